"""The preprocessing a set of weights was trained with, as data that a run records.

torchvision's weights (and d2l's recipe) use one view: bilinear resize, ImageNet mean and
std; the CLI's evaluation squashes to ``Resize([256, 256])`` then crops 224, as d2l. timm's
weights each carry a ``pretrained_cfg`` (in the hub's ``config.json``) with their own
``mean``, ``std``, ``interpolation`` (most are bicubic), ``crop_pct`` and ``input_size``:
evaluation resizes the shorter side to ``floor(size / crop_pct)`` and center-crops
``size``, as ``timm.data.create_transform``. A `Preprocessing` holds either, is saved with
every checkpoint (`to_dict`), and `predict` / `export` read it back (`from_metadata`).

Example:
    >>> from jtransfer.preprocess import Preprocessing
    >>> p = Preprocessing.from_pretrained_cfg(
    ...     {"interpolation": "bicubic", "crop_pct": 0.95, "input_size": [3, 224, 224],
    ...      "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    >>> p.interpolation, p.crop_size, p.resize_size
    ('bicubic', 224, 235)
    >>> Preprocessing.d2l(224).resize_size
    (256, 256)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from jtransfer.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Size,
    eval_pixels,
    eval_transform,
    train_transform,
)
from jtransfer.errors import ConfigError

__all__ = ["INTERPOLATIONS", "Preprocessing"]

INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocessing:
    """Normalisation, resize filter and evaluation view of a set of weights.

    Attributes:
        mean: per-channel mean (RGB, on pixels scaled to [0, 1]).
        std: per-channel standard deviation.
        interpolation: resize filter of both views, "bilinear" or "bicubic".
        crop_size: training crop and evaluation center-crop size.
        resize_size: evaluation resize before the crop: an int resizes the shorter side and
            keeps the aspect ratio (timm, torchvision's ``Resize(256)``); ``(h, w)`` squashes
            (d2l's ``Resize([256, 256])``).
        crop_pct: timm's ``crop_pct`` when the view came from one (``resize_size`` is then
            ``floor(crop_size / crop_pct)``), else None.
        source: where the view came from: "torchvision" or "timm".
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_size: int = 224
    resize_size: int | tuple[int, int] = (256, 256)
    crop_pct: float | None = None
    source: str = "torchvision"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"interpolation {self.interpolation!r} is not supported; use one of "
                f"{', '.join(INTERPOLATIONS)}."
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ConfigError(f"{name} needs 3 values (RGB), got {list(value)}.")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if not isinstance(self.resize_size, int):
            object.__setattr__(self, "resize_size", tuple(int(v) for v in self.resize_size))
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ConfigError(f"crop_pct must be in (0, 1], got {self.crop_pct}.")

    @classmethod
    def d2l(cls, image_size: int = 224) -> Preprocessing:
        """torchvision weights as the CLI uses them: d2l's squash to 256/224 of the crop."""
        resize = round(image_size * 256 / 224)
        return cls(crop_size=image_size, resize_size=(resize, resize))

    @classmethod
    def from_pretrained_cfg(
        cls, cfg: Mapping[str, Any], image_size: int | None = None
    ) -> Preprocessing:
        """timm's view from a ``pretrained_cfg`` (the hub's ``config.json`` holds one).

        Args:
            cfg: the ``pretrained_cfg`` mapping, or the whole ``config.json`` (its
                ``pretrained_cfg`` entry is used when present).
            image_size: crop size; None takes ``input_size``'s (timm's own default).

        Returns:
            The view ``timm.data.create_transform(**resolve_data_config({}, model=m))``
            builds (center crop mode).

        Raises:
            ConfigError: an interpolation other than bilinear / bicubic, a non-square
                ``input_size``, or a bad ``crop_pct``.
        """
        cfg = cfg.get("pretrained_cfg", cfg)
        input_size = cfg.get("input_size", (3, 224, 224))
        if input_size[-1] != input_size[-2]:
            raise ConfigError(
                f"input_size {list(input_size)} is not square; jtransfer's views are square crops."
            )
        if cfg.get("crop_mode", "center") != "center":
            raise ConfigError(
                f"crop_mode {cfg['crop_mode']!r} is not supported (only timm's 'center')."
            )
        size = int(image_size or input_size[-1])
        crop_pct = float(cfg.get("crop_pct") or 0.875)  # timm's DEFAULT_CROP_PCT
        return cls(
            mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
            std=tuple(cfg.get("std", IMAGENET_STD)),
            interpolation=str(cfg.get("interpolation") or "bilinear"),
            crop_size=size,
            resize_size=math.floor(size / crop_pct),
            crop_pct=crop_pct,
            source="timm",
        )

    def with_crop_size(self, size: int) -> Preprocessing:
        """The same view at another crop size (timm's resize follows ``crop_pct``)."""
        if self.crop_pct is not None:
            return replace(self, crop_size=size, resize_size=math.floor(size / self.crop_pct))
        if isinstance(self.resize_size, int):
            return replace(self, crop_size=size, resize_size=round(size * 256 / 224))
        resize = round(size * 256 / 224)
        return replace(self, crop_size=size, resize_size=(resize, resize))

    def eval(self, img: Any) -> np.ndarray:
        """The evaluation view of a PIL image: float32 ``(crop, crop, 3)``."""
        return eval_transform(img, crop_size=self.crop_size, **self.loader_kwargs(train=False))

    def eval_pixels(self, img: Any) -> np.ndarray:
        """`eval` before ToTensor and Normalize: uint8 ``(crop, crop, 3)`` pixels, which
        `jtransfer.train.normalize_images(pixels, self.mean, self.std)` turns into `eval`'s
        bits on the device."""
        return eval_pixels(img, self.resize_size, self.crop_size, self.interpolation)

    def train(self, img: Any, rng: np.random.Generator) -> np.ndarray:
        """A random training view (`jtransfer.data.train_transform`) of a PIL image."""
        return train_transform(
            img,
            rng,
            size=self.crop_size,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
        )

    def loader_kwargs(self, train: bool) -> dict[str, Any]:
        """Keyword arguments of `jtransfer.data.make_loader` (less ``image_size``)."""
        kwargs: dict[str, Any] = {
            "interpolation": self.interpolation,
            "mean": self.mean,
            "std": self.std,
        }
        if not train:
            kwargs["resize_size"] = self.resize_size
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as a checkpoint's metadata records it."""
        resize: Size = self.resize_size
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_size": self.crop_size,
            "resize_size": resize if isinstance(resize, int) else list(resize),
            "crop_pct": self.crop_pct,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        """The inverse of `to_dict`."""
        resize = d["resize_size"]
        return cls(
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            interpolation=d.get("interpolation", "bilinear"),
            crop_size=int(d["crop_size"]),
            resize_size=resize if isinstance(resize, int) else tuple(resize),
            crop_pct=d.get("crop_pct"),
            source=d.get("source", "torchvision"),
        )

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> Preprocessing:
        """The view a checkpoint was trained with, from its metadata.

        Runs written before the view was recorded hold only ``image_size``,
        ``resize_size``, ``mean`` and ``std`` (bilinear, d2l's squash): those are read.
        """
        if "preprocessing" in meta:
            return cls.from_dict(meta["preprocessing"])
        crop = int(meta.get("image_size", 224))
        resize: Sequence[int] = meta.get("resize_size") or (256, 256)
        return cls(
            mean=tuple(meta.get("mean") or IMAGENET_MEAN),
            std=tuple(meta.get("std") or IMAGENET_STD),
            crop_size=crop,
            resize_size=tuple(resize),
        )
