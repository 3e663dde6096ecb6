"""timm checkpoints whose layout is torchvision's, into jtransfer.

timm's ResNets, ResNeXts and Wide ResNets (``resnet50.a1_in1k``,
``resnext50_32x4d.a1h_in1k``, ``wide_resnet50_2.racm_in1k``, ...) use torchvision's
state_dict keys as they are. timm's VGGs (``vgg16.tv_in1k``, ``vgg16_bn.tv_in1k``) hold
torchvision's classifier as convolutions: ``pre_logits.fc1`` (a 7x7 conv over the
512x7x7 map), ``pre_logits.fc2`` (1x1) and ``head.fc`` (a Linear). A 7x7 conv's OIHW
weight flattened per output row is exactly torchvision's ``classifier.0`` Linear weight
(torch flattens the map channel-first too), so the mapping is a reshape here; the one
transpose for JAX's NHWC flatten happens in `porting.from_torchvision` as for every VGG.

timm's VGG computes what torchvision's does only while the feature map is at most 7x7,
i.e. for inputs below 256 px (224, the size both were trained at, included): timm pools a
smaller map up to 7x7 as torchvision's ``AdaptiveAvgPool2d((7, 7))`` does, but slides its
7x7 conv over a larger map and averages the outputs, where torchvision pools the map down
to 7x7 first. jtransfer's VGG is torchvision's.

Layouts that are not torchvision's (``resnet50d``'s deep stem and average-pool shortcut,
``resnet50_gn``'s GroupNorm, ...) are refused with the keys that do not fit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

import jtransfer as jt
from jtransfer.errors import PortingError
from porting import io

__all__ = [
    "WEIGHT_FILES",
    "find_local",
    "read_config",
    "resolve_arch",
    "timm_to_torchvision",
]

# What timm (and `timm.models.push_to_hf_hub`) writes, in the order they are tried.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"

_VGG_HEAD = {
    "pre_logits.fc1": "classifier.0",
    "pre_logits.fc2": "classifier.3",
    "head.fc": "classifier.6",
}


def timm_to_torchvision(state_dict: Mapping[str, Any], arch: str) -> dict[str, np.ndarray]:
    """A timm state_dict in torchvision's layout for `arch`.

    Args:
        state_dict: timm's keys and tensors (or arrays).
        arch: the jtransfer architecture, one of `jt.models.ARCHS`.

    Returns:
        {torchvision key: numpy array}; ResNet-family keys pass unchanged, a VGG's
        ``pre_logits.fc1/fc2`` and ``head.fc`` become ``classifier.0/3/6`` Linear weights.

    Raises:
        PortingError: a key of timm's VGG head has an unexpected shape.
    """
    sd = io.read_state_dict(state_dict)
    if not arch.startswith("vgg"):
        return sd
    out = {}
    for key, value in sd.items():
        module, _, leaf = key.rpartition(".")
        if module not in _VGG_HEAD:
            out[key] = value
            continue
        if leaf == "weight" and value.ndim == 4:
            # (out, C, kh, kw) -> (out, C*kh*kw): the channel-first flatten of torchvision's
            # Linear, which is what a 7x7 conv over a 7x7 map computes.
            value = value.reshape(value.shape[0], -1)
        elif leaf == "weight" and value.ndim != 2:
            raise PortingError(
                f"{key} has shape {tuple(value.shape)}; timm's VGG head needs a conv or Linear "
                "weight."
            )
        out[f"{_VGG_HEAD[module]}.{leaf}"] = value
    return out


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A timm ``config.json`` (``architecture``, ``num_classes``, ``pretrained_cfg``).

    Raises:
        PortingError: the file is not JSON or not a mapping.
    """
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PortingError(
            f"could not read {path} as a timm config.json ({type(e).__name__}: {e}). Delete "
            "it and download it again, or pass the weights file without it."
        ) from e
    if not isinstance(config, dict):
        raise PortingError(f"{path} holds {type(config).__name__}, not a timm config mapping.")
    return config


def resolve_arch(arch: str | None, config: Mapping[str, Any] | None, source: str) -> str:
    """The jtransfer architecture of timm weights: the caller's, config.json's, or both.

    Args:
        arch: the caller's architecture, or None to take config.json's.
        config: the weights' config.json, or None when there is none.
        source: what the weights are (a hub name or path), for messages.

    Returns:
        One of `jt.models.ARCHS`.

    Raises:
        PortingError: config.json names an architecture jtransfer does not have (a timm
            layout that is not torchvision's), names another one than `arch`, or neither
            says which.
    """
    named = None if config is None else config.get("architecture")
    if named is not None and named not in jt.models.ARCHS:
        raise PortingError(
            f"{source}: config.json's architecture {named!r} is not one jtransfer builds; "
            f"timm weights load when their layout is torchvision's: {', '.join(jt.models.ARCHS)}. "
            "(timm's variants such as resnet50d, resnet50_gn or seresnet50 are other networks.)"
        )
    if arch is not None and named is not None and arch != named:
        raise PortingError(
            f"{source} holds {named} weights (config.json's architecture), but arch={arch!r} "
            f"was asked for: pass arch={named!r} (CLI: --arch {named}), or leave it out to "
            "take config.json's."
        )
    if arch is None and named is None:
        raise PortingError(
            f"{source} has no config.json naming its architecture: pass arch (CLI: --arch)."
        )
    return arch or named


def find_local(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """A local timm checkpoint's weights file and its config.json (None when absent).

    Args:
        path: a weights file (config.json beside it is used when present), or a directory
            holding ``model.safetensors`` (or ``pytorch_model.bin``) and config.json.

    Raises:
        PortingError: the path does not exist, or a directory without a weights file.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            found = sorted(p.name for p in path.iterdir())[:10]
            raise PortingError(
                f"{path} holds no weights file ({' or '.join(WEIGHT_FILES)}); it has "
                f"{found or 'nothing'}. Pass the weights file itself."
            )
    elif path.is_file():
        weights = path
    else:
        raise PortingError(f"weights file not found: {path}. Check the path.")
    config = weights.parent / CONFIG_FILE
    return weights, config if config.is_file() else None


def is_timm_layout(keys: Any) -> bool:
    """Whether a state_dict's keys are timm's VGG head (other timm layouts need no mapping)."""
    return any(k.startswith(("pre_logits.", "head.fc.")) for k in keys)


def not_torchvision_message(arch: str, source: str, err: PortingError) -> str:
    """A load failure of timm weights, saying that the layout is not torchvision's."""
    return (
        f"{source} is not in torchvision's {arch} layout, which is the one jtransfer builds "
        f"(timm variants such as resnet50d's deep stem are other networks). {err}"
    )
