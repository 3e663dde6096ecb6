"""ImageFolder input, torchvision-equivalent transforms, a grain loader and device prefetch.

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
import json
import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from PIL import Image, ImageDraw

from jtransfer.errors import CheckpointError, ConfigError, DataError

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
    "NoFullBatchError",
    "center_crop",
    "check_same_classes",
    "crop",
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
            # convert() calls load(), which reads all pixel data: truncation raises here.
            return img.convert("RGB")
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


def _eval_pixels(
    img: Image.Image, resize_size: Size, crop_size: Size, interpolation: str = "bilinear"
) -> np.ndarray:
    """The uint8 pixels of the evaluation view (resize, then center crop)."""
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
    pixels = _eval_pixels(img, resize_size, crop_size, interpolation)
    return to_normalized_array(pixels, mean, std)


# --------------------------------------------------------------------------------------------
# grain loader
# --------------------------------------------------------------------------------------------


class _EpochBatches(grain.MapDataset):
    """Element ``g`` is global batch ``g``: ``(epoch, sample indices of that batch)``.

    A batch, not an image, is the unit grain hands to a worker, so every batch is the same
    whatever ``worker_count`` is, and epochs never share a batch (the remainder is dropped or
    kept per epoch, as torch's ``drop_last``). Indexing past one epoch is how grain's
    ``repeat`` asks for the next one; the epoch's order is a pure function of (seed, epoch).
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
        super().__init__()
        self._num_examples = num_examples
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
        order = np.arange(self._num_examples)
        if self._shuffle:
            # All hosts draw the same permutation and take disjoint blocks of it.
            order = np.random.default_rng([_SHUFFLE_STREAM, self._seed, epoch]).permutation(order)
        return order[self._shard_of == self._shard_index][: self._per_shard]

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return self.slice(index)
        epoch, batch = divmod(int(index), self._num_batches)
        order = self.epoch_order(epoch)
        return epoch, order[batch * self._batch_size : (batch + 1) * self._batch_size]


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
        cache: np.ndarray | None,
        interpolation: str = "bilinear",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self._paths = [path for path, _ in samples]
        self._labels = np.asarray([label for _, label in samples], dtype=np.int32)
        self._train = train
        self._seed = seed
        self._image_size = image_size
        self._resize_size = resize_size
        self._cache = cache
        self._view = {"interpolation": interpolation, "mean": tuple(mean), "std": tuple(std)}

    def example(self, epoch: int, index: int) -> np.ndarray:
        """The transformed image of sample ``index`` in ``epoch``."""
        if self._cache is not None:
            return to_normalized_array(self._cache[index], self._view["mean"], self._view["std"])
        img = load_image(self._paths[index])
        if self._train:
            rng = example_rng(self._seed, epoch, index)
            return train_transform(img, rng, size=self._image_size, **self._view)
        return eval_transform(
            img, resize_size=self._resize_size, crop_size=self._image_size, **self._view
        )

    def __call__(self, element: tuple[int, np.ndarray]) -> dict[str, np.ndarray]:
        epoch, indices = element
        first = self.example(epoch, int(indices[0]))
        # Filling a preallocated batch saves np.stack's extra copy (77 MB at batch 128).
        images = np.empty((len(indices), *first.shape), dtype=np.float32)
        images[0] = first
        for k in range(1, len(indices)):
            images[k] = self.example(epoch, int(indices[k]))
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


# Per-process read-ahead, in batches. grain's defaults (16 threads, 500 elements) are sized
# for small records; ours are whole batches (77 MB at 128x224x224x3 float32).
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


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
        self._batches = batches
        self._all_batches = batches.repeat(num_epochs).map(make_batch)
        self._fingerprint = fingerprint

    def epoch_order(self, epoch: int) -> list[int]:
        """Indices into `samples` in the order epoch ``epoch`` serves them (this shard)."""
        return self._batches.epoch_order(epoch)[: self.steps_per_epoch * self.batch_size].tolist()

    def pipeline(self, start: int = 0) -> grain.IterDataset:
        """The grain pipeline serving global batches ``start, start + 1, ...``.

        Args:
            start: the first global batch (``epoch * steps_per_epoch + step``).

        Returns:
            A grain ``IterDataset`` (worker processes attached when ``worker_count > 0``).
        """
        # Batches are a pure function of their global index, so resuming is slicing: the
        # same state works for any worker_count, unlike grain's per-worker iterator states.
        dataset = self._all_batches[start:].to_iter_dataset(_READ_OPTIONS)
        if self.worker_count > 0:
            _allow_grain_workers()
            options = grain.MultiprocessingOptions(num_workers=self.worker_count)
            dataset = dataset.mp_prefetch(options)
        return dataset

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
            self._source = iter(self._loader.pipeline(self._next_batch))
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


def _eval_cache(
    samples: Sequence[Sample], resize_size: Size, crop_size: Size, interpolation: str
) -> np.ndarray:
    """Decodes every evaluation image once into a uint8 ``(N, H, W, 3)`` array."""

    def pixels(sample: Sample) -> np.ndarray:
        return _eval_pixels(load_image(sample[0]), resize_size, crop_size, interpolation)

    # PIL decodes and resizes without the GIL, so threads use every core here.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return np.stack(list(pool.map(pixels, samples)))


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
            batch ahead in a background thread). Workers are started with ``spawn``, so a
            script using them needs the ``if __name__ == "__main__":`` guard.
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
        cache_eval: evaluation only: decode, resize and crop every image once, at construction,
            and keep the uint8 pixels in memory, so later passes (epochs) only normalise.
            Batches are then served from this process and ``worker_count`` is not used.
        interpolation: the resize filter of both views, as in `resize` ("bicubic" for most
            timm weights; `jtransfer.preprocess.Preprocessing` carries a weights' choice).
        mean: per-channel mean of the normalisation.
        std: per-channel standard deviation of the normalisation.

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
            "crop every epoch, so it cannot be cached. Use cache_eval only with train=False."
        )
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
    cache = _eval_cache(samples, resize_size, image_size, interpolation) if cache_eval else None
    make_batch = _MakeBatch(
        samples,
        train=train,
        seed=seed,
        image_size=image_size,
        resize_size=resize_size,
        cache=cache,
        interpolation=interpolation,
        mean=mean,
        std=std,
    )
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
        worker_count=0 if cache_eval else worker_count,
        fingerprint=fingerprint,
    )


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
