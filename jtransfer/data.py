"""ImageFolder input, torchvision-equivalent transforms, a multi-process loader, device prefetch.

Everything here is numpy / PIL / grain / JAX; torch is never imported. The deterministic
transforms return exactly what torchvision's do on the same PIL image (the tests compare them),
and the random ones take their randomness from a numpy ``Generator`` derived from
``(seed, epoch, index)``, so any batch of any epoch can be recomputed, and a run resumed from a
checkpointed loader state sees the same augmented images it would have seen uninterrupted.

Example:
    A small generated image folder stands in for a real one such as ``hotdog/train``:

    >>> import tempfile
    >>> from jtransfer import data
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = data.make_demo_imagefolder(f"{tmp.name}/train", n_per_class=4, size=40)
    >>> folder.classes, len(folder)
    (['hotdog', 'not-hotdog'], 8)
    >>> loader = data.make_loader(folder, batch_size=4, train=True, seed=0, image_size=32)
    >>> it = iter(loader)
    >>> batch = next(it)
    >>> batch["image"].shape, batch["image"].dtype, batch["label"].shape
    ((4, 32, 32, 3), dtype('float32'), (4,))
    >>> state = it.get_state()  # JSON bytes for the checkpoint; it.set_state(state) resumes
    >>> it.close()
    >>> tmp.cleanup()
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import math
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import sys
import tempfile
import threading
import traceback
import types
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import connection as mp_connection
from multiprocessing import shared_memory
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from jtransfer.errors import CheckpointError, ConfigError, DataError

if TYPE_CHECKING:  # imported where used: loader workers start without jax and grain
    import grain

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "BadImageError",
    "DevicePrefetcher",
    "ImageFolder",
    "ImageLoader",
    "LoaderIterator",
    "LoaderStateMismatchError",
    "LoaderWorkerError",
    "NoFullBatchError",
    "center_crop",
    "check_same_classes",
    "crop",
    "eval_pixels",
    "eval_transform",
    "example_rng",
    "hflip",
    "load_image",
    "make_demo_imagefolder",
    "make_loader",
    "normalize",
    "prefetch_to_device",
    "random_resized_crop_params",
    "resize",
    "resized_crop",
    "scan_images",
    "to_normalized_array",
    "train_transform",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# torchvision.datasets.folder.IMG_EXTENSIONS, matched case-insensitively as torchvision does.
IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)

Sample = tuple[str, int]
Size = int | Sequence[int]


# --------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------


class BadImageError(DataError):
    """An image file cannot be decoded (missing, not an image, corrupt or truncated).

    Attributes:
        path: the file.
        reason: what the decoder said.
    """

    def __init__(self, message: str = "", *, path: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.path, self.reason = path, reason


class NoFullBatchError(ConfigError):
    """A training folder holds fewer examples (per shard) than one batch.

    Attributes:
        root: the folder.
        examples: readable examples per shard (per process).
        shard_count: the number of shards (processes).
        batch_size: the batch size per shard.
    """

    def __init__(
        self,
        message: str = "",
        *,
        root: str = "",
        examples: int = 0,
        shard_count: int = 1,
        batch_size: int = 0,
    ) -> None:
        super().__init__(message)
        self.root, self.examples = root, examples
        self.shard_count, self.batch_size = shard_count, batch_size


class LoaderStateMismatchError(CheckpointError):
    """A saved loader position belongs to a loader over other data or with other settings.

    Attributes:
        changed: ``{setting: (saved, now)}``, e.g. ``{"num_examples": (32, 40)}``.
    """

    def __init__(self, message: str = "", *, changed: dict[str, tuple] | None = None) -> None:
        super().__init__(message)
        self.changed = dict(changed or {})


class ImageFolder:
    """A folder with one sub-folder per class, read exactly as torchvision's ImageFolder.

    ``classes``, ``class_to_idx`` and ``samples`` are equal to those of
    ``torchvision.datasets.ImageFolder(root)``: class folders sorted by name, files found by
    walking each class folder (sub-folders included, symlinks followed) in sorted order, and a
    file kept when its name ends with one of `IMG_EXTENSIONS`, ignoring case.

    Attributes:
        root: the folder, as a string (``~`` expanded), as torchvision stores it.
        classes: class names, sorted.
        class_to_idx: class name -> label.
        samples: ``(path, label)`` pairs; paths are strings joined onto ``root``.

    Raises:
        DataError: ``root`` is missing or not a folder, has no class folders, or a class folder
            holds no image file. The message names the path and what to do.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        """Scans ``root``.

        Args:
            root: the dataset folder, e.g. ``hotdog/train``.
        """
        self.root: str = os.path.expanduser(os.fspath(root))
        if not os.path.isdir(self.root):
            what = "is not a folder" if os.path.exists(self.root) else "does not exist"
            raise DataError(
                f"Image folder {self.root} {what}. Pass a folder with one sub-folder per class "
                "(root/<class>/<image>.jpg), e.g. hotdog/train."
            )
        self.classes: list[str] = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.classes:
            raise DataError(
                f"Found no class folders in {self.root}. An image folder needs one sub-folder per "
                "class holding that class's images (root/<class>/<image>.jpg); point it at the "
                "folder above the class folders."
            )
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[Sample] = []
        empty = []
        for name in self.classes:
            found = _image_files(os.path.join(self.root, name))
            if not found:
                empty.append(os.path.join(self.root, name))
            self.samples.extend((path, self.class_to_idx[name]) for path in found)
        if empty:
            raise DataError(
                f"Found no image files in the class folder(s) {', '.join(empty)}. Allowed "
                f"extensions (any case): {', '.join(IMG_EXTENSIONS)}. Add images, or remove the "
                "folder if it is not a class."
            )

    @property
    def targets(self) -> list[int]:
        """The label of each sample, as torchvision's ``targets``."""
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"ImageFolder(root={self.root!r}, classes={self.classes!r}, "
            f"num_samples={len(self.samples)})"
        )


def _image_files(class_dir: str) -> list[str]:
    """Image paths under ``class_dir`` in torchvision's make_dataset order."""
    paths = []
    # sorted() over os.walk's (root, dirs, files) tuples orders by directory path, as
    # torchvision's make_dataset does; that is not the walk order, so we copy it.
    for root, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
        for fname in sorted(fnames):
            if fname.lower().endswith(IMG_EXTENSIONS):
                paths.append(os.path.join(root, fname))
    return paths


def check_same_classes(train: ImageFolder, test: ImageFolder) -> None:
    """Checks that two folders have the same classes, so labels mean the same in both.

    Args:
        train: the training folder.
        test: the evaluation folder.

    Raises:
        DataError: the class lists differ; the message lists the classes found only in one.
    """
    if train.classes == test.classes:
        return
    only_train = sorted(set(train.classes) - set(test.classes))
    only_test = sorted(set(test.classes) - set(train.classes))
    raise DataError(
        f"The training folder {train.root} and the evaluation folder {test.root} have different "
        f"classes, so their labels would not mean the same thing. Only in training: "
        f"{only_train or 'none'}; only in evaluation: {only_test or 'none'}. Give both folders "
        "the same class sub-folders."
    )


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

# What PIL raises on an unreadable, unidentifiable or truncated file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decodes an image file to RGB exactly as torchvision's default loader does.

    Grayscale is replicated to three channels and alpha is dropped (``convert("RGB")``, not
    composited). The whole file is decoded here, so a truncated file fails now rather than
    silently producing a partly grey image.

    Args:
        path: the image file.

    Returns:
        A fully loaded RGB PIL image.

    Raises:
        DataError: the file is missing, not an image, or corrupt/truncated.
    """
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            # load() reads all pixel data: truncation raises here. An RGB image (most JPEGs)
            # is returned as decoded: convert("RGB") would only copy it.
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")
    except _DECODE_ERRORS as e:
        raise BadImageError(
            f"Cannot decode image {os.fspath(path)}: {e}. The file is missing, corrupt or "
            "truncated; delete or replace it, or pass skip_bad_images=True to leave unreadable "
            "files out.",
            path=os.fspath(path),
            reason=str(e),
        ) from e


def scan_images(
    samples: Sequence[Sample] | ImageFolder, *, num_threads: int | None = None
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Decodes every image once to find the unreadable ones.

    Args:
        samples: ``(path, label)`` pairs, or an `ImageFolder`.
        num_threads: decoding threads (PIL decodes without holding the GIL); default: CPU count.

    Returns:
        ``(good_samples, bad_files)``: the readable samples in their original order, and
        ``(path, reason)`` for each file `load_image` cannot decode.
    """
    if isinstance(samples, ImageFolder):
        samples = samples.samples

    def problem(sample: Sample) -> str | None:
        try:
            load_image(sample[0])
        except DataError as e:
            return str(e.__cause__ or e)
        return None

    with ThreadPoolExecutor(max_workers=num_threads or os.cpu_count() or 1) as pool:
        problems = list(pool.map(problem, samples))
    good = [s for s, p in zip(samples, problems, strict=True) if p is None]
    bad = [(s[0], p) for s, p in zip(samples, problems, strict=True) if p is not None]
    return good, bad


# --------------------------------------------------------------------------------------------
# Transforms (each equal to its torchvision.transforms.functional counterpart on PIL input)
# --------------------------------------------------------------------------------------------


def _resized_size(height: int, width: int, size: Size) -> tuple[int, int]:
    """torchvision's ``_compute_resized_output_size``: returns the output ``(height, width)``."""
    if isinstance(size, int) or len(size) == 1:
        requested = size if isinstance(size, int) else int(size[0])
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = requested, int(requested * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if len(size) != 2:
        raise ConfigError(f"size must be an int or (height, width), got {size!r}.")
    return int(size[0]), int(size[1])


_FILTERS = {
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "nearest": Image.NEAREST,
    "lanczos": Image.LANCZOS,
}


def _pil_filter(interpolation: str) -> int:
    try:
        return _FILTERS[interpolation]
    except KeyError:
        raise ConfigError(
            f"interpolation {interpolation!r} is not one of {', '.join(_FILTERS)}."
        ) from None


def resize(img: Image.Image, size: Size, interpolation: str = "bilinear") -> Image.Image:
    """Resize, as ``torchvision.transforms.functional.resize`` on a PIL image.

    Args:
        img: the image.
        size: ``(height, width)``, or an int: the shorter side becomes ``size`` and the aspect
            ratio is kept (torchvision's ``Resize(int)``; note ``Resize([256, 256])`` squashes).
        interpolation: "bilinear" (torchvision's default), "bicubic" (most timm weights),
            "nearest" or "lanczos": PIL's filter of that name, which is what torchvision and
            timm call for PIL input.

    Returns:
        The resized image (the input itself when it already has that size, as torchvision).
    """
    resample = _pil_filter(interpolation)
    height, width = _resized_size(img.height, img.width, size)
    if (height, width) == (img.height, img.width):
        return img
    # PIL's filters widen their support when shrinking, which is the antialiasing that
    # torchvision relies on for PIL input; calling the same function gives the same pixels.
    return img.resize((width, height), resample)


def crop(img: Image.Image, top: int, left: int, height: int, width: int) -> Image.Image:
    """Crops a box, zero-filling any part outside the image, as torchvision's ``crop``.

    Args:
        img: the image.
        top: first row of the box.
        left: first column of the box.
        height: box height.
        width: box width.

    Returns:
        The ``height`` x ``width`` crop.
    """
    return img.crop((left, top, left + width, top + height))


def center_crop(img: Image.Image, size: Size) -> Image.Image:
    """Central crop with torchvision's rounding and zero padding.

    Args:
        img: the image.
        size: an int (square) or ``(height, width)``.

    Returns:
        The crop. When the image is smaller than ``size`` it is zero-padded around, with the
        odd pixel on the bottom/right, as torchvision pads it.
    """
    crop_h, crop_w = (size, size) if isinstance(size, int) else (size[0], size[-1])
    height, width = img.height, img.width
    # torchvision pads first ((crop - size) // 2 before), then crops at round((padded - crop)/2),
    # which is 0 along a padded axis: the same as a crop starting before the image.
    top = -((crop_h - height) // 2) if crop_h > height else int(round((height - crop_h) / 2.0))
    left = -((crop_w - width) // 2) if crop_w > width else int(round((width - crop_w) / 2.0))
    return crop(img, top, left, crop_h, crop_w)


def resized_crop(
    img: Image.Image,
    top: int,
    left: int,
    height: int,
    width: int,
    size: Size,
    interpolation: str = "bilinear",
) -> Image.Image:
    """Crops a box and resizes it, as ``torchvision.transforms.functional.resized_crop``.

    Args:
        img: the image.
        top: first row of the box.
        left: first column of the box.
        height: box height.
        width: box width.
        size: output size, as in `resize`.
        interpolation: as in `resize`.

    Returns:
        The resized crop.
    """
    return resize(crop(img, top, left, height, width), size, interpolation)


def hflip(img: Image.Image) -> Image.Image:
    """Mirrors left-right, as ``torchvision.transforms.functional.hflip``.

    Args:
        img: the image.

    Returns:
        The mirrored image.
    """
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def to_normalized_array(
    img: Image.Image | np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """``ToTensor()`` then ``Normalize(mean, std)``, laid out HWC for JAX's NHWC.

    The float32 operations are torchvision's, in its order (divide by 255, subtract the mean,
    divide by the std), so the result is bit-identical to torchvision's tensor transposed to
    HWC.

    Args:
        img: an RGB PIL image, or a uint8 ``(H, W, 3)`` array of one.
        mean: per-channel mean.
        std: per-channel standard deviation.

    Returns:
        float32 array of shape ``(H, W, 3)``.
    """
    if isinstance(img, Image.Image) and img.mode != "RGB":
        img = img.convert("RGB")
    pixels = np.asarray(img, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ConfigError(f"Expected an RGB image or a (H, W, 3) array, got shape {pixels.shape}.")
    x = pixels.astype(np.float32) / np.float32(255)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def normalize(
    images: np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """uint8 pixels (a batch ``(..., H, W, 3)`` or one image) to float32, as torchvision.

    The reference for normalising the uint8 batches of ``make_loader(..., dtype=np.uint8)``
    elsewhere (e.g. inside a jitted step): the float32 operations of ``ToTensor()`` then
    ``Normalize(mean, std)`` in their order (divide by 255, subtract the mean, divide by the
    std), each correctly rounded, so the result is bit-identical to torchvision's tensor
    transposed to channels-last, and to the default float32 batches of `make_loader`.

    Args:
        images: uint8 array whose last axis holds the 3 channels.
        mean: per-channel mean (the loader's ``loader.mean``).
        std: per-channel standard deviation (the loader's ``loader.std``).

    Returns:
        float32 array of the same shape.

    Example:
        >>> import numpy as np
        >>> from jtransfer import data
        >>> white = np.full((1, 1, 1, 3), 255, np.uint8)
        >>> data.normalize(white)[0, 0, 0].astype(float).round(4).tolist()
        [2.2489, 2.4286, 2.64]
    """
    pixels = np.asarray(images)
    if pixels.dtype != np.uint8 or pixels.ndim < 3 or pixels.shape[-1] != 3:
        raise ConfigError(
            f"normalize expects uint8 pixels with 3 channels last, got {pixels.dtype} of shape "
            f"{pixels.shape}. Pass the images of a make_loader(..., dtype=np.uint8) batch."
        )
    out = np.empty(pixels.shape, np.float32)
    _normalize_into(pixels, out, mean, std)
    return out


def _normalize_into(
    pixels: np.ndarray, out: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> None:
    """`normalize` writing into ``out`` (float32, same shape): three in-place passes."""
    np.divide(pixels, np.float32(255), out=out, dtype=np.float32)
    np.subtract(out, np.asarray(mean, np.float32), out=out)
    np.divide(out, np.asarray(std, np.float32), out=out)


@functools.lru_cache(maxsize=8)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: `normalize` of every pixel value in every channel."""
    values = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    table = np.empty((256, 3), np.float32)
    _normalize_into(values, table, mean, std)
    return np.ascontiguousarray(table.T)


def _normalize_by_table(
    pixels: np.ndarray, out: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> None:
    """`_normalize_into` by looking every value up (the same float32 operations, made once
    per value in `_normalize_table`, so the same bits), about twice as fast."""
    table = _normalize_table(tuple(mean), tuple(std))
    for c in range(3):
        np.take(table[c], pixels[..., c], out=out[..., c], mode="clip")  # uint8: in range


def random_resized_crop_params(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Samples a crop box with torchvision's ``RandomResizedCrop.get_params`` algorithm.

    Up to ten tries draw an area fraction uniformly from ``scale`` and an aspect ratio
    log-uniformly from ``ratio``; the first box that fits gets a uniform position. If none fits
    (very elongated images) the fallback is torchvision's: the largest central box whose aspect
    ratio is clamped to ``ratio``. The draws come from ``rng`` instead of torch's global RNG, so
    the distribution is torchvision's but the individual boxes are not.

    Args:
        rng: the source of randomness.
        height: image height.
        width: image width.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop's width / height.

    Returns:
        ``(top, left, height, width)`` of the box, as torchvision's ``(i, j, h, w)``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation randomness of one example in one epoch.

    Args:
        seed: the run's seed.
        epoch: the epoch (0-based).
        index: the example's index in ``folder.samples`` (not its position in the epoch).

    Returns:
        A generator that depends only on ``(seed, epoch, index)``.
    """
    # The leading stream tag keeps this apart from the shuffle stream: numpy's SeedSequence
    # treats [a, b] and [a, b, 0] as the same entropy, so untagged lists could collide.
    return np.random.default_rng([_AUGMENT_STREAM, seed, epoch, index])


_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


def train_transform(
    img: Image.Image,
    rng: np.random.Generator,
    *,
    size: Size = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_prob: float = 0.5,
    interpolation: str = "bilinear",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """``RandomResizedCrop(size)``, ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize``.

    Args:
        img: an RGB image.
        rng: randomness for this example (see `example_rng`); the crop box is drawn first,
            then the flip, as torchvision's Compose does.
        size: output size (int: square).
        scale: `random_resized_crop_params` scale range.
        ratio: `random_resized_crop_params` aspect-ratio range.
        flip_prob: probability of the horizontal flip.
        interpolation: the crop's resize filter, as in `resize`.
        mean: per-channel mean of the normalisation.
        std: per-channel standard deviation of the normalisation.

    Returns:
        float32 ``(size, size, 3)`` normalised array.
    """
    out_size = [size, size] if isinstance(size, int) else list(size)
    top, left, h, w = random_resized_crop_params(rng, img.height, img.width, scale, ratio)
    img = resized_crop(img, top, left, h, w, out_size, interpolation)
    if rng.random() < flip_prob:
        img = hflip(img)
    return to_normalized_array(img, mean, std)


def eval_pixels(
    img: Image.Image,
    resize_size: Size = (256, 256),
    crop_size: Size = 224,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """`eval_transform` before ``ToTensor`` and ``Normalize``: ``Resize`` + ``CenterCrop``.

    The pixels a uint8 loader's evaluation batches hold; `jtransfer.train.normalize_images`
    turns them into `eval_transform`'s float32 bits on the device.

    Args:
        img: an RGB image.
        resize_size: as in `resize`.
        crop_size: as in `center_crop`.
        interpolation: the resize filter, as in `resize`.

    Returns:
        uint8 ``(crop, crop, 3)`` pixels.
    """
    resized = resize(img, resize_size, interpolation)
    return np.asarray(center_crop(resized, crop_size), dtype=np.uint8)


def eval_transform(
    img: Image.Image,
    *,
    resize_size: Size = (256, 256),
    crop_size: Size = 224,
    interpolation: str = "bilinear",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """``Resize(resize_size)``, ``CenterCrop(crop_size)``, ``ToTensor()``, ``Normalize``.

    The default ``(256, 256)`` squashes the image to a square, as d2l's hot-dog recipe
    (``Resize([256, 256])``); pass an int for torchvision's aspect-preserving ``Resize(256)``.

    Args:
        img: an RGB image.
        resize_size: as in `resize` (timm's eval view: the int ``floor(crop / crop_pct)``).
        crop_size: as in `center_crop`.
        interpolation: the resize filter, as in `resize`.
        mean: per-channel mean of the normalisation.
        std: per-channel standard deviation of the normalisation.

    Returns:
        float32 ``(crop, crop, 3)`` normalised array.
    """
    pixels = eval_pixels(img, resize_size, crop_size, interpolation)
    return to_normalized_array(pixels, mean, std)


# --------------------------------------------------------------------------------------------
# grain loader
# --------------------------------------------------------------------------------------------


class _EpochBatches:
    """Element ``g`` is global batch ``g``: ``(epoch, sample indices of that batch)``.

    A batch, not an image, is the unit handed to a worker, so every batch is the same
    whatever ``worker_count`` is, and epochs never share a batch (the remainder is dropped or
    kept per epoch, as torch's ``drop_last``). Indexing past one epoch gives the next one
    (as grain's ``repeat`` asks); the epoch's order is a pure function of (seed, epoch).
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        drop_remainder: bool,
        shard_index: int,
        shard_count: int,
        shard_drop_remainder: bool,
    ) -> None:
        self._num_examples = num_examples
        self._last_order: tuple[int, np.ndarray] | None = None
        self._batch_size = batch_size
        self._shuffle = shuffle
        self._seed = seed
        self._shard_index = shard_index
        self._shard_count = shard_count
        # Shard p serves block p of every run of shard_count blocks of batch_size examples:
        # its batch g is rows [p * batch_size, (p + 1) * batch_size) of the global batch g of
        # batch_size * shard_count examples, so the hosts' batches concatenated in shard order
        # are exactly the batches of one host with the global batch size.
        self._shard_of = (np.arange(num_examples) // batch_size) % shard_count
        per_shard = int(np.sum(self._shard_of == shard_index))
        if shard_drop_remainder:
            # Every host must run the same number of steps, or collectives hang: the last
            # shard has the fewest examples.
            per_shard = int(np.sum(self._shard_of == shard_count - 1))
        self._per_shard = per_shard
        self._num_batches = (
            per_shard // batch_size if drop_remainder else -(-per_shard // batch_size)
        )

    def __len__(self) -> int:
        return self._num_batches

    def __str__(self) -> str:
        return f"_EpochBatches(num_examples={self._num_examples}, batch_size={self._batch_size})"

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This shard's sample indices for ``epoch``, in the order they are served."""
        cached = self._last_order
        if cached is not None and cached[0] == epoch:
            return cached[1]
        order = np.arange(self._num_examples)
        if self._shuffle:
            # All hosts draw the same permutation and take disjoint blocks of it.
            order = np.random.default_rng([_SHUFFLE_STREAM, self._seed, epoch]).permutation(order)
        order = order[self._shard_of == self._shard_index][: self._per_shard]
        self._last_order = (epoch, order)  # every batch of an epoch asks for the same order
        return order

    def __getitem__(self, index: int) -> tuple[int, np.ndarray]:
        epoch, batch = divmod(int(index), self._num_batches)
        order = self.epoch_order(epoch)
        return epoch, order[batch * self._batch_size : (batch + 1) * self._batch_size]


def _out_hw(size: Size) -> tuple[int, int]:
    """The ``(height, width)`` of the train crop / eval center crop for ``image_size``."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def _open_image(path: str, draft_size: Any = None) -> Image.Image:
    """`load_image`, or with ``draft_size(width, height) -> (w, h) | None`` a reduced decode.

    ``draft_size`` sees the stored size and returns the smallest size the decode may produce;
    a JPEG is then decoded with libjpeg's DCT scaling (``Image.draft``) at the largest of 1/2,
    1/4, 1/8 that keeps at least that size. Other formats decode in full.
    """
    if draft_size is None:
        return load_image(path)
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            if img.format == "JPEG":
                wanted = draft_size(img.width, img.height)
                if wanted is not None:
                    img.draft(None, wanted)
            return img.convert("RGB")
    except _DECODE_ERRORS as e:
        raise BadImageError(
            f"Cannot decode image {path}: {e}. The file is missing, corrupt or truncated; delete "
            "or replace it, or pass skip_bad_images=True to leave unreadable files out.",
            path=path,
            reason=str(e),
        ) from e


class _DecodedImages:
    """Decoded uint8 images kept in one shared-memory block, readable by worker processes.

    Pickling sends the block's name, not the pixels: a worker maps the same memory, so the
    cache costs its size once whatever ``worker_count`` is. Entries of height 0 are images that
    could not be decoded when the cache was built; they are decoded (and fail) when served,
    as without a cache. The block is unlinked when the owning process drops the cache.
    """

    def __init__(self, arrays: Sequence[np.ndarray | None]) -> None:
        shapes = np.array([(0, 0) if a is None else a.shape[:2] for a in arrays], np.int64)
        sizes = shapes[:, 0] * shapes[:, 1] * 3
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._shapes = shapes
        self._shm = shared_memory.SharedMemory(create=True, size=max(1, int(self._offsets[-1])))
        self._owner = True
        flat = np.ndarray((int(self._offsets[-1]),), np.uint8, self._shm.buf)
        for k, a in enumerate(arrays):
            if a is not None:
                flat[self._offsets[k] : self._offsets[k + 1]] = a.reshape(-1)
        del flat
        self._finalizer = weakref.finalize(self, _release_shared, self._shm, True)

    @property
    def nbytes(self) -> int:
        return int(self._offsets[-1])

    def get(self, index: int) -> np.ndarray | None:
        """Image ``index`` as a read-only ``(H, W, 3)`` view, or None if it is not cached."""
        h, w = self._shapes[index]
        if h == 0:
            return None
        start = int(self._offsets[index])
        view = np.ndarray((h, w, 3), np.uint8, self._shm.buf, offset=start)
        view.flags.writeable = False
        return view

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self._shm.name, "offsets": self._offsets, "shapes": self._shapes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._offsets, self._shapes = state["offsets"], state["shapes"]
        self._shm = shared_memory.SharedMemory(name=state["name"])
        self._owner = False
        self._finalizer = weakref.finalize(self, _release_shared, self._shm, False)


def _release_shared(shm: shared_memory.SharedMemory, unlink: bool) -> None:
    try:
        shm.close()
    except BufferError:  # a view is still alive (e.g. held by a caller): the OS frees it later
        pass
    if unlink:
        try:
            shm.unlink()
        except FileNotFoundError:
            pass


def _default_decode_cache_mb() -> float:
    """1 GiB, or an eighth of the physical memory when that is less."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1024.0
    return min(1024.0, total / 8 / 2**20)


def _stored_size(path: str) -> tuple[int, int] | None:
    """``(height, width)`` from the file header, or None if it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except _DECODE_ERRORS:
        return None


class _MakeBatch:
    """Decodes and transforms one batch; a module-level class so worker processes can unpickle."""

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        train: bool,
        seed: int,
        image_size: Size,
        resize_size: Size,
        interpolation: str = "bilinear",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        dtype: Any = np.float32,
        draft: bool = False,
    ) -> None:
        self._paths = [path for path, _ in samples]
        self._labels = np.asarray([label for _, label in samples], dtype=np.int32)
        self._train = train
        self._seed = seed
        self._image_size = image_size
        self._resize_size = resize_size
        self._interpolation = interpolation
        self._mean, self._std = tuple(mean), tuple(std)
        self.dtype = np.dtype(dtype)
        self._draft = draft
        # What the cache holds: the full decoded image (train: a new crop every epoch) or
        # the finished evaluation view (eval: the same every epoch).
        self._cache: _DecodedImages | None = None
        self.image_shape = (*_out_hw(image_size), 3)

    def cache_entry_bytes(self, stored_hw: tuple[int, int]) -> int:
        """Bytes one image takes in the decode cache, from its stored ``(height, width)``."""
        if self._train:
            return stored_hw[0] * stored_hw[1] * 3
        return int(np.prod(self.image_shape))

    def build_cache(self, num_threads: int) -> None:
        """Decodes every image once into the shared decode cache (exact decode, no draft)."""

        def entry(index: int) -> np.ndarray | None:
            try:
                img = load_image(self._paths[index])
            except DataError:
                return None  # fails again, with its message, when the batch is made
            if self._train:
                return np.asarray(img, dtype=np.uint8)
            return self._eval_view(img)

        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            self._cache = _DecodedImages(list(pool.map(entry, range(len(self._paths)))))

    @property
    def cached(self) -> bool:
        return self._cache is not None

    @property
    def cache_nbytes(self) -> int:
        return 0 if self._cache is None else self._cache.nbytes

    def _eval_view(self, img: Image.Image) -> np.ndarray:
        return eval_pixels(img, self._resize_size, self._image_size, self._interpolation)

    def _train_pixels(self, epoch: int, index: int) -> np.ndarray:
        rng = example_rng(self._seed, epoch, index)
        out_h, out_w = self.image_shape[:2]
        full = None if self._cache is None else self._cache.get(index)
        if full is not None:
            height, width = full.shape[:2]
            top, left, h, w = random_resized_crop_params(rng, height, width)
            # Cropping the array first converts only the box to a PIL image: the same pixels
            # as torchvision's crop of the whole image, since the box lies inside it.
            box = Image.fromarray(full[top : top + h, left : left + w])
            img = resize(box, [out_h, out_w], self._interpolation)
        elif self._draft:
            drawn: list[tuple[int, int, int, int, int, int]] = []

            def draft_size(width: int, height: int) -> tuple[int, int]:
                # The box is drawn on the stored size, so the draws (and the box) are the
                # exact path's; the decode only needs the box to keep >= the output size.
                top, left, h, w = random_resized_crop_params(rng, height, width)
                drawn.append((top, left, h, w, height, width))
                factor = max(out_h / h, out_w / w)
                return math.ceil(width * factor), math.ceil(height * factor)

            img = _open_image(self._paths[index], draft_size)
            if drawn:
                top, left, h, w, height, width = drawn[0]
                sx, sy = img.width / width, img.height / height
            if not drawn or (sx, sy) == (1, 1):  # not reduced (or not a JPEG): exact path
                if not drawn:
                    top, left, h, w = random_resized_crop_params(rng, img.height, img.width)
                img = resized_crop(img, top, left, h, w, [out_h, out_w], self._interpolation)
            else:
                img = img.resize(
                    (out_w, out_h),
                    _pil_filter(self._interpolation),
                    box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy),
                )
        else:
            img = load_image(self._paths[index])
            top, left, h, w = random_resized_crop_params(rng, img.height, img.width)
            img = resized_crop(img, top, left, h, w, [out_h, out_w], self._interpolation)
        pixels = np.asarray(img, dtype=np.uint8)
        # The flip as a reversed view: the batch's copy makes it, not another image copy.
        return pixels[:, ::-1] if rng.random() < 0.5 else pixels

    def pixels(self, epoch: int, index: int) -> np.ndarray:
        """The uint8 pixels of sample ``index`` in ``epoch``, before ToTensor."""
        if self._train:
            return self._train_pixels(epoch, index)
        if self._cache is not None:
            view = self._cache.get(index)
            if view is not None:
                return view
        if self._draft:
            target: list[tuple[int, int]] = []

            def draft_size(width: int, height: int) -> tuple[int, int]:
                target.append(_resized_size(height, width, self._resize_size))
                return target[0][1], target[0][0]

            img = _open_image(self._paths[index], draft_size)
            if target:  # the size the full image would have been resized to (aspect kept)
                img = resize(img, list(target[0]), self._interpolation)
                return np.asarray(center_crop(img, self._image_size), dtype=np.uint8)
        return self._eval_view(load_image(self._paths[index]))

    def fill(self, epoch: int, indices: np.ndarray, out: np.ndarray) -> None:
        """Writes the batch's images into ``out`` (``(len(indices), H, W, 3)``, our dtype)."""
        for k, index in enumerate(indices):
            pixels = self.pixels(epoch, int(index))
            if self.dtype == np.uint8:
                out[k] = pixels
            else:
                _normalize_by_table(pixels, out[k], self._mean, self._std)

    def labels(self, indices: np.ndarray) -> np.ndarray:
        return self._labels[indices]

    def __call__(self, element: tuple[int, np.ndarray]) -> dict[str, np.ndarray]:
        epoch, indices = element
        # Filling a preallocated batch saves np.stack's extra copy (77 MB at batch 128).
        images = np.empty((len(indices), *self.image_shape), dtype=self.dtype)
        self.fill(epoch, indices, images)
        return {"image": images, "label": self._labels[indices]}


def _allow_grain_workers() -> None:
    """Works around google/grain#1355 (fixed upstream by google/grain#1362).

    With a recent jaxlib, grain reads an absl flag when it starts worker processes, and absl
    raises UnparsedFlagAccessError in any program that did not parse flags via absl.app. Marking
    the (unparsed) flags as parsed keeps every flag at its default, which is what grain would
    use; a program that parses absl flags itself is unaffected.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# --------------------------------------------------------------------------------------------
# Serving batches: a background thread (worker_count=0) or a pool of worker processes
# --------------------------------------------------------------------------------------------


class LoaderWorkerError(DataError):
    """A loader worker process died (killed, e.g. by the out-of-memory killer, or crashed).

    Attributes:
        worker: the worker's index.
        pid: its process id.
        exitcode: its exit code (negative: the signal that ended it).
    """

    def __init__(self, message: str = "", *, worker: int = -1, pid: int = 0, exitcode=None):
        super().__init__(message)
        self.worker, self.pid, self.exitcode = worker, pid, exitcode


class _Job:
    """What makes global batch ``g``: its ``(epoch, sample indices)``, then its pixels."""

    def __init__(self, batches: _EpochBatches, make_batch: _MakeBatch, batch_size: int):
        self.batches = batches
        self.make_batch = make_batch
        self.batch_size = batch_size

    def element(self, g: int) -> tuple[int, np.ndarray]:
        return self.batches[g]


class _ThreadBatches(Iterator[dict[str, np.ndarray]]):
    """Makes batches ``start, start + 1, ...`` one ahead in a background thread.

    PIL decodes and resizes without holding the GIL, so the next batch is decoded while the
    caller's (jitted) step runs.
    """

    _DONE = object()

    def __init__(self, job: _Job, start: int, stop: int | None, ahead: int = 2) -> None:
        self._job, self._next, self._stop_at = job, start, stop
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jtransfer-loader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        g = self._next
        try:
            while not self._stop.is_set() and (self._stop_at is None or g < self._stop_at):
                item = self._job.make_batch(self._job.element(g))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                g += 1
            item = self._DONE
        except BaseException as e:  # handed to the consumer, which re-raises it
            item = e
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __next__(self) -> dict[str, np.ndarray]:
        if self._stop.is_set():
            raise StopIteration
        item = self._queue.get()
        if item is self._DONE:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()


# Batches each worker may hold finished or in progress: its slots in shared memory.
_SLOTS_PER_WORKER = 2


# A worker's first code. It imports jtransfer.data without running jtransfer/__init__.py
# (models, flax, jax: seconds and ~200 MB per worker): a worker needs only numpy and PIL.
_WORKER_BOOT = """
import sys, types
if "jtransfer" not in sys.modules:
    package = types.ModuleType("jtransfer")
    package.__path__ = [PACKAGE_DIR + "/jtransfer"]
    sys.modules["jtransfer"] = package
from jtransfer.data import _worker_main
_worker_main(*ARGS)
"""


# glibc's malloc in a worker: keep freed memory for the next image instead of handing it
# back to the kernel. By default every decoded photo (megabytes) is a fresh mmap whose pages
# the kernel must fault in and zero again; that system time was a tenth of a worker's CPU
# (docs/performance.md, "Input pipeline"). The worker keeps its peak working set, a few
# decoded images. Set only where the user has not set them; other C libraries ignore them.
_WORKER_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(64 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(512 * 2**20),
    "MALLOC_TOP_PAD_": str(64 * 2**20),
}


@contextlib.contextmanager
def _worker_environment() -> Iterator[None]:
    """`_WORKER_MALLOC_ENV` in ``os.environ`` while workers start (spawn copies it)."""
    added = {k: v for k, v in _WORKER_MALLOC_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Starts spawned processes without re-running the main script in them.

    ``spawn`` normally imports the parent's ``__main__`` file in the child, so a script
    without ``if __name__ == "__main__":`` would start its loader again in every worker. Our
    workers need nothing from the main script (the job is jtransfer's own objects), so the
    child is told there is no main file to import.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    # Ctrl-C goes to the whole process group: a worker still starting up would print a
    # KeyboardInterrupt traceback. An ignored SIGINT survives exec, so the child ignores it
    # from its first instruction; the main process handles Ctrl-C and stops the workers.
    in_main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        yield
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, sigint)
        if main is None:
            del sys.modules["__main__"]
        else:
            sys.modules["__main__"] = main


def _worker_main(
    worker: int, conn: Any, job_bytes: bytes, shm_name: str, slot_bytes: int, dtype: str
) -> None:
    """A loader worker: makes the batches it is sent, straight into its shared-memory slots."""
    # Ctrl-C reaches the whole process group; the main process handles it and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    job = pickle.loads(job_bytes)
    shm = shared_memory.SharedMemory(name=shm_name)
    shape = job.make_batch.image_shape
    try:
        while True:
            try:
                task = conn.recv()
            except (EOFError, OSError):  # the main process is gone
                return
            if task is None:
                return
            g, slot = task
            try:
                epoch, indices = job.element(g)
                out = np.ndarray((len(indices), *shape), dtype, shm.buf, offset=slot * slot_bytes)
                job.make_batch.fill(epoch, indices, out)
                del out
                reply = ("ok", g, slot, job.make_batch.labels(indices))
            except Exception as e:
                reply = ("error", g, _picklable(e, worker))
            try:
                conn.send(reply)
            except (EOFError, OSError):
                return
    finally:
        shm.close()


def _picklable(error: Exception, worker: int) -> Exception:
    """The error with the worker's traceback as a note, or a stand-in if it cannot pickle."""
    remote = "".join(traceback.format_exception(error))
    error.add_note(f"Raised in loader worker {worker} (pid {os.getpid()}):\n{remote}")
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return DataError(f"Loader worker {worker} failed:\n{remote}")


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "closed its connection"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (the kernel's out-of-memory killer sends SIGKILL)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {exitcode}"


class _ProcessBatches(Iterator[dict[str, np.ndarray]]):
    """Makes batches ``start, start + 1, ...`` in ``worker_count`` spawned processes.

    Batch ``start + r`` is made by worker ``r % worker_count`` into its slot
    ``(r // worker_count) % _SLOTS_PER_WORKER`` of one shared-memory block (each worker has
    its own slots); the main process
    receives a small message per batch and copies the images out, so a batch crosses between
    processes once, without pickling. Batches come back in order, and each is a pure function
    of its index, so the output does not depend on ``worker_count``.
    """

    def __init__(self, job: _Job, start: int, stop: int | None, worker_count: int) -> None:
        self._job, self._start, self._next, self._stop_at = job, start, start, stop
        self._count = worker_count
        mb = job.make_batch
        self._shape, self._dtype = mb.image_shape, mb.dtype
        self._slot_bytes = job.batch_size * int(np.prod(self._shape)) * mb.dtype.itemsize
        needed = self._slot_bytes * _SLOTS_PER_WORKER * worker_count
        if needed > _shm_free_bytes():
            raise ConfigError(
                f"worker_count={worker_count} needs {needed / 2**20:.0f} MiB of shared memory "
                f"(/dev/shm) for its batches, and {_shm_free_bytes() / 2**20:.0f} MiB are free. "
                "Give the container more (docker run --shm-size=2g), or lower batch_size or "
                "worker_count, or pass dtype=np.uint8 (a quarter of the bytes)."
            )
        self._shm: shared_memory.SharedMemory | None = shared_memory.SharedMemory(
            create=True, size=self._slot_bytes * _SLOTS_PER_WORKER * worker_count
        )
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        self._closed = False
        ctx = mp.get_context("spawn")
        job_bytes = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
        package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        try:
            for w in range(worker_count):
                parent, child = ctx.Pipe()
                args = (w, child, job_bytes, self._shm.name, self._slot_bytes, mb.dtype.str)
                proc = ctx.Process(
                    target=exec,
                    args=(_WORKER_BOOT, {"ARGS": args, "PACKAGE_DIR": package_dir}),
                    name=f"jtransfer-loader-worker-{w}",
                    daemon=True,
                )
                with _main_module_hidden(), _worker_environment():
                    proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
            for r in range(_SLOTS_PER_WORKER * worker_count):
                self._submit(start + r)
        except BaseException:
            self.close()
            raise

    def _submit(self, g: int) -> None:
        if self._stop_at is not None and g >= self._stop_at:
            return
        r = g - self._start
        worker = r % self._count
        slot = worker * _SLOTS_PER_WORKER + (r // self._count) % _SLOTS_PER_WORKER
        try:
            self._conns[worker].send((g, slot))
        except (BrokenPipeError, ConnectionResetError):
            # The worker died after sending its last batch. Receiving from it next raises
            # LoaderWorkerError naming it (`_receive` sees its exit), in batch order.
            pass

    def _receive(self, worker: int) -> tuple:
        conn, proc = self._conns[worker], self._procs[worker]
        while True:
            ready = mp_connection.wait([conn, proc.sentinel], timeout=1.0)
            if conn in ready or conn.poll():
                try:
                    return conn.recv()
                except (EOFError, OSError):
                    pass  # died mid-message
            elif proc.sentinel not in ready:
                continue
            proc.join(timeout=1.0)
            raise LoaderWorkerError(
                f"Loader worker {worker} (pid {proc.pid}) {_describe_exit(proc.exitcode)} "
                f"while making batch {self._next}. If memory ran out, lower worker_count or "
                "batch_size; the loader state (get_state) still resumes at this batch.",
                worker=worker,
                pid=proc.pid or 0,
                exitcode=proc.exitcode,
            )

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed or (self._stop_at is not None and self._next >= self._stop_at):
            self.close()
            raise StopIteration
        r = self._next - self._start
        worker = r % self._count
        try:
            reply = self._receive(worker)
            if reply[0] == "error":
                raise reply[2]
            _, g, slot, labels = reply
            view = np.ndarray(
                (len(labels), *self._shape),
                self._dtype,
                self._shm.buf,
                offset=slot * self._slot_bytes,
            )
            images = view.copy()
            del view
            self._submit(self._next + _SLOTS_PER_WORKER * self._count)
        except BaseException:
            self.close()
            raise
        self._next += 1
        return {"image": images, "label": labels}

    def close(self) -> None:
        """Stops the workers (asks, then terminates) and frees the shared memory."""
        if self._closed:
            return
        self._closed = True
        for conn in self._conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        for proc in self._procs:
            proc.join(timeout=2.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        if self._shm is not None:
            _release_shared(self._shm, True)
            self._shm = None


class ImageLoader:
    """An iterable of batches over an image folder; build it with `make_loader`.

    Each ``iter(loader)`` gives a `LoaderIterator` starting at the first batch of epoch 0; its
    ``get_state()`` / ``set_state(state)`` save and restore the position exactly. The loader can
    be iterated again, e.g. once per evaluation, and keeps its decoded-image cache across those
    passes.

    Attributes:
        folder: the source folder.
        samples: the samples actually served (``folder.samples`` minus unreadable files when
            ``skip_bad_images``). Batch indices refer to this list.
        bad_files: ``(path, reason)`` of each file left out by ``skip_bad_images``.
        batch_size: examples per batch (the last batch of an epoch may be smaller when
            ``drop_remainder`` is False).
        steps_per_epoch: batches per epoch on this shard.
        num_epochs: epochs per pass, or None for endless.
        worker_count: worker processes decoding batches (0: in this process).
        dtype: the dtype of the images served: float32 (normalised) or uint8 (raw pixels).
        mean: the per-channel mean of the normalisation (applied to float32 batches; pass it
            to `normalize` for uint8 ones).
        std: the per-channel standard deviation of the normalisation.
        decode_cache_bytes: bytes of decoded images kept in memory across epochs (0: none).
    """

    def __init__(
        self,
        folder: ImageFolder,
        samples: list[Sample],
        bad_files: list[tuple[str, str]],
        batches: _EpochBatches,
        make_batch: _MakeBatch,
        *,
        batch_size: int,
        num_epochs: int | None,
        worker_count: int,
        fingerprint: dict[str, Any],
    ) -> None:
        self.folder = folder
        self.samples = samples
        self.bad_files = bad_files
        self.batch_size = batch_size
        self.steps_per_epoch = len(batches)
        self.num_epochs = num_epochs
        self.worker_count = worker_count
        self.dtype = make_batch.dtype
        self.mean, self.std = make_batch._mean, make_batch._std
        self.decode_cache_bytes = make_batch.cache_nbytes
        self._batches = batches
        self._job = _Job(batches, make_batch, batch_size)
        self._num_batches = None if num_epochs is None else num_epochs * len(batches)
        self._fingerprint = fingerprint

    def epoch_order(self, epoch: int) -> list[int]:
        """Indices into `samples` in the order epoch ``epoch`` serves them (this shard)."""
        return self._batches.epoch_order(epoch)[: self.steps_per_epoch * self.batch_size].tolist()

    def pipeline(self, start: int = 0) -> grain.IterDataset:
        """The same batches as a grain pipeline, for use inside a larger grain program.

        Iterating the loader does not use it: its own worker pool moves batches through
        shared memory with less overhead, and reports dead workers.

        Args:
            start: the first global batch (``epoch * steps_per_epoch + step``).

        Returns:
            A grain ``IterDataset`` (worker processes attached when ``worker_count > 0``).
        """
        # Batches are a pure function of their global index, so resuming is slicing: the
        # same state works for any worker_count, unlike grain's per-worker iterator states.
        import grain

        all_batches = grain.MapDataset.source(self._batches).repeat(self.num_epochs)
        # One read-ahead thread, two batches: grain's defaults (16 threads, 500 elements) are
        # sized for small records; ours are whole batches (77 MB at 128x224x224x3 float32).
        read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
        dataset = all_batches.map(self._job.make_batch)[start:].to_iter_dataset(read_options)
        if self.worker_count > 0:
            _allow_grain_workers()
            options = grain.MultiprocessingOptions(num_workers=self.worker_count)
            dataset = dataset.mp_prefetch(options)
        return dataset

    def _serve(self, start: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches ``start, start + 1, ...`` from worker processes or a background thread."""
        if self.worker_count > 0:
            return _ProcessBatches(self._job, start, self._num_batches, self.worker_count)
        return _ThreadBatches(self._job, start, self._num_batches)

    def __iter__(self) -> LoaderIterator:
        return LoaderIterator(self, self._fingerprint)

    def __repr__(self) -> str:
        return (
            f"ImageLoader(root={self.folder.root!r}, num_samples={len(self.samples)}, "
            f"batch_size={self.batch_size}, steps_per_epoch={self.steps_per_epoch}, "
            f"num_epochs={self.num_epochs}, bad_files={len(self.bad_files)})"
        )


class LoaderIterator(Iterator[dict[str, np.ndarray]]):
    """The checkpointable iterator of an `ImageLoader`.

    It follows grain's ``DataLoaderIterator`` protocol: ``get_state()`` returns JSON bytes and
    ``set_state`` takes them back, so ``grain.checkpoint.CheckpointSave(iterator)`` stores it
    in an Orbax checkpoint. The state records the next global batch and the loader settings it
    was saved under; restoring it into a loader with different data, batch size, seed or mode
    is refused rather than silently serving other batches. It does not depend on
    ``worker_count``.
    """

    def __init__(self, loader: ImageLoader, fingerprint: dict[str, Any]) -> None:
        self._loader = loader
        self._fingerprint = fingerprint
        self._next_batch = 0
        self._source: Iterator[dict[str, np.ndarray]] | None = None

    def start_prefetch(self) -> None:
        """Starts the pipeline (and its workers) now rather than at the first ``next``."""
        if self._source is None:
            self._source = self._loader._serve(self._next_batch)
            _OPEN_ITERATORS.add(self)

    def __next__(self) -> dict[str, np.ndarray]:
        self.start_prefetch()
        try:
            batch = next(self._source)
        except StopIteration:
            self.close()  # release worker processes as soon as the pass is over
            raise
        self._next_batch += 1
        return batch

    def get_state(self) -> bytes:
        """The position after the last batch returned, as JSON bytes."""
        return json.dumps({"next_batch": self._next_batch, **self._fingerprint}).encode()

    def set_state(self, state: bytes | str | dict[str, Any]) -> None:
        """Continues from a saved position: the next batch is the one that followed it.

        Args:
            state: what `get_state` returned (bytes, or the same decoded to str or dict).

        Raises:
            CheckpointError: the state was saved by a loader with other settings.
        """
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        changed = {
            key: (state.get(key), value)
            for key, value in self._fingerprint.items()
            if state.get(key) != value
        }
        if changed:
            details = ", ".join(
                f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items()
            )
            raise LoaderStateMismatchError(
                f"The loader state was saved by a loader with other settings ({details}), so it "
                "would not resume the same sequence of batches. Resume with the original "
                "settings, or start the data iterator afresh.",
                changed=changed,
            )
        self.close()
        self._next_batch = int(state["next_batch"])

    def close(self) -> None:
        """Stops the pipeline's worker processes and threads, if started."""
        if self._source is not None and hasattr(self._source, "close"):
            self._source.close()
        self._source = None
        _OPEN_ITERATORS.discard(self)


# Iterators still running at exit are closed while their modules still exist: grain's own
# cleanup in __del__ otherwise runs during interpreter teardown and prints tracebacks.
_OPEN_ITERATORS: weakref.WeakSet[LoaderIterator] = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
    for iterator in list(_OPEN_ITERATORS):
        iterator.close()


def make_loader(
    folder: ImageFolder,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    num_epochs: int | None = 1,
    worker_count: int = 0,
    drop_remainder: bool | None = None,
    skip_bad_images: bool = False,
    image_size: Size = 224,
    resize_size: Size = (256, 256),
    shard_options: grain.sharding.ShardOptions | None = None,
    cache_eval: bool = False,
    interpolation: str = "bilinear",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: Any = np.float32,
    draft: bool = False,
    decode_cache_mb: float | None = None,
) -> ImageLoader:
    """Builds a grain pipeline serving ``{"image": float32 (B,H,W,3), "label": int32 (B,)}``.

    Training batches apply `train_transform` in a fresh order each epoch; evaluation batches
    apply `eval_transform` in folder order. Everything random is a function of
    ``(seed, epoch, index)``, so the batches are the same for any ``worker_count`` and across
    runs.

    Args:
        folder: the images.
        batch_size: examples per batch (per host when sharded).
        train: training (shuffle + random augmentation) or evaluation (fixed order and view).
        seed: shuffling and augmentation seed, a non-negative int below 2**32.
        num_epochs: epochs served by one pass over the iterator; None for endless.
        worker_count: worker processes decoding batches; 0 decodes in this process (still one
            batch ahead in a background thread). Workers are spawned without re-running the
            main script, so no ``if __name__ == "__main__":`` guard is needed; they stop
            (and their shared memory is freed) at the end of the pass, on ``close()``, on an
            error or at exit, and a worker that dies raises `LoaderWorkerError`.
        drop_remainder: drop each epoch's last incomplete batch. Default: True for training
            (every step sees a full batch, so the compiled step is reused), False for
            evaluation (every example is scored exactly once).
        skip_bad_images: decode every file up front (`scan_images`) and leave unreadable ones
            out (listed in ``loader.bad_files`` and logged) instead of failing mid-epoch.
        image_size: output size: the random crop's (train) or center crop's (eval).
        resize_size: the evaluation resize before the center crop, as in `resize`; the
            default ``(256, 256)`` is d2l's ``Resize([256, 256])``.
        shard_options: grain ``ShardOptions`` for multi-host data parallelism (e.g.
            ``grain.sharding.ShardByJaxProcess(drop_remainder=True)``, or
            `jtransfer.distributed.process_shard_options()`): host ``p`` of ``n`` serves, of
            each run of ``n * batch_size`` examples of the epoch's order, the ``p``-th block of
            ``batch_size``, so the hosts' batches together are the batches of one host with
            batch size ``n * batch_size``, in the same order.
            cache_eval: evaluation only: cache the evaluation view whatever its size (the decode
            cache below, ignoring ``decode_cache_mb``).
        interpolation: the resize filter of both views, as in `resize` ("bicubic" for most
            timm weights; `jtransfer.preprocess.Preprocessing` carries a weights' choice).
        mean: per-channel mean of the normalisation.
        std: per-channel standard deviation of the normalisation.
        dtype: ``np.float32`` (default): normalised images, bit-identical to torchvision's
            ``ToTensor()`` + ``Normalize``; ``np.uint8``: the pixels torchvision holds before
            ``ToTensor`` (a quarter of the bytes to move), to be normalised by the consumer
            with ``loader.mean`` / ``loader.std`` (`normalize` is the reference).
        draft: decode JPEGs at a reduced size (libjpeg's DCT scaling: 1/2, 1/4 or 1/8) when
            the crop is resized well below the stored size, e.g. 4000x3000 phone photos. Much
            faster on big photos but NOT bit-exact to torchvision: the pixels differ slightly
            (see the data guide for the measured difference). Off by default.
        decode_cache_mb: memory budget, in MiB, for keeping decoded images across epochs:
            when the whole dataset fits (train: the full decoded images, from the file
            headers; eval: the finished views), every image is decoded once, at construction,
            in shared memory the workers read; later epochs only crop, flip and normalise.
            Random crops are still drawn per ``(seed, epoch, index)``, so batches are
            unchanged. None: 1 GiB or an eighth of the physical memory, whichever is less;
            0: no cache.

    Returns:
        An `ImageLoader`; ``iter(loader)`` gives a checkpointable `LoaderIterator`.

    Raises:
        ConfigError: invalid sizes, seed or option combination.
        DataError: an image cannot be decoded (when iterated, or at construction with
            ``cache_eval``), or no readable image is left.
    """
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}.")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be an int in [0, 2**32), got {seed}.")
    if num_epochs is not None and num_epochs <= 0:
        raise ConfigError(f"num_epochs must be positive or None, got {num_epochs}.")
    if worker_count < 0:
        raise ConfigError(f"worker_count must be >= 0, got {worker_count}.")
    if cache_eval and train:
        raise ConfigError(
            "cache_eval=True caches the fixed evaluation view; training draws a new random "
            "crop every epoch. Use cache_eval only with train=False; decode_cache_mb= sets "
            "the budget under which training images are kept decoded."
        )
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.uint8):
        raise ConfigError(f"dtype must be np.float32 or np.uint8, got {dtype}.")
    if decode_cache_mb is not None and decode_cache_mb < 0:
        raise ConfigError(f"decode_cache_mb must be >= 0 or None, got {decode_cache_mb}.")
    if drop_remainder is None:
        drop_remainder = train

    samples, bad = list(folder.samples), []
    if skip_bad_images:
        samples, bad = scan_images(samples)
        for path, reason in bad:
            logger.warning("Skipping unreadable image %s: %s", path, reason)
        if not samples:
            shown = "; ".join(f"{path} ({reason})" for path, reason in bad[:3])
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise DataError(
                f"no readable image left in {folder.root}: all {len(bad)} failed, e.g. "
                f"{shown}{more}. Replace or delete the broken files, or check that --data "
                "points at the right folder."
            )

    shard_index, shard_count, shard_drop = 0, 1, False
    if shard_options is not None:
        shard_index = shard_options.shard_index
        shard_count = shard_options.shard_count
        shard_drop = shard_options.drop_remainder
    batches = _EpochBatches(
        len(samples),
        batch_size,
        shuffle=train,
        seed=seed,
        drop_remainder=drop_remainder,
        shard_index=shard_index,
        shard_count=shard_count,
        shard_drop_remainder=shard_drop,
    )
    if len(batches) == 0:
        raise NoFullBatchError(
            f"{folder.root} gives no full batch: {batches._per_shard} examples per shard, "
            f"batch_size {batch_size}, drop_remainder=True. Lower batch_size or pass "
            "drop_remainder=False.",
            root=folder.root,
            examples=batches._per_shard,
            shard_count=shard_count,
            batch_size=batch_size,
        )
    _pil_filter(interpolation)  # an unknown name fails here, not in a worker
    make_batch = _MakeBatch(
        samples,
        train=train,
        seed=seed,
        image_size=image_size,
        resize_size=resize_size,
        interpolation=interpolation,
        mean=mean,
        std=std,
        dtype=dtype,
        draft=draft,
    )
    budget = _default_decode_cache_mb() if decode_cache_mb is None else decode_cache_mb
    if cache_eval or _fits(make_batch, samples, budget * 2**20):
        make_batch.build_cache(os.cpu_count() or 1)
    fingerprint = {
        "num_examples": len(samples),
        "batch_size": batch_size,
        "steps_per_epoch": len(batches),
        "train": train,
        "seed": seed,
        "shard": [shard_index, shard_count],
    }
    return ImageLoader(
        folder,
        samples,
        bad,
        batches,
        make_batch,
        batch_size=batch_size,
        num_epochs=num_epochs,
        # A cached evaluation view only needs normalising: no work worth a process.
        worker_count=0 if make_batch.cached and not train else worker_count,
        fingerprint=fingerprint,
    )


def _shm_free_bytes() -> float:
    """Free bytes for shared memory (/dev/shm), or infinity where there is no such folder."""
    try:
        st = os.statvfs("/dev/shm")
    except (OSError, AttributeError):
        return math.inf
    return float(st.f_bavail * st.f_frsize)


def _fits(make_batch: _MakeBatch, samples: Sequence[Sample], budget: float) -> bool:
    """Whether the decode cache of ``samples`` fits ``budget`` bytes (stops reading early)."""
    # Shared memory lives in /dev/shm on Linux; a container's is often 64 MB, and writing past
    # its end kills the process with SIGBUS, so the budget never exceeds what is free there.
    budget = min(budget, _shm_free_bytes() * 0.5)
    if budget <= 0:
        return False
    if not make_batch._train:
        return len(samples) * make_batch.cache_entry_bytes((0, 0)) <= budget
    total = 0
    for path, _ in samples:
        hw = _stored_size(path)
        total += 0 if hw is None else make_batch.cache_entry_bytes(hw)
        if total > budget:
            return False
    return True


# --------------------------------------------------------------------------------------------
# Device prefetch
# --------------------------------------------------------------------------------------------


class DevicePrefetcher(Iterator[Any]):
    """Iterator returned by `prefetch_to_device`.

    ``get_state()`` returns the state the source iterator had right after producing the batch
    most recently returned here, not its actual (further ahead) state, so saving it with a
    checkpoint resumes at the next batch the training loop has not yet seen.
    """

    _DONE = object()

    def __init__(self, iterator: Iterator[Any], size: int, sharding: Any | None) -> None:
        if size < 1:
            raise ConfigError(f"prefetch size must be >= 1, got {size}.")
        self._source = iterator
        self._sharding = sharding
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._has_state = hasattr(iterator, "get_state")
        self._state = iterator.get_state() if self._has_state else None
        self._thread = threading.Thread(target=self._run, name="prefetch_to_device", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        """Blocks until there is room, or returns False once the consumer closed us."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        import jax

        try:
            for batch in self._source:
                state = self._source.get_state() if self._has_state else None
                if self._sharding is None:
                    on_device = jax.device_put(batch)
                else:
                    on_device = jax.device_put(batch, self._sharding)
                if not self._put((on_device, state)):
                    return
            self._put((self._DONE, None))
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put((e, None))

    def __next__(self) -> Any:
        if self._stop.is_set():
            raise StopIteration
        item, state = self._queue.get()
        if item is self._DONE:
            self._stop.set()
            raise StopIteration
        if isinstance(item, BaseException):
            self._stop.set()
            raise item
        self._state = state
        return item

    def get_state(self) -> Any:
        """The source iterator's state after the last batch returned (see class docstring)."""
        if not self._has_state:
            raise TypeError(f"{type(self._source).__name__} has no get_state().")
        return self._state

    def close(self) -> None:
        """Stops the background thread, then closes the source iterator if it can be closed."""
        self._stop.set()
        # The thread may be inside next(source); let it finish before closing the source.
        self._thread.join()
        if hasattr(self._source, "close"):
            self._source.close()


def prefetch_to_device(
    iterator: Iterator[Any], size: int = 2, sharding: Any | None = None
) -> DevicePrefetcher:
    """Moves batches to the accelerator in a background thread while the step runs.

    Args:
        iterator: yields pytrees of numpy arrays (e.g. ``iter(loader)``).
        size: batches held on the device ahead of the consumer.
        sharding: a ``jax.sharding.Sharding`` (or pytree of them) for ``jax.device_put``;
            None puts each batch on the default device.

    Returns:
        A `DevicePrefetcher` yielding ``jax.Array`` pytrees, with ``get_state()`` and
        ``close()``.
    """
    return DevicePrefetcher(iterator, size, sharding)


# --------------------------------------------------------------------------------------------
# Offline demo data
# --------------------------------------------------------------------------------------------


def _demo_image(rng: np.random.Generator, label: int, num_classes: int, size: int) -> Image.Image:
    """One synthetic image: a class-specific shape and hue on a noisy random background."""
    height, width = (int(size * f) for f in rng.uniform(0.75, 1.25, 2))
    background = rng.integers(40, 216, 3)
    pixels = background + rng.normal(0, 25, (height, width, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    # Hue and shape both carry the label, so the task is learnable from few images and
    # from random initialisation, while position, size and colour jitter keep it non-trivial.
    hue = (label / num_classes + rng.normal(0, 0.03)) % 1.0
    colour = tuple(int(c) for c in _hsv_to_rgb(hue, 0.8, rng.uniform(0.7, 1.0)))
    extent = rng.uniform(0.35, 0.7) * min(height, width)
    cx = rng.uniform(extent / 2, width - extent / 2)
    cy = rng.uniform(extent / 2, height - extent / 2)
    shape = label % 3
    half_w, half_h = extent / 2, (extent / 4 if shape == 0 else extent / 2)
    left, top, right, bottom = cx - half_w, cy - half_h, cx + half_w, cy + half_h
    if shape == 0:  # a sausage: a wide ellipse
        draw.ellipse((left, top, right, bottom), fill=colour)
    elif shape == 1:
        draw.rectangle((left, top, right, bottom), fill=colour)
    else:
        draw.polygon([(left, bottom), (right, bottom), (cx, top)], fill=colour)
    return img


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """HSV in [0, 1] to RGB in [0, 255]."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return 255 * (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1))


def make_demo_imagefolder(
    root: str | os.PathLike[str],
    classes: Sequence[str] = ("hotdog", "not-hotdog"),
    n_per_class: int = 40,
    size: int = 96,
    seed: int = 0,
) -> ImageFolder:
    """Writes a small synthetic, learnable image folder (JPEG files) for demos and tests.

    Each class has its own hue and shape (ellipse, square, triangle, cycling) drawn at a random
    position and scale on a noisy background; image sizes vary around ``size``. The output is a
    pure function of the arguments. The folder is written beside ``root`` and renamed into
    place, so an interrupted call never leaves a partial dataset.

    Args:
        root: the folder to create; it must not exist yet.
        classes: class folder names.
        n_per_class: images per class.
        size: typical image side in pixels (each side varies by +-25%).
        seed: seed of the generated content; use different seeds for train and test splits.

    Returns:
        The `ImageFolder` at ``root``.

    Raises:
        ConfigError: ``root`` already exists, or the arguments are invalid.
    """
    root = Path(root)
    if root.exists():
        raise ConfigError(
            f"{root} already exists; make_demo_imagefolder only writes a new folder. Remove it "
            "or choose another path."
        )
    if not classes or n_per_class <= 0 or size < 8:
        raise ConfigError("Need at least one class, n_per_class >= 1 and size >= 8.")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        for label, name in enumerate(classes):
            (staging / name).mkdir()
            for i in range(n_per_class):
                rng = np.random.default_rng([seed, label, i])
                img = _demo_image(rng, label, len(classes), size)
                img.save(staging / name / f"{name}_{i:04d}.jpg", quality=90)
        staging.chmod(0o755)  # mkdtemp makes it private; the dataset is not secret
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ImageFolder(root)
