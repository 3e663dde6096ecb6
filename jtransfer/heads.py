"""Replace and initialise the classifier head of a model's variables.

The head is the layer that `num_classes` resizes: ResNet `fc`, VGG
`classifier_6`. A new head gets a Xavier-uniform weight and a zero bias (d2l's
fine-tuning recipe), optionally with some rows copied from the source head,
e.g. ImageNet's "hotdog" row 934 for a hotdog / not-hotdog classifier (d2l
exercise 4; 934 is torchvision's class order, 713 is MXNet Gluon's).

Example:
    >>> import jtransfer as jt
    >>> from jtransfer import heads
    >>> model = jt.models.create("resnet18")
    >>> variables = jt.models.random_variables(model, image_size=32)  # or ImageNet weights
    >>> new = heads.replace_head(variables, "resnet18", 2, init_rows=[934, None])
    >>> fc, old = new["params"]["fc"], variables["params"]["fc"]
    >>> fc["kernel"].shape, bool((fc["kernel"][:, 0] == old["kernel"][:, 934]).all())
    ((512, 2), True)
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jtransfer import models, partition
from jtransfer.errors import ConfigError
from jtransfer.models.layers import head_init

Variables = dict[str, Any]


def head_name(arch: str) -> str:
    """The Flax name of the classifier head of `arch`.

    Args:
        arch: one of `jt.models.ARCHS`.

    Returns:
        "fc" for ResNets, "classifier_6" for VGGs.

    Example:
        >>> head_name("vgg16_bn")
        'classifier_6'
    """
    return models.family(arch).head


def _torch_linear(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
    """A fresh torch.nn.Linear: weight and bias both U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    k_w, k_b = jax.random.split(key)
    return {
        "kernel": jax.random.uniform(k_w, (fan_in, fan_out), jnp.float32, -bound, bound),
        "bias": jax.random.uniform(k_b, (fan_out,), jnp.float32, -bound, bound),
    }


def _classifier_layers(arch: str, params: Mapping[str, Any]) -> list[str]:
    """Top-level modules of the last stage (the one holding the head), in index order."""
    pattern = re.compile(list(partition.groups(arch).values())[-1])
    names = [m for m in params if pattern.fullmatch(f"{m}/kernel")]
    return sorted(
        names, key=lambda m: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", m)]
    )


def _check_rows(init_rows: Sequence[int | None], num_classes: int, source_rows: int) -> None:
    if isinstance(init_rows, (str, bytes)) or len(init_rows) != num_classes:
        raise ConfigError(
            f"init_rows must list one source row (or None) per new class: expected "
            f"{num_classes} entries, got {init_rows!r}"
        )
    bad = [
        r
        for r in init_rows
        if r is not None
        and (isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 0 <= r < source_rows)
    ]
    if bad:
        raise ConfigError(
            f"init_rows {bad} are not rows of the source head, which has {source_rows} classes; "
            "use indices in [0, source classes) or None for a fresh row"
        )


def replace_head(
    variables: Mapping[str, Any],
    arch: str,
    num_classes: int,
    *,
    seed: int = 0,
    init_rows: Sequence[int | None] | None = None,
    whole_classifier: bool = False,
) -> Variables:
    """A copy of `variables` with a new classifier head for `num_classes` classes.

    The new head has a Xavier-uniform weight drawn from `PRNGKey(seed)` (the same
    draw as `porting.from_torchvision(..., num_classes=n, seed=seed)`) and a zero
    bias. The result fits `jt.models.create(arch, num_classes=num_classes)`.
    Pure: the input is not modified, arrays not replaced are shared. Traceable
    (works under `jax.eval_shape` / `jax.jit` with static arguments).

    Args:
        variables: {"params": ..., "batch_stats": ...} of `arch` (any head size).
        arch: one of `jt.models.ARCHS`.
        num_classes: classes of the new head.
        seed: PRNG seed of the new layers.
        init_rows: one entry per new class: an index into the source head's
            classes (torch weight row; Flax kernel column), whose weight row and
            bias are copied, or None to keep the fresh initialisation. E.g.
            `[934, None]` starts class 0 from ImageNet's "hotdog".
        whole_classifier: also re-initialise the other layers of the classifier
            stage as fresh `torch.nn.Linear`s (VGG `classifier_0` and
            `classifier_3`: weight and bias U(+-1/sqrt(fan_in))). A ResNet's
            classifier is its head alone, so this changes nothing there.

    Returns:
        New variables (plain dicts).

    Raises:
        ConfigError: unknown arch, no head in `variables`, bad `num_classes` or `init_rows`.

    Example:
        >>> v = {"params": {"fc": {"kernel": jnp.ones((512, 1000)), "bias": jnp.zeros(1000)}}}
        >>> new = replace_head(v, "resnet18", 2, init_rows=[934, None])
        >>> fc = new["params"]["fc"]
        >>> fc["kernel"].shape, bool((fc["kernel"][:, 0] == 1).all()), fc["bias"].tolist()
        ((512, 2), True, [0.0, 0.0])
    """
    head = head_name(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be an int >= 1, got {num_classes!r}")
    params = variables.get("params") if isinstance(variables, Mapping) else None
    if not isinstance(params, Mapping) or head not in params:
        raise ConfigError(
            f"variables have no params/{head}: pass the {{'params', 'batch_stats'}} dict of a "
            f"{arch} model (is arch right?)"
        )
    old = params[head]
    fan_in, source_rows = old["kernel"].shape

    new_params = dict(params)
    if whole_classifier:
        others = [m for m in _classifier_layers(arch, params) if m != head]
        for i, name in enumerate(others, start=1):
            n_in, n_out = params[name]["kernel"].shape
            new_params[name] = _torch_linear(
                jax.random.fold_in(jax.random.PRNGKey(seed), i), n_in, n_out
            )

    kernel = head_init(jax.random.PRNGKey(seed), (fan_in, num_classes), jnp.float32)
    bias = jnp.zeros((num_classes,), jnp.float32)
    if init_rows is not None:
        _check_rows(init_rows, num_classes, source_rows)
        for new_row, src_row in enumerate(init_rows):
            if src_row is not None:
                src_row = int(src_row)
                kernel = kernel.at[:, new_row].set(
                    jnp.asarray(old["kernel"][:, src_row], jnp.float32)
                )
                bias = bias.at[new_row].set(jnp.asarray(old["bias"][src_row], jnp.float32))
    new_params[head] = {"kernel": kernel, "bias": bias}
    return {**variables, "params": new_params}


__all__ = ["head_name", "replace_head"]
