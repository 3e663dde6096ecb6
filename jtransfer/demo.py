"""Generated source and target tasks for the offline demo of transfer learning.

Without network the hot-dog example cannot download ImageNet weights or d2l's photos. It
still teaches the recipe's lesson with two generated tasks that share their visual
primitives, as ImageNet and the hot-dog photos share theirs:

- the SOURCE task (`source_batch`): which of the `PRIMITIVES` (disc, ring, square, sausage,
  ...) an image shows, each drawn in random colours, sizes and positions on a noisy
  background. It has many classes and unlimited examples, so a network trained on it
  learns shape features that do not depend on colour;
- the TARGET task (`make_target_imagefolder`): "hotdog" (a sausage lying in a bun) against
  "not-hotdog" (another primitive lying on another base), colours random in both classes, so
  only shape tells them apart. Its training set is kept small, as d2l's is, so a network
  trained from scratch sees too few examples to learn shape, while the source task's
  features make it easy.

Everything is numpy / PIL and a pure function of its seeds; torch is never imported.

Example:
    >>> from jtransfer import demo
    >>> images, labels = demo.source_batch(seed=0, step=0, batch_size=4, size=32)
    >>> images.shape, images.dtype, labels.shape
    ((4, 32, 32, 3), dtype('uint8'), (4,))
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jtransfer import data
from jtransfer.errors import ConfigError

__all__ = [
    "GENERATOR_VERSION",
    "PRIMITIVES",
    "TARGET_CLASSES",
    "SourceStream",
    "make_target_imagefolder",
    "source_batch",
    "source_eval_batches",
    "source_image",
    "target_image",
]

PRIMITIVES = (
    "disc",
    "ring",
    "square",
    "frame",
    "triangle",
    "diamond",
    "plus",
    "cross",
    "bar",
    "sausage",
    "star",
    "half-disc",
)
TARGET_CLASSES = ("hotdog", "not-hotdog")
# Part of every cache key built on these images: bump it when the drawing changes, so a
# cached data set or pretrained network made from the old pictures is not reused.
GENERATOR_VERSION = 1
_SAUSAGE = PRIMITIVES.index("sausage")
# The same numbers are the seed's first entry for each task, so a source image and a target
# image never share their random draws.
_SOURCE_STREAM, _TARGET_STREAM, _HELD_OUT_STREAM = 7, 8, 9

Colour = tuple[int, int, int]


def _colour(rng: np.random.Generator, light: bool | None = None) -> Colour:
    """A random colour; `light` True or False picks a bright or a dark one."""
    hue = rng.uniform()
    low, high = {None: (0.3, 1.0), True: (0.75, 1.0), False: (0.3, 0.6)}[light]
    value = rng.uniform(low, high)
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    sat = rng.uniform(0.4, 1.0)
    rgb = 255 * (value - value * sat * np.clip(np.minimum(k, 4 - k), 0, 1))
    return tuple(int(c) for c in rgb)


def _contrasting(
    rng: np.random.Generator, against: np.ndarray, light: bool | None = None
) -> Colour:
    """A colour that stands out from `against` (so no shape is drawn invisibly)."""
    for _ in range(20):
        colour = _colour(rng, light)
        if np.abs(np.asarray(colour) - against).sum() > 150:
            break
    return colour


def _draw(draw: ImageDraw.ImageDraw, kind: int, cx: float, cy: float, r: float, fill: Colour):
    """Draws primitive `PRIMITIVES[kind]` centred at (cx, cy), about 2r across."""
    box = (cx - r, cy - r, cx + r, cy + r)
    thick = max(1.0, r / 2.5)
    name = PRIMITIVES[kind]
    if name == "disc":
        draw.ellipse(box, fill=fill)
    elif name == "ring":
        draw.ellipse(box, outline=fill, width=round(thick))
    elif name == "square":
        s = 0.85 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif name == "frame":
        s = 0.9 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), outline=fill, width=round(thick))
    elif name == "triangle":
        draw.polygon([(cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r), (cx, cy - r)], fill=fill)
    elif name == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif name == "plus":
        h = thick / 2
        draw.rectangle((cx - r, cy - h, cx + r, cy + h), fill=fill)
        draw.rectangle((cx - h, cy - r, cx + h, cy + r), fill=fill)
    elif name == "cross":
        d = 0.8 * r
        w = round(thick)
        draw.line((cx - d, cy - d, cx + d, cy + d), fill=fill, width=w)
        draw.line((cx - d, cy + d, cx + d, cy - d), fill=fill, width=w)
    elif name == "bar":
        h = thick / 2
        draw.rectangle((cx - h, cy - r, cx + h, cy + r), fill=fill)
    elif name == "sausage":
        h = 0.35 * r
        draw.rounded_rectangle((cx - r, cy - h, cx + r, cy + h), radius=h, fill=fill)
    elif name == "star":
        points = []
        for i in range(10):
            angle = -math.pi / 2 + i * math.pi / 5
            radius = r if i % 2 == 0 else 0.4 * r
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:  # half-disc, flat side down
        draw.pieslice((cx - r, cy - 0.5 * r, cx + r, cy + 1.5 * r), 180, 360, fill=fill)


def _background(rng: np.random.Generator, size: int) -> tuple[Image.Image, np.ndarray]:
    """A flat random colour with pixel noise, and that colour."""
    base = rng.integers(30, 226, 3)
    pixels = base + rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), base


def _places(rng: np.random.Generator, size: int) -> list[tuple[float, float, float]]:
    """(cx, cy, r) of one big object, or of 2-4 smaller ones on a jittered 2x2 grid.

    Several copies keep the label inside most of RandomResizedCrop's crops; one big copy
    keeps each shape large enough to tell apart at a few tens of pixels.
    """
    if rng.uniform() < 0.4:
        r = rng.uniform(0.25, 0.4) * size
        return [tuple(rng.uniform(r, size - r, 2)) + (r,)]
    cell = size / 2
    cells = [(i, j) for i in range(2) for j in range(2)]
    keep = rng.permutation(4)[: rng.integers(2, 5)]
    out = []
    for k in keep:
        i, j = cells[k]
        r = rng.uniform(0.3, 0.42) * cell
        cx = (j + 0.5) * cell + rng.uniform(-0.5, 0.5) * (cell / 2 - r)
        cy = (i + 0.5) * cell + rng.uniform(-0.5, 0.5) * (cell / 2 - r)
        out.append((cx, cy, r))
    return out


def source_image(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    """One source-task image: copies of `PRIMITIVES[label]`, each in its own random colour.

    Args:
        rng: the randomness of this image.
        label: index into `PRIMITIVES`.
        size: side in pixels.

    Returns:
        An RGB image of `size` x `size`.
    """
    img, base = _background(rng, size)
    draw = ImageDraw.Draw(img)
    for cx, cy, r in _places(rng, size):
        _draw(draw, label, cx, cy, r, _contrasting(rng, base))
    return img


def target_image(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    """One target-task image: label 0 ("hotdog") or 1 ("not-hotdog").

    A hot dog is a sausage lying across a wider, rounded bun. Anything else is another
    primitive lying on another base primitive. Colours are random in both classes (a light
    base, a darker top), so only the shapes carry the label.

    Args:
        rng: the randomness of this image.
        label: 0 or 1, the index into `TARGET_CLASSES`.
        size: side in pixels.

    Returns:
        An RGB image of `size` x `size`.
    """
    img, base = _background(rng, size)
    draw = ImageDraw.Draw(img)
    others = [k for k in range(len(PRIMITIVES)) if k != _SAUSAGE]
    for cx, cy, r in _places(rng, size):
        light = _contrasting(rng, base, light=True)
        dark = _contrasting(rng, np.asarray(light), light=False)
        if label == 0:
            h = 0.5 * r
            draw.rounded_rectangle((cx - 0.8 * r, cy - h, cx + 0.8 * r, cy + h), h, fill=light)
            _draw(draw, _SAUSAGE, cx, cy, r, dark)
        else:
            below, above = rng.choice(others, 2, replace=False)
            _draw(draw, int(below), cx, cy, r, light)
            _draw(draw, int(above), cx, cy, 0.6 * r, dark)
    return img


def source_batch(seed: int, step: int, batch_size: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch `step` of an endless stream of source-task examples, balanced over the classes.

    Args:
        seed: the stream's seed.
        step: which batch; any step can be recomputed on its own.
        batch_size: examples in the batch.
        size: image side in pixels.

    Returns:
        (uint8 images (batch_size, size, size, 3), int32 labels (batch_size,)), labels
        indexing `PRIMITIVES`.
    """
    return _source_batch(_SOURCE_STREAM, seed, step, batch_size, size)


def _source_batch(
    stream: int, seed: int, step: int, batch_size: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([stream, seed, step])
    labels = (np.arange(batch_size) + step * batch_size) % len(PRIMITIVES)
    labels = rng.permutation(labels).astype(np.int32)
    images = np.stack([np.asarray(source_image(rng, int(y), size)) for y in labels])
    return images, labels


def make_target_imagefolder(
    root: str | os.PathLike[str], n_per_class: int, size: int, seed: int
) -> Path:
    """Writes `n_per_class` target images per class as an ImageFolder (JPEG files) at `root`.

    The folder is written beside `root` and renamed into place, so an interrupted call never
    leaves a partial data set; the content is a pure function of the arguments.

    Args:
        root: the folder to create; it must not exist yet.
        n_per_class: images per class.
        size: image side in pixels.
        seed: use different seeds for the train and test splits.

    Returns:
        `root`, holding `hotdog/` and `not-hotdog/`.

    Raises:
        ConfigError: `root` exists, or the arguments are invalid.
    """
    root = Path(root)
    if root.exists():
        raise ConfigError(f"{root} already exists; pick a new folder or remove it.")
    if n_per_class <= 0 or size < 16:
        raise ConfigError(f"need n_per_class >= 1 and size >= 16, got {n_per_class}, {size}.")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        for label, name in enumerate(TARGET_CLASSES):
            (staging / name).mkdir()
            for i in range(n_per_class):
                rng = np.random.default_rng([_TARGET_STREAM, seed, label, i])
                img = target_image(rng, label, size)
                img.save(staging / name / f"{name}_{i:04d}.jpg", quality=95)
        staging.chmod(0o755)  # mkdtemp makes it private; the data set is not secret
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def _normalized(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) to float32 ImageNet-normalised, as `data.to_normalized_array`."""
    x = images.astype(np.float32) / np.float32(255)
    mean = np.asarray(data.IMAGENET_MEAN, np.float32)
    return (x - mean) / np.asarray(data.IMAGENET_STD, np.float32)


class SourceStream:
    """Fresh source-task batches for `jtransfer.fit.fit`, `steps_per_epoch` per pass.

    Each pass (what `fit` calls an epoch) continues the endless `source_batch` stream, so no
    image is seen twice and the network cannot memorise the source set: it has to learn the
    shapes. Batches are ``{"image": float32 (B, H, W, 3) ImageNet-normalised, "label": int32
    (B,)}``.

    Args:
        seed: the stream's seed.
        steps_per_epoch: batches per pass.
        batch_size: examples per batch.
        size: image side in pixels.
    """

    def __init__(self, seed: int, steps_per_epoch: int, batch_size: int, size: int) -> None:
        self.seed, self.steps_per_epoch = seed, steps_per_epoch
        self.batch_size, self.size = batch_size, size
        self.passes = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        first = self.passes * self.steps_per_epoch
        self.passes += 1
        for step in range(first, first + self.steps_per_epoch):
            images, labels = source_batch(self.seed, step, self.batch_size, self.size)
            yield {"image": _normalized(images), "label": labels}


def source_eval_batches(
    seed: int, count: int, size: int, batch_size: int = 128
) -> list[dict[str, np.ndarray]]:
    """`count` source-task examples that `SourceStream(seed, ...)` never draws, in batches."""
    images, labels = _source_batch(_HELD_OUT_STREAM, seed, 0, count, size)
    return [
        {"image": _normalized(images[i : i + batch_size]), "label": labels[i : i + batch_size]}
        for i in range(0, count, batch_size)
    ]
