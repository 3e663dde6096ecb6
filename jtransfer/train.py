"""Jit-compiled train and eval steps: `train_step(state, batch) -> (state, metrics)`.

The BatchNorm policy has one meaning everywhere:

* ``bn_policy="train"`` is torch's ``net.train()``: BatchNorm of the trainable
  stages normalises with batch statistics and updates the running ones. Stages
  frozen with a static ``frozen_stages=k`` run BatchNorm on running statistics,
  keep their ``batch_stats`` bit-identical and stop the gradient at their end, so
  no backward pass runs through them (torch: the frozen part in ``eval()`` mode
  with ``requires_grad=False``).
* ``bn_policy="frozen"`` is torch with every BatchNorm module in ``eval()``
  mode: running statistics everywhere, ``batch_stats`` never change; dropout
  and gradients are unaffected.

``frozen_stages`` may also be a function of the step (gradual unfreezing). Its
value is then traced: frozen stages still run BatchNorm on running statistics,
but gradients are computed and must be zeroed by the optimizer (schedules in
`jtransfer.partition`), so one compilation serves every phase.

``skip_nonfinite=True`` makes a step whose loss or gradient holds a NaN or an
infinity (or whose update would make a parameter non-finite) a no-op on params,
batch_stats and opt_state (selected inside the
compiled step: no re-compile, no host round trip), reported as
``metrics["skipped"]``; `jtransfer.fit` counts and limits such steps.

``precision`` is the float32 precision of every convolution and matrix product
in the step (`jax.default_matmul_precision` while it is traced): None leaves
XLA's default, which on NVIDIA GPUs since Ampere runs float32 convolutions and
products as TensorFloat-32 (10-bit mantissa inputs, float32 sums), as torch does
for its cuDNN convolutions by default; "highest" computes them in full float32
(slower on a GPU; what parity needs). On the CPU both give the same bits. It
does not apply to bfloat16 compute (`compute_dtype`). See docs/guides/precision.md.

Batches are ``{"image": (N, H, W, 3), "label": int32 (N,)}``. The images are either
float32, already normalised (``ToTensor`` then ``Normalize``, `jtransfer.data`'s
transforms), or uint8 pixels (what torchvision holds before ``ToTensor``;
``make_loader(..., dtype=np.uint8)``), a quarter of the bytes to move, which every step
normalises on the device with `normalize_images`, to the same float32 bits. The dtype is
read when the step is traced, so each kind compiles once. uint8 images are normalised with
``mean``/``std`` (default ImageNet's, `jtransfer.data.IMAGENET_MEAN` and ``IMAGENET_STD``).

Example:
    >>> import jax.numpy as jnp, optax
    >>> import jtransfer as jt
    >>> from jtransfer import train
    >>> model = jt.models.create("resnet18", num_classes=2)
    >>> variables = jt.models.random_variables(model, image_size=32)
    >>> tx = optax.sgd(1e-3)
    >>> state = train.create_train_state(model, variables, tx)
    >>> step = train.make_train_step(model, tx)
    >>> batch = {"image": jnp.zeros((2, 32, 32, 3)), "label": jnp.array([0, 1])}
    >>> state, metrics = step(state, batch)
    >>> int(state.step), int(metrics["count"])
    (1, 2)
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jtransfer.errors import ConfigError, NonFiniteLossError
from jtransfer.models.layers import BatchNorm

Array = jax.Array
Batch = Mapping[str, Array]
Metrics = dict[str, Array]
FrozenStages = int | Callable[[Array], Array]

DATA_AXIS = "data"
LOSS_REDUCTIONS = ("sum", "mean")
BN_POLICIES = ("train", "frozen")
# `precision` values: XLA's default, or the names `jax.default_matmul_precision` takes.
PRECISIONS = (None, "default", "high", "highest", "tensorfloat32", "float32", "bfloat16")
# Metrics that add up over batches; `summarize` turns totals into means.
SUMMABLE = ("loss_sum", "correct", "count")


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and writes; a pytree, so it can be checkpointed.

    Attributes:
        step: int32 scalar, number of steps taken.
        params: the model parameters (float32).
        batch_stats: BatchNorm running statistics.
        opt_state: the optax optimizer state.
        rng: PRNG key; step t uses `fold_in(rng, t)` (VGG dropout).
    """

    step: Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: Array


def create_train_state(
    model: nn.Module,
    variables: Mapping[str, Any],
    tx: optax.GradientTransformation,
    seed: int = 0,
    *,
    mesh: Mesh | None = None,
) -> TrainState:
    """A TrainState at step 0 for `variables` of `model`.

    The arrays are copied: train steps donate the state's buffers, and the
    caller's `variables` must stay usable afterwards.

    Args:
        model: the flax module `variables` belong to (used to check their shapes).
        variables: {"params": ..., "batch_stats": ...}, e.g. from `porting.from_torchvision`.
        tx: the optimizer; its state is initialised here.
        seed: seed of the state's PRNG key (dropout).
        mesh: if given, the state is replicated over it (see `data_parallel_mesh`).

    Returns:
        The TrainState.

    Raises:
        ConfigError: the variables do not fit the model.
    """
    _check_fits(model, variables)
    params = jax.tree.map(jnp.array, variables["params"])
    batch_stats = jax.tree.map(jnp.array, variables.get("batch_stats", {}))
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
    )
    if mesh is not None:
        state = replicate(state, _check_mesh(mesh))
    return state


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copies a pytree of arrays to every device of `mesh` (``NamedSharding(mesh, P())``).

    In a multi-process run every process must pass the same values (e.g. the same seed or
    the same checkpoint); each one fills only its own devices, with no communication.
    """
    sharding = NamedSharding(mesh, P())
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def one(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(one, tree)


def _check_fits(model: nn.Module, variables: Mapping[str, Any]) -> None:
    if "params" not in variables:
        raise ConfigError(
            f"variables must be {{'params': ..., 'batch_stats': ...}}; got keys {sorted(variables)}"
        )
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    want = flax.traverse_util.flatten_dict(dict(expected), sep="/")
    have = flax.traverse_util.flatten_dict(
        {k: variables[k] for k in ("params", "batch_stats") if k in variables}, sep="/"
    )
    problems = [f"missing {k}" for k in want if k not in have]
    problems += [f"unexpected {k}" for k in have if k not in want]
    problems += [
        f"{k}: shape {tuple(have[k].shape)}, the model needs {tuple(want[k].shape)}"
        for k in want
        if k in have and tuple(have[k].shape) != tuple(want[k].shape)
    ]
    if problems:
        shown = problems[:10] + (
            [f"... and {len(problems) - 10} more"] if len(problems) > 10 else []
        )
        raise ConfigError(
            "the variables do not fit the model (was it created with the same arch and "
            "num_classes?):\n  " + "\n  ".join(shown)
        )


def data_parallel_mesh(devices: Iterable[jax.Device] | None = None) -> Mesh:
    """A 1-d mesh with axis "data" over `devices` (default: `jax.devices()`).

    The default is every local device, and in a multi-process run (`jtransfer.distributed`)
    the devices of all processes.
    """
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(devices, (DATA_AXIS,))


def _check_mesh(mesh: Mesh) -> Mesh:
    if mesh.axis_names != (DATA_AXIS,):
        raise ConfigError(
            f"the mesh must have the single axis {DATA_AXIS!r}, got {mesh.axis_names}; "
            "build it with jtransfer.train.data_parallel_mesh()"
        )
    return mesh


def shard_batch(batch: Batch, mesh: Mesh) -> dict[str, Array]:
    """Places a batch on `mesh`, split along its first (batch) axis.

    Args:
        batch: {"image": (N, H, W, 3), "label": (N,)} host or device arrays. When the mesh
            spans several processes: this process's part of the global batch (see
            `jtransfer.distributed.global_batch`).
        mesh: a mesh from `data_parallel_mesh`.

    Returns:
        The batch as global arrays sharded with `NamedSharding(mesh, P("data"))`.

    Raises:
        ConfigError: N is not a multiple of the number of (this process's) devices.
    """
    sharding = NamedSharding(_check_mesh(mesh), P(DATA_AXIS))
    local = not sharding.is_fully_addressable
    n_dev = len(mesh.local_devices) if local else mesh.devices.size
    n = len(batch["label"])
    if n % n_dev:
        raise ConfigError(
            f"batch size {n} is not a multiple of the {n_dev} devices of the mesh; "
            "use a batch size divisible by the device count (or drop the last batch)"
        )
    if local:
        from jtransfer import distributed

        return distributed.global_batch(batch, mesh)
    return jax.device_put(dict(batch), sharding)


def _bn_running_average_interceptor(next_fun, args, kwargs, context):
    """Runs every BatchNorm on its running statistics, whatever the model asked for."""
    bn = context.module
    if not isinstance(bn, BatchNorm) or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    if isinstance(bn.use_running_average, bool) and bn.use_running_average:
        return next_fun(*args, **kwargs)
    # An unbound eval-mode copy applied to the bound layer's own variables: the
    # gradient reaches its scale/bias as usual, and nothing is written back.
    eval_bn = bn.clone(parent=None, use_running_average=True)
    return eval_bn.apply(
        {"params": bn.variables["params"], "batch_stats": bn.variables["batch_stats"]},
        *args,
        **kwargs,
    )


def _bn_context(bn_policy: str):
    if bn_policy == "frozen":
        return nn.intercept_methods(_bn_running_average_interceptor)
    return contextlib.nullcontext()


def _summable_metrics(logits: Array, labels: Array, per_example: Array) -> Metrics:
    return {
        "loss_sum": per_example.sum(),
        "correct": jnp.sum(jnp.argmax(logits, axis=-1) == labels).astype(jnp.int32),
        "count": jnp.asarray(labels.shape[0], jnp.int32),
    }


def _check_options(model, loss_reduction, bn_policy, frozen_stages) -> None:
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ConfigError(
            f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}"
        )
    if bn_policy not in BN_POLICIES:
        raise ConfigError(f"bn_policy must be one of {BN_POLICIES}, got {bn_policy!r}")
    n_stages = len(getattr(model, "stages", ()))
    if isinstance(frozen_stages, bool) or not (
        callable(frozen_stages) or isinstance(frozen_stages, int)
    ):
        raise ConfigError(
            f"frozen_stages must be an int or a function of the step, got {frozen_stages!r}"
        )
    if isinstance(frozen_stages, int) and not 0 <= frozen_stages < max(n_stages, 1):
        raise ConfigError(
            f"frozen_stages={frozen_stages}: the model has {n_stages} stages "
            f"{tuple(getattr(model, 'stages', ()))}; freeze 0..{n_stages - 1} of them "
            "(the last one holds the head, which must stay trainable)"
        )


def check_normalization(
    mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """`mean` and `std` as tuples of 3 floats (None stays None: ImageNet's, when used).

    Raises:
        ConfigError: not 3 finite numbers each, or a std that is not positive.
    """

    def one(name: str, value: Sequence[float] | None) -> tuple[float, ...] | None:
        if value is None:
            return None
        try:
            out = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            out = ()
        if len(out) != 3 or not all(math.isfinite(v) for v in out):
            raise ConfigError(
                f"{name} must be 3 numbers, one per RGB channel in [0, 1] units as torchvision's "
                f"Normalize takes them (e.g. ImageNet's {name} (0.485, 0.456, 0.406)), got "
                f"{value!r}"
            )
        if name == "std" and min(out) <= 0:
            raise ConfigError(f"std must be > 0 for every channel, got {value!r}")
        return out

    return one("mean", mean), one("std", std)


@functools.lru_cache(maxsize=16)
def _pixel_table(mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> np.ndarray:
    """float32 (256, 3): the normalised value of each uint8 pixel value in each channel.

    Made by `jtransfer.data.normalize` itself, the host's reference (the loader's float32
    batches hold the same bits), so a looked-up value has its bits by construction. (The
    same arithmetic compiled by XLA would not: it turns a division by a constant into a
    multiplication by its reciprocal, which is not correctly rounded; on the CPU 7 in 10
    outputs of ``x / 255`` then ``/ std`` differed in their last bit.)
    """
    from jtransfer import data  # grain and PIL: imported when a uint8 batch is first traced

    mean = data.IMAGENET_MEAN if mean is None else mean
    std = data.IMAGENET_STD if std is None else std
    pixels = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)  # (256, 1, 3)
    table = data.normalize(pixels, mean, std)[:, 0, :]
    return np.ascontiguousarray(table, np.float32)


def normalize_images(
    images: Array, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Array:
    """Images as the model takes them: uint8 pixels normalised, float images unchanged.

    uint8 ``(..., 3)`` pixels become float32 ``ToTensor()`` then ``Normalize(mean, std)``,
    bit-identical to `jtransfer.data.normalize` on the host (the float32
    division by 255, the subtraction and the division by the std, in torchvision's order):
    each value is looked up in a 256 x 3 table that transform made. Inside a jitted step
    this is where the normalising happens, on the device. Floating-point images are taken
    to be normalised already and returned as they are, whatever `mean` and `std` say.

    Args:
        images: uint8 or floating-point images, channels last.
        mean: per-channel mean for uint8 images; default ImageNet's
            (`jtransfer.data.IMAGENET_MEAN`).
        std: per-channel standard deviation for uint8 images; default ImageNet's.

    Returns:
        float32 images for uint8 input, else `images`.

    Raises:
        ConfigError: another dtype (e.g. int32 or uint16 pixels), uint8 images without 3
            channels, or a bad mean or std.

    Example:
        >>> import numpy as np
        >>> from jtransfer import data
        >>> pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), np.uint8)
        >>> on_device = np.asarray(normalize_images(pixels))
        >>> on_device.dtype, np.array_equal(on_device, data.normalize(pixels))
        (dtype('float32'), True)
    """
    dtype = np.dtype(images.dtype)
    if np.issubdtype(dtype, np.floating) or dtype == jnp.bfloat16:
        return images
    if dtype != np.uint8:
        raise ConfigError(
            f"batch images must be uint8 pixels (normalised on the device) or floats already "
            f"normalised, got {dtype}; convert 0..255 pixels with .astype(np.uint8), or use "
            "jtransfer.data's loader"
        )
    if images.ndim < 1 or images.shape[-1] != 3:
        raise ConfigError(
            f"uint8 images must be RGB, channels last (..., H, W, 3), got shape "
            f"{tuple(images.shape)}"
        )
    table = jnp.asarray(_pixel_table(*check_normalization(mean, std)))
    channel = jnp.arange(3, dtype=jnp.int32)
    return table.at[jnp.asarray(images).astype(jnp.int32), channel].get(mode="promise_in_bounds")


def _loss_fn(model, loss_reduction: str, bn_policy: str, frozen_params=None, mean=None, std=None):
    """(params, batch_stats, batch, rng, frozen_stages) -> (loss, (batch_stats, metrics))."""

    def loss_fn(params, batch_stats, batch, rng, frozen_stages):
        if frozen_params is not None:
            # A stop_gradient leaf's gradient is a constant zero: no kernel-gradient
            # products for a frozen layer even where the gradient is read.
            params = jax.tree.map(
                lambda p, frozen: jax.lax.stop_gradient(p) if frozen else p, params, frozen_params
            )
        variables = {"params": params, "batch_stats": batch_stats}
        with _bn_context(bn_policy):
            logits, updates = model.apply(
                variables,
                normalize_images(batch["image"], mean, std),
                train=True,
                frozen_stages=frozen_stages,
                mutable=["batch_stats"],
                rngs={"dropout": rng},
            )
        # float32 for float32 / half-precision models, float64 for a float64 one.
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        # d2l sums (`l.sum().backward()`); torch's default is the mean.
        loss = per_example.sum() if loss_reduction == "sum" else per_example.mean()
        new_stats = batch_stats if bn_policy == "frozen" else updates["batch_stats"]
        metrics = {"loss": loss, **_summable_metrics(logits, batch["label"], per_example)}
        return loss, (new_stats, metrics)

    return loss_fn


def _jit(fn, mesh: Mesh | None, donate: bool):
    kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    if mesh is not None:
        # The state is replicated and the batch split: under jit that is plain
        # data parallelism, with BatchNorm statistics over the global batch (as
        # on one device) and the gradient all-reduce inserted by XLA.
        replicated = NamedSharding(_check_mesh(mesh), P())
        kwargs["in_shardings"] = (replicated, NamedSharding(mesh, P(DATA_AXIS)))
        kwargs["out_shardings"] = replicated
    return jax.jit(fn, **kwargs)


def _grads_and_metrics(
    model,
    loss_reduction,
    bn_policy,
    frozen_stages,
    state,
    batch,
    frozen_params=None,
    mean=None,
    std=None,
):
    fs = frozen_stages
    if callable(frozen_stages):
        fs = jnp.asarray(frozen_stages(state.step), jnp.int32)
    rng = jax.random.fold_in(state.rng, state.step)
    loss_fn = _loss_fn(model, loss_reduction, bn_policy, frozen_params, mean, std)
    grad_fn = jax.grad(loss_fn, has_aux=True)
    grads, (batch_stats, metrics) = grad_fn(state.params, state.batch_stats, batch, rng, fs)
    return grads, batch_stats, metrics


def _with_dtype(model: nn.Module, compute_dtype: Any) -> nn.Module:
    return model if compute_dtype is None else model.clone(dtype=compute_dtype)


def check_precision(precision: str | None) -> None:
    """Raises ConfigError unless `precision` is one of `PRECISIONS`."""
    if precision not in PRECISIONS:
        names = ", ".join(repr(p) for p in PRECISIONS)
        raise ConfigError(
            f"precision={precision!r} is not one of {names}: use None for XLA's default "
            "(TensorFloat-32 float32 convolutions on recent NVIDIA GPUs) or 'highest' for "
            "full float32"
        )


def at_precision(fn: Callable, precision: str | None) -> Callable:
    """`fn` traced under `jax.default_matmul_precision(precision)` (None: as it is).

    For a function that jit traces: the precision is fixed in its compiled code.
    """
    check_precision(precision)
    if precision is None:
        return fn

    def traced_at_precision(*args, **kwargs):
        with jax.default_matmul_precision(precision):
            return fn(*args, **kwargs)

    return traced_at_precision


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    loss_reduction: str = "sum",
    bn_policy: str = "train",
    frozen_stages: FrozenStages = 0,
    compute_dtype: Any = None,
    mesh: Mesh | None = None,
    donate: bool = True,
    return_grads: bool = False,
    skip_nonfinite: bool = False,
    frozen_params: Any = None,
    precision: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """A jit-compiled `train_step(state, batch) -> (state, metrics)`.

    Args:
        model: a module from `jt.models.create`.
        tx: the optimizer the state was created with (e.g. `partition.make_optimizer`).
        loss_reduction: "sum" (d2l: `l.sum().backward()`) or "mean" (torch's default)
            over the batch of float32 softmax cross-entropies.
        bn_policy: "train" (torch `net.train()`) or "frozen" (every BatchNorm on
            running statistics); see the module docstring.
        frozen_stages: a static int k freezes the first k stages (BatchNorm on
            running statistics, no backward pass through them); a function of the
            int32 step returning an int32 scalar changes k per step without
            re-compiling (the optimizer must zero the frozen leaves' updates).
        compute_dtype: e.g. jnp.bfloat16 to compute in bfloat16; parameters,
            BatchNorm statistics, the loss and the optimizer stay float32.
        mesh: data parallelism over a mesh from `data_parallel_mesh`: the batch is
            split on its first axis (see `shard_batch`), the state replicated.
        donate: donate the input state's buffers (the input state is unusable after).
        return_grads: also return the gradient that was applied, as
            `metrics["grads"]` (debugging and torch parity checks; costs memory).
        skip_nonfinite: a step whose loss or any gradient leaf is NaN or infinite, or
            whose update would make a parameter non-finite, leaves params, batch_stats
            and opt_state bit-identical (as if its batch had not been there) and sets
            `metrics["skipped"]` to 1. `state.step` still advances: it counts batches,
            so the loader position and checkpoint numbering stay aligned, while the
            optimizer's own counts (learning-rate and unfreeze schedules) count
            applied updates only. A traced `frozen_stages` follows `state.step`, so each
            skipped step of a frozen phase moves its BatchNorm switch one step ahead of
            the optimizer's unfreezing.
        frozen_params: a pytree of bools shaped like the params
            (`partition.frozen_params(params, rules)`): True leaves get a zero
            gradient through `stop_gradient` (it still flows through them to the
            trained layers before). XLA already drops gradients nothing reads (the
            optimizer's `set_to_zero` ignores frozen leaves'), but `skip_nonfinite`'s
            finite check and `return_grads` read every gradient; with the mask a
            frozen leaf's is a constant zero and costs nothing, which makes such a
            step measurably faster (docs/performance.md). The optimizer
            must zero those leaves' updates, as `partition.make_optimizer` does.
        precision: float32 precision of convolutions and matrix products: None (XLA's
            default: TensorFloat-32 on recent NVIDIA GPUs) or "highest" (full float32);
            see the module docstring. The same bits on the CPU.
        mean: per-channel mean that uint8 batches are normalised with (`normalize_images`);
            default ImageNet's. Float batches are used as they are.
        std: per-channel standard deviation for uint8 batches; default ImageNet's.

    Returns:
        The jitted step. `metrics` has "loss" (the reduced loss that was
        differentiated) and the summable "loss_sum", "correct", "count" (see
        `summarize`), plus int32 "skipped" (0 or 1) with `skip_nonfinite`; pass
        them to `check_finite` to stop on a NaN.
    """
    _check_options(model, loss_reduction, bn_policy, frozen_stages)
    check_precision(precision)
    mean, std = check_normalization(mean, std)
    model = _with_dtype(model, compute_dtype)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        grads, batch_stats, metrics = _grads_and_metrics(
            model,
            loss_reduction,
            bn_policy,
            frozen_stages,
            state,
            batch,
            frozen_params,
            mean,
            std,
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        if skip_nonfinite:
            finite = (
                jnp.isfinite(metrics["loss"]) & all_finite(grads) & all_finite(new_state.params)
            )
            new_state = new_state.replace(
                **{
                    name: _select(finite, getattr(new_state, name), getattr(state, name))
                    for name in ("params", "batch_stats", "opt_state")
                }
            )
            metrics = {**metrics, "skipped": jnp.logical_not(finite).astype(jnp.int32)}
        if return_grads:
            metrics = {**metrics, "grads": grads}
        return new_state, metrics

    return _jit(at_precision(train_step, precision), mesh, donate)


def all_finite(tree: Any) -> Array:
    """A bool scalar: every element of every leaf of `tree` is finite (no NaN, no inf)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _select(keep_new: Array, new: Any, old: Any) -> Any:
    # jnp.where picks `old`'s bits exactly, so a skipped step is bit-identical to no step.
    return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


def make_eval_step(
    model: nn.Module,
    mesh: Mesh | None = None,
    *,
    compute_dtype: Any = None,
    precision: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Callable[[TrainState | Mapping[str, Any], Batch], Metrics]:
    """A jit-compiled `eval_step(state, batch) -> metrics` (BatchNorm on running statistics).

    `state` is a `TrainState` or a variables dict. Over many batches with the same
    weights, pass `models.prepare_inference(model, variables)` (the model at
    `compute_dtype`): the Winograd kernel transforms are then made once rather than in
    every call, as `fit.evaluate` does (faster, most of all for small images and
    batches; see docs/performance.md).

    Args:
        model: a module from `jt.models.create`.
        mesh: as for `make_train_step`.
        compute_dtype: as for `make_train_step`.
        precision: as for `make_train_step`.
        mean: as for `make_train_step` (uint8 batches only).
        std: as for `make_train_step` (uint8 batches only).

    Returns:
        The jitted step; metrics "loss" (mean over the batch) and the summable
        "loss_sum", "correct", "count" (see `summarize`).
    """
    mean, std = check_normalization(mean, std)
    model = _with_dtype(model, compute_dtype)

    def eval_step(state: TrainState | Mapping[str, Any], batch: Batch) -> Metrics:
        if isinstance(state, TrainState):
            variables = {"params": state.params, "batch_stats": state.batch_stats}
        elif isinstance(state, Mapping) and "params" in state:
            variables = state
        else:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ConfigError(
                f"eval_step takes a TrainState or a variables dict with 'params' and "
                f"'batch_stats', got {got}; for bare params pass "
                "{'params': params, 'batch_stats': batch_stats}"
            )
        images = normalize_images(batch["image"], mean, std)
        logits = model.apply(variables, images, train=False).astype(jnp.float32)
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        metrics = _summable_metrics(logits, batch["label"], per_example)
        return {"loss": per_example.mean(), **metrics}

    return _jit(at_precision(eval_step, precision), mesh, donate=False)


def summarize(metrics: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Totals over batches of step metrics.

    Args:
        metrics: the metrics of several train or eval steps.

    Returns:
        {"loss": mean loss per example, "accuracy": top-1, "count": examples}.
    """
    totals = dict.fromkeys(SUMMABLE, 0.0)
    for m in metrics:
        for k in SUMMABLE:
            totals[k] += float(m[k])
    n = totals["count"]
    return {
        "loss": totals["loss_sum"] / n if n else math.nan,
        "accuracy": totals["correct"] / n if n else math.nan,
        "count": int(n),
    }


NONFINITE_ADVICE = (
    "The learning rate is probably too high (note that a summed loss scales the gradient "
    "with the batch size): lower it, e.g. 10x; also check the inputs are finite and "
    "ImageNet-normalised, and try compute_dtype=None (float32) if you use bfloat16."
)


def check_finite(metrics: Mapping[str, Any], step: int | Array) -> None:
    """Raises NonFiniteLossError if a step's loss is NaN or infinite.

    Args:
        metrics: what the train step returned.
        step: the step those metrics belong to (for the message).

    Raises:
        NonFiniteLossError: naming the step and what to try.
    """
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"the training loss is {loss} at step {int(step)}. {NONFINITE_ADVICE}"
        )
