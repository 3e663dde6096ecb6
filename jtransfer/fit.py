"""The epoch loop: `fit` a model with rules-as-data and get d2l's per-epoch numbers back.

`fit` is what `examples/hotdog.py` and `python -m jtransfer finetune` run. It builds the
optimizer from the rules (`partition.make_optimizer`), freezes a frozen prefix statically
(`partition.frozen_prefix`: no backward pass through it, BatchNorm on running statistics),
and runs the jitted steps of `jtransfer.train` data-parallel over every device (of every process
in a `jtransfer.distributed` run), with the next batches copied to the devices while the current
step runs.

Each epoch gives one history entry (a dict), the numbers d2l prints:

* ``epoch``: epochs completed (1-based; pass it as ``start_epoch`` to resume after it);
* ``step``: steps completed (``int(state.step)``; with ``skip_nonfinite``, skipped ones too);
* ``train_loss``: loss per example over the epoch (``loss_sum / count``, also with a summed
  training loss, as d2l prints it), ``train_acc``, ``train_count``;
* ``skipped``: steps skipped because their loss, gradient or update was not finite (with
  ``skip_nonfinite=True``; their examples are left out of the training numbers);
* ``test_loss``, ``test_acc``, ``test_count``: on the test loader (None without one);
* ``examples_per_s``: training examples per second of wall time in the training loop, input
  pipeline waits included; the run's first step (which compiles) is left out, and timed
  separately as ``compile_s`` (0.0 in later epochs);
* ``epoch_s``: wall seconds of the whole epoch, evaluation and compilation included.

Example:
    One epoch on a small generated image folder, from random weights; for the d2l recipe
    itself, ``porting.load_pretrained("resnet18", num_classes=2)`` gives the model and its
    ImageNet variables, and the folders are ``hotdog/train`` and ``hotdog/test``:

    >>> import tempfile
    >>> import jtransfer as jt
    >>> from jtransfer import data, fit, partition
    >>> tmp = tempfile.TemporaryDirectory()
    >>> train_folder = data.make_demo_imagefolder(f"{tmp.name}/train", n_per_class=4, size=40)
    >>> test_folder = data.make_demo_imagefolder(f"{tmp.name}/test", n_per_class=2, size=40,
    ...                                          seed=1)
    >>> train_loader = data.make_loader(train_folder, batch_size=4, train=True,
    ...                                 num_epochs=None, image_size=32)
    >>> test_loader = data.make_loader(test_folder, batch_size=4, train=False, image_size=32,
    ...                                resize_size=(36, 36))
    >>> model = jt.models.create("resnet18", num_classes=2)
    >>> variables = jt.models.random_variables(model, image_size=32)
    >>> state, history = fit.fit(model, variables, partition.finetune("resnet18"),
    ...                          train_loader, test_loader, learning_rate=5e-5,
    ...                          weight_decay=1e-3, epochs=1, progress=False, log=None)
    >>> int(state.step), history[-1]["train_count"], history[-1]["test_count"]
    (2, 8, 4)
    >>> 0.0 <= history[-1]["test_acc"] <= 1.0
    True
    >>> tmp.cleanup()
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jtransfer import data, models, partition, train
from jtransfer.errors import ConfigError, NonFiniteLossError

__all__ = [
    "HISTORY_KEYS",
    "StepInfo",
    "evaluate",
    "fit",
    "format_epoch",
    "frozen_stages_for",
    "infer_arch",
    "predict",
]

History = list[dict[str, Any]]
HISTORY_KEYS: tuple[str, ...] = (
    "epoch",
    "step",
    "train_loss",
    "train_acc",
    "train_count",
    "skipped",
    "test_loss",
    "test_acc",
    "test_count",
    "examples_per_s",
    "compile_s",
    "epoch_s",
)
_PREFETCH = 2  # batches on the devices ahead of the step
MAX_CONSECUTIVE_SKIPS = 10  # default limit of skip_nonfinite: then the run has diverged


@dataclass(frozen=True)
class StepInfo:
    """What `fit` tells an ``on_step_end(state, info)`` callback after each training step.

    Attributes:
        epoch: the epoch this step belongs to (0-based).
        index: the batch's index within its epoch (0-based).
        step: steps completed, i.e. ``int(state.step)`` after this step (skipped ones count).
        metrics: this step's metrics (device arrays; reading them waits for the step). `fit`
            checks its loss for NaN while the next step runs, so a checkpoint that must never
            hold a diverged state should check `metrics["loss"]` itself.
    """

    epoch: int
    index: int
    step: int
    metrics: train.Metrics
    _iterator: Any = field(default=None, repr=False)

    def loader_state(self) -> Any:
        """The training loader's state right after this step's batch, for a checkpoint.

        Passing it back as ``fit(..., loader_state=...)`` resumes with the next batch. Only
        available when the training loader is a `jtransfer.data.ImageLoader`.

        Raises:
            ConfigError: the training loader is a plain iterable with no state.
        """
        if self._iterator is None:
            raise ConfigError(
                "the training loader has no state to save; use jtransfer.data.make_loader"
            )
        return self._iterator.get_state()


# ---------------------------------------------------------------------------
# Model and rules -> the static arguments of the train step.


def infer_arch(model: nn.Module) -> str:
    """The registry name of a module made by `jt.models.create`.

    Args:
        model: the flax module.

    Returns:
        e.g. "resnet18".

    Raises:
        ConfigError: the module is not one of `jt.models.ARCHS`.

    Example:
        >>> import jtransfer as jt
        >>> infer_arch(jt.models.create("vgg11_bn", num_classes=3))
        'vgg11_bn'
    """
    for arch in models.ARCHS:
        fam = models.family(arch)
        if type(model) is fam.module and all(
            getattr(model, k, None) == v for k, v in fam.variants[arch].items()
        ):
            return arch
    raise ConfigError(
        f"cannot tell which of jt.models.ARCHS this {type(model).__name__} is; "
        "pass arch=... explicitly"
    )


def frozen_stages_for(arch: str, rules: partition.Rules) -> train.FrozenStages:
    """The model's `frozen_stages` for a rule list.

    Args:
        arch: one of `jt.models.ARCHS`.
        rules: the rules.

    Returns:
        `partition.frozen_prefix` (a static int: no backward pass through the frozen stages)
        when no multiplier is a schedule; else `partition.frozen_prefix_schedule`, a function
        of the step, so one compilation serves every phase.

    Example:
        >>> frozen_stages_for("resnet18", partition.preset("resnet18", "head"))
        5
    """
    scheduled = any(
        callable(g.lr_mult) and not g.is_frozen
        for g in (partition.as_group(spec) for _, spec in rules)
    )
    if scheduled:
        return partition.frozen_prefix_schedule(arch, rules)
    return partition.frozen_prefix(arch, rules)


# ---------------------------------------------------------------------------
# Batches.


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(train.DATA_AXIS))


def _check_divisible(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
    if jax.process_count() > 1:
        # This process's part of the global batch; the prefetcher's device_put keeps it.
        return train.shard_batch(batch, mesh)
    n_dev = mesh.devices.size
    n = len(batch["label"])
    if n % n_dev:
        raise ConfigError(
            f"a training batch of {n} examples cannot be split over {n_dev} devices; use "
            "a batch size divisible by the device count and drop the last partial batch "
            "(make_loader(..., train=True) does)"
        )
    return dict(batch)


def _divisible(batches: Iterable[Mapping[str, Any]], mesh: Mesh) -> Iterator[dict[str, Any]]:
    for batch in batches:
        yield _check_divisible(batch, mesh)


class _DivisibleWithState(Iterator[dict[str, Any]]):
    """`_divisible` over a loader iterator, keeping its get_state() and close()."""

    def __init__(self, source: data.LoaderIterator, mesh: Mesh) -> None:
        self._source = source
        self._mesh = mesh

    def __next__(self) -> dict[str, Any]:
        return _check_divisible(next(self._source), self._mesh)

    def get_state(self) -> bytes:
        return self._source.get_state()

    def close(self) -> None:
        self._source.close()


def _padded(batches: Iterable[Mapping[str, Any]], size: int, n_dev: int) -> Iterator[dict]:
    """Pads each batch to `size` (rounded up to a multiple of `n_dev`) with label -1 examples.

    One batch shape means one compilation, and any batch can be split over the devices.
    uint8 images stay uint8 (normalised on the device), others become float32.
    """
    for batch in batches:
        n = len(batch["label"])
        target = max(size, n)
        target += -target % n_dev
        image = _host_images(batch["image"])
        label = np.asarray(batch["label"], np.int32)
        if n < target:
            image = np.concatenate([image, np.zeros((target - n, *image.shape[1:]), image.dtype)])
            label = np.concatenate([label, np.full((target - n,), -1, np.int32)])
        yield {"image": image, "label": label}


def _host_images(images: Any) -> np.ndarray:
    """uint8 pixels as they are (a quarter of the bytes to the device), anything else float32."""
    images = np.asarray(images)
    return images if images.dtype == np.uint8 else images.astype(np.float32, copy=False)


def normalization(
    mean: Sequence[float] | None, std: Sequence[float] | None, *loaders: Any
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """The mean and std that uint8 batches from `loaders` are normalised with.

    A uint8 `data.ImageLoader` (``make_loader(..., dtype=np.uint8)``) carries the mean and
    std it was made with (``loader.mean``, ``loader.std``, e.g. a timm weights' own): they
    are the default, so a loader made for other statistics is normalised with them. Float32
    loaders have normalised their batches already and say nothing here.

    Args:
        mean: the caller's mean, or None (the loaders', else ImageNet's).
        std: the caller's std, or None.
        *loaders: where the batches come from; only `data.ImageLoader` ones are read.

    Returns:
        (mean, std) as tuples, or None for ImageNet's.

    Raises:
        ConfigError: a given mean or std that differs from a uint8 loader's, or two uint8
            loaders with different ones.
    """
    mean, std = train.check_normalization(mean, std)
    found = {
        train.check_normalization(getattr(loader, "mean", None), getattr(loader, "std", None))
        for loader in loaders
        if isinstance(loader, data.ImageLoader)
        and np.dtype(getattr(loader, "dtype", np.float32)) == np.uint8
    }
    if len(found) > 1:
        raise ConfigError(
            f"the uint8 loaders were made with different mean/std {sorted(found)}: make them "
            "with the same mean= and std= (those of the weights' preprocessing)"
        )
    if not found:
        return mean, std
    ((loader_mean, loader_std),) = found
    for name, given, loader_value in (("mean", mean, loader_mean), ("std", std, loader_std)):
        if given is not None and given != loader_value:
            raise ConfigError(
                f"{name}={list(given)} differs from the {name} {list(loader_value)} the uint8 "
                f"loader was made with; leave {name} out (the loader's is used) or make the "
                f"loader with make_loader(..., {name}=...)"
            )
    return loader_mean, loader_std


def _host_metrics(logits: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Summable metrics of the real (label >= 0) examples of a padded batch."""
    real = label >= 0
    logits, label = logits[real].astype(np.float64), label[real]
    top = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
    picked = np.take_along_axis(logits, label[:, None], axis=-1)[:, 0]
    return {
        "loss_sum": float((log_z - picked).sum()),
        "correct": int((logits.argmax(axis=-1) == label).sum()),
        "count": int(real.sum()),
    }


def _model_variables(variables: Mapping[str, Any] | train.TrainState) -> dict[str, Any]:
    if isinstance(variables, train.TrainState):
        return {"params": variables.params, "batch_stats": variables.batch_stats}
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def _for_inference(model: nn.Module, compute_dtype: Any, variables: dict[str, Any]) -> dict:
    """`variables` with the Winograd kernel transforms done once for a whole evaluation
    (`models.prepare_inference`), for the model `_make_logits_fn` runs."""
    return models.prepare_inference(train._with_dtype(model, compute_dtype), variables)


def _make_logits_fn(
    model: nn.Module,
    mesh: Mesh,
    compute_dtype: Any,
    precision: str | None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
):
    """jit `(variables, images) -> float32 logits`, BatchNorm on running statistics.

    uint8 images are normalised on the device with `mean` and `std` (`train.normalize_images`).
    """
    devices = tuple(mesh.devices.flat)
    mean, std = train.check_normalization(mean, std)
    return _cached_logits_fn(model, devices, mesh.axis_names, compute_dtype, precision, mean, std)


@functools.lru_cache(maxsize=16)
def _cached_logits_fn(
    model: nn.Module,
    devices: tuple,
    axis_names: tuple,
    compute_dtype: Any,
    precision: str | None,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
):
    # One jitted function per model and devices: later calls (each epoch's evaluation, the
    # next run's, repeated `predict`s) reuse its compilations.
    mesh = Mesh(np.asarray(devices), axis_names)
    model = train._with_dtype(model, compute_dtype)

    def logits_fn(variables, images):
        images = train.normalize_images(images, mean, std)
        return model.apply(variables, images, train=False).astype(jnp.float32)

    return jax.jit(
        train.at_precision(logits_fn, precision),
        in_shardings=(_replicated(mesh), _batch_sharding(mesh)),
        out_shardings=_replicated(mesh),
    )


def _global_copy(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
    """A batch every process holds whole, as global arrays, with no communication."""
    return {
        k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
        for k, v in batch.items()
    }


def _run_eval(logits_fn, variables, loader, mesh: Mesh) -> dict[str, Any]:
    """Loss and accuracy over a loader; the numbers are summed on the host in float64."""
    size = getattr(loader, "batch_size", 0) or 1
    labels: collections.deque[np.ndarray] = collections.deque()  # host copies, in order

    def batches():
        for batch in _padded(loader, size, mesh.devices.size):
            labels.append(batch["label"])
            if jax.process_count() > 1:  # every process reads every batch, fills its devices
                batch = _global_copy(batch, _batch_sharding(mesh))
            yield batch

    device_batches = data.prefetch_to_device(batches(), _PREFETCH, _batch_sharding(mesh))
    parts = []
    try:
        for batch in device_batches:
            logits = logits_fn(variables, batch["image"])
            parts.append(_host_metrics(np.asarray(logits), labels.popleft()))
    finally:
        device_batches.close()
    return train.summarize(parts)


def evaluate(
    model: nn.Module,
    variables: Mapping[str, Any] | train.TrainState,
    loader: Iterable[Mapping[str, Any]],
    *,
    mesh: Mesh | None = None,
    compute_dtype: Any = None,
    precision: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, float]:
    """Loss and top-1 accuracy of a model on every example of a loader.

    BatchNorm runs on running statistics. Partial batches are padded to the loader's batch
    size (one compilation) and the padding is left out of the numbers.

    Args:
        model: the flax module.
        variables: {"params", "batch_stats"}, or a `train.TrainState`.
        loader: e.g. `data.make_loader(folder, batch_size=..., train=False)`, or any iterable
            of {"image": (N, H, W, 3), "label": (N,)} batches; the images float32 normalised,
            or uint8 pixels normalised on the device (`train.normalize_images`).
        mesh: devices to split batches over; default: every local device.
        compute_dtype: e.g. jnp.bfloat16 (parameters stay float32).
        precision: float32 precision of convolutions and products; see `train.make_train_step`.
        mean: per-channel mean for uint8 images; default: the uint8 loader's
            (``loader.mean``), else ImageNet's.
        std: per-channel standard deviation for uint8 images; default: as `mean`.

    Returns:
        {"loss": mean cross-entropy per example, "accuracy": top-1, "count": examples}.
    """
    mean, std = normalization(mean, std, loader)
    mesh = mesh or train.data_parallel_mesh()
    on_devices = train.replicate(_model_variables(variables), mesh)
    on_devices = _for_inference(model, compute_dtype, on_devices)
    logits_fn = _make_logits_fn(model, mesh, compute_dtype, precision, mean, std)
    return _run_eval(logits_fn, on_devices, loader, mesh)


def predict(
    model: nn.Module,
    variables: Mapping[str, Any] | train.TrainState,
    images: Any,
    *,
    batch_size: int = 64,
    mesh: Mesh | None = None,
    compute_dtype: Any = None,
    precision: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """Logits for images, in batches (BatchNorm on running statistics).

    Args:
        model: the flax module.
        variables: {"params", "batch_stats"}, or a `train.TrainState`.
        images: float32 (N, H, W, 3) or one (H, W, 3) image, normalised (e.g. from
            `data.eval_transform`), or uint8 pixels, normalised on the device with `mean`
            and `std` (`train.normalize_images`).
        batch_size: images per compiled call; fewer images are padded to a power of two.
        mesh: devices to split batches over; default: every local device.
        compute_dtype: e.g. jnp.bfloat16 (parameters stay float32).
        precision: float32 precision of convolutions and products; see `train.make_train_step`.
        mean: per-channel mean for uint8 images; default ImageNet's.
        std: per-channel standard deviation for uint8 images; default ImageNet's.

    Returns:
        float32 logits, (N, num_classes), or (num_classes,) for one image; `argmax(-1)` is the
        class index (`folder.classes[i]`), `jax.nn.softmax` the probabilities.
    """
    x = _host_images(images)
    single = x.ndim == 3
    if single:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3 or len(x) == 0:
        raise ConfigError(f"images must be (N, H, W, 3) or (H, W, 3), got shape {x.shape}")
    mesh = mesh or train.data_parallel_mesh()
    on_devices = jax.device_put(_model_variables(variables), _replicated(mesh))
    on_devices = _for_inference(model, compute_dtype, on_devices)
    logits_fn = _make_logits_fn(model, mesh, compute_dtype, precision, mean, std)
    # Batches padded to a power of two (at most batch_size): few shapes, few compilations.
    size = min(batch_size, 1 << (len(x) - 1).bit_length())
    batches = (
        {"image": x[i : i + size], "label": np.zeros(len(x[i : i + size]), np.int32)}
        for i in range(0, len(x), size)
    )
    out = []
    for batch in _padded(batches, size, mesh.devices.size):
        images_on_devices = jax.device_put(batch["image"], _batch_sharding(mesh))
        out.append(np.asarray(logits_fn(on_devices, images_on_devices)))
    logits = np.concatenate(out)[: len(x)]
    return logits[0] if single else logits


# ---------------------------------------------------------------------------
# The loop.


def format_epoch(metrics: Mapping[str, Any], epochs: int | None = None, desc: str = "") -> str:
    """One history entry as d2l prints it.

    Example:
        >>> format_epoch({"epoch": 1, "train_loss": 0.5, "train_acc": 0.75, "test_acc": 0.8,
        ...               "examples_per_s": 123.4, "compile_s": 0.0, "epoch_s": 9.5}, 5, "run")
        'run: epoch 1/5: loss 0.500, train acc 0.750, test acc 0.800, 123.4 examples/sec, 9.5s'
    """

    def num(key: str, fmt: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None or not math.isfinite(value) else format(value, fmt)

    of = f"/{epochs}" if epochs else ""
    text = f"epoch {metrics['epoch']}{of}: loss {num('train_loss', '.3f')}, "
    text += f"train acc {num('train_acc', '.3f')}"
    if metrics.get("test_acc") is not None:
        text += f", test acc {num('test_acc', '.3f')}"
    if metrics.get("skipped"):
        text += f", skipped {metrics['skipped']} non-finite step(s)"
    text += f", {num('examples_per_s', '.1f')} examples/sec, {num('epoch_s', '.1f')}s"
    if metrics.get("compile_s"):
        text += f" (first step, with compilation: {metrics['compile_s']:.1f}s)"
    return f"{desc}: {text}" if desc else text


class _TrainBatches:
    """The training batches of each epoch, on the devices, starting at a given position."""

    def __init__(self, loader, mesh: Mesh, start_epoch: int, epochs: int, loader_state: Any):
        self._loader = loader
        self._mesh = mesh
        self._n_dev = len(mesh.local_devices)  # a loader serves this process's part
        self._stream: data.DevicePrefetcher | None = None
        self.start_index = 0
        self.start_epoch = start_epoch
        self._resumable = isinstance(loader, data.ImageLoader)
        if self._resumable:
            self._init_image_loader(start_epoch, epochs, loader_state)
        elif loader_state is not None:
            raise ConfigError("loader_state needs a jtransfer.data.ImageLoader as train_loader")
        self.steps_per_epoch = getattr(loader, "steps_per_epoch", None)
        if self.steps_per_epoch is None and hasattr(loader, "__len__"):
            self.steps_per_epoch = len(loader)

    def _init_image_loader(self, start_epoch: int, epochs: int, loader_state: Any) -> None:
        loader: data.ImageLoader = self._loader
        if loader.batch_size % self._n_dev:
            raise ConfigError(
                f"batch_size {loader.batch_size} is not a multiple of the {self._n_dev} devices; "
                "choose a batch size divisible by the device count"
            )
        if loader.num_epochs is not None and loader.num_epochs < epochs:
            raise ConfigError(
                f"the training loader serves {loader.num_epochs} epoch(s) but fit runs {epochs}; "
                "build it with make_loader(..., train=True, num_epochs=None), so every epoch "
                "gets a fresh shuffle and fresh augmentations"
            )
        spe = loader.steps_per_epoch
        host = iter(loader)
        if loader_state is not None:
            host.set_state(loader_state)
        elif start_epoch:
            position = json.loads(host.get_state())
            position["next_batch"] = start_epoch * spe
            host.set_state(position)
        next_batch = json.loads(host.get_state())["next_batch"]
        self.start_epoch, self.start_index = divmod(next_batch, spe)
        self._stream = data.prefetch_to_device(
            _DivisibleWithState(host, self._mesh), _PREFETCH, _batch_sharding(self._mesh)
        )

    def epoch(self, first: bool) -> tuple[Iterator[dict[str, jax.Array]], Any]:
        """(device batches of the next epoch, the iterator whose get_state() is the position)."""
        if self._resumable:  # one stream of batches over all epochs
            n = self.steps_per_epoch - (self.start_index if first else 0)
            return itertools.islice(self._stream, n), self._stream
        self.close()
        self._stream = data.prefetch_to_device(
            _divisible(self._loader, self._mesh), _PREFETCH, _batch_sharding(self._mesh)
        )
        return self._stream, None

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class _SkipGuard:
    """Counts non-finite steps that `skip_nonfinite` skipped; raises once the run has diverged.

    Skipping is for a rare bad batch. `limit` skipped steps in a row (across epoch ends), or
    an epoch in which every step was skipped, mean the run itself has diverged: stopping
    then, with the state of the last good step, beats silently training on nothing.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.first_in_a_row = 0  # 0-based step that began the current streak

    def skipped(self, at_step: int, loss: float) -> None:
        if self.in_a_row == 0:
            self.first_in_a_row = at_step
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.in_a_row} steps in a row had a non-finite loss, gradient or update (steps "
                f"{self.first_in_a_row}..{at_step}, the last loss {loss}); each was skipped, "
                f"but {self.limit} in a row (the limit) means training has diverged. The "
                f"state is the one before step {self.first_in_a_row}. {train.NONFINITE_ADVICE}"
            )

    def applied(self) -> None:
        self.in_a_row = 0

    @staticmethod
    def check_epoch(epoch: int, skipped: int, steps: int) -> None:
        if skipped and skipped == steps:
            raise NonFiniteLossError(
                f"every one of the {steps} step(s) of epoch {epoch + 1} had a non-finite loss, "
                f"gradient or update and was skipped, so nothing was learned. "
                f"{train.NONFINITE_ADVICE}"
            )


class _EpochRun:
    """One epoch's steps: running totals, NaN checks, and throughput timing.

    A step's metrics are read while the next step runs (reading them waits for the step),
    so checking every loss costs no idle device time. The run's first step compiles: it is
    waited for and timed apart, and the throughput counts the steps after it.
    """

    def __init__(
        self, bar: tqdm, steps: int, compiled: bool, guard: _SkipGuard | None = None
    ) -> None:
        self.bar = bar
        self.steps = steps  # steps done (batches trained on, skipped ones included)
        self.compiled = compiled
        self.guard = guard
        self.skipped = 0
        self.first_step = steps
        self.totals = {"loss_sum": 0.0, "correct": 0, "count": 0}
        self.compile_s = 0.0
        self._pending: tuple[train.Metrics, int] | None = None
        self._timed_from = 0  # examples before the timed window
        self._t0 = time.perf_counter()
        self.train_s = 0.0

    def step(self, train_step, state, batch):
        t_step = time.perf_counter()
        state, metrics = train_step(state, batch)
        self.finish()  # the previous step's metrics, while this one runs
        self._pending = (metrics, self.steps)
        self.steps += 1
        if not self.compiled:
            self.finish()
            self.compiled = True
            self.compile_s = time.perf_counter() - t_step
            self._timed_from, self._t0 = self.totals["count"], time.perf_counter()
        self.bar.update(1)
        return state, metrics

    def finish(self) -> None:
        """Reads and checks the metrics of the last step not read yet."""
        if self._pending is None:
            return
        metrics, at_step = self._pending
        self._pending = None
        keys = ("loss", *train.SUMMABLE, *(("skipped",) if self.guard else ()))
        m = jax.device_get({k: metrics[k] for k in keys})
        if self.guard is not None:
            if m["skipped"]:
                self.skipped += 1
                self.guard.skipped(at_step, float(m["loss"]))
                return  # its NaN loss and its examples stay out of the epoch's numbers
            self.guard.applied()
        train.check_finite(m, at_step)
        for k in train.SUMMABLE:
            self.totals[k] += m[k]
        n = self.totals["count"]
        if not n:
            return
        self.bar.set_postfix(
            loss=f"{self.totals['loss_sum'] / n:.3f}",
            acc=f"{self.totals['correct'] / n:.3f}",
            refresh=False,
        )

    def end(self) -> None:
        """After the epoch's last step: its metrics are checked and the timing stops."""
        self.finish()
        self.train_s = time.perf_counter() - self._t0

    def history_entry(self, epoch: int, test: dict | None, epoch_s: float) -> dict[str, Any]:
        n = self.totals["count"]
        timed = n - self._timed_from
        return {
            "epoch": epoch + 1,
            "step": self.steps,
            "train_loss": self.totals["loss_sum"] / n if n else None,
            "train_acc": self.totals["correct"] / n if n else None,
            "train_count": int(n),
            "skipped": self.skipped,
            "test_loss": test["loss"] if test else None,
            "test_acc": test["accuracy"] if test else None,
            "test_count": test["count"] if test else None,
            "examples_per_s": timed / self.train_s if timed else None,
            "compile_s": self.compile_s,
            "epoch_s": epoch_s,
        }


def fit(
    model: nn.Module,
    variables: Mapping[str, Any] | None,
    rules: partition.Rules,
    train_loader: Iterable[Mapping[str, Any]],
    test_loader: Iterable[Mapping[str, Any]] | None = None,
    *,
    learning_rate: float | partition.Schedule,
    epochs: int,
    optimizer: str | Callable[..., Any] = "sgd",
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    loss_reduction: str = "sum",
    bn_policy: str = "train",
    compute_dtype: Any = None,
    precision: str | None = None,
    seed: int = 0,
    arch: str | None = None,
    mesh: Mesh | None = None,
    desc: str = "",
    progress: bool = True,
    log: Callable[[str], Any] | None = print,
    state: train.TrainState | None = None,
    start_epoch: int = 0,
    loader_state: Any = None,
    on_step_end: Callable[[train.TrainState, StepInfo], Any] | None = None,
    on_epoch_end: Callable[[int, train.TrainState, dict[str, Any]], bool | None] | None = None,
    skip_nonfinite: bool = False,
    max_consecutive_skips: int = MAX_CONSECUTIVE_SKIPS,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[train.TrainState, History]:
    """Trains for `epochs` epochs, evaluating after each; d2l's `train_ch13`, jitted.

    Args:
        model: a module from `jt.models.create` (or `porting.load_pretrained`).
        variables: its {"params", "batch_stats"}; may be None when `state` is given.
        rules: who trains how fast, e.g. `partition.finetune(arch)` (the head at 10x) or
            `partition.preset(arch, "head")` (frozen backbone: the frozen stages cost no
            backward pass and keep their `batch_stats` bit-identical).
        train_loader: `data.make_loader(folder, train=True, num_epochs=None, ...)` (each
            epoch its own shuffle; resumable), or any re-iterable of {"image", "label"}
            numpy batches, iterated once per epoch. Images are float32 normalised, or uint8
            pixels (``make_loader(..., dtype=np.uint8)``: a quarter of the bytes to the
            device), normalised inside the compiled steps to the same bits.
        test_loader: evaluated after each epoch (`evaluate`); None to skip.
        learning_rate: base lr, a float or an optax schedule of the step.
        epochs: total epochs; with `start_epoch=k` only epochs k+1..epochs run.
        optimizer, momentum, nesterov, weight_decay: as for `partition.make_optimizer`.
        loss_reduction: "sum" (d2l) or "mean" (torch's default); see `train.make_train_step`.
        bn_policy: "train" (torch `net.train()`) or "frozen"; see `jtransfer.train`.
        compute_dtype: e.g. jnp.bfloat16; see `train.make_train_step`.
        precision: None (XLA's default: TensorFloat-32 on recent NVIDIA GPUs) or "highest"
            (full float32) for the convolutions and products; see `train.make_train_step`.
        seed: seed of the state's PRNG key (dropout); the loaders have their own seeds.
        arch: the registry name of `model`; default: inferred (`infer_arch`).
        mesh: devices to split batches over; default: `train.data_parallel_mesh()`, all
            devices. The batch size must be a multiple of the device count. In a multi-process
            run (`jtransfer.distributed`) the training loader serves this process's part of
            each global batch (`distributed.process_shard_options`), the test loader whole
            batches on every process, and only process 0 logs and shows progress.
        desc: label of the progress bar and of each logged line.
        progress: show a tqdm bar per epoch (only on a terminal).
        log: called with one line per epoch (`format_epoch`); None for silence.
        state: a TrainState to continue from (e.g. restored from a checkpoint) instead of
            a new one from `variables`; it must come from the same model, rules and optimizer.
        start_epoch: epochs already completed (the `epoch` of the last history entry).
        loader_state: `StepInfo.loader_state()` of a checkpoint taken mid-epoch; overrides
            `start_epoch` and resumes with the next batch (ImageLoader only).
        on_step_end: `on_step_end(state, info: StepInfo)` after each step. `state` is only
            valid during the call: the next step donates its buffers.
        on_epoch_end: `on_epoch_end(epoch, state, metrics)` after each epoch's evaluation,
            with the history entry; return True to stop training.
        skip_nonfinite: a step whose loss, gradient or update is NaN or infinite changes nothing
            (params, batch_stats and opt_state stay bit-identical; see
            `train.make_train_step`) instead of stopping the run. Skipped steps are counted
            in the history's ``skipped`` and the log line, and their examples left out of
            the training loss and accuracy. Training still stops with NonFiniteLossError
            after `max_consecutive_skips` skipped steps in a row, or when every step of an
            epoch was skipped: a diverged run, not a bad batch.
        max_consecutive_skips: see `skip_nonfinite` (default 10). The count starts afresh
            in each call (a resumed run).
        mean: per-channel mean that uint8 batches (training and test) are normalised with;
            default: the uint8 loaders' (``loader.mean``, see `normalization`), else
            ImageNet's (`data.IMAGENET_MEAN`). Float batches are used as they are.
        std: per-channel standard deviation for uint8 batches; default: as `mean`.

    Returns:
        (the final TrainState, the history: one dict per epoch run, keys `HISTORY_KEYS`).

    Raises:
        NonFiniteLossError: a step's loss is NaN or infinite (with `skip_nonfinite`: too
            many in a row, or a whole epoch); the message names the step (0-based: the
            steps done before it).
        ConfigError: invalid options, rules that do not cover the params, batch sizes that
            do not split over the devices.
    """
    if epochs < 0 or start_epoch < 0:
        raise ConfigError(f"epochs and start_epoch must be >= 0, got {epochs}, {start_epoch}")
    if state is None and variables is None:
        raise ConfigError("pass variables (a new run) or state (to continue one)")
    if isinstance(max_consecutive_skips, bool) or not (
        isinstance(max_consecutive_skips, int) and max_consecutive_skips >= 1
    ):
        raise ConfigError(
            f"max_consecutive_skips must be an int >= 1, got {max_consecutive_skips!r}"
        )
    arch = arch or infer_arch(model)
    mean, std = normalization(mean, std, train_loader, test_loader)
    mesh = mesh or train.data_parallel_mesh()
    params = state.params if state is not None else variables["params"]
    tx = partition.make_optimizer(
        params,
        rules,
        learning_rate=learning_rate,
        optimizer=optimizer,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
    )
    train_step = train.make_train_step(
        model,
        tx,
        loss_reduction=loss_reduction,
        bn_policy=bn_policy,
        frozen_stages=frozen_stages_for(arch, rules),
        compute_dtype=compute_dtype,
        precision=precision,
        mesh=mesh,
        skip_nonfinite=skip_nonfinite,
        frozen_params=partition.frozen_params(params, rules),
        mean=mean,
        std=std,
    )
    logits_fn = _make_logits_fn(model, mesh, compute_dtype, precision, mean, std)
    if state is None:
        state = train.create_train_state(model, variables, tx, seed, mesh=mesh)
    else:
        state = train.replicate(state, mesh)

    history: History = []
    step = int(state.step)
    batches = _TrainBatches(train_loader, mesh, start_epoch, epochs, loader_state)
    compiled = False
    guard = _SkipGuard(max_consecutive_skips) if skip_nonfinite else None
    try:
        for epoch in range(batches.start_epoch, epochs):
            t_epoch = time.perf_counter()
            first = epoch == batches.start_epoch
            epoch_batches, position = batches.epoch(first)
            start_index = batches.start_index if first else 0
            bar = tqdm(
                total=batches.steps_per_epoch,
                initial=start_index,
                desc=f"{desc + ' ' if desc else ''}epoch {epoch + 1}/{epochs}",
                unit="batch",
                leave=False,
                disable=None if progress and jax.process_index() == 0 else True,
            )
            run = _EpochRun(bar, step, compiled, guard)
            try:
                for index, batch in enumerate(epoch_batches, start=start_index):
                    state, metrics = run.step(train_step, state, batch)
                    if on_step_end is not None:
                        on_step_end(state, StepInfo(epoch, index, run.steps, metrics, position))
                run.end()
            finally:
                bar.close()
            _SkipGuard.check_epoch(epoch, run.skipped, run.steps - run.first_step)
            if run.totals["count"] == 0 and batches.steps_per_epoch != start_index:
                raise ConfigError(
                    f"the training loader gave no batch in epoch {epoch + 1}; pass a loader "
                    "that can be iterated once per epoch (make_loader(..., num_epochs=None), "
                    "or a list), not a one-shot iterator"
                )
            step, compiled = run.steps, run.compiled
            test = None
            if test_loader is not None:
                prepared = _for_inference(model, compute_dtype, _model_variables(state))
                test = _run_eval(logits_fn, prepared, test_loader, mesh)
            entry = run.history_entry(epoch, test, time.perf_counter() - t_epoch)
            history.append(entry)
            if log is not None and jax.process_index() == 0:
                log(format_epoch(entry, epochs, desc))
            if on_epoch_end is not None and on_epoch_end(epoch + 1, state, entry):
                break
    finally:
        batches.close()
    return state, history
