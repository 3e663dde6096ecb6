"""The learning-rate range test (Smith 2015; fastai's ``lr_find``), with the user's rules.

Train for a few hundred steps while the base learning rate grows exponentially from
`start_lr` to `end_lr`, record the loss of every step, and stop once the loss diverges. The
optimizer is the one the run will use: `partition.make_optimizer` with the user's rules and an
exponential schedule as the base rate, so each group's multiplier (e.g. the head at 10x)
scales the sweep, frozen groups stay frozen (bit-identical, no backward pass through a frozen
prefix), and BatchNorm follows the same policy as in training. The variables passed in are
not changed: the sweep trains a copy, which is thrown away.

The suggestion is fastai's "steep": the learning rate where the smoothed loss falls fastest,
i.e. the most negative slope d(smoothed loss)/d(log lr), ignoring the first tenth of the sweep
(still warming up the average) and its last five points (diverging). It is a point inside the
sweep, usually an order of magnitude below the loss minimum; fastai's "valley" (the middle of
the longest descending stretch, often a little more conservative) is `LRFindResult.suggest
("valley")`. Both are starting points to read against the plot, not answers.

Example:
    A short sweep on a small generated image folder, from random weights (a real one takes
    100 to 300 steps, from ``porting.load_pretrained("resnet18", num_classes=2)``):

    >>> import tempfile
    >>> import jtransfer as jt
    >>> from jtransfer import data, lr_find, partition
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = data.make_demo_imagefolder(f"{tmp.name}/train", n_per_class=4, size=40)
    >>> loader = data.make_loader(folder, batch_size=4, train=True, num_epochs=None,
    ...                           image_size=32)
    >>> model = jt.models.create("resnet18", num_classes=2)
    >>> variables = jt.models.random_variables(model, image_size=32)
    >>> result = lr_find.lr_find(model, variables, partition.finetune("resnet18"), loader,
    ...                          num_steps=6, momentum=0.9)
    >>> len(result.lrs) <= 6, result.suggestion in result.lrs
    (True, True)
    >>> result.plot(f"{tmp.name}/lr_find.png").name
    'lr_find.png'
    >>> tmp.cleanup()

From the shell (`main`): ``python -m jtransfer lr-find --data DIR --arch resnet18 --weights
PATH --freeze backbone --out runs/lr``; it writes lr_find.png and lr_find.json to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jtransfer import partition, train
from jtransfer.errors import ConfigError, DataError, JTransferError

__all__ = [
    "SUGGESTIONS",
    "LRFindResult",
    "add_parser",
    "exponential_lrs",
    "lr_find",
    "main",
    "run",
    "smooth_losses",
    "steepest",
    "valley",
]

SUGGESTIONS = ("steep", "valley")
PROG = "python -m jtransfer lr-find"


# ---------------------------------------------------------------------------
# The sweep and its reading


def exponential_lrs(start_lr: float, end_lr: float, num_steps: int) -> np.ndarray:
    """The swept rates: ``start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))``.

    Args:
        start_lr: the first rate (> 0).
        end_lr: the last rate (> start_lr).
        num_steps: how many (>= 2).

    Returns:
        float64 (num_steps,), evenly spaced in log scale, both ends included.

    Example:
        >>> exponential_lrs(1e-3, 1e-1, 3).tolist()
        [0.001, 0.01, 0.1]
    """
    return start_lr * (end_lr / start_lr) ** (np.arange(num_steps) / (num_steps - 1))


def _schedule(start_lr: float, end_lr: float, num_steps: int) -> partition.Schedule:
    log_ratio = math.log(end_lr / start_lr)

    def schedule(count):
        return start_lr * jnp.exp(log_ratio * count / (num_steps - 1))

    return schedule


def smooth_losses(losses: Sequence[float], beta: float = 0.98) -> np.ndarray:
    """fastai's debiased exponential moving average of the losses.

    ``avg = beta * avg + (1 - beta) * loss; smoothed = avg / (1 - beta ** (i + 1))``.

    Example:
        >>> smooth_losses([2.0, 2.0, 2.0], 0.9).round(6).tolist()
        [2.0, 2.0, 2.0]
    """
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * float(loss)
        out.append(avg / (1 - beta ** (i + 1)))
    return np.asarray(out, np.float64)


def _trimmed(n: int) -> slice:
    """fastai's view of a sweep: without its first tenth and its last five points."""
    start, stop = n // 10, n - 5
    return slice(start, stop) if stop - start >= 2 else slice(0, n)


def steepest(lrs: Sequence[float], smoothed: Sequence[float]) -> float:
    """fastai's "steep": the rate where the smoothed loss falls fastest per log-lr.

    The first tenth of the sweep and its last five points are left out when enough remain.

    Args:
        lrs: the swept rates.
        smoothed: the smoothed loss at each.

    Returns:
        One of `lrs` (the start of the steepest segment).
    """
    lrs, smoothed = np.asarray(lrs, np.float64), np.asarray(smoothed, np.float64)
    if len(lrs) < 2:
        return float(lrs[0])
    keep = _trimmed(len(lrs))
    lr, loss = lrs[keep], smoothed[keep]
    slopes = np.diff(loss) / np.diff(np.log(lr))
    return float(lr[int(np.argmin(slopes))])


def valley(lrs: Sequence[float], smoothed: Sequence[float]) -> float:
    """fastai's "valley": the point 1/2 of the way into the longest descending stretch.

    Precisely fastai's rule: the longest run (not necessarily contiguous) of decreasing
    smoothed losses, and the point at 1/3 + 1/6 of its length.

    Returns:
        One of `lrs`.
    """
    lrs, losses = np.asarray(lrs, np.float64), np.asarray(smoothed, np.float64)
    n = len(losses)
    if n < 2:
        return float(lrs[0])
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return float(lrs[max_start + int(sections) + int(sections / 2)])


@dataclass(frozen=True)
class LRFindResult:
    """What a range test measured.

    Attributes:
        lrs: the base learning rate of each step taken (float64, exponential).
        losses: the training loss of each step, computed before that step's update.
        smoothed: `smooth_losses(losses, smooth)`.
        suggestion: `steepest(lrs, smoothed)`, a base rate (group multipliers apply on top).
        stopped_early: the loss diverged (or became non-finite) before the last step.
        end_lr: the rate the sweep would have ended at.
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    suggestion: float
    stopped_early: bool
    end_lr: float

    def suggest(self, method: str = "steep") -> float:
        """The suggestion by fastai's "steep" (the default) or "valley" rule."""
        if method not in SUGGESTIONS:
            raise ConfigError(f"method must be one of {SUGGESTIONS}, got {method!r}")
        rule = steepest if method == "steep" else valley
        return rule(self.lrs, self.smoothed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: lists of floats and the suggestions."""
        return {
            "lrs": self.lrs.tolist(),
            "losses": self.losses.tolist(),
            "smoothed": self.smoothed.tolist(),
            "suggestion": self.suggestion,
            "suggestion_rule": "steep",
            "valley": self.suggest("valley"),
            "stopped_early": self.stopped_early,
            "end_lr": self.end_lr,
        }

    def plot(self, path: str | os.PathLike[str], *, title: str = "") -> Path:
        """Saves loss against learning rate (log scale) as a PNG, the suggestion marked.

        Uses matplotlib's Agg canvas directly: no display needed, pyplot's global state and
        backend are left alone.

        Args:
            path: the PNG to write (its folder is created).
            title: a first title line (e.g. the model and data).

        Returns:
            The path written.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(7, 4.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(self.lrs, self.losses, color="tab:blue", alpha=0.3, lw=1, label="loss")
        ax.plot(self.lrs, self.smoothed, color="tab:blue", lw=2, label="smoothed loss")
        at = int(np.argmin(np.abs(np.log(self.lrs) - math.log(self.suggestion))))
        ax.plot([self.suggestion], [self.smoothed[at]], "o", color="tab:red",
                label=f"steepest descent: lr {self.suggestion:.2e}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("base learning rate (group multipliers apply on top)")
        ax.set_ylabel("training loss")
        ax.set_ylim(top=_ylim_top(self.smoothed))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        end = f", stopped at {self.lrs[-1]:.1e} (diverged)" if self.stopped_early else ""
        heading = "learning-rate range test" + end
        ax.set_title(f"{title}\n{heading}" if title else heading, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, format="png")
        return path


def _ylim_top(smoothed: np.ndarray) -> float:
    """Keeps the diverging tail from squashing the useful part of the curve."""
    finite = smoothed[np.isfinite(smoothed)]
    start = finite[: max(1, len(finite) // 10)].max()
    return float(max(start, finite.min()) * 1.5 + 1e-12)


def _check(start_lr, end_lr, num_steps, smooth, diverge_factor) -> None:
    if not 0 < start_lr < end_lr or not math.isfinite(end_lr):
        raise ConfigError(f"need 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ConfigError(f"num_steps must be an int >= 2 (100 to 300 is usual), got {num_steps}")
    if not 0 <= smooth < 1:
        raise ConfigError(f"smooth must be in [0, 1), got {smooth}")
    if not diverge_factor > 1:
        raise ConfigError(f"diverge_factor must be > 1, got {diverge_factor}")


def lr_find(
    model: nn.Module,
    variables: Mapping[str, Any],
    rules: partition.Rules,
    loader: Iterable[Mapping[str, Any]],
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    optimizer: str | Callable[..., Any] = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    loss_reduction: str = "mean",
    smooth: float = 0.98,
    diverge_factor: float = 4.0,
    bn_policy: str = "train",
    compute_dtype: Any = None,
    seed: int = 0,
    arch: str | None = None,
    log: Callable[[str], Any] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **optimizer_kw,
) -> LRFindResult:
    """Runs the range test and reads a suggestion off it.

    Step i (0-based) updates with base rate ``exponential_lrs(start_lr, end_lr,
    num_steps)[i]``; its recorded loss is the one computed before that update, as in fastai.
    The sweep stops after the step whose smoothed loss exceeds `diverge_factor` times the
    lowest smoothed loss so far, or before recording a non-finite loss.

    Args:
        model: a module from `jt.models.create`.
        variables: its {"params", "batch_stats"}; not modified.
        rules: who trains how fast (`jtransfer.partition`), as for the real run: multipliers
            scale the swept rate; frozen groups stay bit-identical.
        loader: training batches {"image", "label"}, e.g. `data.make_loader(folder,
            train=True, num_epochs=None)`; a finite one is iterated again when exhausted.
            Images float32 normalised, or uint8 pixels normalised on the device.
        start_lr: first base rate.
        end_lr: last base rate.
        num_steps: steps of the full sweep (100 to 300 is usual).
        optimizer, momentum, weight_decay: as for `partition.make_optimizer`.
        **optimizer_kw: other options of `partition.make_optimizer`.
        loss_reduction: "mean" (torch's default) or "sum" (d2l's; the good rates are then
            about batch-size times smaller).
        smooth: beta of `smooth_losses`.
        diverge_factor: stop once the smoothed loss exceeds this times its minimum.
        bn_policy: "train" or "frozen", see `jtransfer.train`.
        compute_dtype: e.g. jnp.bfloat16, see `train.make_train_step`.
        seed: the train state's PRNG seed (dropout).
        arch: the registry name of `model`; default: inferred.
        log: called with a short progress line every tenth of the sweep; None for silence.
        mean: per-channel mean for uint8 batches; default: the uint8 loader's
            (``loader.mean``), else ImageNet's.
        std: per-channel standard deviation for uint8 batches; default: as `mean`.

    Returns:
        An `LRFindResult`.

    Raises:
        ConfigError: bad arguments, rules not covering the params, or an empty loader.
    """
    from jtransfer import fit

    _check(start_lr, end_lr, num_steps, smooth, diverge_factor)
    arch = arch or fit.infer_arch(model)
    mean, std = fit.normalization(mean, std, loader)
    tx = partition.make_optimizer(
        variables["params"],
        rules,
        learning_rate=_schedule(start_lr, end_lr, num_steps),
        optimizer=optimizer,
        momentum=momentum,
        weight_decay=weight_decay,
        **optimizer_kw,
    )
    step = train.make_train_step(
        model,
        tx,
        loss_reduction=loss_reduction,
        bn_policy=bn_policy,
        frozen_stages=fit.frozen_stages_for(arch, rules),
        compute_dtype=compute_dtype,
        frozen_params=partition.frozen_params(variables["params"], rules),
        mean=mean,
        std=std,
    )
    state = train.create_train_state(model, variables, tx, seed)
    planned = exponential_lrs(start_lr, end_lr, num_steps)
    losses: list[float] = []
    stopped = False
    best = math.inf
    avg = 0.0
    batches = _Cycle(loader)
    try:
        for i in range(num_steps):
            state, metrics = step(state, batches.next())
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                stopped = True
                break
            losses.append(loss)
            avg = smooth * avg + (1 - smooth) * loss
            smoothed_now = avg / (1 - smooth ** (i + 1))
            best = min(best, smoothed_now)
            if log is not None and (i + 1) % max(1, num_steps // 10) == 0:
                log(f"lr-find step {i + 1}/{num_steps}: lr {planned[i]:.2e}, loss {loss:.4f}")
            if smoothed_now > diverge_factor * best:
                stopped = i + 1 < num_steps
                break
    finally:
        batches.close()
    if not losses:
        raise ConfigError(
            f"the loss was not finite at the first step (lr {start_lr:g}): check the inputs "
            "are finite and ImageNet-normalised, or lower start_lr"
        )
    lrs = planned[: len(losses)]
    smoothed = smooth_losses(losses, smooth)
    return LRFindResult(
        lrs=lrs,
        losses=np.asarray(losses, np.float64),
        smoothed=smoothed,
        suggestion=steepest(lrs, smoothed),
        stopped_early=stopped,
        end_lr=float(end_lr),
    )


class _Cycle:
    """Batches from a loader, starting it again when it runs out."""

    def __init__(self, loader: Iterable[Mapping[str, Any]]) -> None:
        self._loader = loader
        self._it = iter(loader)

    def next(self) -> Mapping[str, Any]:
        try:
            return next(self._it)
        except StopIteration:
            self.close()
            self._it = iter(self._loader)
            try:
                return next(self._it)
            except StopIteration:
                raise ConfigError("the loader gave no batch") from None

    def close(self) -> None:
        if hasattr(self._it, "close"):
            self._it.close()


# ---------------------------------------------------------------------------
# Command line


_DESCRIPTION = """\
Learning-rate range test: train briefly while the learning rate grows exponentially from
--start-lr to --end-lr, plot the loss against it, and suggest a rate (the steepest descent of
the smoothed loss, fastai's "steep"). The model, weights, freezing, head multiplier and
optimizer options are finetune's, so the suggestion is the --lr to pass to finetune with the
same options. Nothing is saved but the plot (lr_find.png) and the numbers (lr_find.json).

DATA is an image folder (one sub-folder per class), or a folder holding train/ (used) and
test/ or val/ (ignored).
"""


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from jtransfer import models
    from jtransfer.cli import BATCH_DTYPES

    # fmt: off
    p.add_argument("--data", required=True, metavar="DIR",
                   help="image folder, or a folder with train/ (see above)")
    p.add_argument("--arch", default=None, choices=models.ARCHS, metavar="ARCH",
                   help="architecture (default: the config.json's of timm --weights, else "
                   f"resnet18): {', '.join(models.ARCHS)}")
    p.add_argument("--weights", default="DEFAULT", metavar="PATH|TAG|hf-hub:ORG/NAME|none",
                   help="a local .pth/.safetensors state_dict, a torchvision tag (DEFAULT, "
                   "IMAGENET1K_V1, ...), a timm checkpoint (hf-hub:timm/resnet50.a1_in1k, or "
                   "a local directory; its preprocessing is used) or none for random init "
                   "(default: DEFAULT)")
    p.add_argument("--freeze", nargs="+", default=["none"], metavar="WHAT",
                   help="none (default), backbone, or the first stages to freeze, as finetune")
    p.add_argument("--head-lr-mult", type=float, default=10.0, metavar="X",
                   help="learning-rate multiplier of the new classifier (default: 10)")
    p.add_argument("--optimizer", choices=partition.OPTIMIZERS, default="sgd",
                   help="sgd (default), adam or adamw")
    p.add_argument("--momentum", type=float, default=0.9,
                   help="SGD momentum (default: 0.9; ignored by adam/adamw)")
    p.add_argument("--weight-decay", type=float, default=1e-4,
                   help="weight decay, as torch.optim (default: 1e-4)")
    p.add_argument("--loss-reduction", choices=("mean", "sum"), default="mean",
                   help="cross-entropy over the batch: mean (default) or sum (d2l)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step (default: 32)")
    p.add_argument("--image-size", type=int, default=224,
                   help="training crop size (default: 224)")
    p.add_argument("--start-lr", type=float, default=1e-7, help="first rate (default: 1e-7)")
    p.add_argument("--end-lr", type=float, default=10.0, help="last rate (default: 10)")
    p.add_argument("--num-steps", type=int, default=100,
                   help="steps of the sweep (default: 100; 100 to 300 is usual)")
    p.add_argument("--workers", type=int, default=0,
                   help="data-loading worker processes (default: 0)")
    p.add_argument("--batch-dtype", choices=BATCH_DTYPES, default=BATCH_DTYPES[0],
                   help="uint8 pixels normalised in the compiled step, or float32 normalised "
                   f"by the loader: the same numbers (default: {BATCH_DTYPES[0]})")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of shuffling, augmentation and head init (default: 0)")
    p.add_argument("--out", default="runs/lr_find", metavar="DIR",
                   help="where lr_find.png and lr_find.json go (default: runs/lr_find)")
    # fmt: on


def add_parser(subparsers: Any, *, parents: Sequence[argparse.ArgumentParser] = ()):
    """Adds the ``lr-find`` command to `python -m jtransfer`'s subparsers.

    Args:
        subparsers: what ``parser.add_subparsers()`` returned.
        parents: parent parsers (e.g. the CLI's common ``--debug``).

    Returns:
        The new sub-parser; dispatch to `run(args, argv)`.
    """
    p = subparsers.add_parser(
        "lr-find",
        parents=list(parents),
        help="find a learning rate (range test, plot and suggestion)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    return p


def _train_folder(root: Path):
    from jtransfer import data

    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"--data {root} {what}; pass an image folder (one sub-folder per class)")
    return data.ImageFolder(root / "train" if (root / "train").is_dir() else root)


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Runs ``lr-find`` for parsed arguments (see `add_parser`); returns the exit code."""
    from jtransfer import _cliutil, cli, data, models

    args.arch = cli._weights_arch(args.arch, args.weights)
    positive = {"--batch-size": args.batch_size, "--num-steps": args.num_steps - 1,
                "--image-size": args.image_size}  # fmt: skip
    bad = [f"{k} {v}" for k, v in positive.items() if v < 1]
    if bad:
        raise ConfigError(f"invalid value(s): {', '.join(bad)}")
    folder = _train_folder(Path(args.data).expanduser())
    view = cli._preprocessing(args.weights, args.image_size)  # timm weights: their own
    loader = data.make_loader(
        folder,
        batch_size=args.batch_size,
        train=True,
        seed=args.seed,
        num_epochs=None,
        worker_count=args.workers,
        image_size=args.image_size,
        **view.loader_kwargs(train=True),
        dtype=np.dtype(args.batch_dtype),
    )
    num_classes = len(folder.classes)
    model = models.create(args.arch, num_classes=num_classes)
    variables = _cliutil.initial_variables(args, model, num_classes)
    rules = _cliutil.freeze_rules(args.arch, args.freeze, args.head_lr_mult)
    print(f"{args.arch}, {num_classes} classes, {len(folder)} images in {folder.root}")
    print(partition.rules_table(variables["params"], rules))
    print(f"sweeping the base lr from {args.start_lr:g} to {args.end_lr:g} over "
          f"{args.num_steps} steps of {args.batch_size} images ({args.optimizer}, momentum "
          f"{args.momentum:g}, weight decay {args.weight_decay:g}, {args.loss_reduction} "
          "loss)")  # fmt: skip
    t0 = time.perf_counter()
    result = lr_find(
        model,
        variables,
        rules,
        loader,
        start_lr=args.start_lr,
        end_lr=args.end_lr,
        num_steps=args.num_steps,
        optimizer=args.optimizer,
        momentum=args.momentum if args.optimizer == "sgd" else 0.0,
        weight_decay=args.weight_decay,
        loss_reduction=args.loss_reduction,
        seed=args.seed,
        arch=args.arch,
        log=print,
    )
    out = Path(args.out)
    title = f"{args.arch} on {Path(folder.root).name}, freeze {' '.join(args.freeze)}"
    png = result.plot(out / "lr_find.png", title=title)
    record = {"command": list(argv) if argv is not None else None, **result.to_dict()}
    (out / "lr_find.json").write_text(json.dumps(record, indent=1))
    how = "diverged and stopped" if result.stopped_early else "ran to the end"
    print(f"the sweep {how} after {len(result.lrs)} steps ({time.perf_counter() - t0:.1f} s)")
    print(f"suggested --lr {result.suggestion:.2e} (steepest descent of the smoothed loss; "
          f"fastai's valley rule: {result.suggest('valley'):.2e})")  # fmt: skip
    print(f"wrote {png} and {out / 'lr_find.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jtransfer.lr_find ...``: the ``lr-find`` command on its own.

    Returns:
        0 on success, 1 on a failure (one line on stderr), 2 on a usage error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog=PROG, description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        return run(args, argv)
    except (JTransferError, OSError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
