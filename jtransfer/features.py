"""Intermediate features by stage name, cached embeddings and a linear probe on them.

`extract` is timm's ``features_only`` / ``out_indices`` for every jtransfer model: the output of
named stages (ResNet ``stem``, ``layer1``..``layer4``; VGG ``block1``..``block5``; both
``prelogits`` and ``logits``), computed batch by batch with BatchNorm on its running statistics
(``train=False``), one compilation per batch shape.

A frozen backbone gives every image the same features in every epoch, so training a new head
on it ("feature extraction", torch's ``requires_grad=False`` on the body) need not run the
backbone more than once: `embed_dataset` runs it once over a folder with the evaluation
transform and caches the result on disk, `fit_linear_probe` trains the head on the cached
features in a single jitted loop, and `insert_head` puts the head back into the full model,
which then predicts with it and exports to torchvision like any other.

What the probe gives up against a frozen-backbone fine-tune: augmentation (each image has one
view, the evaluation one) and, for VGG, dropout on the frozen ``classifier_0`` and
``classifier_3`` outputs (the features are computed in eval mode). With the evaluation view
for training and no dropout, the two compute the same thing; `fit_linear_probe` visits the
examples in the order `jtransfer.data.make_loader(train=True, seed=seed)` does.

Example:
    A linear probe on a small generated image folder, from random weights; with
    ``porting.load_pretrained("resnet18")`` (and ``weights_id="IMAGENET1K_V1"`` to name the
    cache file) the features are ImageNet's:

    >>> import tempfile
    >>> import jtransfer as jt
    >>> from jtransfer import data, features
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = data.make_demo_imagefolder(f"{tmp.name}/train", n_per_class=4, size=40)
    >>> model = jt.models.create("resnet18")
    >>> variables = jt.models.random_variables(model, image_size=32)
    >>> x, y = features.embed_dataset(model, variables, folder, cache_dir=f"{tmp.name}/cache",
    ...                               image_size=32)
    >>> x.shape, y.tolist()
    ((8, 512), [0, 0, 0, 0, 1, 1, 1, 1])
    >>> head = features.fit_linear_probe(x, y, 2, method="lbfgs")
    >>> variables = features.insert_head(variables, "resnet18", head)
    >>> variables["params"]["fc"]["kernel"].shape  # fits jt.models.create("resnet18", 2)
    (512, 2)
    >>> tmp.cleanup()
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import traverse_util

from jtransfer import heads, models, partition, train
from jtransfer.errors import ConfigError, DataError
from jtransfer.models.layers import head_init

if TYPE_CHECKING:
    from jtransfer.preprocess import Preprocessing

__all__ = [
    "CACHE_VERSION",
    "PROBE_METHODS",
    "embed_dataset",
    "epoch_order",
    "extract",
    "feature_levels",
    "fit_linear_probe",
    "insert_head",
    "probe_accuracy",
    "probe_logits",
    "stage_names",
    "weights_hash",
]

Variables = Mapping[str, Any]
Head = dict[str, jax.Array]
StageSpec = str | int | Sequence[str | int]

PRELOGITS, LOGITS = "prelogits", "logits"
PROBE_METHODS = ("sgd", "adam", "lbfgs")
# Bump when what a cache file holds, or how it is computed, changes: old files then miss.
CACHE_VERSION = 1
_SHUFFLE_STREAM = 0  # jtransfer.data's shuffle stream tag, so the probe sees its order


# ---------------------------------------------------------------------------
# Stage names


@functools.lru_cache(maxsize=64)
def _map_names(model: nn.Module) -> tuple[str, ...]:
    """The keys of `model.feature_maps`, in forward order (shapes only, no compute)."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    out, _ = jax.eval_shape(
        functools.partial(model.init_with_output, method="feature_maps"), jax.random.PRNGKey(0), x
    )
    # eval_shape returns the dict with sorted keys; the forward order is the stages', with
    # the pooled and pre-logits outputs between the last feature stage and the head.
    *body, head = model.stages
    extra = sorted(set(out) - set(model.stages), key=lambda k: (k != "pool", k != PRELOGITS, k))
    return (*body, *extra, head)


def _aliases(model: nn.Module) -> dict[str, str]:
    """Names that mean the same for every family -> the model's own map name."""
    names = _map_names(model)
    return {PRELOGITS: PRELOGITS if PRELOGITS in names else "pool", LOGITS: names[-1]}


def stage_names(model: nn.Module) -> tuple[str, ...]:
    """The names `extract` accepts for `model`.

    Args:
        model: a module from `jt.models.create`.

    Returns:
        The model's `feature_maps` keys in forward order, then the aliases "prelogits" (the
        input of the classifier head: ResNet "pool", VGG "prelogits") and "logits".

    Example:
        >>> import jtransfer as jt
        >>> stage_names(jt.models.create("resnet18"))
        ('stem', 'layer1', 'layer2', 'layer3', 'layer4', 'pool', 'fc', 'prelogits', 'logits')
    """
    names = _map_names(model)
    return names + tuple(a for a in (PRELOGITS, LOGITS) if a not in names)


def feature_levels(model: nn.Module) -> tuple[str, ...]:
    """The stages an integer index refers to (timm's ``out_indices``): all but the head.

    ResNet: stem, layer1..layer4 (strides 4, 4, 8, 16, 32); VGG: block1..block5 (strides 2..32).

    Example:
        >>> import jtransfer as jt
        >>> feature_levels(jt.models.create("vgg11"))
        ('block1', 'block2', 'block3', 'block4', 'block5')
    """
    return tuple(model.stages[:-1])


def _resolve(model: nn.Module, stages: StageSpec) -> tuple[tuple[str, str], ...]:
    """((requested name, feature_maps key), ...) for `stages`; ConfigError on unknown names."""
    requested = [stages] if isinstance(stages, (str, int)) else list(stages)
    if not requested:
        raise ConfigError("stages is empty: name at least one stage, e.g. stages='prelogits'")
    names, levels, aliases = stage_names(model), feature_levels(model), _aliases(model)
    out, bad = [], []
    for s in requested:
        if isinstance(s, int) and not isinstance(s, bool):
            if -len(levels) <= s < len(levels):
                out.append((levels[s], levels[s]))
            else:
                bad.append(repr(s))
        elif isinstance(s, str) and s in names:
            out.append((s, aliases.get(s, s)))
        else:
            bad.append(repr(s))
    if bad:
        raise ConfigError(
            f"unknown stage(s) {', '.join(bad)} for {type(model).__name__}; valid names: "
            f"{', '.join(names)}, or an index into {levels} (timm's out_indices)"
        )
    return tuple(dict.fromkeys(out))


# ---------------------------------------------------------------------------
# extract


def _feature_maps(model: nn.Module, keys: tuple[str, ...], variables, x) -> dict[str, jax.Array]:
    # XLA drops whatever the requested stages do not need (e.g. the head for "layer4").
    maps = model.apply(variables, x, train=False, method="feature_maps")
    return {k: maps[k].astype(jnp.float32) for k in keys}


_stage_outputs = jax.jit(_feature_maps, static_argnums=(0, 1))  # normalised float images


@functools.partial(jax.jit, static_argnums=(0, 1, 4, 5))
def _pixel_stage_outputs(
    model: nn.Module, keys: tuple[str, ...], variables, pixels, mean, std
) -> dict[str, jax.Array]:
    """`_stage_outputs` of uint8 pixels, normalised here, on the device."""
    return _feature_maps(model, keys, variables, train.normalize_images(pixels, mean, std))


def _batches(images: Any, batch_size: int) -> Iterator[np.ndarray]:
    if hasattr(images, "shape") and hasattr(images, "__getitem__"):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ConfigError(
                f"images must be (N, H, W, 3) normalised floats or uint8 pixels, got shape "
                f"{tuple(images.shape)}"
            )
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
        return
    for batch in images:
        yield batch["image"] if isinstance(batch, Mapping) else batch


def extract(
    model: nn.Module,
    variables: Variables,
    images: Any,
    *,
    stages: StageSpec = PRELOGITS,
    batch_size: int = 64,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """The outputs of named stages for a set of images, in eval mode.

    BatchNorm uses running statistics and dropout is off (``train=False``), so each image's
    features do not depend on the batch it is in. Every batch is padded to the size of the
    first, so one compilation serves the whole set.

    Args:
        model: a module from `jt.models.create`.
        variables: its {"params", "batch_stats"}.
        images: float32 (N, H, W, 3) normalised images (numpy or jax), or an iterable
            of batches (such arrays, or {"image": ...} dicts, e.g. a `data.make_loader`
            evaluation loader); or the same as uint8 pixels, normalised on the device with
            `mean` and `std` to the bits of the float32 path (`train.normalize_images`).
        stages: a name or a sequence of names from `stage_names(model)` (e.g. "layer4",
            ("layer2", "layer3"), "prelogits"), or integer indices into
            `feature_levels(model)` as timm's ``out_indices``.
        batch_size: images per call when `images` is an array.
        mean: per-channel mean for uint8 images; default: a uint8 loader's
            (``loader.mean``), else ImageNet's.
        std: per-channel standard deviation for uint8 images; default: as `mean`.

    Returns:
        {name as requested (indices become their stage name): float32 numpy array with N
        rows}; feature maps are NHWC, pre-logits (N, D).

    Raises:
        ConfigError: an unknown stage name (the message lists the valid ones), or bad shapes.

    Example:
        >>> import numpy as np, jtransfer as jt
        >>> model = jt.models.create("resnet18")
        >>> v = jt.models.random_variables(model, image_size=32)
        >>> out = extract(model, v, np.zeros((3, 64, 64, 3), np.float32),
        ...               stages=("layer4", "prelogits"))
        >>> out["layer4"].shape, out["prelogits"].shape
        ((3, 2, 2, 512), (3, 512))
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    wanted = _resolve(model, stages)
    keys = tuple(dict.fromkeys(k for _, k in wanted))
    from jtransfer import fit

    mean, std = fit.normalization(mean, std, images)
    variables = models.prepare_inference(model, variables)  # kernel transforms once, not per batch
    pieces: dict[str, list[jax.Array]] = {k: [] for k in keys}
    size = None
    for batch in _batches(images, batch_size):
        n = batch.shape[0]
        if n == 0:
            continue
        size = size or n
        if n > size:
            raise ConfigError(f"batch of {n} images after a first batch of {size}")
        x = jnp.asarray(batch)
        x = x if x.dtype == jnp.uint8 else x.astype(jnp.float32)
        if n < size:  # pad: eval-mode outputs are per example, the padding is sliced off
            x = jnp.concatenate([x, jnp.zeros((size - n, *x.shape[1:]), x.dtype)])
        if x.dtype == jnp.uint8:  # dispatched asynchronously
            out = _pixel_stage_outputs(model, keys, variables, x, mean, std)
        else:
            out = _stage_outputs(model, keys, variables, x)
        for k in keys:
            pieces[k].append(out[k][:n])
    if size is None:
        raise ConfigError("no images to extract features from")
    host = {k: np.concatenate(jax.device_get(v)) for k, v in pieces.items()}
    return {name: host[key] for name, key in wanted}


# ---------------------------------------------------------------------------
# Cached embeddings


def weights_hash(variables: Variables, *, exclude: Iterable[str] = ()) -> str:
    """sha256 of the variables' bytes (with their paths, shapes and dtypes), as hex.

    Args:
        variables: {"params", "batch_stats"} (any pytree of arrays).
        exclude: top-level module names to leave out, e.g. the head, whose weights do not
            change the pre-logits.

    Returns:
        64 hex digits; equal for equal weights, whatever the order of the dict keys.
    """
    skip = set(exclude)
    flat = traverse_util.flatten_dict(
        {k: dict(v) if isinstance(v, Mapping) else v for k, v in dict(variables).items()}
    )
    digest = hashlib.sha256()
    for path in sorted(flat, key=lambda p: tuple(map(str, p))):
        if len(path) > 1 and path[1] in skip:
            continue
        arr = np.ascontiguousarray(np.asarray(flat[path]))
        digest.update(json.dumps([list(map(str, path)), arr.dtype.str, arr.shape]).encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def _samples(folder_or_samples: Any) -> list[tuple[str, int]]:
    samples = getattr(folder_or_samples, "samples", folder_or_samples)
    try:
        return [(os.fspath(path), int(label)) for path, label in samples]
    except (TypeError, ValueError) as e:
        raise ConfigError(
            "pass a jtransfer.data.ImageFolder or a list of (path, label) pairs"
        ) from e


def _file_list(paths: Sequence[str]) -> list[list[Any]]:
    """[absolute path, size, mtime_ns] per file, sorted by path."""
    out = []
    for path in sorted({os.path.abspath(p) for p in paths}):
        try:
            st = os.stat(path)
        except OSError as e:
            raise DataError(f"cannot read image {path}: {e.strerror}") from e
        out.append([path, st.st_size, st.st_mtime_ns])
    return out


def _eval_pixels(paths: Sequence[str], view: Preprocessing, batch_size: int, pool) -> Iterator:
    """uint8 batches of the evaluation view; `extract` normalises them on the device."""
    from jtransfer import data

    def one(path: str) -> np.ndarray:
        return view.eval_pixels(data.load_image(path))

    for start in range(0, len(paths), batch_size):
        yield np.stack(list(pool.map(one, paths[start : start + batch_size])))


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[:40] or "weights"


def _embedding_view(
    preprocessing: Preprocessing | None, image_size: int | None, resize_size: Any
) -> Preprocessing:
    """The evaluation view `embed_dataset` uses, from its arguments."""
    from dataclasses import replace

    from jtransfer.preprocess import Preprocessing

    if preprocessing is not None and not isinstance(preprocessing, Preprocessing):
        raise ConfigError(
            f"preprocessing must be a jtransfer.preprocess.Preprocessing, got "
            f"{type(preprocessing).__name__}; build one with Preprocessing.from_pretrained_cfg "
            "or Preprocessing.from_metadata."
        )
    if image_size is not None and int(image_size) < 1:
        raise ConfigError(f"image_size must be positive, got {image_size}")
    view = preprocessing or Preprocessing.d2l(int(image_size or 224))
    if image_size is not None and int(image_size) != view.crop_size:
        view = view.with_crop_size(int(image_size))
    if resize_size is not None:
        resize = int(resize_size) if isinstance(resize_size, int) else tuple(resize_size)
        view = replace(view, resize_size=resize)
    return view


def _transform_key(view: Preprocessing, resize: list[int]) -> dict[str, Any]:
    """The cache key's view. torchvision's (bilinear, ImageNet statistics) keeps the key that
    files written before views were recorded have, so those caches stay valid."""
    from jtransfer.data import IMAGENET_MEAN, IMAGENET_STD

    key: dict[str, Any] = {"resize": resize, "crop": int(view.crop_size)}
    if view.interpolation == "bilinear" and (view.mean, view.std) == (
        tuple(IMAGENET_MEAN),
        tuple(IMAGENET_STD),
    ):
        key["normalize"] = "imagenet"
    else:
        key.update(interpolation=view.interpolation, mean=list(view.mean), std=list(view.std))
    return key


def embed_dataset(
    model: nn.Module,
    variables: Variables,
    folder_or_samples: Any,
    *,
    cache_dir: str | os.PathLike[str],
    arch: str | None = None,
    weights_id: str | None = None,
    image_size: int | None = None,
    resize_size: int | Sequence[int] | None = None,
    preprocessing: Preprocessing | None = None,
    batch_size: int = 64,
    stage: str = PRELOGITS,
    num_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features of every image (evaluation transform, eval mode), computed once, then cached.

    The cache is one ``.npz`` file in `cache_dir` per key; the key hashes everything the
    features depend on: the weights (`weights_hash` of the parameter and BatchNorm bytes, the
    head left out unless `stage` is "logits"), `arch`, `stage`, the transform settings, and
    the sorted list of image files with their sizes and modification times. A later call with
    the same key loads the file and runs no model; a changed, added or removed image, other
    weights, another size or another view give a new key. Files are written atomically.

    Images are decoded and resized on the host (threads) and travel as uint8 pixels; the
    normalisation runs on the device, to the bits of the float32 transform
    (`train.normalize_images`).

    Args:
        model: a module from `jt.models.create`.
        variables: its {"params", "batch_stats"}.
        folder_or_samples: a `jtransfer.data.ImageFolder` or a list of (path, label) pairs.
        cache_dir: where cache files live (created if missing).
        arch: `model`'s registry name; default: inferred from the module.
        weights_id: a readable name of the weights (e.g. "IMAGENET1K_V1") for the cache
            file's name. It does not replace the hash: other weights under the same id miss.
        image_size: center-crop size of the evaluation transform; default: the
            preprocessing's crop size, else 224.
        resize_size: the resize before the crop, as in `jtransfer.data.resize`; default: the
            preprocessing's, else a square of round(image_size * 256 / 224) (d2l's
            ``Resize([256, 256])`` at 224).
        preprocessing: the weights' view (`jtransfer.preprocess.Preprocessing`, e.g.
            ``porting.hub.preprocessing("hf-hub:timm/resnet50.a1_in1k")`` or a checkpoint's
            ``Preprocessing.from_metadata``): its mean, std, resize filter and eval view
            (resize then center crop); `image_size` rescales it as
            `Preprocessing.with_crop_size`. Default: torchvision's weights as d2l uses them
            (`Preprocessing.d2l`).
        batch_size: images per forward pass.
        stage: what to cache, a name from `stage_names(model)`.
        num_threads: image decoding threads; default: CPU count.

    Returns:
        (features float32 (N, D...), labels int32 (N,)), in the order of the samples.

    Raises:
        ConfigError: bad arguments or stage name.
        DataError: an image cannot be read.
    """
    if arch is None:
        from jtransfer import fit

        arch = fit.infer_arch(model)
    ((_, key_stage),) = _resolve(model, stage)
    samples = _samples(folder_or_samples)
    if not samples:
        raise ConfigError("no images to embed")
    view = _embedding_view(preprocessing, image_size, resize_size)
    resize_size = view.resize_size
    resize = [int(resize_size)] if isinstance(resize_size, int) else [int(s) for s in resize_size]
    paths = [p for p, _ in samples]
    files = _file_list(paths)
    exclude = () if key_stage == _aliases(model)[LOGITS] else (heads.head_name(arch),)
    w_hash = weights_hash(variables, exclude=exclude)
    spec = {
        "version": CACHE_VERSION,
        "arch": arch,
        "stage": key_stage,
        "weights": w_hash,
        "transform": _transform_key(view, resize),
        "files": files,
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    cache_dir = Path(cache_dir)
    name = f"{arch}-{_safe_name(stage)}-{_safe_name(weights_id or w_hash[:12])}-{key[:16]}.npz"
    path = cache_dir / name
    labels = np.asarray([label for _, label in samples], np.int32)
    canonical = [f[0] for f in files]  # the cache holds one row per file, in this order
    rows = np.searchsorted(np.asarray(canonical), [os.path.abspath(p) for p in paths])

    cached = _read_cache(path, key)
    if cached is not None:
        return cached[rows], labels

    workers = num_threads or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        batches = _eval_pixels(canonical, view, batch_size, pool)
        feats = extract(model, variables, batches, stages=key_stage, mean=view.mean, std=view.std)
        feats = feats[key_stage]
    _write_cache(path, key, feats, spec)
    return feats[rows], labels


def _read_cache(path: Path, key: str) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != key:
                return None
            return np.asarray(f["features"], np.float32)
    except (OSError, KeyError, ValueError):
        return None  # missing, or unreadable: recompute and overwrite


def _write_cache(path: Path, key: str, feats: np.ndarray, spec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.asarray(key), features=feats, spec=np.asarray(json.dumps(spec)))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------
# Linear probe


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which an epoch visits the examples: `data.make_loader(train=True)`'s.

    Args:
        num_examples: N.
        seed: the loader's seed.
        epoch: 0-based epoch.

    Returns:
        A permutation of range(N).
    """
    return np.random.default_rng([_SHUFFLE_STREAM, seed, epoch]).permutation(num_examples)


def probe_logits(head: Mapping[str, Any], features: Any) -> jax.Array:
    """``features @ kernel + bias``: what the model's head computes on its pre-logits."""
    return jnp.asarray(features, jnp.float32) @ head["kernel"] + head["bias"]


def probe_accuracy(head: Mapping[str, Any], features: Any, labels: Any) -> float:
    """Top-1 accuracy of a head on features."""
    pred = np.asarray(jnp.argmax(probe_logits(head, features), axis=-1))
    return float(np.mean(pred == np.asarray(labels)))


def _loss(head, x, y, weight, loss_reduction: str) -> jax.Array:
    per_example = optax.softmax_cross_entropy_with_integer_labels(probe_logits(head, x), y)
    total = jnp.sum(per_example * weight)
    return total if loss_reduction == "sum" else total / jnp.sum(weight)


@functools.partial(
    jax.jit,
    static_argnames=("method", "momentum", "weight_decay", "loss_reduction"),
)
def _minibatch_run(
    head, features, labels, index, weight, *, method, lr, momentum, weight_decay, loss_reduction
):
    # The optimizer is the one partition.make_optimizer gives a fine-tune's head group
    # (torch.optim.SGD / Adam, coupled weight decay), so both take the same steps.
    tx = partition.make_optimizer(
        head,
        [(".*", 1.0)],
        learning_rate=lr,
        optimizer=method,
        momentum=momentum,
        weight_decay=weight_decay,
    )

    def step(carry, batch):
        head, opt_state = carry
        i, w = batch
        loss, grads = jax.value_and_grad(_loss)(head, features[i], labels[i], w, loss_reduction)
        updates, opt_state = tx.update(grads, opt_state, head)
        return (optax.apply_updates(head, updates), opt_state), loss

    (head, _), losses = jax.lax.scan(step, (head, tx.init(head)), (index, weight))
    return head, losses


@jax.jit
def _lbfgs_run(head, features, labels, max_iter, weight_decay, tol):
    ones = jnp.ones(labels.shape, jnp.float32)

    def objective(h):
        # L2 on every head parameter: the objective whose gradient is SGD's coupled decay.
        l2 = sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(h))
        return _loss(h, features, labels, ones, "mean") + 0.5 * weight_decay * l2

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def body(carry):
        h, state = carry
        value, grad = value_and_grad(h, state=state)
        updates, state = solver.update(grad, state, h, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(h, updates), state

    def going(carry):
        _, state = carry
        count = optax.tree_utils.tree_get(state, "count")
        grad = optax.tree_utils.tree_get(state, "grad")
        return (count == 0) | ((count < max_iter) & (optax.tree_utils.tree_norm(grad) >= tol))

    head, _ = jax.lax.while_loop(going, body, (head, solver.init(head)))
    return head


def _batch_plan(n: int, batch_size: int, epochs: int, seed: int, drop_remainder: bool):
    """(index (steps, B) int32, weight (steps, B) float32): padded rows have weight 0."""
    index, weight = [], []
    for epoch in range(epochs):
        order = epoch_order(n, seed, epoch)
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            if len(rows) < batch_size and drop_remainder:
                break
            pad = batch_size - len(rows)
            index.append(np.concatenate([rows, np.zeros(pad, rows.dtype)]))
            weight.append(np.concatenate([np.ones(len(rows)), np.zeros(pad)]))
    return np.asarray(index, np.int32).reshape(-1, batch_size), np.asarray(
        weight, np.float32
    ).reshape(-1, batch_size)


def fit_linear_probe(
    features: Any,
    labels: Any,
    num_classes: int,
    *,
    method: str = "sgd",
    epochs: int | None = None,
    lr: float | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    loss_reduction: str = "mean",
    drop_remainder: bool = False,
    init: Mapping[str, Any] | None = None,
    tol: float = 1e-6,
) -> Head:
    """Trains a linear classifier (the model's new head) on fixed features, in one jit.

    "sgd" and "adam" take exactly the steps a frozen-backbone fine-tune takes on its head:
    mini-batches in `data.make_loader(train=True, seed=seed)`'s order (`epoch_order`),
    softmax cross-entropy, torch.optim.SGD / Adam with coupled weight decay (the optimizer
    is built by `partition.make_optimizer`), all epochs in one `lax.scan`. "lbfgs" minimises
    the full-batch mean cross-entropy plus ``weight_decay / 2 * |params|^2`` with
    `optax.lbfgs` (zoom line search), up to `epochs` iterations or until the gradient norm is
    below `tol`.

    Args:
        features: float (N, D) features, e.g. from `embed_dataset`.
        labels: int (N,) in [0, num_classes).
        num_classes: C, the head's outputs.
        method: "sgd", "adam" or "lbfgs".
        epochs: passes over the data (sgd, adam; default 10) or the maximum number of
            iterations (lbfgs; default 100).
        lr: learning rate (default 0.1 for sgd, 1e-3 for adam); lbfgs takes none (its line
            search picks each step).
        momentum: SGD momentum (torch's, dampening 0).
        weight_decay: coupled L2 decay (torch's `weight_decay`), on kernel and bias.
        batch_size: examples per step (sgd, adam).
        seed: seed of the example order; the default head initialisation uses PRNGKey(seed)
            as `heads.replace_head(..., seed=seed)` does.
        loss_reduction: "mean" (torch's default) or "sum" (d2l's) over each batch.
        drop_remainder: skip each epoch's last incomplete batch (as a training loader does
            by default); otherwise it is a smaller step.
        init: the starting head {"kernel": (D, C), "bias": (C,)}; default a Xavier-uniform
            kernel and zero bias, the head `heads.replace_head(..., seed=seed)` makes.
        tol: lbfgs stops when the gradient norm is below this.

    Returns:
        {"kernel": float32 (D, C), "bias": float32 (C,)}, ready for `insert_head`.

    Raises:
        ConfigError: inconsistent shapes, labels out of range, bad options.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
        >>> y = (x[:, 0] > 0).astype(np.int32)
        >>> head = fit_linear_probe(x, y, 2, method="lbfgs")
        >>> head["kernel"].shape, probe_accuracy(head, x, y)
        ((8, 2), 1.0)
    """
    x = jnp.asarray(features, jnp.float32)
    y = np.asarray(labels)
    if x.ndim != 2:
        raise ConfigError(
            f"features must be (N, D), got shape {tuple(x.shape)}; flatten or pool feature maps"
        )
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"labels must be N={x.shape[0]} integers, got {y.dtype} {y.shape}")
    if num_classes < 1 or (y.size and not 0 <= y.min() <= y.max() < num_classes):
        raise ConfigError(f"labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
    if method not in PROBE_METHODS:
        raise ConfigError(f"method must be one of {PROBE_METHODS}, got {method!r}")
    if loss_reduction not in ("mean", "sum"):
        raise ConfigError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    if method == "lbfgs" and (lr is not None or momentum):
        raise ConfigError("lbfgs takes no lr or momentum: its line search sets each step")
    epochs = epochs if epochs is not None else (100 if method == "lbfgs" else 10)
    if epochs < 1 or batch_size < 1 or weight_decay < 0 or momentum < 0:
        raise ConfigError("epochs and batch_size must be >= 1; weight_decay, momentum >= 0")

    head = _initial_head(init, x.shape[1], num_classes, seed)
    y = jnp.asarray(y, jnp.int32)
    if method == "lbfgs":
        return _lbfgs_run(head, x, y, epochs, jnp.float32(weight_decay), jnp.float32(tol))
    index, weight = _batch_plan(x.shape[0], batch_size, epochs, seed, drop_remainder)
    if index.shape[0] == 0:
        raise ConfigError(
            f"no full batch of {batch_size} among {x.shape[0]} examples with "
            "drop_remainder=True; lower batch_size"
        )
    lr = float(lr) if lr is not None else (0.1 if method == "sgd" else 1e-3)
    head, _ = _minibatch_run(
        head,
        x,
        y,
        index,
        weight,
        method=method,
        lr=jnp.float32(lr),
        momentum=float(momentum),
        weight_decay=float(weight_decay),
        loss_reduction=loss_reduction,
    )
    return head


def _initial_head(init, dim: int, num_classes: int, seed: int) -> Head:
    if init is None:
        kernel = head_init(jax.random.PRNGKey(seed), (dim, num_classes), jnp.float32)
        return {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}
    head = {
        "kernel": jnp.asarray(init["kernel"], jnp.float32),
        "bias": jnp.asarray(init["bias"], jnp.float32),
    }
    if head["kernel"].shape != (dim, num_classes) or head["bias"].shape != (num_classes,):
        raise ConfigError(
            f"init must be a head for {dim} features and {num_classes} classes, got kernel "
            f"{tuple(head['kernel'].shape)} and bias {tuple(head['bias'].shape)}"
        )
    return head


def insert_head(variables: Variables, arch: str, head: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `variables` whose classifier head (ResNet `fc`, VGG `classifier_6`) is `head`.

    The result fits `jt.models.create(arch, num_classes=C)` with C the head's outputs, so
    ``model.apply(result, x)`` predicts with the probe and `porting.to_torchvision(result,
    arch)` exports it. Other arrays are shared, not copied.

    Args:
        variables: {"params", "batch_stats"} of `arch` (any head size).
        arch: one of `jt.models.ARCHS`.
        head: {"kernel": (D, C), "bias": (C,)}, e.g. from `fit_linear_probe`; D must be the
            model's pre-logits width.

    Returns:
        New variables.

    Raises:
        ConfigError: the head does not fit the model.
    """
    name = heads.head_name(arch)
    params = variables.get("params") if isinstance(variables, Mapping) else None
    if not isinstance(params, Mapping) or name not in params:
        raise ConfigError(f"variables have no params/{name}: pass {arch}'s variables")
    kernel = jnp.asarray(head["kernel"], jnp.float32)
    bias = jnp.asarray(head["bias"], jnp.float32)
    dim = params[name]["kernel"].shape[0]
    if kernel.ndim != 2 or kernel.shape[0] != dim or bias.shape != (kernel.shape[1],):
        raise ConfigError(
            f"the head must be kernel ({dim}, C) and bias (C,) for {arch}; got kernel "
            f"{tuple(kernel.shape)} and bias {tuple(bias.shape)}"
        )
    return {**variables, "params": {**params, name: {"kernel": kernel, "bias": bias}}}
