"""torchvision state_dict <-> jtransfer Flax variables, strict by name.

One naming rule maps every key, for every architecture: Flax module names use
`_N` where torch uses `.N`, and `/` where torch uses `.`:

    params/layer1_0/downsample_0/kernel   <->  layer1.0.downsample.0.weight
    batch_stats/features_1/var            <->  features.1.running_var

Leaf names and layouts: conv kernel HWIO <-> weight OIHW; Dense kernel (in, out)
<-> weight (out, in); BatchNorm scale/bias/mean/var <-> weight/bias/
running_mean/running_var. A Dense fed by a flattened feature map (VGG's
`classifier.0`) is permuted between torch's (C, H, W) and NHWC flatten orders.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import jtransfer as jt
from jtransfer.errors import DownloadError, PortingError
from porting import io

Variables = dict[str, Any]

_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_IGNORED_SUFFIXES = (".num_batches_tracked",)


class HeadReinitialized(UserWarning):
    """The checkpoint's classifier did not fit `num_classes` and was re-initialised."""


def torch_key(flax_path: tuple[str, ...]) -> str:
    """('params', 'layer1_0', 'conv1', 'kernel') -> 'layer1.0.conv1.weight'."""
    collection, *modules, leaf = flax_path
    names = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join([*names, _LEAF_TO_TORCH[(collection, leaf)]])


def _module_name(flax_path: tuple[str, ...]) -> str:
    return flax_path[-2]


@functools.partial(jax.jit, static_argnums=(1,))
def _rows_chw_to_hwc(value: jax.Array, chw: tuple[int, int, int]) -> jax.Array:
    """(out, C*H*W) in torch's flatten order -> (H*W*C, out) in jtransfer's: one XLA
    transpose. numpy's strided copy of VGG's 400 MB first classifier layer took 1-5 s on the
    2-core machine, most of it page faults of the fresh array, then jax copied it again."""
    c, h, w = chw
    return value.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)


def _to_flax(value: np.ndarray, flax_path: tuple[str, ...], fam: jt.models.Family):
    if flax_path[-1] != "kernel":
        return value
    if value.ndim == 4:  # OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
        chw = fam.flatten_inputs.get(_module_name(flax_path))
        if chw is not None and value.shape[1] == int(np.prod(chw)):
            return _rows_chw_to_hwc(jnp.asarray(value), tuple(chw))
        return value.T
    return value


def _to_torch(value: np.ndarray, flax_path: tuple[str, ...], fam: jt.models.Family) -> np.ndarray:
    if flax_path[-1] != "kernel":
        return value
    if value.ndim == 4:  # HWIO -> OIHW
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2:
        chw = fam.flatten_inputs.get(_module_name(flax_path))
        if chw is not None and value.shape[0] == int(np.prod(chw)):
            c, h, w = chw
            return value.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * w)
        return value.T
    return value


@functools.lru_cache(maxsize=64)
def _abstract(arch: str, num_classes: int) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Flat {flax path: shape} of a model, without computing anything."""
    model = jt.models.create(arch, num_classes=num_classes)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    return traverse_util.flatten_dict(dict(shapes))


def expected_keys(arch: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """{torch key: torch shape} of torchvision's `arch` state_dict, less num_batches_tracked."""
    out = {}
    for path, sds in _abstract(arch, num_classes).items():
        out[torch_key(path)] = _torch_shape(tuple(sds.shape), path)
    return out


def _torch_shape(shape: tuple[int, ...], flax_path: tuple[str, ...]) -> tuple[int, ...]:
    """The torch shape of a Flax leaf, without materialising it (VGG's fc6 is 400 MB)."""
    if flax_path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if flax_path[-1] == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])  # also for a permuted flatten: (out, C*H*W)
    return shape


def _head_rows(sd: Mapping[str, np.ndarray], arch: str) -> int | None:
    fam = jt.models.family(arch)
    bias = sd.get(torch_key(("params", fam.head, "bias")))
    return None if bias is None or bias.ndim != 1 else int(bias.shape[0])


def _guess_arch(sd: Mapping[str, np.ndarray]) -> str | None:
    """The architecture whose keys, and shapes outside the head, are the checkpoint's.

    Names alone do not tell resnet50 from resnext50_32x4d or wide_resnet50_2
    (torchvision uses the same keys); the Bottleneck widths do.
    """
    for arch in jt.models.ARCHS:
        expected = expected_keys(arch)
        if set(expected) != set(sd):
            continue
        head = jt.models.family(arch).head.replace("_", ".") + "."
        if all(
            tuple(sd[k].shape) == shape for k, shape in expected.items() if not k.startswith(head)
        ):
            return arch
    return None


def from_torchvision(
    src: str | os.PathLike | Mapping[str, Any],
    arch: str,
    *,
    num_classes: int | None = None,
    seed: int = 0,
) -> Variables:
    """Converts a torchvision state_dict into jtransfer variables, strictly by name.

    Args:
        src: a state_dict, or a `.pth`/`.pt`/`.safetensors` path.
        arch: the architecture it belongs to, one of `jt.models.ARCHS`.
        num_classes: classes of the new model. None keeps the checkpoint's; a
            different number re-initialises the head (Xavier-uniform weight, zero
            bias) and warns with `HeadReinitialized`.
        seed: PRNG seed of a re-initialised head.

    Returns:
        {"params": ..., "batch_stats": ...} for `jt.models.create(arch, num_classes)`.

    Raises:
        PortingError: listing every missing, unexpected and mis-shaped key.
    """
    fam = jt.models.family(arch)
    sd = io.read_state_dict(src)
    sd = {k: v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIXES)}
    ckpt_rows = _head_rows(sd, arch)
    n_out = num_classes or ckpt_rows or 1000
    reinit_head = ckpt_rows is not None and n_out != ckpt_rows
    abstract = _abstract(arch, n_out)
    head_keys = {torch_key(p) for p in abstract if p[-2] == fam.head}

    missing, mis_shaped, flat = [], [], {}
    for path, sds in abstract.items():
        key = torch_key(path)
        if reinit_head and key in head_keys:
            continue
        if key not in sd:
            missing.append(key)
            continue
        value = _to_flax(sd[key], path, fam)
        if value.shape != tuple(sds.shape):
            torch_shape = _torch_shape(tuple(sds.shape), path)
            mis_shaped.append(
                f"{key}: checkpoint {tuple(sd[key].shape)}, {arch} needs {torch_shape}"
            )
            continue
        flat[path] = value
    known = {torch_key(p) for p in abstract}
    unexpected = sorted(set(sd) - known)
    if missing or unexpected or mis_shaped:
        raise PortingError(_mismatch_message(arch, sd, missing, unexpected, mis_shaped))

    if reinit_head:
        warnings.warn(
            f"{arch}: the checkpoint's head has {ckpt_rows} classes, num_classes={n_out}; "
            f"`{fam.head}` was re-initialised (Xavier-uniform weight, zero bias).",
            HeadReinitialized,
            stacklevel=2,
        )
        flat.update(_init_head(arch, n_out, seed))
    return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat))


def _init_head(arch: str, num_classes: int, seed: int) -> dict[tuple[str, ...], np.ndarray]:
    from jtransfer.models.layers import head_init

    fam = jt.models.family(arch)
    abstract = _abstract(arch, num_classes)
    kernel_shape = abstract[("params", fam.head, "kernel")].shape
    kernel = head_init(jax.random.PRNGKey(seed), kernel_shape, jnp.float32)
    return {
        ("params", fam.head, "kernel"): np.asarray(kernel),
        ("params", fam.head, "bias"): np.zeros((num_classes,), np.float32),
    }


def _mismatch_message(arch, sd, missing, unexpected, mis_shaped) -> str:
    lines = [f"the state_dict does not fit {arch}:"]
    for title, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", mis_shaped),
    ):
        if keys:
            shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
            lines.append(f"  {title} ({len(keys)}): " + ", ".join(shown))
    hint = "Pass the architecture the weights were trained with"
    if sd and all(k.startswith("module.") for k in sd):
        hint = "The keys start with 'module.' (saved from DataParallel): strip that prefix"
    elif (guess := _guess_arch(sd)) is not None and guess != arch:
        hint = f"These are {guess} weights: pass arch={guess!r}"
    elif not missing and not unexpected:
        hint = (
            "Only shapes differ: pass num_classes to re-initialise the head, or use load_matching"
        )
    lines.append(
        f"{hint}; to load only the matching tensors into a different model, use "
        "porting.load_matching(src, variables, arch)."
    )
    return "\n".join(lines)


def to_torchvision(variables: Variables, arch: str) -> dict[str, Any]:
    """Exports jtransfer variables as a torchvision state_dict of torch tensors.

    `torchvision.models.<arch>(num_classes=...).load_state_dict(sd, strict=True)`
    accepts it. `num_batches_tracked` (not kept in JAX) is recreated as 0; torch
    only reads it when BatchNorm momentum is None.
    """
    import torch

    fam = jt.models.family(arch)
    flat = traverse_util.flatten_dict(
        {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    )
    out: dict[str, Any] = {}
    for path, value in flat.items():
        key = torch_key(path)
        src = np.asarray(value, np.float32)  # may be a read-only view of jax's buffer
        arr = _to_torch(src, path, fam)
        # Copied once if still a view of it or not C-ordered; VGG's first classifier layer
        # is reordered into new memory already, and a second copy of its 400 MB takes
        # seconds of page faults.
        if np.may_share_memory(arr, src) or not arr.flags.c_contiguous or not arr.flags.writeable:
            arr = np.array(arr, order="C", copy=True)
        out[key] = torch.from_numpy(arr)
        if key.endswith(".running_var"):
            out[key[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(
                0, dtype=torch.long
            )
    return out


@dataclass
class LoadReport:
    """What `load_matching` did, per torch key."""

    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> why
    left_at_init: list[str] = field(default_factory=list)  # model keys not loaded

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} from the checkpoint:")
            lines += [f"  {k}: {why}" for k, why in self.skipped.items()]
        if self.left_at_init:
            lines.append(f"left at init {len(self.left_at_init)}: " + ", ".join(self.left_at_init))
        return "\n".join(lines)


def load_matching(
    src: str | os.PathLike | Mapping[str, Any], variables: Variables, arch: str
) -> tuple[Variables, LoadReport]:
    """Loads the tensors whose names and shapes match into `variables`; the rest stays.

    The seed tutorials' "keep the keys the new net has, update, load", made
    explicit: use it to load weights into a model of another shape (a new head,
    fewer classes). Strict loading is `from_torchvision`.

    Returns:
        (new variables, LoadReport of what was loaded, skipped and left at init).
    """
    fam = jt.models.family(arch)
    sd = {k: v for k, v in io.read_state_dict(src).items() if not k.endswith(_IGNORED_SUFFIXES)}
    flat = traverse_util.flatten_dict({k: variables[k] for k in ("params", "batch_stats")})
    report = LoadReport()
    new = dict(flat)
    by_key = {torch_key(p): p for p in flat}
    for key, value in sd.items():
        path = by_key.get(key)
        if path is None:
            report.skipped[key] = "not in the model"
            continue
        converted = _to_flax(value, path, fam)
        if converted.shape != tuple(flat[path].shape):
            report.skipped[key] = f"shape {tuple(value.shape)} does not fit the model's"
            continue
        new[path] = jnp.asarray(converted)
        report.loaded.append(key)
    report.left_at_init = [k for k in by_key if k not in report.loaded]
    return traverse_util.unflatten_dict(new), report


def load_pretrained(
    arch: str | None,
    weights: str | os.PathLike = "DEFAULT",
    num_classes: int | None = None,
    *,
    progress: bool = True,
    seed: int = 0,
):
    """A model and its variables from torchvision's or timm's published ImageNet weights.

    Args:
        arch: one of `jt.models.ARCHS`; None takes timm's config.json's `architecture`.
        weights: "DEFAULT", a torchvision tag ("IMAGENET1K_V1", "IMAGENET1K_V2"),
            a path to a local `.pth`/`.safetensors` file, a timm hub name
            ("hf-hub:timm/resnet50.a1_in1k"), or a local timm checkpoint (a
            directory, or a file with config.json beside it); see `porting.hub`.
        num_classes: None keeps ImageNet's 1000; another number re-initialises
            the head (see `from_torchvision`).
        progress: show a download progress bar.
        seed: PRNG seed of a re-initialised head.

    The file goes to torch's cache ($TORCH_HOME/hub/checkpoints), where an
    existing copy is reused; its sha256 is checked against the prefix in its
    name. Set JTRANSFER_WEIGHTS_BASE_URL to download from a mirror.

    Returns:
        (flax module, {"params", "batch_stats"}).
    """
    from jtransfer.download import fetch
    from porting import hub

    if arch is not None:
        jt.models.family(arch)  # unknown arch -> ConfigError before any download
    if hub.is_timm_source(weights):
        arch, variables, _ = hub.load_timm(weights, arch, num_classes=num_classes, seed=seed)
        n_out = variables["params"][jt.models.family(arch).head]["bias"].shape[0]
        return jt.models.create(arch, num_classes=n_out), variables
    if arch is None:
        raise PortingError(f"weights {str(weights)!r} do not name their architecture: pass arch.")
    path = weights
    tag = str(weights)
    if not (os.path.sep in tag or tag.endswith((".pth", ".pt", ".safetensors"))):
        url = io.weights_url(arch, tag)
        filename = url.rsplit("/", 1)[1]
        dest = io.torch_cache_dir() / filename
        try:
            path = fetch(url, dest, sha256_prefix=io.hash_prefix(filename), progress=progress)
        except DownloadError as e:
            raise DownloadError(
                f"{e}\nTo use a copy you already have, pass weights='/path/to/{filename}' "
                f"(CLI: --weights /path/to/{filename}) or put it at {dest}."
            ) from e
    variables = from_torchvision(path, arch, num_classes=num_classes, seed=seed)
    n_out = variables["params"][jt.models.family(arch).head]["bias"].shape[0]
    return jt.models.create(arch, num_classes=n_out), variables
