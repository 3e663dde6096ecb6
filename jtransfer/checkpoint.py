"""Orbax checkpoints of a training run: exact resume, best-k by a metric, loading for inference.

One checkpoint is one step directory, written by Orbax's `CheckpointManager` into a temporary
directory and renamed into place when complete, so a run killed at any instant leaves only
complete checkpoints (plus a temporary directory that is ignored and cleaned up). It holds:

* ``state``: the `jtransfer.train.TrainState` pytree (step, params, batch_stats, opt_state,
  rng), or any pytree of arrays;
* ``progress`` (JSON): epoch, phase, the data loader's iterator state, the metrics, and a
  CRC-32 of every array, checked on restore, so silent corruption is found;
* ``model`` (JSON): the metadata that makes the directory usable alone for prediction and
  export (arch, num_classes, class names, image size, jtransfer version, ...).

Retention: the ``max_to_keep`` most recent checkpoints plus the ``keep_best`` best by
``best_metric``. Saving is asynchronous where Orbax offers it: `Checkpointer.save` copies the
arrays to host memory before it returns, so the caller may donate the state's buffers to the
next train step at once, and the files are written in the background.

Example:
    A training loop restores the latest checkpoint if there is one (the state, and with
    ``train_iter.set_state(restored.loader_state)`` the data loader's position) and saves
    at the end of each epoch (``loader_state=train_iter.get_state()``):

    >>> import tempfile, optax
    >>> import jtransfer as jt
    >>> from jtransfer import checkpoint, train
    >>> model = jt.models.create("resnet18", num_classes=2)
    >>> variables = jt.models.random_variables(model, image_size=32)
    >>> state = train.create_train_state(model, variables, optax.sgd(0.01))
    >>> tmp = tempfile.TemporaryDirectory()
    >>> ckpt = checkpoint.Checkpointer(tmp.name, metadata={"arch": "resnet18",
    ...                                                    "num_classes": 2})
    >>> ckpt.restore_latest(checkpoint.abstract_state(state)) is None  # nothing saved yet
    True
    >>> ckpt.save(state, epoch=1, metrics={"test_acc": 0.93}, force=True)
    True
    >>> ckpt.wait_until_finished()
    >>> restored = ckpt.restore_latest(checkpoint.abstract_state(state))
    >>> restored.step, restored.epoch, restored.metrics
    (0, 1, {'test_acc': 0.93})

    The directory alone is enough for prediction and export:

    >>> model, variables, meta = checkpoint.load_for_inference(tmp.name)
    >>> meta["arch"], meta["num_classes"], meta["step"]
    ('resnet18', 2, 0)
    >>> ckpt.close()
    >>> tmp.cleanup()
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import shlex
import shutil
import time
import warnings
import weakref
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jtransfer import _lockfile
from jtransfer.errors import CheckpointError, ConfigError

__all__ = [
    "CheckpointWarning",
    "Checkpointer",
    "Restored",
    "RunInUseError",
    "WRITER_LOCK",
    "abstract_state",
    "checkpoint_steps",
    "load_for_inference",
    "read_metadata",
    "read_progress",
    "state_nbytes",
    "writer",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_STATE, _PROGRESS, _MODEL = "state", "progress", "model"
_SHOWN = 20  # mismatched paths listed before "... and N more"
_CORRUPT_PREFIX = "corrupt-"
WRITER_LOCK = ".jtransfer-writer.lock"  # in the checkpoint directory: who writes into it


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (unreadable or corrupt) and an older one used instead."""


class _Unreadable(CheckpointError):
    """A step directory exists but cannot be read back intact (internal: triggers fallback)."""


class RunInUseError(CheckpointError):
    """Another process writes checkpoints into the directory: it holds the writer lock.

    Attributes:
        directory: the checkpoint directory.
        holder: who holds the lock (`jtransfer._lockfile.Holder`: host, pid, command, since).
    """

    def __init__(self, message: str = "", *, directory: Path | None = None, holder=None):
        super().__init__(message)
        self.directory = directory
        self.holder = holder

    def advice(self, *, name: str, other: str, readers: str) -> str:
        """The message, naming the directory as `name`, another one as `other`, the readers."""
        holder, lock = self.holder, self.directory / WRITER_LOCK
        text = (
            f"{name} is in use: another run writes checkpoints into it: {holder.describe()}. "
            "Two writers would overwrite each other's checkpoints. Reading it meanwhile is "
            f"safe: {readers} its latest complete checkpoint. "
        )
        if holder.alive():
            return text + f"Wait for that run to finish or stop it (kill {holder.pid}), or {other}."
        return text + (
            f"That run is on another host, which cannot be checked from here: if it is still "
            f"running, wait for it or {other}; if it is not (its machine crashed or the job "
            f"was killed), remove its stale lock and run again: rm {shlex.quote(str(lock))}"
        )


def _in_use(directory: Path, holder) -> RunInUseError:
    error = RunInUseError(directory=directory, holder=holder)
    error.args = (
        error.advice(
            name=f"checkpoint directory {directory}",
            other="use another directory",
            readers="load_for_inference reads",
        ),
    )
    return error


# Checkpointers of one process share its lock on a directory (e.g. one that trains and one
# that reads back); the file goes when the last of them closes. {directory: [LockFile, count]}
_HELD: dict[Path, list] = {}


def writer(directory: str | os.PathLike):
    """Who holds the writer lock of a checkpoint directory (a `Holder`), or None.

    A lock whose holder is gone (killed on this host), or that was copied here from
    another directory, counts as None.
    """
    lock = Path(directory).expanduser() / WRITER_LOCK
    holder = _lockfile.read_holder(lock)
    if holder is None or holder.alive() is False:
        return None
    if holder.on_this_host() and not holder.guards(lock):
        return None  # copied along with the directory: that run writes elsewhere
    return holder


def _acquire_writer_lock(directory: Path, command: str | None) -> None:
    """Takes `directory`'s writer lock in process 0 (all processes learn if it was refused).

    Raises:
        RunInUseError: another run holds it.
        CheckpointError: the lock file cannot be written.
    """
    refused, failed = None, None
    if jax.process_index() == 0:
        entry = _HELD.get(directory)
        if entry is not None:
            entry[1] += 1
        else:
            lock = _lockfile.LockFile(directory / WRITER_LOCK, command=command)
            try:
                refused = lock.acquire()
            except OSError as e:
                failed = CheckpointError(
                    f"cannot write checkpoints to {directory} ({_first_line(e)}). Choose a "
                    "writable directory."
                )
            if refused is None and failed is None:
                _HELD[directory] = [lock, 1]
                if lock.took_over is not None:
                    gone = lock.took_over
                    why = (
                        "is no longer running (killed?)"
                        if gone.alive() is False
                        else f"writes elsewhere (its lock was copied here from {gone.path})"
                    )
                    warnings.warn(
                        CheckpointWarning(
                            f"the run that last wrote to {directory}, {gone.describe()}, "
                            f"{why}; this one takes over its lock"
                        ),
                        stacklevel=3,
                    )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        # Every process constructs its Checkpointer here: all of them fail, or none.
        flags = multihost_utils.process_allgather(
            np.int32(refused is not None or failed is not None)
        )
        if refused is None and failed is None and int(np.max(flags)):
            refused = _lockfile.read_holder(directory / WRITER_LOCK)
            if refused is None:
                raise CheckpointError(f"process 0 could not lock {directory}; see its error")
    if failed is not None:
        raise failed
    if refused is not None:
        raise _in_use(directory, refused)


def _release_writer_lock(directory: Path) -> None:
    entry = _HELD.get(directory)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _HELD[directory]
        entry[0].release()


@dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore` read back.

    Attributes:
        state: the restored pytree, with the structure, dtypes and shardings of the abstract
            state that was passed in.
        step: the checkpoint's step.
        epoch: the epoch recorded at save time.
        phase: the phase recorded at save time (any JSON value, e.g. "frozen").
        loader_state: the data loader iterator's state (bytes, for ``it.set_state``), or None.
        metrics: the metrics saved with the checkpoint, or None.
        metadata: the ``model`` metadata (arch, num_classes, classes, ...).
        extra: the ``extra`` dict given to `Checkpointer.save`.
    """

    state: Any
    step: int
    epoch: int
    phase: Any
    loader_state: bytes | None
    metrics: dict[str, float] | None
    metadata: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Pytree helpers


def abstract_state(state: Any) -> Any:
    """The shape, dtype and sharding of every array in `state`, as restore targets.

    Args:
        state: a pytree of arrays (e.g. a fresh `TrainState`) or of ShapeDtypeStructs.

    Returns:
        The same pytree with `jax.ShapeDtypeStruct` leaves; numpy leaves get the default
        device.
    """
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def one(x):
        sharding = getattr(x, "sharding", None) or default
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(one, state)


def state_nbytes(state: Any) -> int:
    """Bytes of all arrays in `state` (arrays or ShapeDtypeStructs): one checkpoint's size."""
    return int(
        sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
    )


def _host_copy(x: Any) -> np.ndarray:
    # A real copy: the train step donates the state's buffers, and on CPU np.asarray of a
    # jax.Array can be a view of one, which an asynchronous write would then race with.
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        raise CheckpointError(
            "the state holds a typed PRNG key (jax.random.key); store raw key data "
            "(jax.random.PRNGKey or jax.random.key_data) in checkpointed state"
        )
    return np.array(x, copy=True)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat(tree: Any) -> dict[str, Any]:
    """{'params/fc/kernel': leaf} for the array-like leaves of `tree`.

    Namedtuple fields and dataclass attributes are named, sequences indexed, so a live state
    and the nested dicts and lists of Orbax's saved metadata give the same paths.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(_key_name(k) for k in path): leaf
        for path, leaf in leaves
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype")
    }


def _checksums(flat: Mapping[str, np.ndarray]) -> dict[str, int]:
    return {
        k: zlib.crc32(np.ascontiguousarray(v).view(np.uint8).reshape(-1)) for k, v in flat.items()
    }


def _listing(title: str, lines: list[str]) -> list[str]:
    if not lines:
        return []
    shown = lines[:_SHOWN] + (
        [f"... and {len(lines) - _SHOWN} more"] if len(lines) > _SHOWN else []
    )
    return [f"  {title} ({len(lines)}): " + ", ".join(shown)]


def _encode_loader_state(loader_state: Any) -> Any:
    if loader_state is None:
        return None
    if isinstance(loader_state, (bytes, bytearray)):
        try:
            return {"json": json.loads(loader_state)}
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {"base64": base64.b64encode(bytes(loader_state)).decode("ascii")}
    if isinstance(loader_state, str):
        return {"json": json.loads(loader_state)}
    return {"json": loader_state}


def _decode_loader_state(saved: Any) -> bytes | None:
    if saved is None:
        return None
    if "base64" in saved:
        return base64.b64decode(saved["base64"])
    return json.dumps(saved["json"]).encode()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else 'no detail'}"[:300]


# ---------------------------------------------------------------------------
# Orbax plumbing


def _registry():
    import orbax.checkpoint as ocp

    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(_STATE, ocp.args.StandardSave, ocp.handlers.StandardCheckpointHandler)
    registry.add(_STATE, ocp.args.StandardRestore, ocp.handlers.StandardCheckpointHandler)
    for item in (_PROGRESS, _MODEL):
        registry.add(item, ocp.args.JsonSave, ocp.handlers.JsonCheckpointHandler)
        registry.add(item, ocp.args.JsonRestore, ocp.handlers.JsonCheckpointHandler)
    return registry


# Routine Orbax messages that say nothing to our users: saves without the ranking metric
# (interval saves), read-only managers (inference), items we chose not to restore.
_ORBAX_NOISE = (
    "Requested `tracked_metric`",
    "read_only=True",
    "Given directory is read only",
    "but could not be restored",
)


class _DropOrbaxNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _ORBAX_NOISE)


def _quiet_absl() -> None:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropOrbaxNoise) for f in absl_logger.filters):
        absl_logger.addFilter(_DropOrbaxNoise())


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """The complete checkpoints in `directory`, as sorted steps ([] if none or no directory).

    Temporary directories of saves that never finished are not counted.
    """
    from orbax.checkpoint import utils as ocp_utils

    path = Path(directory)
    if not path.is_dir():
        return []
    return sorted(int(s) for s in ocp_utils.checkpoint_steps(path))


class Checkpointer:
    """Saves and restores training checkpoints in one directory (Orbax CheckpointManager).

    Args:
        directory: where the step directories go; created if missing. It is checked to be
            writable now (a probe file is written and removed), so a bad path fails before
            training starts.
        max_to_keep: how many of the most recent checkpoints to keep (>= 1).
        best_metric: the metric that ranks checkpoints (a key of `save`'s ``metrics``), or
            None to keep only the most recent ones.
        best_mode: "max" (accuracy) or "min" (loss).
        keep_best: how many of the best checkpoints to keep besides the most recent ones.
        save_interval_steps: `save` writes every this many steps; None saves only when
            called with ``force=True`` (e.g. at the end of an epoch).
        metadata: JSON-serialisable facts about the model saved with every checkpoint;
            `load_for_inference` needs ``arch`` and ``num_classes``, and uses ``classes``
            and ``image_size`` when given. ``jtransfer_version`` is added.
        async_save: write files in a background thread (Orbax AsyncCheckpointer).
        command: how the lock file describes this writer to another that finds it held
            (default: this process's command line).

    One directory has one writer: the constructor takes the directory's lock file
    (``.jtransfer-writer.lock``: host, pid, command, start time) before writing anything,
    and `close` releases it. A directory locked by another live process is refused with
    `RunInUseError`, naming it; a lock left by a process that died on this host (SIGKILL,
    the OOM killer) is taken over with a `CheckpointWarning`; one left on another host is
    reported with the command that removes it. Checkpointers in one process share the
    lock; in a multi-process run process 0 holds it for all. Readers need no lock:
    `load_for_inference` reads the latest complete checkpoint while a run writes.

    Raises:
        CheckpointError: the directory cannot be created or written.
        RunInUseError: another run writes into the directory.
        ConfigError: an argument is invalid.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 1,
        best_metric: str | None = "test_acc",
        best_mode: str = "max",
        keep_best: int = 1,
        save_interval_steps: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        async_save: bool = True,
        command: str | None = None,
    ) -> None:
        if max_to_keep < 1:
            raise ConfigError(
                f"max_to_keep must be >= 1 (the latest is needed to resume), got {max_to_keep}"
            )
        if keep_best < 0:
            raise ConfigError(f"keep_best must be >= 0, got {keep_best}")
        if best_mode not in ("max", "min"):
            raise ConfigError(f'best_mode must be "max" or "min", got {best_mode!r}')
        if save_interval_steps is not None and save_interval_steps < 1:
            raise ConfigError(
                f"save_interval_steps must be >= 1 or None, got {save_interval_steps}"
            )
        self.directory = Path(directory).expanduser().absolute()
        self.max_to_keep = max_to_keep
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.keep_best = keep_best if best_metric else 0
        self.save_interval_steps = save_interval_steps
        self.metadata = _with_version(metadata)
        self._space_checked = False
        _probe_writable(self.directory)
        # Before Orbax sees the directory: its manager deletes the temporary directories of
        # unfinished saves, which would be another live writer's save in progress.
        _acquire_writer_lock(self.directory, command)
        self._unlock = weakref.finalize(self, _release_writer_lock, self.directory)
        try:
            self._mngr = self._manager(async_save)
        except BaseException:
            self._unlock()
            raise

    # -- construction ------------------------------------------------------------------

    def _manager(self, async_save: bool):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as cm

        _quiet_absl()
        policies = [cm.LatestN(n=self.max_to_keep)]
        best_fn = None
        if self.best_metric:
            metric = self.best_metric

            def best_fn(metrics):
                return float(metrics[metric])

            if self.keep_best:
                policies.append(
                    cm.BestN(
                        get_metric_fn=best_fn,
                        reverse=self.best_mode == "min",
                        n=self.keep_best,
                        keep_checkpoints_without_metrics=False,
                    )
                )
        options = ocp.CheckpointManagerOptions(
            best_fn=best_fn,
            best_mode=self.best_mode,
            preservation_policy=cm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        try:
            return ocp.CheckpointManager(
                self.directory, options=options, handler_registry=_registry()
            )
        except OSError as e:
            raise CheckpointError(
                f"cannot use {self.directory} for checkpoints ({_first_line(e)})"
            ) from e

    # -- queries ------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """The most recent complete checkpoint's step, or None."""
        return self._mngr.latest_step()

    def best_step(self) -> int | None:
        """The step with the best ``best_metric`` (latest if none has metrics), or None."""
        return self._mngr.best_step() if self.best_metric else self.latest_step()

    def should_save(self, step: int) -> bool:
        """True if `save` without ``force`` would write at `step` (the interval is due)."""
        interval = self.save_interval_steps
        return interval is not None and step % interval == 0 and step not in self.all_steps()

    # -- disk space -----------------------------------------------------------------------

    def check_space(self, state: Any) -> None:
        """Raises before training if the disk cannot hold the checkpoints this run keeps.

        At most ``max_to_keep + keep_best`` checkpoints are kept and one more is written
        before an old one is deleted; space the existing checkpoints already use counts
        as available, since they are rotated out.

        Args:
            state: the state to be saved (arrays or ShapeDtypeStructs), to size one checkpoint.

        Raises:
            CheckpointError: not enough free space; the message gives the numbers.
        """
        self._space_checked = True
        one = state_nbytes(state)
        copies = self.max_to_keep + self.keep_best + 1
        existing = _dir_bytes(self.directory)
        needed = max(one * copies - existing, one) + (1 << 20)
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise CheckpointError(
                f"not enough disk space for checkpoints in {self.directory}: one checkpoint is "
                f"about {_mb(one)}, up to {copies} exist at once (max_to_keep={self.max_to_keep}"
                f" + keep_best={self.keep_best} + 1 being written), which needs {_mb(needed)} "
                f"more, and {_mb(free)} is free. Free some space, choose another directory, or "
                "keep fewer checkpoints."
            )

    # -- save ---------------------------------------------------------------------------

    def save(
        self,
        state: Any,
        *,
        epoch: int = 0,
        loader_state: bytes | str | Mapping[str, Any] | None = None,
        phase: Any = None,
        metrics: Mapping[str, float] | None = None,
        extra: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `state` at step ``int(state.step)`` if due (or `force`), in the background.

        The arrays are copied to host memory before this returns, so the caller may donate
        the state's buffers to the next step at once; files are written asynchronously and
        appear atomically. A step already saved without metrics is saved again when
        `metrics` are given (an interval save that coincides with an epoch end).

        Args:
            state: a `TrainState` (or pytree of arrays with a ``step`` attribute or key).
            epoch: the epoch in progress (or just completed; the caller's convention).
            loader_state: the training iterator's ``get_state()`` (JSON bytes), or None.
            phase: any JSON value naming the training phase (e.g. "frozen").
            metrics: numbers to rank checkpoints by; ``best_metric`` among them.
            extra: any JSON-serialisable dict, returned as `Restored.extra`.
            force: save even if ``save_interval_steps`` is not due.

        Returns:
            True if a checkpoint was written (or started).

        Raises:
            CheckpointError: the disk is full or the directory became unwritable.
        """
        import orbax.checkpoint as ocp

        step = _step_of(state)
        if not force and not self.should_save(step):
            return False
        if not self._space_checked:
            self.check_space(state)
        if step in self.all_steps():
            if metrics is None:
                return False
            self._mngr.wait_until_finished()
            self._mngr.delete(step)
        host = jax.tree.map(_host_copy, state)
        clean_metrics = _clean_metrics(metrics)
        progress = {
            "format": FORMAT_VERSION,
            "step": step,
            "epoch": int(epoch),
            "phase": phase,
            "loader": _encode_loader_state(loader_state),
            "metrics": clean_metrics,
            "best_metric": self.best_metric,
            "best_mode": self.best_mode,
            "extra": dict(extra or {}),
            "crc32": _checksums(_flat(host)),
            "time": time.time(),
        }
        ranked = None
        if self.best_metric and clean_metrics and self.best_metric in clean_metrics:
            ranked = {self.best_metric: clean_metrics[self.best_metric]}
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(host),
                _PROGRESS: ocp.args.JsonSave(progress),
                _MODEL: ocp.args.JsonSave(self.metadata),
            }
        )
        try:
            return bool(self._mngr.save(step, args=args, metrics=ranked, force=True))
        except OSError as e:
            raise CheckpointError(
                f"could not write the checkpoint of step {step} to {self.directory} "
                f"({_first_line(e)}); check free disk space and permissions"
            ) from e

    def wait_until_finished(self) -> None:
        """Blocks until the background writes of earlier `save` calls are complete."""
        try:
            self._mngr.wait_until_finished()
        except OSError as e:
            raise CheckpointError(
                f"writing a checkpoint to {self.directory} failed ({_first_line(e)})"
            ) from e

    def close(self) -> None:
        """Waits for pending writes, releases Orbax's resources and the directory's lock."""
        try:
            self._mngr.close()
        finally:
            self._unlock()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restore --------------------------------------------------------------------------

    def restore(self, step: int, abstract_state: Any) -> Restored:
        """Restores the checkpoint of `step` into the structure of `abstract_state`.

        Args:
            step: one of `all_steps()`.
            abstract_state: the target: `abstract_state(fresh_state)` (or the fresh state itself).

        Returns:
            The `Restored` checkpoint.

        Raises:
            CheckpointError: the checkpoint belongs to another model (listing every missing,
                unexpected and mis-shaped array, and differing arch / num_classes), or it is
                unreadable or corrupt.
        """
        return _restore(self._mngr, self.directory, step, abstract_state, self.metadata)

    def restore_latest(self, abstract_state: Any, *, quarantine: bool = True) -> Restored | None:
        """Restores the most recent checkpoint that reads back intact, or None if there is none.

        A complete checkpoint that cannot be read or fails its checksums is skipped with a
        `CheckpointWarning` giving the cause, and the previous one is tried. With
        `quarantine`, a skipped step directory is renamed to ``corrupt-<step>-<time>`` so the
        resumed run can save that step again.

        Args:
            abstract_state: the restore target, e.g. `abstract_state(fresh_state)`.
            quarantine: rename unreadable checkpoints out of the way.

        Returns:
            The `Restored` checkpoint, or None when the directory holds no complete checkpoint
            (a fresh run, or one killed before its first save finished).

        Raises:
            CheckpointError: the checkpoints belong to another model (see `restore`), or every
                checkpoint is unreadable (each one's cause is listed): never a silent restart.
        """
        self._mngr.reload()
        steps = sorted(self.all_steps(), reverse=True)
        failures: list[str] = []
        for i, step in enumerate(steps):
            try:
                restored = self.restore(step, abstract_state)
            except _Unreadable as e:
                failures.append(f"step {step}: {e}")
                nxt = (
                    f"falling back to step {steps[i + 1]}"
                    if i + 1 < len(steps)
                    else ("no older checkpoint is left")
                )
                moved = self._quarantine(step) if quarantine else None
                warnings.warn(
                    CheckpointWarning(
                        f"{CheckpointError(str(e))}; {nxt}"
                        + (f" (moved it to {moved})" if moved else "")
                    ),
                    stacklevel=2,
                )
                continue
            return restored
        if failures:
            raise CheckpointError(
                f"every checkpoint in {self.directory} is unreadable, so training cannot "
                f"resume: {'; '.join(failures)}. Delete the directory (or use another one) to "
                "start from scratch."
            )
        return None

    def _quarantine(self, step: int) -> Path | None:
        self._mngr.wait_until_finished()
        src = self.directory / str(step)
        dst = self.directory / f"{_CORRUPT_PREFIX}{step}-{int(time.time())}"
        try:
            os.replace(src, dst)
        except OSError:
            return None
        self._mngr.reload()
        return dst


# ---------------------------------------------------------------------------
# Restore internals


def _restore(mngr, directory: Path, step: int, abstract: Any, expected_meta) -> Restored:
    import orbax.checkpoint as ocp

    try:
        saved_tree = mngr.item_metadata(step)[_STATE]
        saved_tree = getattr(saved_tree, "tree", saved_tree)
    except Exception as e:  # Orbax / tensorstore raise many untyped errors on damaged files
        raise _Unreadable(
            f"checkpoint {directory / str(step)} is unreadable (its array metadata: "
            f"{_first_line(e)})"
        ) from e
    if not saved_tree:
        raise _Unreadable(f"checkpoint {directory / str(step)} has no array metadata")
    try:
        meta_and_progress = mngr.restore(
            step,
            args=ocp.args.Composite(
                **{_PROGRESS: ocp.args.JsonRestore(), _MODEL: ocp.args.JsonRestore()}
            ),
        )
        progress, saved_meta = meta_and_progress[_PROGRESS], meta_and_progress[_MODEL]
    except Exception as e:
        raise _Unreadable(
            f"checkpoint {directory / str(step)} is unreadable (its JSON: {_first_line(e)})"
        ) from e
    _check_fits(directory / str(step), saved_tree, abstract, saved_meta, expected_meta)
    target = abstract_state(abstract)
    try:
        state = mngr.restore(
            step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
        )[_STATE]
    except Exception as e:
        raise _Unreadable(
            f"checkpoint {directory / str(step)} is unreadable (its arrays: {_first_line(e)})"
        ) from e
    _verify(directory / str(step), state, progress.get("crc32"))
    return Restored(
        state=state,
        step=int(progress.get("step", step)),
        epoch=int(progress.get("epoch", 0)),
        phase=progress.get("phase"),
        loader_state=_decode_loader_state(progress.get("loader")),
        metrics=progress.get("metrics"),
        metadata=dict(saved_meta or {}),
        extra=dict(progress.get("extra") or {}),
    )


def _verify(where: Path, state: Any, crcs: Mapping[str, int] | None) -> None:
    if crcs is None:
        return
    flat = _flat(jax.tree.map(np.asarray, state))
    bad = [k for k, v in _checksums(flat).items() if crcs.get(k) != v]
    if bad or set(crcs) != set(flat):
        raise _Unreadable(
            f"checkpoint {where} is corrupt: the checksum of {len(bad)} array(s) does not "
            f"match what was saved ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})"
        )


def _model_first(path: str) -> tuple[int, str]:
    """Sort key: params, then batch_stats, then the rest (optimizer state repeats the paths)."""
    order = {"params": 0, "batch_stats": 1}
    return order.get(path.split("/", 1)[0], 2), path


def _check_fits(where: Path, saved_tree, abstract, saved_meta, expected_meta) -> None:
    have = {k: tuple(v.shape) for k, v in _flat(saved_tree).items()}
    want = {k: tuple(np.shape(v)) for k, v in _flat(abstract).items()}
    missing = sorted((k for k in want if k not in have), key=_model_first)
    unexpected = sorted((k for k in have if k not in want), key=_model_first)
    shapes = [
        f"{k}: checkpoint {have[k]}, model {want[k]}"
        for k in sorted(want, key=_model_first)
        if k in have and have[k] != want[k]
    ]
    meta_diff = [
        f"{key}: checkpoint {saved_meta.get(key)!r}, now {expected_meta.get(key)!r}"
        for key in ("arch", "num_classes")
        if saved_meta
        and key in saved_meta
        and key in expected_meta
        and saved_meta[key] != expected_meta[key]
    ]
    if not (missing or unexpected or shapes or meta_diff):
        return
    lines = [f"checkpoint {where} does not fit this model:"]
    if meta_diff:
        lines.append("  " + "; ".join(meta_diff))
    lines += _listing("wrong shape", shapes)
    lines += _listing("missing from the checkpoint", missing)
    lines += _listing("not in the model", unexpected)
    lines.append(
        "It was saved by a run with another architecture, number of classes or optimizer "
        "setup. Resume with the same settings, or use a new checkpoint directory."
    )
    raise CheckpointError("\n".join(lines))


# ---------------------------------------------------------------------------
# Small helpers


def _with_version(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    from jtransfer import __version__

    meta = dict(metadata or {})
    meta.setdefault("jtransfer_version", __version__)
    try:
        json.dumps(meta)
    except TypeError as e:
        raise CheckpointError(f"checkpoint metadata must be JSON-serialisable: {e}") from e
    return meta


def _step_of(state: Any) -> int:
    step = state["step"] if isinstance(state, Mapping) else getattr(state, "step", None)
    if step is None:
        raise CheckpointError("the state to save has no `step` (a TrainState has one)")
    return int(step)


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
    if metrics is None:
        return None
    out = {}
    for k, v in metrics.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def _probe_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".jtransfer-write-probe-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise CheckpointError(
            f"cannot write checkpoints to {directory} ({e.strerror or type(e).__name__}"
            f"{': ' + str(e.filename) if e.filename else ''}). Choose a writable directory."
        ) from e


def _dir_bytes(directory: Path) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                continue
    return total


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


# ---------------------------------------------------------------------------
# Reading a checkpoint directory without training


def _reader(directory: Path):
    import orbax.checkpoint as ocp

    _quiet_absl()
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    return ocp.CheckpointManager(directory, options=options, handler_registry=_registry())


def _require_checkpoints(directory: str | os.PathLike) -> tuple[Path, list[int]]:
    path = Path(directory).expanduser().absolute()
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint directory {path} does not exist; pass the --out directory of a "
            "finetune run"
        )
    steps = checkpoint_steps(path)
    if not steps:
        holder = writer(path)
        if holder is not None:
            raise CheckpointError(
                f"{path} holds no complete checkpoint yet: the run writing into it, "
                f"{holder.describe()}, has not finished its first save. Try again once it "
                "has saved (at the end of its first epoch, or after --save-every steps)"
            )
        raise CheckpointError(
            f"{path} holds no complete checkpoint; pass the --out directory of a finetune run "
            "that saved at least once"
        )
    return path, steps


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The ``model`` metadata saved with a checkpoint (latest by default).

    Raises:
        CheckpointError: no checkpoint there, or its metadata is unreadable.
    """
    out = _read_json_item(directory, step, _MODEL, "the metadata")
    return dict(out or {})


def read_progress(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """Where training stood at a checkpoint (latest by default), without reading its arrays.

    Returns:
        {"step", "epoch", "phase", "metrics", "loader" (the loader state, as saved),
        "best_metric", "best_mode", "extra", "time", "format"}.

    Raises:
        CheckpointError: no checkpoint there, or its progress record is unreadable.
    """
    out = _read_json_item(directory, step, _PROGRESS, "the progress record")
    return {k: v for k, v in dict(out or {}).items() if k != "crc32"}


def _read_json_item(directory: str | os.PathLike, step: int | None, item: str, what: str) -> Any:
    """One JSON item of a checkpoint (latest by default), without reading its arrays."""
    import orbax.checkpoint as ocp

    path, steps = _require_checkpoints(directory)
    step = steps[-1] if step is None else step
    try:
        return _reader(path).restore(
            step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})
        )[item]
    except Exception as e:
        raise CheckpointError(
            f"cannot read {what} of checkpoint {path / str(step)} ({_first_line(e)})"
        ) from e


def _ranked_steps(mngr, steps: list[int], which: str | int) -> list[int]:
    """Candidate steps, preferred first: the requested one, then the others newest first."""
    import orbax.checkpoint as ocp

    newest_first = sorted(steps, reverse=True)
    if isinstance(which, int) and not isinstance(which, bool):
        if which not in steps:
            raise ConfigError(f"no checkpoint of step {which}; there are steps {steps}")
        return [which]
    if which == "latest":
        return newest_first
    if which != "best":
        raise ConfigError(f'which must be "best", "latest" or a step, got {which!r}')
    scored = []
    for step in steps:
        try:
            progress = mngr.restore(
                step, args=ocp.args.Composite(**{_PROGRESS: ocp.args.JsonRestore()})
            )[_PROGRESS]
        except Exception:  # unreadable: tried last, by recency
            continue
        name, mode = progress.get("best_metric"), progress.get("best_mode", "max")
        value = (progress.get("metrics") or {}).get(name) if name else None
        if value is not None and math.isfinite(value):
            scored.append((value if mode == "max" else -value, step))
    best = [s for _, s in sorted(scored, reverse=True)]
    return best + [s for s in newest_first if s not in best]


def load_for_inference(
    directory: str | os.PathLike, which: str | int = "best"
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """A model, its variables and metadata from a checkpoint directory alone.

    Args:
        directory: a `Checkpointer` directory (the CLI's ``--out``).
        which: "best" (by the saved ``best_metric``; the latest if none has metrics),
            "latest", or a step number.

    Returns:
        ``(model, {"params", "batch_stats"}, metadata)``; ``metadata`` has "arch",
        "num_classes" and whatever the run saved ("classes", "image_size", ...), plus "step".
        An unreadable checkpoint is skipped with a `CheckpointWarning` for the next best.

    Raises:
        CheckpointError: no checkpoint, metadata without arch / num_classes, or every
            candidate unreadable.
    """
    path, _ = _require_checkpoints(directory)
    # A run may be writing into the directory: it renames a save into place only when
    # complete, and deletes old checkpoints as it goes, so a step listed a moment ago can
    # vanish while it is read. That is not damage: list again and read what is there now.
    for _ in range(_READ_ATTEMPTS):
        try:
            return _load_for_inference(path, which)
        except _Rotated:
            continue
    return _load_for_inference(path, which, rotated_ok=False)


_READ_ATTEMPTS = 5
_GONE_WAIT_S = 2.0  # how long a step that failed to read may take to disappear (rmtree)


class _Rotated(Exception):
    """A checkpoint was deleted by the run writing the directory while it was being read."""


def _vanished(path: Path, step: int) -> bool:
    """True once `step` is no longer listed (its writer is deleting it), within a short wait."""
    deadline = time.monotonic() + _GONE_WAIT_S
    while True:
        if step not in checkpoint_steps(path):
            return True
        if time.monotonic() > deadline or writer(path) is None:
            return False
        time.sleep(0.05)


def _load_for_inference(path: Path, which: str | int, *, rotated_ok: bool = True):
    import jtransfer as jt

    steps = checkpoint_steps(path)
    if not steps:
        _require_checkpoints(path)  # raises, saying why
    try:
        mngr = _reader(path)
    except FileNotFoundError as e:
        # Orbax lists the steps, then reads each one's time: a step deleted in between by
        # the run writing the directory is a rotation, not damage.
        if rotated_ok:
            raise _Rotated from e
        raise CheckpointError(
            f"the checkpoints in {path} kept changing while they were read ({e}): the run "
            "writing them deletes old ones as it goes. Read again, or once that run ends."
        ) from e
    candidates = _ranked_steps(mngr, steps, which)
    failures = []
    for i, step in enumerate(candidates):
        try:
            meta = read_metadata(path, step)
        except CheckpointError as e:
            if rotated_ok and _vanished(path, step):
                raise _Rotated from e
            failures.append(f"step {step}: {e}")
            continue
        if "arch" not in meta or "num_classes" not in meta:
            raise CheckpointError(
                f"checkpoint {path / str(step)} does not say which model it holds (its metadata "
                f"has {sorted(meta)}); save with Checkpointer(..., metadata={{'arch': ..., "
                "'num_classes': ...}})"
            )
        model = jt.models.create(meta["arch"], num_classes=int(meta["num_classes"]))
        shapes = jax.eval_shape(
            model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
        )
        try:
            variables = _restore_variables(mngr, path, step, dict(shapes), meta)
        except _Unreadable as e:
            if rotated_ok and _vanished(path, step):
                raise _Rotated from e
            failures.append(f"step {step}: {e}")
            if i + 1 < len(candidates):
                warnings.warn(
                    CheckpointWarning(f"{e}; using step {candidates[i + 1]} instead"),
                    stacklevel=2,
                )
            continue
        return model, variables, {**meta, "step": step}
    raise CheckpointError(f"no readable checkpoint in {path}: {'; '.join(failures)}")


def _restore_variables(mngr, path: Path, step: int, shapes: dict, meta) -> dict[str, Any]:
    """params and batch_stats only (no optimizer state), checked against their checksums."""
    import orbax.checkpoint as ocp

    try:
        saved_tree = mngr.item_metadata(step)[_STATE]
        saved_tree = dict(getattr(saved_tree, "tree", saved_tree) or {})
    except Exception as e:
        raise _Unreadable(f"checkpoint {path / str(step)} is unreadable ({_first_line(e)})") from e
    _check_fits(
        path / str(step),
        {k: saved_tree.get(k, {}) for k in ("params", "batch_stats")},
        shapes,
        meta,
        meta,
    )
    target = {k: abstract_state(v) for k, v in shapes.items()}
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
    try:
        handler = ocp.PyTreeCheckpointHandler()
        with ocp.Checkpointer(handler) as reader:
            variables = reader.restore(
                path / str(step) / _STATE,
                args=ocp.args.PyTreeRestore(
                    item=target, restore_args=restore_args, partial_restore=True
                ),
            )
        progress = mngr.restore(
            step, args=ocp.args.Composite(**{_PROGRESS: ocp.args.JsonRestore()})
        )[_PROGRESS]
    except Exception as e:
        raise _Unreadable(f"checkpoint {path / str(step)} is unreadable ({_first_line(e)})") from e
    crcs = {
        k: v
        for k, v in (progress.get("crc32") or {}).items()
        if k.split("/", 1)[0] in ("params", "batch_stats")
    }
    _verify(path / str(step), variables, crcs or None)
    return dict(variables)
