"""jtransfer.lr_find: an exponential sweep under the user's rules, read the fastai way."""

from __future__ import annotations

import functools
import json
import math
import time

import numpy as np
import pytest
from flax import traverse_util

import jtransfer as jt
from jtransfer import data, lr_find, partition, train
from jtransfer.errors import ConfigError

# Training machinery, not convolution numerics: XLA's own convolutions, which
# compile much faster (tests/conftest.py).
XLA_CONVOLUTIONS = True

SIZE, BATCH = 32, 8
ARCH = "resnet18"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("lr_find") / "data"
    return data.make_demo_imagefolder(root, n_per_class=12, size=48, seed=0)


def loader(folder):
    return data.make_loader(folder, batch_size=BATCH, train=True, num_epochs=None, image_size=SIZE)


@functools.cache
def model_and_variables():
    """Random weights and BatchNorm statistics from shapes alone (jitting model.init is slow)."""
    model = jt.models.create(ARCH, num_classes=2)
    return model, jt.models.random_variables(model, SIZE, seed=0)


def flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


NUM_STEPS = 40
START_LR, END_LR = 1e-4, 1e3


@pytest.fixture(scope="module")
def sweep(folder):
    """One sweep (each compiles its step), recording the state after every step."""
    model, variables = model_and_variables()
    rules = partition.rules(ARCH, default="frozen", layer4=1.0, fc=10.0)
    seen = []
    real = train.make_train_step

    def recording(*args, **kwargs):
        assert kwargs["frozen_stages"] == 4  # stem..layer3: no backward pass through them
        step = real(*args, **kwargs)

        def wrapped(state, batch):
            state, metrics = step(state, batch)
            seen.append(flat({"params": state.params, "batch_stats": state.batch_stats}))
            return state, metrics

        return wrapped

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "make_train_step", recording)
        result = lr_find.lr_find(
            model, variables, rules, loader(folder), start_lr=START_LR, end_lr=END_LR,
            num_steps=NUM_STEPS, momentum=0.9, loss_reduction="sum",
        )  # fmt: skip
    return result, seen, flat(variables)


def test_frozen_groups_stay_bit_identical_during_the_sweep(sweep):
    result, seen, before = sweep
    assert len(seen) == len(result.lrs) > 5
    frozen = [k for k in before if not k.split("/")[1].startswith(("layer4", "fc"))]
    assert "params/conv1/kernel" in frozen and "batch_stats/layer3_1/bn2/var" in frozen
    for k in frozen:
        np.testing.assert_array_equal(seen[-1][k], before[k], err_msg=k)
    assert not np.array_equal(seen[-1]["params/fc/kernel"], before["params/fc/kernel"])
    # Trainable stages run BatchNorm in train mode, as the real run will.
    key = "batch_stats/layer4_0/bn1/mean"
    assert not np.array_equal(seen[-1][key], before[key])


def test_the_swept_rates_are_exponential_as_the_optimizer_applies_them(sweep):
    result, _, _ = sweep
    n = len(result.lrs)
    np.testing.assert_allclose(
        result.lrs, np.geomspace(START_LR, END_LR, NUM_STEPS)[:n], rtol=1e-12
    )
    np.testing.assert_allclose(
        np.diff(np.log(result.lrs)), math.log(END_LR / START_LR) / (NUM_STEPS - 1)
    )
    schedule = lr_find._schedule(START_LR, END_LR, NUM_STEPS)
    np.testing.assert_allclose([schedule(i) for i in range(n)], result.lrs, rtol=1e-5)


def test_the_sweep_stops_when_the_loss_diverges(sweep):
    result, _, _ = sweep
    assert result.stopped_early and len(result.lrs) < NUM_STEPS
    diverged = result.smoothed[-1] > 4 * result.smoothed.min()
    assert diverged or len(result.lrs) < NUM_STEPS  # or the next loss was not finite
    assert np.isfinite(result.losses).all()
    np.testing.assert_allclose(result.smoothed, lr_find.smooth_losses(result.losses, 0.98))


def test_the_suggestion_lies_within_the_sweep(sweep):
    result, _, _ = sweep
    assert result.lrs[0] <= result.suggestion <= result.lrs[-1]
    assert result.suggestion == lr_find.steepest(result.lrs, result.smoothed)
    assert result.lrs[0] <= result.suggest("valley") <= result.lrs[-1]


def test_plot_writes_a_png_and_the_numbers_are_json(sweep, tmp_path):
    result, _, _ = sweep
    png = result.plot(tmp_path / "plots" / "lr.png", title="resnet18 on a demo set")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    record = json.loads(json.dumps(result.to_dict()))
    assert record["suggestion_rule"] == "steep" and len(record["lrs"]) == len(result.lrs)


def test_steep_picks_the_steepest_fall_of_the_smoothed_loss():
    lrs = np.geomspace(1e-6, 1.0, 100)
    x = np.log10(lrs)
    # Flat, then falling fastest around 1e-3, then rising again after 1e-1.
    loss = 2.0 - np.tanh((x + 3) * 2) + np.where(x > -1, (x + 1) ** 2 * 20, 0)
    assert lr_find.steepest(lrs, loss) == pytest.approx(1e-3, rel=0.1)
    assert 1e-4 < lr_find.valley(lrs, loss) < 1e-1
    assert lr_find.steepest(lrs[:1], loss[:1]) == lrs[0]


def test_bad_sweeps_are_config_errors(folder):
    model, variables = model_and_variables()
    rules = partition.preset(ARCH, "head")
    for kwargs in ({"start_lr": 1.0, "end_lr": 0.1}, {"num_steps": 1}, {"smooth": 1.0}):
        with pytest.raises(ConfigError):
            lr_find.lr_find(model, variables, rules, [], **kwargs)
    with pytest.raises(ConfigError, match="no batch"):
        lr_find.lr_find(model, variables, rules, [], num_steps=5)


def test_the_command_line_writes_the_plot_and_the_numbers(folder, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    weights = tmp_path / "resnet18_random.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    code = lr_find.main([
        "--data", str(folder.root), "--arch", ARCH, "--weights", str(weights),
        "--freeze", "backbone", "--batch-size", str(BATCH), "--image-size", str(SIZE),
        "--num-steps", "30", "--start-lr", "1e-5", "--end-lr", "10", "--out", str(out),
    ])  # fmt: skip
    elapsed = time.perf_counter() - t0
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "suggested --lr" in printed and "head" in printed  # the rules table
    record = json.loads((out / "lr_find.json").read_text())
    assert 1e-5 <= record["suggestion"] <= 10 and len(record["lrs"]) <= 30
    assert (out / "lr_find.png").stat().st_size > 5000
    print(f"lr-find CLI on resnet18, 30 steps at {SIZE} px: {elapsed:.1f} s")


def test_the_command_line_reports_a_missing_folder_in_one_line(tmp_path, capsys):
    code = lr_find.main(["--data", str(tmp_path / "nope"), "--weights", "none"])
    assert code == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
