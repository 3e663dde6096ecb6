"""Training parity in float64: jtransfer computes what torch computes, to float64 rounding.

In float32 the full fine-tuning recipes (d2l, per_layer) cannot meet the targets:
a pre-activation within rounding of 0 lands on either side of its ReLU in one
implementation and the other (test_training_parity explains). In float64 no
pre-activation comes that close, so both sides take the same branch at every
kink, and the runs must agree for every quantity of every scenario: the check
that the two compute the same algorithm (`porting.training`, precision "float64").

x64 is process-wide and must be on before jax makes an array, so the runs go
through `python -m porting.training --float64` in a fresh process and the pytest
worker's jax stays float32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from memory_lock import one_at_a_time

from porting import training as T

# Issue #4's targets.
TARGET_FIRST_STEP = 1e-5
TARGET_TEN_STEPS = 1e-4
# What float64 actually allows, by the dtype `train` computed the loss in. It
# casts the logits to float32 before the cross-entropy whatever the model's
# dtype, so the loss and the gradient leaving it carry float32 rounding (~1e-7;
# measured worst 5.6e-7, vgg's params after 10 steps). With a float64 loss every
# quantity agrees to ~1e-14 (measured worst 4e-14).
TIGHT = {"float32": 2e-6, "float64": 1e-10}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_float64(tmp_path, *args: str, **env: str) -> list[dict]:
    """`python -m porting.training --float64 ARGS` in a fresh process (`env` added to
    its environment); its reports, in the order it ran them."""
    out = tmp_path / "parity.json"
    proc = subprocess.run(
        [sys.executable, "-m", "porting.training", "--float64", "-q", "--json", str(out), *args],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu", **env),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    return json.loads(out.read_text())


def worst(report: dict, quantity: str, first_steps: int | None = None) -> float:
    return max(step[quantity] for step in report["steps"][:first_steps])


# The recipes whose BatchNorm trains, the ones float32 cannot check past the first step
# (test_training_parity explains). The frozen-backbone recipes (BatchNorm in eval mode) meet
# the ten-step targets in float32 on both convolution paths (test_training_parity), so here
# they would repeat that at twice the suite time; `python -m porting.training --float64`
# runs them too (docs/parity.md).
AUTO_SCENARIOS = ("d2l", "per_layer", "vgg_bn_features")
# Both convolution paths: jtransfer's CPU forms ("auto") run those three; XLA's own
# convolutions with XLA's autodiff ("xla", the path of every GPU and TPU) run d2l, a ResNet
# whose every layer trains with train-mode BatchNorm. What differs between the paths is how
# a convolution and its gradients are computed, which d2l's layers exercise: per_layer
# differs from d2l in the recipe (per-layer rates, a frozen prefix), vgg_bn_features in the
# network (VGG's pools, flatten and classifier are the same code on both paths; its
# convolutions and BatchNorm are the layers d2l trains, and VGG-13-BN's train-mode forward
# on XLA's path is in test_parity). Both pass on "xla" too (`JTRANSFER_CONV=xla python -m
# porting.training --float64`); here the second 7.5 GB VGG run would cost the suite about
# a minute.
XLA_SCENARIOS = ("d2l",)
CASES = [("auto", name) for name in AUTO_SCENARIOS] + [("xla", name) for name in XLA_SCENARIOS]


# About 9 GiB at its peak (VGG-11-BN's 103M-parameter classifier_0 in float64, on both
# sides): it runs in its own process, never beside the other memory-heavy tests.
MEMORY_HEAVY = ("vgg_bn_features",)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    runs: dict[str, dict | BaseException] = {}

    def run(path: str, names: tuple[str, ...]) -> dict[str, dict]:
        env = {"JTRANSFER_CONV": "xla"} if path == "xla" else {}
        tmp = tmp_path_factory.mktemp(f"float64_{path}")
        out: dict[str, dict] = {}
        light = [n for n in names if n not in MEMORY_HEAVY]
        if light:
            out.update({r["scenario"]: r for r in run_float64(tmp, "--scenarios", *light, **env)})
        for name in (n for n in names if n in MEMORY_HEAVY):
            with one_at_a_time():
                out.update({r["scenario"]: r for r in run_float64(tmp, "--scenarios", name, **env)})
        return out

    def get(path: str) -> dict[str, dict]:
        if path not in runs:
            try:
                runs[path] = run(path, AUTO_SCENARIOS if path == "auto" else XLA_SCENARIOS)
            except BaseException as e:  # one failed run fails each of its tests, once
                runs[path] = e
                raise
        if isinstance(runs[path], BaseException):
            raise runs[path]
        return runs[path]

    return get


@pytest.mark.parametrize("conv_path,name", CASES)
def test_batchnorm_recipes_match_torch_in_float64_at_every_step(reports, conv_path, name):
    report = reports(conv_path)[name]
    assert report["precision"] == "float64"
    assert len(report["steps"]) == T.SCENARIOS[name].steps
    tight = TIGHT[report["jax_loss_dtype"]]
    for q in T.QUANTITIES:
        where = (q, report["worst_tensor"])
        assert worst(report, q, 1) <= TARGET_FIRST_STEP, where
        assert worst(report, q) <= TARGET_TEN_STEPS, where
        assert worst(report, q) <= tight, where


def test_conv_biases_before_train_mode_batchnorm_are_judged_by_their_layer():
    """VGG-BN's conv biases have a true gradient of exactly 0 (the BatchNorm after
    them subtracts the batch mean), so both sides compute rounding noise for it;
    `compare` measures that noise against the layer's weight gradient (issue 24,
    docs/parity.md). Every trainable conv of vgg11_bn's features is such a case,
    and nothing else is."""
    s = T.SCENARIOS["vgg_bn_features"]
    noise = T.zero_gradient_biases(s)
    assert len(noise) == 8 and all(b.startswith("features.") for b in noise)
    assert noise["features.0.bias"] == "features.0.weight"
    assert T.zero_gradient_biases(T.SCENARIOS["d2l"]) == {}
    assert T.zero_gradient_biases(replace(s, bn_policy="frozen")) == {}
    # The measure: noise of 1e-16 on a bias whose weight gradient is ~1 is 1e-16,
    # not the 100% that noise against noise gives.
    got = {"b": np.array([3e-16]), "w": np.array([1.0])}
    ref = {"b": np.array([-2e-16]), "w": np.array([1.0])}
    assert T.tensor_errors(got, ref)["b"] == pytest.approx(5e-16 / 2e-16)
    assert T.tensor_errors(got, ref, scale_from={"b": "w"})["b"] == pytest.approx(5e-16)


@pytest.fixture(scope="module")
def wrong_recipes(tmp_path_factory) -> dict[str, dict]:
    # The recipe, not the convolutions, is under test: XLA's own compile faster. Every
    # mistake runs in one process.
    tmp = tmp_path_factory.mktemp("recipe_errors")
    args = ("--scenarios", "d2l", "--steps", "2", "--recipe-error", *T.RECIPE_ERRORS)
    return {r["recipe_error"]: r for r in run_float64(tmp, *args, JTRANSFER_CONV="xla")}


@pytest.mark.parametrize("error", list(T.RECIPE_ERRORS))
def test_a_wrong_recipe_on_the_jax_side_fails_the_comparison(wrong_recipes, error):
    """The comparison is not blind: one recipe mistake on the jax side shows.

    A head at 1x instead of d2l's 10x moves the head's params by ~2e-2 at step 1,
    far past even the issue's targets. A 10x weight decay moves d2l's params by
    only lr * 9e-3 * |p| ~ 5e-6 per step, which the issue's 1e-5 / 1e-4 targets do
    not see: only the float64 bound does.
    """
    report = wrong_recipes[error]
    assert report["scenario"] == "d2l" and len(report["steps"]) == 2
    # d2l passes with the right recipe (above); with this mistake it fails there.
    assert worst(report, "params") > TIGHT[report["jax_loss_dtype"]], report["steps"]
    if error == "head_lr_mult":
        assert worst(report, "params", 1) > 100 * TARGET_FIRST_STEP, report["steps"]
