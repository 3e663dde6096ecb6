"""jtransfer.fit: the epoch loop on a tiny generated image folder, end to end on CPU."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jtransfer as jt
from jtransfer import data, fit, partition
from jtransfer.errors import ConfigError, NonFiniteLossError

# Training machinery, not convolution numerics: XLA's own convolutions, which
# compile much faster (tests/conftest.py).
XLA_CONVOLUTIONS = True

SIZE = 32  # pixels: ResNet-18 runs at any size, and the compiled step stays cheap on 2 cores
BATCH = 8
ARCH = "resnet18"


def random_variables(model, seed: int = 0):
    """torchvision-like random init from shapes alone (compiling `model.init` costs ~20 s)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel" and len(leaf.shape) == 4:  # Kaiming normal, fan_out
            fan_out = leaf.shape[0] * leaf.shape[1] * leaf.shape[3]
            return rng.normal(0, math.sqrt(2 / fan_out), leaf.shape).astype(np.float32)
        if name == "kernel":
            bound = 1 / math.sqrt(leaf.shape[0])
            return rng.uniform(-bound, bound, leaf.shape).astype(np.float32)
        fill_value = 1.0 if name in ("scale", "var") else 0.0
        return np.full(leaf.shape, fill_value, np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def state_arrays(state) -> dict[str, np.ndarray]:
    return flat({"params": state.params, "batch_stats": state.batch_stats})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit_data")
    train = data.make_demo_imagefolder(root / "train", n_per_class=16, size=SIZE, seed=0)
    test = data.make_demo_imagefolder(root / "test", n_per_class=8, size=SIZE, seed=1)
    return train, test


def loaders(folders, test_batch: int = BATCH, num_epochs=None):
    train, test = folders
    train_loader = data.make_loader(
        train, batch_size=BATCH, train=True, num_epochs=num_epochs, image_size=SIZE
    )
    test_loader = data.make_loader(
        test, batch_size=test_batch, train=False, image_size=SIZE, resize_size=(36, 36)
    )
    return train_loader, test_loader


@pytest.fixture(scope="module")
def model():
    return jt.models.create(ARCH, num_classes=2)


@pytest.fixture(scope="module")
def variables(model):
    return random_variables(model)


@pytest.fixture(scope="module")
def trained(folders, model, variables):
    """d2l's recipe from scratch (summed loss, plain SGD, BN in train mode), 4 epochs."""
    # Test batches of 6 leave a partial last batch (16 = 6 + 6 + 4): padded, then left out.
    train_loader, test_loader = loaders(folders, test_batch=6)
    state, history = fit.fit(
        model,
        variables,
        partition.rules(ARCH, default=1.0),
        train_loader,
        test_loader,
        learning_rate=2e-3,
        epochs=4,
        loss_reduction="sum",
        progress=False,
        log=None,
    )
    return state, history, test_loader


def test_fit_learns_the_demo_data(trained):
    _, history, _ = trained
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert max(h["test_acc"] for h in history) >= 0.75  # chance is 0.5
    assert history[-1]["train_acc"] > 0.6


def test_history_has_one_entry_per_epoch_with_d2l_numbers(trained):
    state, history, _ = trained
    steps_per_epoch = 32 // BATCH
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert [h["step"] for h in history] == [steps_per_epoch * e for e in (1, 2, 3, 4)]
    assert int(state.step) == 4 * steps_per_epoch
    for h in history:
        assert tuple(h) == fit.HISTORY_KEYS
        assert h["train_count"] == 32 and h["test_count"] == 16 and h["skipped"] == 0
        assert 0 <= h["train_acc"] <= 1 and 0 <= h["test_acc"] <= 1
        assert h["train_loss"] > 0 and h["test_loss"] > 0
        assert h["examples_per_s"] > 0 and h["epoch_s"] > 0
    # The first step compiles; it is timed apart and left out of the throughput.
    assert history[0]["compile_s"] > 0
    assert all(h["compile_s"] == 0 for h in history[1:])
    assert history[0]["epoch_s"] > history[0]["compile_s"]
    line = fit.format_epoch(history[0], 4, "run")
    assert line.startswith("run: epoch 1/4: loss ") and "examples/sec" in line


def test_evaluate_and_predict_agree_with_the_history(trained, model):
    state, history, test_loader = trained
    result = fit.evaluate(model, state, test_loader)
    assert result["count"] == 16
    assert result["accuracy"] == history[-1]["test_acc"]
    assert result["loss"] == pytest.approx(history[-1]["test_loss"], rel=1e-6)

    batches = list(test_loader)
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = fit.predict(model, variables, images, batch_size=6)
    assert logits.shape == (16, 2)
    assert np.mean(logits.argmax(-1) == labels) == result["accuracy"]
    # One image compiles another program than a batch of 16 (other conv kernels): rounding only.
    scale = float(np.abs(logits).max())
    np.testing.assert_allclose(
        fit.predict(model, variables, images[3]), logits[3], rtol=1e-5, atol=1e-5 * scale
    )


@pytest.fixture(scope="module")
def head_only(folders, model, variables):
    """A frozen backbone (feature extraction) with momentum, 2 epochs, uninterrupted."""
    kwargs = dict(learning_rate=1e-2, momentum=0.9, epochs=2, progress=False, log=None)
    train_loader, test_loader = loaders(folders)
    rules = partition.preset(ARCH, "head")
    after_epoch = {}

    def snapshot(epoch, state, metrics):
        after_epoch[epoch] = state_arrays(state)

    state, history = fit.fit(
        model, variables, rules, train_loader, test_loader, on_epoch_end=snapshot, **kwargs
    )
    return rules, kwargs, state, history, after_epoch


def test_frozen_backbone_stays_bit_identical_under_bn_train(head_only, model, variables):
    rules, _, state, _, _ = head_only
    assert fit.frozen_stages_for(ARCH, rules) == 5  # stem..layer4: no backward through them
    before, after = flat(variables), state_arrays(state)
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    assert changed == ["params/fc/bias", "params/fc/kernel"]
    # The optimizer keeps momentum for the head only.
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert sum(np.size(x) for x in moments) == 512 * 2 + 2


def test_interrupted_runs_resume_exactly_through_the_hooks(head_only, folders, model, variables):
    rules, kwargs, full_state, full_history, after_epoch = head_only
    train_loader, test_loader = loaders(folders)
    saved = {}

    # 1. Killed mid-epoch: on_step_end saw the state and the loader position (a checkpoint).
    class Killed(Exception):
        pass

    def kill_at_step_3(state, info):
        if info.step == 3:
            assert (info.epoch, info.index) == (0, 2)
            saved["state"] = jax.tree.map(np.array, state)
            saved["loader"] = info.loader_state()
            raise Killed

    with pytest.raises(Killed):
        fit.fit(model, variables, rules, train_loader, on_step_end=kill_at_step_3, **kwargs)

    # 2. Resumed from that checkpoint; on_epoch_end stops it after the first epoch.
    def stop(epoch, state, metrics):
        saved["state"] = jax.tree.map(np.array, state)
        return True

    _, history = fit.fit(
        model,
        None,
        rules,
        train_loader,
        state=saved["state"],
        loader_state=saved["loader"],
        on_epoch_end=stop,
        **kwargs,
    )
    assert [h["epoch"] for h in history] == [1]
    assert history[0]["train_count"] == BATCH  # the rest of the interrupted epoch
    for k, v in after_epoch[1].items():
        np.testing.assert_array_equal(state_arrays(saved["state"])[k], v, err_msg=k)

    # 3. Resumed at an epoch boundary: the same end as the uninterrupted run.
    state, rest = fit.fit(
        model,
        None,
        rules,
        train_loader,
        test_loader,
        state=saved["state"],
        start_epoch=1,
        **kwargs,
    )
    assert [h["epoch"] for h in rest] == [2]
    assert rest[0]["test_acc"] == full_history[1]["test_acc"]
    for k, v in state_arrays(full_state).items():
        np.testing.assert_array_equal(state_arrays(state)[k], v, err_msg=k)


class NaNInSecondEpoch:
    """A plain re-iterable loader: two batches per epoch; epoch 2's second one holds a NaN."""

    def __init__(self):
        self.epochs_started = 0

    def __iter__(self):
        self.epochs_started += 1
        rng = np.random.default_rng(self.epochs_started)
        for i in range(2):
            image = rng.normal(size=(4, SIZE, SIZE, 3)).astype(np.float32)
            if self.epochs_started == 2 and i == 1:
                image[0, 0, 0, 0] = np.nan  # one bad pixel
            yield {"image": image, "label": np.arange(4) % 2}


def test_nan_loss_stops_training_and_names_the_step(model, variables):
    loader, lines = NaNInSecondEpoch(), []
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        fit.fit(
            model,
            variables,
            partition.preset(ARCH, "head"),
            loader,
            learning_rate=1e-3,
            momentum=0.9,
            epochs=3,
            progress=False,
            log=lines.append,
        )
    assert loader.epochs_started == 2
    assert len(lines) == 1 and lines[0].startswith("epoch 1/3: loss ")


def test_loaders_that_cannot_serve_every_epoch_are_refused(folders, model, variables):
    train_loader, _ = loaders(folders, num_epochs=1)
    kwargs = dict(learning_rate=1e-3, epochs=2, log=None)
    with pytest.raises(ConfigError, match="num_epochs=None"):
        fit.fit(model, variables, partition.finetune(ARCH), train_loader, **kwargs)
    with pytest.raises(ConfigError, match="no batch in epoch 1"):
        fit.fit(model, variables, partition.finetune(ARCH), iter([]), **kwargs)


@pytest.mark.parametrize("arch", jt.models.ARCHS)
def test_infer_arch_names_every_registered_model(arch):
    assert fit.infer_arch(jt.models.create(arch, num_classes=3)) == arch


def _batches(seed: int, bad: dict[int, float] | None = None, n: int = 3) -> list[dict]:
    """`n` random batches of 4; batch i of `bad` gets one pixel set to `bad[i]` (NaN or inf)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = rng.normal(size=(4, SIZE, SIZE, 3)).astype(np.float32)
        if i in (bad or {}):
            image[1, 5, 5, 0] = bad[i]
        out.append({"image": image, "label": np.arange(4, dtype=np.int32) % 2})
    return out


# layer4 and fc train, so BatchNorm statistics change and a skipped step must restore them.
LAYER4_AND_HEAD = partition.rules(ARCH, default="frozen", layer4=1.0, fc=10.0)
SKIP_KWARGS = dict(learning_rate=1e-2, momentum=0.9, loss_reduction="mean", progress=False)


def test_skip_nonfinite_is_bit_identical_to_leaving_the_bad_batches_out(model, variables):
    good = _batches(0)
    nan_batch, inf_batch = _batches(1, bad={0: np.nan, 1: np.inf}, n=2)
    with_bad = [good[0], nan_batch, good[1], inf_batch, good[2]]  # each epoch iterates it
    lines: list[str] = []
    skipped, history = fit.fit(
        model,
        variables,
        LAYER4_AND_HEAD,
        with_bad,
        epochs=2,
        skip_nonfinite=True,
        log=lines.append,
        **SKIP_KWARGS,
    )
    # The same run on the good batches alone. (It keeps skip_nonfinite on: the flag changes
    # how XLA fuses the BatchNorm running-statistics update, which can move those by one
    # float32 ulp against a run without it.)
    reference, _ = fit.fit(
        model,
        variables,
        LAYER4_AND_HEAD,
        good,
        epochs=2,
        skip_nonfinite=True,
        log=None,
        **SKIP_KWARGS,
    )
    assert [h["skipped"] for h in history] == [2, 2]
    assert all("skipped 2 non-finite step(s)" in line for line in lines)
    assert [h["train_count"] for h in history] == [12, 12]  # bad batches left out
    assert all(math.isfinite(h["train_loss"]) for h in history)
    # params, BatchNorm statistics and optimizer state (momentum, counts) bit for bit;
    # only the step counter also counted the two bad batches of each epoch.
    assert (int(skipped.step), int(reference.step)) == (10, 6)
    for part in ("params", "batch_stats", "opt_state"):
        got, want = getattr(skipped, part), getattr(reference, part)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), part
    # The comparison covers BatchNorm statistics that training moved (layer4's).
    before, after = flat(variables["batch_stats"]), flat(skipped.batch_stats)
    assert sorted({k.split("/")[0] for k in before if not np.array_equal(before[k], after[k])}) == [
        "layer4_0",
        "layer4_1",
    ]


class PerEpoch:
    """A re-iterable loader serving a different list of batches in each epoch."""

    def __init__(self, *epochs: list[dict]) -> None:
        self.epochs = epochs
        self.started = 0

    def __iter__(self):
        self.started += 1
        return iter(self.epochs[self.started - 1])


@pytest.mark.parametrize(
    ("epochs", "limit", "message"),
    [
        # A streak across the epoch boundary: steps 2, 3 and 4 (0-based).
        (
            lambda g, b: ([g[0], g[1], b[0]], [b[1], b[2], g[2]]),
            3,
            r"3 steps in a row .*steps 2\.\.4.*each was skipped.*before step 2.*lower it",
        ),
        # A whole epoch of them, fewer than the limit.
        (
            lambda g, b: (g, b),
            10,
            r"every one of the 3 step\(s\) of epoch 2 .*skipped.*lower it",
        ),
    ],
    ids=["in a row", "whole epoch"],
)
def test_skip_nonfinite_still_stops_a_diverged_run(model, variables, epochs, limit, message):
    good, bad = _batches(0), _batches(1, bad={0: np.nan, 1: np.nan, 2: np.inf})
    lines: list[str] = []
    with pytest.raises(NonFiniteLossError, match=message):
        fit.fit(
            model,
            variables,
            partition.preset(ARCH, "head"),
            PerEpoch(*epochs(good, bad)),
            epochs=2,
            skip_nonfinite=True,
            max_consecutive_skips=limit,
            log=lines.append,
            **SKIP_KWARGS,
        )
    assert len(lines) == 1  # epoch 1 finished and was reported


def test_max_consecutive_skips_must_be_positive(model, variables):
    with pytest.raises(ConfigError, match="max_consecutive_skips must be an int >= 1"):
        fit.fit(
            model,
            variables,
            partition.finetune(ARCH),
            [],
            epochs=1,
            skip_nonfinite=True,
            max_consecutive_skips=0,
            learning_rate=1e-3,
        )
