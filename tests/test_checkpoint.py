"""Checkpoints: exact round trip, best-k retention, fallback past corrupt ones, loud mismatches."""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jtransfer as jt
from jtransfer import checkpoint, data, partition, train
from jtransfer.checkpoint import Checkpointer, CheckpointWarning
from jtransfer.errors import CheckpointError

# Training machinery, not convolution numerics: XLA's own convolutions, which
# compile much faster (tests/conftest.py).
XLA_CONVOLUTIONS = True

# tensorstore may leave an asyncio callback behind when reading a damaged file fails.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

RULES = [("fc/.*", 10.0), ("(?!fc/).*", 1.0)]


def _small_state(seed: int = 0, steps: int = 3) -> train.TrainState:
    """A TrainState with a real multi-label SGD-momentum state after a few updates."""
    rng = np.random.default_rng(seed)
    params = {
        "conv1": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 8)), jnp.float32)},
        "fc": {
            "kernel": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
            "bias": jnp.zeros((2,), jnp.float32),
        },
    }
    tx = partition.make_optimizer(params, RULES, learning_rate=0.1, momentum=0.9)
    opt_state = tx.init(params)
    for _ in range(steps):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return train.TrainState(
        step=jnp.asarray(steps, jnp.int32),
        params=params,
        batch_stats={"bn1": {"mean": jnp.arange(8.0), "var": jnp.ones(8)}},
        opt_state=opt_state,
        rng=jax.random.PRNGKey(seed + 7),
    )


def _at_step(state: train.TrainState, step: int) -> train.TrainState:
    return state.replace(step=jnp.asarray(step, jnp.int32))


def _assert_identical(a, b) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> data.ImageFolder:
    root = tmp_path_factory.mktemp("images") / "train"
    return data.make_demo_imagefolder(root, n_per_class=4, size=24)


def test_round_trip_is_bit_exact_with_optimizer_rng_and_loader_state(tmp_path, folder):
    loader = data.make_loader(folder, batch_size=2, train=True, seed=3, image_size=16)
    it = iter(loader)
    next(it), next(it)
    state = _small_state()
    with Checkpointer(tmp_path / "ck", metadata={"arch": "resnet18"}) as ckpt:
        assert ckpt.save(
            state,
            epoch=1,
            loader_state=it.get_state(),
            phase="frozen",
            extra={"note": "x"},
            force=True,
        )
    expected_batch = next(it)
    it.close()

    ckpt = Checkpointer(tmp_path / "ck")
    restored = ckpt.restore_latest(checkpoint.abstract_state(_small_state(seed=1)))
    _assert_identical(restored.state, state)
    assert isinstance(restored.state, train.TrainState)
    assert (restored.step, restored.epoch, restored.phase) == (3, 1, "frozen")
    assert restored.extra == {"note": "x"}
    assert restored.metadata["arch"] == "resnet18"
    assert restored.metadata["jtransfer_version"] == jt.__version__
    # Where training stood, without reading the arrays.
    progress = checkpoint.read_progress(tmp_path / "ck")
    assert (progress["step"], progress["epoch"], progress["phase"]) == (3, 1, "frozen")
    assert progress["extra"] == {"note": "x"} and "crc32" not in progress

    resumed = iter(loader)
    resumed.set_state(restored.loader_state)
    batch = next(resumed)
    resumed.close()
    np.testing.assert_array_equal(batch["image"], expected_batch["image"])
    np.testing.assert_array_equal(batch["label"], expected_batch["label"])


def test_save_copies_arrays_so_donating_the_state_right_after_is_safe(tmp_path):
    state = _small_state()
    expected = jax.tree.map(np.array, state)
    scramble = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 + 1, s), donate_argnums=0)
    ckpt = Checkpointer(tmp_path, best_metric=None)
    ckpt.save(state, force=True)
    scramble(state)  # the next train step donates (and overwrites) the saved buffers
    ckpt.close()
    restored = Checkpointer(tmp_path).restore_latest(checkpoint.abstract_state(expected))
    _assert_identical(restored.state, expected)


def test_interval_saves_and_epoch_end_resave_with_metrics(tmp_path):
    state = _small_state()
    with Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=5) as ckpt:
        saved = [ckpt.save(_at_step(state, s)) for s in range(1, 6)]
        assert saved == [False, True, False, True, False]
        # The epoch ends at step 4: saved again, now with the metric that ranks it.
        assert ckpt.save(_at_step(state, 4), metrics={"test_acc": 0.5}, force=True)
        assert ckpt.save(_at_step(state, 4), force=True) is False  # nothing new to add
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2, 4]
        assert ckpt.best_step() == 4


@pytest.mark.parametrize(
    ("mode", "values", "kept", "best"),
    [
        ("max", [0.5, 0.9, 0.7, 0.8, 0.6], [2, 4, 5], 2),
        ("min", [0.5, 0.1, 0.7, 0.3, 0.6], [2, 4, 5], 2),
    ],
)
def test_keeps_the_best_k_by_metric_plus_the_latest(tmp_path, mode, values, kept, best):
    state = _small_state()
    with Checkpointer(tmp_path, max_to_keep=1, keep_best=2, best_mode=mode) as ckpt:
        for step, value in enumerate(values, start=1):
            ckpt.save(_at_step(state, step), metrics={"test_acc": value}, force=True)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == kept
        assert ckpt.best_step() == best
    # A new manager on the same directory sees the same ranking.
    assert Checkpointer(tmp_path, best_mode=mode).best_step() == best


def _array_files(step_dir: Path) -> list[Path]:
    return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


def _truncate_arrays(step_dir: Path) -> None:
    for p in _array_files(step_dir):
        p.write_bytes(b"")


def _flip_array_bytes(step_dir: Path) -> None:
    # Damage the stored values without breaking the container format: only the checksums
    # saved with the checkpoint can tell.
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(step_dir / "state")
    flipped = jax.tree.map(lambda x: np.asarray(x) + 1, tree)
    shutil.rmtree(step_dir / "state")
    with ocp.StandardCheckpointer() as writer:
        writer.save(step_dir / "state", flipped)


def _garble_json(step_dir: Path) -> None:
    (step_dir / "progress" / "metadata").write_text("{not json")


def _remove_manifest(step_dir: Path) -> None:
    (step_dir / "state" / "manifest.ocdbt").unlink()


CORRUPTIONS = {
    "truncated arrays": _truncate_arrays,
    "changed values": _flip_array_bytes,
    "garbled json": _garble_json,
    "missing manifest": _remove_manifest,
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_latest_falls_back_to_the_previous_one_with_a_warning(tmp_path, corrupt):
    state = _small_state()
    with Checkpointer(tmp_path, max_to_keep=3, best_metric=None) as ckpt:
        ckpt.save(_at_step(state, 1), force=True)
        ckpt.save(_at_step(_small_state(seed=5), 2), force=True)
    corrupt(tmp_path / "2")

    ckpt = Checkpointer(tmp_path, max_to_keep=3, best_metric=None)
    with pytest.warns(CheckpointWarning, match=r"(?s)checkpoint .*2.* falling back to step 1"):
        restored = ckpt.restore_latest(checkpoint.abstract_state(state))
    assert restored.step == 1
    _assert_identical(restored.state, _at_step(state, 1))
    # The bad one is moved aside, so the resumed run can save step 2 again.
    assert ckpt.all_steps() == [1]
    assert [p.name[: len("corrupt-2-")] for p in tmp_path.glob("corrupt-*")] == ["corrupt-2-"]
    assert ckpt.save(_at_step(state, 2), force=True)
    ckpt.close()


def test_every_checkpoint_corrupt_raises_never_restarts_silently(tmp_path):
    state = _small_state()
    with Checkpointer(tmp_path, max_to_keep=3, best_metric=None) as ckpt:
        ckpt.save(_at_step(state, 1), force=True)
        ckpt.save(_at_step(state, 2), force=True)
    _truncate_arrays(tmp_path / "1")
    _garble_json(tmp_path / "2")
    ckpt = Checkpointer(tmp_path, best_metric=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        with pytest.raises(CheckpointError, match=r"(?s)every checkpoint.*step 2.*step 1"):
            ckpt.restore_latest(checkpoint.abstract_state(state))


def test_a_save_that_never_finished_is_ignored(tmp_path):
    state = _small_state()
    with Checkpointer(tmp_path, best_metric=None) as ckpt:
        ckpt.save(_at_step(state, 1), force=True)
    # What a run killed mid-save leaves: Orbax's temporary directory, never renamed.
    partial = tmp_path / "2.orbax-checkpoint-tmp-1700000000000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_bytes(b"\x00" * 10)
    assert checkpoint.checkpoint_steps(tmp_path) == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored = Checkpointer(tmp_path, best_metric=None).restore_latest(
            checkpoint.abstract_state(state)
        )
    assert restored.step == 1


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    ckpt = Checkpointer(tmp_path / "new")
    assert ckpt.restore_latest(checkpoint.abstract_state(_small_state())) is None
    assert ckpt.latest_step() is None


@functools.cache
def _resnet_state(arch: str, num_classes: int) -> train.TrainState:
    """A TrainState of `arch` (zeros, random head), built from shapes without compiling."""
    model = jt.models.create(arch, num_classes=num_classes)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(num_classes)
    variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), dict(shapes))
    tx = partition.make_optimizer(
        variables["params"], partition.finetune(arch), learning_rate=0.1, momentum=0.9
    )
    return train.TrainState(
        step=jnp.asarray(4, jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        rng=jax.random.PRNGKey(0),
    )


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("resnet18")
    meta = {"arch": "resnet18", "num_classes": 2, "classes": ["a", "b"], "image_size": 32}
    with Checkpointer(directory, metadata=meta, max_to_keep=1, keep_best=1) as ckpt:
        state = _resnet_state("resnet18", 2)
        ckpt.save(_at_step(state, 4), metrics={"test_acc": 0.9}, force=True)
        ckpt.save(_at_step(state, 8), metrics={"test_acc": 0.6}, force=True)
    return directory


@pytest.mark.parametrize(
    ("arch", "num_classes", "expected"),
    [
        (
            "resnet18",
            3,
            [
                "num_classes: checkpoint 2, now 3",
                "params/fc/kernel: checkpoint (512, 2), model (512, 3)",
                "params/fc/bias",
            ],
        ),
        (
            "resnet34",
            2,
            [
                "arch: checkpoint 'resnet18', now 'resnet34'",
                "missing from the checkpoint",
                "params/layer1_2/conv1/kernel",
            ],
        ),
    ],
)
def test_other_arch_or_num_classes_lists_the_mismatches(resnet_dir, arch, num_classes, expected):
    ckpt = Checkpointer(resnet_dir, metadata={"arch": arch, "num_classes": num_classes})
    with pytest.raises(CheckpointError) as e:
        ckpt.restore_latest(checkpoint.abstract_state(_resnet_state(arch, num_classes)))
    for text in expected:
        assert text in str(e.value)
    assert checkpoint.checkpoint_steps(resnet_dir) == [4, 8]  # a mismatch is not corruption


@pytest.mark.parametrize(("which", "step"), [("best", 4), ("latest", 8), (8, 8)])
def test_load_for_inference_needs_only_the_directory(resnet_dir, which, step):
    model, variables, meta = checkpoint.load_for_inference(resnet_dir, which)
    assert meta["step"] == step
    assert meta["classes"] == ["a", "b"] and meta["image_size"] == 32
    assert model.num_classes == 2
    saved = _resnet_state("resnet18", 2)
    _assert_identical(variables, {"params": saved.params, "batch_stats": saved.batch_stats})


def test_load_for_inference_without_checkpoints_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load_for_inference(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.load_for_inference(tmp_path)


def test_unwritable_directory_fails_at_construction(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot write checkpoints"):
        Checkpointer(blocker / "ckpt")
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(CheckpointError, match="cannot write checkpoints"):
            Checkpointer(locked / "ckpt")


def test_not_enough_disk_fails_before_training(tmp_path, monkeypatch):
    state = _small_state()
    ckpt = Checkpointer(tmp_path, max_to_keep=2, keep_best=1)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: usage._replace(free=1000))
    with pytest.raises(CheckpointError, match=r"not enough disk space.*1,?0?.*free"):
        ckpt.check_space(checkpoint.abstract_state(state))
    unchecked = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match="not enough disk space"):
        unchecked.save(state, force=True)  # a save without an explicit check checks first
    monkeypatch.undo()
    ckpt.check_space(state)
    assert unchecked.all_steps() == []


def test_a_checkpoint_the_writer_deletes_while_it_is_read_is_not_damage(
    resnet_dir, tmp_path, monkeypatch
):
    directory = tmp_path / "run"
    # (Not the lock: a test above leaves a Checkpointer on resnet_dir open.)
    shutil.copytree(resnet_dir, directory, ignore=shutil.ignore_patterns(checkpoint.WRITER_LOCK))
    real = checkpoint._restore_variables

    def rotated_away(mngr, path, step, shapes, meta):
        if step == 8 and (path / "8").exists():
            shutil.rmtree(path / "8")  # the writer's retention policy, mid-read
            raise checkpoint._Unreadable(f"checkpoint {path / '8'} is unreadable (no file)")
        return real(mngr, path, step, shapes, meta)

    monkeypatch.setattr(checkpoint, "_restore_variables", rotated_away)
    with Checkpointer(directory, best_metric=None):  # a live writer holds the directory
        assert checkpoint.writer(directory).pid == os.getpid()
        with warnings.catch_warnings():
            warnings.simplefilter("error", CheckpointWarning)  # no "corrupt" warning
            _, _, meta = checkpoint.load_for_inference(directory, "latest")
    assert meta["step"] == 4  # listed again, and what is there now was read
    assert checkpoint.writer(directory) is None  # the lock went with its Checkpointer


def test_a_step_deleted_while_orbax_lists_the_directory_is_read_again(
    resnet_dir, tmp_path, monkeypatch
):
    directory = tmp_path / "run"
    shutil.copytree(resnet_dir, directory, ignore=shutil.ignore_patterns(checkpoint.WRITER_LOCK))
    real, calls = checkpoint._reader, []

    def rotated_while_listing(path):
        calls.append(path)
        if len(calls) == 1:  # the writer deleted step 8 between the listing and its stat
            shutil.rmtree(path / "8")
            raise FileNotFoundError(2, "No such file or directory", str(path / "8"))
        return real(path)

    monkeypatch.setattr(checkpoint, "_reader", rotated_while_listing)
    _, _, meta = checkpoint.load_for_inference(directory, "latest")
    assert meta["step"] == 4 and len(calls) > 1  # listed again, and step 4 read

    def always_rotating(path):
        raise FileNotFoundError(2, "No such file or directory", str(path / "4"))

    monkeypatch.setattr(checkpoint, "_reader", always_rotating)
    with pytest.raises(CheckpointError, match="kept changing while they were read"):
        checkpoint.load_for_inference(directory, "latest")
