"""The model registry: torchvision's ResNet and VGG families as Flax modules.

Example:
    >>> import jtransfer as jt
    >>> model = jt.models.create("resnet18", num_classes=2)
    >>> "vgg16_bn" in jt.models.ARCHS
    True
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jtransfer.errors import ConfigError
from jtransfer.models import conv, resnet, vgg
from jtransfer.models.layers import BatchNorm, adaptive_avg_pool2d


@dataclass(frozen=True)
class Family:
    """What porting and partitioning need to know about a model family."""

    name: str
    module: type[nn.Module]
    variants: dict[str, dict[str, Any]]
    stages: tuple[str, ...]  # in forward order; the last one holds the head
    head: str  # Flax name of the classifier layer that `num_classes` resizes
    flatten_inputs: dict[str, tuple[int, int, int]]  # Dense <- torch (C, H, W) flatten


FAMILIES = (
    Family("resnet", resnet.ResNet, resnet.VARIANTS, resnet.STAGES, "fc", {}),
    Family("vgg", vgg.VGG, vgg.VARIANTS, vgg.STAGES, "classifier_6", vgg.FLATTEN_INPUTS),
)
_BY_ARCH = {arch: fam for fam in FAMILIES for arch in fam.variants}
ARCHS: tuple[str, ...] = tuple(_BY_ARCH)


def family(arch: str) -> Family:
    """The family an architecture name belongs to; ConfigError for unknown names."""
    try:
        return _BY_ARCH[arch]
    except KeyError:
        raise ConfigError(
            f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}"
        ) from None


def create(arch: str, num_classes: int = 1000, dtype: Any = jnp.float32, **kwargs) -> nn.Module:
    """Builds the Flax module for a torchvision architecture name.

    Args:
        arch: one of `ARCHS`, e.g. "resnet50" or "vgg16_bn".
        num_classes: output classes of the head.
        dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32 (float64 for
            dtype=jnp.float64, with jax x64 enabled).
        **kwargs: other module attributes (e.g. `dropout=0.0` for VGG).

    Returns:
        An unbound flax.linen Module; `model.init(rng, x)` gives its variables.
    """
    fam = family(arch)
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    return fam.module(num_classes=num_classes, dtype=dtype, **fam.variants[arch], **kwargs)


def init(model: nn.Module, rng, image_size: int = 224):
    """Random variables {"params", "batch_stats"} for `model` (no compute: shapes only)."""
    import jax

    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return jax.jit(model.init)(rng, x)


def prepare_inference(model: nn.Module, variables: dict[str, Any]) -> dict[str, Any]:
    """`variables` plus the Winograd transforms of its 3x3 kernels, for faster inference.

    On the CPU, every 3x3 stride-1 layer convolves by Winograd's F(2x2, 3x3)
    (`jtransfer.models.winograd`), whose kernel transform a jitted forward
    recomputes on every call: a cost that does not shrink with the batch or the
    image. The returned variables carry those transforms (the `"winograd"`
    collection), computed once, and `model.apply` with them skips that work, so
    it matters most for small images and batches (docs/performance.md has the
    speed-ups); the logits are the same bits. Prepare again whenever the
    parameters change: the transforms are not checked against them.

    The prepared variables are for inference (`train=False`, feature
    extraction): differentiating through them raises a ConfigError, since no
    gradient would reach the kernels. Off the CPU, in bfloat16, or with
    `JTRANSFER_CONV=xla` no layer uses Winograd and `variables` comes back as
    it is.

    Args:
        model: a module from `create`.
        variables: its {"params", "batch_stats"} (a previous preparation is replaced).

    Returns:
        A new dict: `variables`' collections and, where any layer uses Winograd,
        "winograd" (16 (Cin, Cout) arrays per layer: about 1.8x the 3x3 kernels' memory).

    Example:
        >>> model = create("resnet18", num_classes=2)
        >>> variables = random_variables(model, image_size=32)
        >>> prepared = prepare_inference(model, variables)
        >>> x = jnp.zeros((2, 32, 32, 3))
        >>> bool((model.apply(prepared, x) == model.apply(variables, x)).all())
        True
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        got = (
            f"a mapping with keys {sorted(variables)}"
            if isinstance(variables, Mapping)
            else f"a {type(variables).__name__}"
        )
        raise ConfigError(
            f"prepare_inference needs the model's variables {{'params': ..., 'batch_stats': "
            f"...}}, got {got}; from a TrainState pass {{'params': state.params, "
            "'batch_stats': state.batch_stats}"
        )
    plain = {k: v for k, v in variables.items() if k != conv.PREPARED}
    # Which layers run by Winograd depends on the backend and JTRANSFER_CONV, read when
    # the function is traced: one jitted function per setting.
    prepared = _transforms(model, conv._cpu_forms())(plain)
    return {**plain, **prepared} if prepared else plain


@functools.lru_cache(maxsize=16)
def _transforms(model: nn.Module, cpu_forms: bool):
    # Applying the model with the collection mutable records every Winograd
    # layer's transform; the forward itself is not among the outputs, so jit
    # keeps only the transforms. Any input size reaches every layer.
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)

    def run(variables):
        return model.apply(variables, x, train=False, mutable=[conv.PREPARED])[1]

    return jax.jit(run)


def random_variables(
    model: nn.Module, image_size: int = 224, seed: int = 0, dtype: Any = jnp.float32
) -> dict[str, Any]:
    """Random variables from shapes alone, without compiling `model.init`.

    For tests, benchmarks and quick experiments (compiling `model.init` of a
    ResNet takes seconds to tens of seconds on a CPU). Conv and dense kernels
    are He-normal over their fan-in; BatchNorm `scale` ~ U(0.5, 1.5), running
    `var` ~ U(0.5, 2), biases and running means ~ U(-0.2, 0.2), so BatchNorm is
    never the identity (a conversion bug could hide behind 0/1 statistics).

    Args:
        model: a module from `create`.
        image_size: the input side the shapes are traced with (VGG's classifier
            does not depend on it: adaptive pooling).
        seed: numpy seed; the same seed gives the same values.
        dtype: dtype of every leaf.

    Returns:
        {"params": ..., "batch_stats": ...} of numpy arrays, the tree `model.init` gives.
    """
    import math

    import jax
    import numpy as np

    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return rng.normal(0, math.sqrt(2 / math.prod(shape[:-1])), shape).astype(dtype)
        low, high = {"scale": (0.5, 1.5), "var": (0.5, 2.0)}.get(name, (-0.2, 0.2))
        return rng.uniform(low, high, shape).astype(dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


__all__ = [
    "ARCHS",
    "FAMILIES",
    "BatchNorm",
    "Family",
    "adaptive_avg_pool2d",
    "create",
    "family",
    "init",
    "prepare_inference",
    "random_variables",
]
