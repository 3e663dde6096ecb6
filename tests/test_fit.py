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
        assert h["train_count"] == 32 and h["test_count"] == 16
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
    np.testing.assert_allclose(fit.predict(model, variables, images[3]), logits[3], rtol=1e-5)


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
