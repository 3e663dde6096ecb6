"""`precision`: the float32 precision of a step's convolutions and products, and parity's.

On a GPU the default float32 precision is TensorFloat-32 for XLA (and for torch's
cuDNN convolutions); parity must run both sides at full float32. The CPU computes
float32 in full either way, so these tests check what is compiled (the precision
of every convolution and product in the lowered step) and that the CPU's bits do
not change; the GPU's figures come from benchmarks/gpu_check.py.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jtransfer as jt
from jtransfer import fit, train
from jtransfer.errors import ConfigError

XLA_CONVOLUTIONS = True


@pytest.fixture(scope="module")
def setup():
    model = jt.models.create("resnet18", num_classes=2)
    variables = jt.models.random_variables(model, image_size=32)
    tx = optax.sgd(1e-3)
    batch = {
        "image": jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32),
        "label": jnp.array([0, 1]),
    }
    return model, variables, tx, batch


def _precisions(hlo: str) -> set[str]:
    """The precision of every dot_general and convolution in lowered StableHLO text."""
    ops = [line for line in hlo.splitlines() if "dot_general" in line or "convolution" in line]
    assert ops
    found = set()
    for line in ops:
        # dot_general: `precision = [HIGHEST, ...`; convolution:
        # `precision_config = [#stablehlo<precision HIGHEST>, ...`; absent: DEFAULT.
        m = re.search(r"precision(?:_config)? = \[(?:#stablehlo<precision )?(\w+)", line)
        found.add(m.group(1) if m else "DEFAULT")
    return found


def test_highest_is_compiled_into_every_convolution_and_product(setup):
    model, variables, tx, batch = setup
    state = train.create_train_state(model, variables, tx)
    default = train.make_train_step(model, tx, donate=False)
    highest = train.make_train_step(model, tx, donate=False, precision="highest")
    assert _precisions(highest.lower(state, batch).as_text()) == {"HIGHEST"}
    assert _precisions(default.lower(state, batch).as_text()) == {"DEFAULT"}
    ev = train.make_eval_step(model, precision="highest")
    assert _precisions(ev.lower(state, batch).as_text()) == {"HIGHEST"}


def test_on_the_cpu_highest_gives_the_same_bits(setup):
    model, variables, tx, batch = setup
    results = []
    for precision in (None, "highest"):
        state = train.create_train_state(model, variables, tx)
        step = train.make_train_step(model, tx, precision=precision)
        state, metrics = step(state, batch)
        results.append((float(metrics["loss"]), state.params))
    assert results[0][0] == results[1][0]
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1]), strict=True):
        np.testing.assert_array_equal(a, b)
    # fit's inference path takes it too.
    logits = [fit.predict(model, variables, batch["image"], precision=p) for p in (None, "highest")]
    np.testing.assert_array_equal(*logits)


@pytest.mark.parametrize("bad", ["fp32", "HIGHEST", 32])
def test_an_unknown_precision_is_refused_naming_the_choices(setup, bad):
    model, _, tx, _ = setup
    with pytest.raises(ConfigError, match="'highest'"):
        train.make_train_step(model, tx, precision=bad)


def test_full_float32_sets_both_frameworks_and_restores_them():
    torch = pytest.importorskip("torch")
    from porting import parity

    flags = parity._torch_tf32_flags()
    before = [getattr(obj, name) for obj, name in flags]
    jax_before = jax.config.jax_default_matmul_precision
    with pytest.raises(RuntimeError, match="inside"):
        with parity.full_float32():
            assert jax.config.jax_default_matmul_precision == "highest"
            for obj, name in flags:
                assert getattr(obj, name) in ("ieee", False), name
            if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
                assert torch.backends.cudnn.conv.fp32_precision == "ieee"
            raise RuntimeError("inside")
    assert [getattr(obj, name) for obj, name in flags] == before
    assert jax.config.jax_default_matmul_precision == jax_before
