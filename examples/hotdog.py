"""d2l.ai's hot-dog fine-tuning recipe (Dive into Deep Learning, section 14.2), in JAX.

    python examples/hotdog.py                      # download data + weights, run the recipe
    python examples/hotdog.py --data-dir DIR --weights resnet18-f37072fd.pth   # local copies
    python examples/hotdog.py --demo               # the offline demo, no network

The recipe: ResNet-18 with torchvision's IMAGENET1K_V1 weights, `fc` replaced by
Linear(512, 2) with a Xavier-uniform weight; SGD without momentum, weight decay 1e-3,
batch 128, 5 epochs, lr 5e-5 for the body and 10x for `fc`, the loss SUMMED over the batch
(d2l's `l.sum().backward()`), BatchNorm in training mode. Then the scratch baseline: the
same net with random weights, lr 5e-4 for everything. d2l publishes test accuracy 0.941
fine-tuned and 0.791 from scratch.

Without network (as on the machines this project is built on, and in CI) it says what it
could not download and how to pass local copies, then runs a DEMO of the same lesson on
generated images (`jtransfer.demo`). In place of ImageNet it first pretrains ResNet-18 on a
generated SOURCE task, which of 12 shapes an image shows, in random colours; saves that
network as a torchvision checkpoint (`porting.to_torchvision` + `torch.save`, cached, so
later runs skip the pretraining) and loads it back with `porting.from_torchvision`, as it
would load torchvision's file. In place of the hot-dog photos the TARGET task is generated
from the same shapes: "hotdog" (a sausage in a bun) against "not-hotdog" (another shape on
another base), with few training images. Then the recipe, fine-tune and scratch, at d2l's
rates. Every line of a demo says so; its numbers are not the d2l result.

Outputs in --out: the curves of both runs (PNG) and their history (JSON).
Environment: JTRANSFER_HOTDOG_URL overrides the data URL, JTRANSFER_WEIGHTS_BASE_URL the
weights' (a mirror), JTRANSFER_CACHE the download cache, TORCH_HOME torch's weight cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp

import jtransfer as jt
import porting
from jtransfer import compile_cache, data, demo, download, fit, partition
from jtransfer.errors import ConfigError, DataError, DownloadError, JTransferError
from porting import io as porting_io

ARCH = "resnet18"
CLASSES = ["hotdog", "not-hotdog"]
HOTDOG_URL = "http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip"
HOTDOG_URL_ENV = "JTRANSFER_HOTDOG_URL"
HOTDOG_SHA1 = "fba480ffa8aa7e0febbb511d181409f899b9baa5"
HOTDOG_IMAGES = {"train": 2000, "test": 800}
WEIGHTS_TAG = "IMAGENET1K_V1"
PUBLISHED = {
    "fine-tune": "d2l publishes test acc 0.941 (train acc 0.910, loss 0.238); "
    "reproductions report 0.929-0.943",
    "scratch": "d2l publishes test acc 0.791; reproductions report 0.76-0.86",
}


@dataclass(frozen=True)
class Settings:
    """The recipe's numbers; `D2L` is the book's, `DEMO` sized for 2 CPU cores."""

    epochs: int = 5
    batch_size: int = 128
    image_size: int = 224
    lr: float = 5e-5
    head_lr_mult: float = 10.0
    scratch_lr: float = 5e-4
    weight_decay: float = 1e-3


D2L = Settings()
# d2l's rates at batch 16: with the loss summed, each example moves the weights as much as
# in d2l's batches of 128. The small training set is the point: it is what makes pretrained
# features matter; the larger test set keeps its accuracy from jumping by whole images.
DEMO = Settings(epochs=8, batch_size=16, image_size=32)
DEMO_PER_CLASS = {"train": 32, "test": 100}


@dataclass(frozen=True)
class Pretrain:
    """The offline demo's stand-in for ImageNet pretraining, on `jtransfer.demo`'s shapes.

    Not d2l's recipe: the source task only has to give the network shape features, fast.
    Adam with a warmup-cosine schedule on the mean loss does that in a few hundred steps,
    each on freshly drawn images. `rounds` is how often the source test accuracy is printed.
    """

    steps: int = 160
    rounds: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    eval_count: int = 256


DEMO_PRETRAIN = Pretrain()
SOURCE_TASK = f"which of {len(demo.PRIMITIVES)} generated shapes an image shows"


@dataclass
class Source:
    """Where the images come from and whether they are d2l's hot-dog set."""

    kind: str  # "hotdog" (d2l's), "local" (a folder that is not d2l's set), "demo"
    train: Path
    test: Path
    note: str
    classes: list[str]


@dataclass
class Weights:
    """The fine-tuning run's starting point."""

    # "imagenet" (torchvision's IMAGENET1K_V1 file), "local", "demo" (random weights),
    # "source-task" (pretrained here on the generated source task, offline demo)
    kind: str
    variables: Any
    note: str


class Failure(NamedTuple):
    """A download that did not happen."""

    what: str
    url: str
    reason: str


def _reason(error: BaseException) -> str:
    """The network's reason for a DownloadError (e.g. "Connection refused")."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    for e in chain:
        if isinstance(e, urllib.error.HTTPError):
            return f"HTTP {e.code} {e.reason}"
        if isinstance(e, urllib.error.URLError):
            return str(e.reason)
    return str(chain[-1])


# ---------------------------------------------------------------------------
# Data.


def find_split_dirs(root: str | os.PathLike) -> tuple[Path, Path]:
    """hotdog/train and hotdog/test under `root`, or train and test in `root` itself."""
    root = Path(root).expanduser()
    for base in (root / "hotdog", root):
        if (base / "train").is_dir() and (base / "test").is_dir():
            return base / "train", base / "test"
    raise DataError(
        f"{root} holds neither hotdog/train and hotdog/test nor train and test. Pass "
        "--data-dir the folder hotdog.zip was unpacked into, or the hotdog folder itself."
    )


def local_source(root: str | os.PathLike, how: str) -> Source:
    """A Source for train/test folders; kind "hotdog" only if they look like d2l's set."""
    train, test = find_split_dirs(root)
    folders = data.ImageFolder(train), data.ImageFolder(test)
    data.check_same_classes(*folders)
    counts = {"train": len(folders[0]), "test": len(folders[1])}
    if folders[0].classes == CLASSES and counts == HOTDOG_IMAGES:
        note = f"d2l's hot-dog images ({how}: {train.parent})"
        return Source("hotdog", train, test, note, CLASSES)
    note = (
        f"local images at {train.parent} ({counts['train']} train / {counts['test']} test, "
        f"classes {folders[0].classes}); d2l's hotdog has {HOTDOG_IMAGES['train']} / "
        f"{HOTDOG_IMAGES['test']} images of {CLASSES}"
    )
    return Source("local", train, test, note, folders[0].classes)


def download_hotdog(failures: list[Failure]) -> Source | None:
    """hotdog.zip into the cache (sha1-checked) and unpacked; None when offline."""
    cache = download.cache_dir()
    if (cache / "hotdog" / "train").is_dir() and (cache / "hotdog" / "test").is_dir():
        return local_source(cache, "cached")
    url = os.environ.get(HOTDOG_URL_ENV) or HOTDOG_URL
    try:
        archive = download.fetch(url, cache / "hotdog.zip", sha1=HOTDOG_SHA1)
    except DownloadError as e:
        failures.append(Failure("the hot-dog data set", url, _reason(e)))
        return None
    download.safe_extract_zip(archive, cache)
    return local_source(cache, "downloaded")


def demo_source(settings: Settings, per_class: dict[str, int]) -> Source:
    """The generated target task in the cache (written once, then reused)."""
    px = round(settings.image_size * 1.25)  # room for RandomResizedCrop, like d2l's photos
    name = f"hotdog-v{demo.GENERATOR_VERSION}-{px}px-{per_class['train']}-{per_class['test']}"
    root = download.cache_dir() / "demo" / name
    for seed, split in enumerate(("train", "test")):
        if not (root / split).is_dir():
            try:
                demo.make_target_imagefolder(root / split, per_class[split], px, seed=seed)
            except ConfigError:  # written meanwhile by another run
                pass
    return Source(
        "demo",
        root / "train",
        root / "test",
        f"generated DEMO target task at {root} ({2 * per_class['train']} train / "
        f"{2 * per_class['test']} test, {px} px): {CLASSES[0]} = a sausage lying in a bun, "
        f"{CLASSES[1]} = another shape on another base, random colours in both; "
        "not d2l's hot-dog photos",
        CLASSES,
    )


# ---------------------------------------------------------------------------
# Weights.


def _is_path(spec: str) -> bool:
    return os.sep in spec or spec.endswith((".pth", ".pt", ".safetensors")) or Path(spec).exists()


def _port(path_or_tag: str, num_classes: int) -> tuple[Any, bool]:
    """(variables with a new fc for `num_classes`, whether fc was re-initialised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", porting.HeadReinitialized)
        _, variables = porting.load_pretrained(ARCH, path_or_tag, num_classes=num_classes)
    reinit = any(issubclass(w.category, porting.HeadReinitialized) for w in caught)
    return variables, reinit


def _fc_note(reinit: bool, num_classes: int) -> str:
    if not reinit:
        return ""
    return f"; fc re-initialised as Linear(512, {num_classes}), Xavier-uniform weight, zero bias"


def load_weights(spec: str, failures: list[Failure], num_classes: int) -> Weights | None:
    """The fine-tuning start; None when the weights tag cannot be downloaded."""
    if _is_path(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataError(f"--weights {spec}: no such file. Pass a torchvision .pth file.")
        variables, reinit = _port(str(path), num_classes)
        official = porting_io.weights_url(ARCH, WEIGHTS_TAG).rsplit("/", 1)[1]
        sha256 = download.file_hashes(path)[1]
        if sha256.startswith(porting_io.hash_prefix(official)):
            note = f"torchvision's {WEIGHTS_TAG} ImageNet weights ({path}, sha256 checked)"
            return Weights("imagenet", variables, note + _fc_note(reinit, num_classes))
        note = f"weights from {path} (not torchvision's {official}: sha256 differs)"
        return Weights("local", variables, note + _fc_note(reinit, num_classes))
    try:
        variables, reinit = _port(spec, num_classes)
    except DownloadError as e:
        failures.append(Failure("the ResNet-18 ImageNet weights", _weights_url(spec), _reason(e)))
        return None
    note = f"torchvision's {spec} ImageNet weights (downloaded or cached, sha256 checked)"
    return Weights("imagenet", variables, note + _fc_note(reinit, num_classes))


def _weights_url(tag: str) -> str:
    try:
        return porting_io.weights_url(ARCH, tag)
    except ConfigError:
        return tag


def _torchvision_random_state_dict(num_classes: int, seed: int) -> dict:
    import torch
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes).state_dict()


def demo_weights(num_classes: int) -> Weights:
    """A random-weight torchvision ResNet-18 checkpoint on disk, ported like a real one."""
    import torch

    path = download.cache_dir() / "demo" / "resnet18-random-weights.pth"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        torch.save(_torchvision_random_state_dict(1000, seed=0), tmp)
        os.replace(tmp, path)
    variables, reinit = _port(str(path), num_classes)
    note = (
        f"DEMO weights: a randomly initialised torchvision resnet18 saved with torch.save "
        f"({path}), ported with porting.from_torchvision; NOT ImageNet-pretrained"
    )
    return Weights("demo", variables, note + _fc_note(reinit, num_classes))


def pretrain_key(settings: Settings, pretrain: Pretrain) -> str:
    """Names the cached pretrained network: any change to what made it gives a new name."""
    spec = {
        "arch": ARCH,
        "generator": demo.GENERATOR_VERSION,
        "primitives": demo.PRIMITIVES,
        "image_size": settings.image_size,
        **dataclasses.asdict(pretrain),
    }
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def pretrain_on_source(settings: Settings, pretrain: Pretrain, say, tag: str) -> dict:
    """ResNet-18 trained on the generated source task: its variables and its history."""
    import optax

    num_classes = len(demo.PRIMITIVES)
    model = jt.models.create(ARCH, num_classes=num_classes)
    rounds = max(1, min(pretrain.rounds, pretrain.steps))
    steps_per_round = math.ceil(pretrain.steps / rounds)
    steps = rounds * steps_per_round
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, pretrain.lr, max(1, steps // 10), steps, end_value=pretrain.lr / 100
    )
    say(
        f"{tag}pretraining on the SOURCE task ({SOURCE_TASK}: "
        f"{', '.join(demo.PRIMITIVES)}; random colours, sizes and places): {steps} steps of "
        f"{pretrain.batch_size} fresh images at {settings.image_size} px, Adam lr "
        f"{pretrain.lr:g} warmup-cosine, mean loss; test acc on {pretrain.eval_count} held-out "
        f"source images after each of {rounds} rounds (chance {1 / num_classes:.3f})"
    )
    state, history = fit.fit(
        model,
        scratch_variables(num_classes, pretrain.seed),
        partition.rules(ARCH, default=1.0),
        demo.SourceStream(pretrain.seed, steps_per_round, pretrain.batch_size, settings.image_size),
        demo.source_eval_batches(pretrain.seed, pretrain.eval_count, settings.image_size),
        learning_rate=schedule,
        optimizer="adam",
        epochs=rounds,
        loss_reduction="mean",
        bn_policy="train",
        seed=pretrain.seed,
        desc=f"{tag}pretrain (source: shapes)",
        log=lambda line: say(line.replace(": epoch ", ": round ", 1)),
    )
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return {"variables": variables, "history": history, "steps": steps}


def source_task_weights(
    settings: Settings, pretrain: Pretrain, num_classes: int, say, tag: str
) -> tuple[Weights, dict]:
    """The fine-tune run's start offline: pretrained on the source task, via torchvision.

    The network is kept as a torchvision state_dict (`porting.to_torchvision`, `torch.save`)
    and loaded back with `porting.load_pretrained(path)`, the path a downloaded ImageNet file
    takes, so the demo runs the porting code too. It is cached under the hash of its
    settings; the folder is written whole, then renamed into place.
    """
    import torch

    key = pretrain_key(settings, pretrain)
    folder = download.cache_dir() / "demo" / f"resnet18-shapes-{key}"
    path = folder / "resnet18-shapes.pth"
    cached = path.is_file() and (folder / "pretrain.json").is_file()
    if cached:
        info = json.loads((folder / "pretrain.json").read_text())
    else:
        start = time.perf_counter()
        result = pretrain_on_source(settings, pretrain, say, tag)
        info = {
            "source_task": SOURCE_TASK,
            "classes": list(demo.PRIMITIVES),
            "settings": dataclasses.asdict(pretrain),
            "image_size": settings.image_size,
            "steps": result["steps"],
            "history": result["history"],
            "seconds": round(time.perf_counter() - start, 1),
        }
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            torch.save(porting.to_torchvision(result["variables"], ARCH), staging / path.name)
            (staging / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
            staging.chmod(0o755)
            os.replace(staging, folder)
        except OSError:
            if not path.is_file():  # not a race lost to another run writing the same network
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    source_acc = info["history"][-1]["test_acc"]
    how = (
        f"from the cache, pretrained by an earlier run in {info['seconds']:.0f}s"
        if cached
        else f"pretrained now in {info['seconds']:.0f}s"
    )
    say(
        f"{tag}source-task network ({how}): test acc {_fmt(source_acc)} on held-out source "
        f"images after {info['steps']} steps; a torchvision state_dict at {path} (delete its "
        "folder to pretrain again)"
    )
    variables, reinit = _port(str(path), num_classes)
    note = (
        f"DEMO weights: ResNet-18 pretrained here on the generated SOURCE task ({SOURCE_TASK}), "
        f"saved with porting.to_torchvision + torch.save ({path}) and loaded back with "
        "porting.from_torchvision; NOT ImageNet-pretrained"
    )
    record = {"cached": cached, "checkpoint": str(path), "key": key, **info}
    return Weights("source-task", variables, note + _fc_note(reinit, num_classes)), record


def scratch_variables(num_classes: int, seed: int = 0) -> Any:
    """d2l's scratch net: a fresh torchvision resnet18 with a new fc, ported.

    torchvision's initialisation (Kaiming-normal convs, default Linear) is what the book's
    baseline starts from; porting it is also much faster on CPU than compiling `model.init`.
    """
    return porting.from_torchvision(_torchvision_random_state_dict(num_classes, seed), ARCH)


# ---------------------------------------------------------------------------
# Reporting.


def offline_paragraph(failures: list[Failure], source: Source | None, weights) -> str:
    what = " and ".join(f"{w} from {url} ({reason})" for w, url, reason in failures)
    flags = []
    if any("data" in w for w, _, _ in failures):
        zip_at = download.cache_dir() / "hotdog.zip"
        flags.append(
            "--data-dir DIR (the folder hotdog.zip was unpacked into, holding hotdog/train "
            f"and hotdog/test; or put hotdog.zip at {zip_at})"
        )
    if any("weights" in w for w, _, _ in failures):
        url = next(u for w, u, _ in failures if "weights" in w)
        name = url.rsplit("/", 1)[-1]
        flags.append(f"--weights /path/to/{name} (or put it at {porting_io.torch_cache_dir()})")
    real = []
    if source is not None:
        real.append(
            "the hot-dog images are real" if source.kind == "hotdog" else "your images are used"
        )
    if weights is not None:
        imagenet = weights.kind == "imagenet"
        real.append("the ImageNet weights are real" if imagenet else "your weights are used")
    if source is None:
        then = "This run continues with a DEMO of the recipe on generated images"
        if weights is None:
            then += (
                ": in place of the ImageNet weights it pretrains ResNet-18 on a generated "
                f"source task ({SOURCE_TASK}; cached after the first run), then fine-tunes it "
                "on a generated hot-dog task made of the same shapes, against training from "
                "scratch"
            )
        else:
            then += " instead of hot-dog photos"
        then += "; its numbers are NOT the d2l result."
    else:
        then = (
            "The fine-tune run continues from a randomly initialised ResNet-18 instead of the "
            "ImageNet weights: a DEMO whose numbers are NOT the d2l result (the scratch "
            "baseline needs no weights)."
        )
    return (
        f"OFFLINE: could not download {what}. To run the real d2l recipe, get the file(s) on "
        f"a machine with network access and pass {' and '.join(flags)}. "
        + (f"Here {' and '.join(real)}. " if real else "")
        + then
    )


def not_d2l_reasons(run: str, source: Source, weights: Weights, settings: Settings) -> list[str]:
    """Why a run's numbers cannot be compared with d2l's (empty: they can)."""
    reasons = []
    if source.kind == "demo":
        reasons.append("generated demo images, not hot-dog photos")
    elif source.kind == "local":
        reasons.append("the data is not d2l's hot-dog set")
    if run == "fine-tune" and weights.kind == "demo":
        reasons.append("random weights, not ImageNet-pretrained")
    elif run == "fine-tune" and weights.kind == "source-task":
        reasons.append("pretrained on a generated source task of shapes, not on ImageNet")
    elif run == "fine-tune" and weights.kind == "local":
        reasons.append("the weights are not torchvision's IMAGENET1K_V1 file")
    changed = [
        f"{f.name} {getattr(settings, f.name)} (d2l: {getattr(D2L, f.name)})"
        for f in dataclasses.fields(Settings)
        if getattr(settings, f.name) != getattr(D2L, f.name)
    ]
    if changed:
        reasons.append("settings differ: " + ", ".join(changed))
    return reasons


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def summary_line(run: str, history: list[dict], reasons: list[str]) -> str:
    last = history[-1]
    rates = [h["examples_per_s"] for h in history if h["examples_per_s"]]
    text = (
        f"summary {run}: loss {_fmt(last['train_loss'])}, train acc {_fmt(last['train_acc'])}, "
        f"test acc {_fmt(last['test_acc'])}, "
        f"{_fmt(sum(rates) / len(rates) if rates else None, '.1f')} examples/sec "
        f"after {last['epoch']} epochs"
    )
    if reasons:
        return f"{text}; NOT the d2l result ({'; '.join(reasons)})"
    return f"{text}; the d2l recipe on hot-dog ({PUBLISHED[run]})"


def save_plot(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    """Train loss, train acc and test acc per epoch, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = (("train_loss", "train loss (per example)"), ("train_acc", "train acc"))
    keys += (("test_acc", "test acc"),)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for run, history in runs.items():
        epochs = [h["epoch"] for h in history]
        for ax, (key, _) in zip(axes, keys, strict=True):
            values = [math.nan if h[key] is None else h[key] for h in history]
            ax.plot(epochs, values, marker="o", label=run)
    for ax, (_, name) in zip(axes, keys, strict=True):
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Main.


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="d2l's hot-dog fine-tuning recipe (ResNet-18), with an offline demo.",
        epilog=f"Data URL: ${HOTDOG_URL_ENV} or {HOTDOG_URL}. Demo defaults: epochs "
        f"{DEMO.epochs}, batch size {DEMO.batch_size}, {DEMO.image_size} px.",
    )
    p.add_argument(
        "--data-dir",
        help="folder holding hotdog/train and hotdog/test (or the hotdog folder itself); "
        "default: download hotdog.zip into the cache",
    )
    p.add_argument(
        "--weights",
        default=WEIGHTS_TAG,
        help=f"torchvision weights tag or path to a .pth (default {WEIGHTS_TAG})",
    )
    p.add_argument("--epochs", type=int, help=f"default {D2L.epochs} (demo {DEMO.epochs})")
    p.add_argument(
        "--batch-size", type=int, help=f"default {D2L.batch_size} (demo {DEMO.batch_size})"
    )
    p.add_argument("--out", default="runs/hotdog", help="folder for the plot and the history")
    p.add_argument(
        "--compute-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="bfloat16: mixed precision for the fine-tune and scratch runs (parameters, "
        "optimizer and BatchNorm statistics stay float32) (default: float32)",
    )
    p.add_argument("--skip-scratch", action="store_true", help="skip the scratch baseline")
    p.add_argument("--demo", action="store_true", help="run the offline demo, no downloads")
    p.add_argument("--workers", type=int, help="loader worker processes (default: 0 for the demo)")
    p.add_argument(
        "--compile-cache",
        default=None,
        metavar="DIR|off",
        help="JAX compilation cache, so a second run starts fast (default: "
        "$JTRANSFER_COMPILE_CACHE, else ~/.cache/jtransfer/xla; off to disable)",
    )
    # Advanced: sizes for quick checks and tests.
    p.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--demo-per-class", type=int, nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--pretrain-steps", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.demo and args.data_dir:
        p.error("--demo runs on generated images; drop --data-dir, or --demo to use your data")
    for name in ("epochs", "batch_size", "image_size", "workers", "pretrain_steps"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "workers" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


@dataclass
class Plan:
    """What `run` resolved: the data, the weights, the settings, what was not downloaded."""

    source: Source
    weights: Weights
    settings: Settings
    failures: list[Failure]
    workers: int
    pretrain: dict | None = None  # the source-task pretraining of the offline demo

    @property
    def demo(self) -> bool:
        return self.source.kind == "demo"

    @property
    def tag(self) -> str:
        """Prefix of every line of a demo."""
        return "DEMO | " if self.demo else ""

    def run_tag(self, run: str) -> str:
        if not self.demo and run == "fine-tune" and self.weights.kind == "demo":
            return "DEMO weights | "
        return self.tag


def resolve(args: argparse.Namespace, say) -> Plan:
    """Finds or downloads the data and weights; falls back to the demo, and says so."""
    failures: list[Failure] = []
    if args.demo:
        source = None
    elif args.data_dir:
        source = local_source(args.data_dir, "--data-dir")
    else:
        source = download_hotdog(failures)
    num_classes = len(source.classes) if source is not None else len(CLASSES)
    weights = None
    if not args.demo or _is_path(args.weights):
        weights = load_weights(args.weights, failures, num_classes)
    if failures:
        say(offline_paragraph(failures, source, weights))

    base = DEMO if source is None else D2L
    settings = dataclasses.replace(
        base,
        epochs=args.epochs or base.epochs,
        batch_size=args.batch_size or base.batch_size,
        image_size=args.image_size or base.image_size,
    )
    if source is None:
        per_class = dict(DEMO_PER_CLASS)
        if args.demo_per_class:
            per_class = dict(zip(("train", "test"), args.demo_per_class, strict=True))
        source = demo_source(settings, per_class)
    pretrained = None
    if weights is None and source.kind == "demo":
        pretrain = DEMO_PRETRAIN
        if args.pretrain_steps:
            pretrain = dataclasses.replace(pretrain, steps=args.pretrain_steps)
        weights, pretrained = source_task_weights(settings, pretrain, num_classes, say, "DEMO | ")
    elif weights is None:
        # Real photos without the ImageNet weights: the shapes network is made for the
        # generated target task, not for photos, so the fine-tune run starts from random
        # weights and its lines say so.
        weights = demo_weights(num_classes)
    workers = args.workers
    if workers is None:
        workers = 0 if source.kind == "demo" else max(0, min(8, (os.cpu_count() or 1) - 1))
    return Plan(source, weights, settings, failures, workers, pretrained)


def describe(plan: Plan, say) -> None:
    s, tag = plan.settings, plan.tag
    say(f"{tag}data: {plan.source.note}")
    say(f"{tag}weights (fine-tune run): {plan.weights.note}")
    rates = ""
    if s.batch_size != D2L.batch_size and (s.lr, s.scratch_lr) == (D2L.lr, D2L.scratch_lr):
        rates = (
            f" (d2l's rates: with the loss summed, each example moves the weights as much at "
            f"batch {s.batch_size} as at d2l's {D2L.batch_size})"
        )
    say(
        f"{tag}settings: {ARCH}, {s.epochs} epochs, batch {s.batch_size}, {s.image_size} px "
        f"crops, SGD (no momentum), weight decay {s.weight_decay:g}, summed loss, BatchNorm in "
        f"train mode, new fc with a Xavier-uniform weight; fine-tune lr {s.lr:g} (fc "
        f"x{s.head_lr_mult:g}), scratch lr {s.scratch_lr:g}{rates}; {plan.workers} loader "
        "workers"
    )
    if plan.demo:
        say(f"{tag}these numbers come from generated images: they are NOT the d2l result.")
    if plan.weights.kind == "source-task":
        train_count = len(data.ImageFolder(plan.source.train))
        say(
            f"{tag}the lesson, as in d2l: the fine-tune run starts from features learned on "
            f"the source task ({SOURCE_TASK}); the scratch run has to learn the shapes from "
            f"the {train_count} target training images alone."
        )
    if plan.weights.kind == "demo":
        say(
            f"{plan.run_tag('fine-tune')}without the ImageNet weights the fine-tune run starts "
            "from random weights at a 10x lower lr than scratch, so expect it to trail the "
            "scratch run; with the pretrained weights on the real photos it leads."
        )


def make_loaders(plan: Plan, seed: int) -> tuple[data.ImageLoader, data.ImageLoader]:
    """d2l's transforms: RandomResizedCrop + flip for training, Resize + CenterCrop for test."""
    s = plan.settings
    train_folder = data.ImageFolder(plan.source.train)
    test_folder = data.ImageFolder(plan.source.test)
    data.check_same_classes(train_folder, test_folder)
    resize = round(s.image_size * 256 / 224)  # Resize([256, 256]) before a 224 crop
    train_loader = data.make_loader(
        train_folder,
        batch_size=s.batch_size,
        train=True,
        seed=seed,
        num_epochs=None,
        worker_count=plan.workers,
        image_size=s.image_size,
    )
    test_loader = data.make_loader(
        test_folder,
        batch_size=s.batch_size,
        train=False,
        image_size=s.image_size,
        resize_size=(resize, resize),
        cache_eval=True,
    )
    return train_loader, test_loader


def train_runs(plan: Plan, args: argparse.Namespace, say) -> dict[str, dict]:
    """The fine-tuning run and (unless skipped) the scratch baseline."""
    s = plan.settings
    train_loader, test_loader = make_loaders(plan, args.seed)
    num_classes = len(plan.source.classes)
    model = jt.models.create(ARCH, num_classes=num_classes)
    plans = [("fine-tune", partition.finetune(ARCH, s.head_lr_mult), s.lr)]
    if not args.skip_scratch:
        plans.append(("scratch", partition.rules(ARCH, default=1.0), s.scratch_lr))
    runs: dict[str, dict] = {}
    for name, rules, lr in plans:
        variables = plan.weights.variables
        if name == "scratch":
            variables = scratch_variables(num_classes, args.seed)
        tag = plan.run_tag(name)
        _, history = fit.fit(
            model,
            variables,
            rules,
            train_loader,
            test_loader,
            learning_rate=lr,
            weight_decay=s.weight_decay,
            epochs=s.epochs,
            loss_reduction="sum",
            bn_policy="train",
            seed=args.seed,
            compute_dtype=jnp.bfloat16 if args.compute_dtype == "bfloat16" else None,
            desc=f"{tag}{name}",
            log=say,
        )
        reasons = not_d2l_reasons(name, plan.source, plan.weights, s)
        runs[name] = {
            "label": tag.strip(" |") or None,
            "not_d2l_because": reasons,
            "summary": f"{tag}{summary_line(name, history, reasons)}",
            "history": history,
        }
    return runs


def run(args: argparse.Namespace, say) -> dict:
    """The whole example; returns what it writes to the history JSON."""
    plan = resolve(args, say)
    describe(plan, say)
    runs = train_runs(plan, args, say)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "demo_hotdog" if plan.demo else "hotdog"  # a demo never overwrites a real result
    plot_path, json_path = out / f"{stem}.png", out / f"{stem}_history.json"
    title = "d2l hot-dog recipe: ResNet-18 fine-tune vs scratch"
    if plan.demo and plan.weights.kind == "source-task":
        title = (
            "DEMO on generated images, NOT the d2l result: ResNet-18 pretrained on a generated "
            f"source task ({SOURCE_TASK}),\nfine-tuned on a generated hot dog / not task, vs "
            "training from scratch"
        )
    elif plan.demo:
        title = "DEMO on generated images, not the d2l result: ResNet-18 fine-tune vs scratch"
    elif plan.weights.kind == "demo":
        title += " (fine-tune from DEMO random weights)"
    curves = {name: r["history"] for name, r in runs.items()}
    label = {"demo": "random weights", "source-task": "pretrained on shapes"}.get(plan.weights.kind)
    if label and "fine-tune" in curves:
        curves = {f"{k} ({label})" if k == "fine-tune" else k: v for k, v in curves.items()}
    save_plot(curves, plot_path, title)
    record = {
        "demo": plan.demo,
        "data": {"kind": plan.source.kind, "note": plan.source.note},
        "weights": {"kind": plan.weights.kind, "note": plan.weights.note},
        "settings": dataclasses.asdict(plan.settings),
        "offline": [f._asdict() for f in plan.failures],
        "pretrain": plan.pretrain,
        "runs": runs,
    }
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    for r in runs.values():
        say(r["summary"])
    if plan.weights.kind == "source-task" and len(runs) == 2:
        tuned, scratch = (runs[k]["history"][-1]["test_acc"] for k in ("fine-tune", "scratch"))
        say(
            f"{plan.tag}test acc after {plan.settings.epochs} epochs: fine-tune {_fmt(tuned)}, "
            f"scratch {_fmt(scratch)}; the fine-tune run's lead, if any, is what the generated "
            "source task taught (NOT the d2l result)"
        )
    say(f"{plan.tag}plot: {plot_path}")
    say(f"{plan.tag}history: {json_path}")
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    compile_cache.enable(args.compile_cache)  # before the first compilation
    try:
        record = run(args, lambda line: print(line, flush=True))
    except JTransferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tag = "DEMO | " if record["demo"] else ""
    print(f"{tag}done in {time.perf_counter() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    from jtransfer import hostmem

    hostmem.reexec_with_hugepages()  # huge pages for XLA's per-step buffers
    sys.exit(main())
