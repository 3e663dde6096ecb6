"""What the shell commands share: `--freeze` as partition rules, `--weights` as variables,
and the library's errors told in the command line's own terms.

`jtransfer.cli` (finetune) and `jtransfer.lr_find` (lr-find) both read these options, and the
lr-find command is part of the CLI; keeping them here lets each import this module and
neither import the other.
"""

from __future__ import annotations

import argparse
import re
import shlex
import warnings
from collections.abc import Sequence
from pathlib import Path

from jtransfer.errors import ConfigError

__all__ = ["freeze_rules", "initial_variables", "user_message"]

PROG = "python -m jtransfer"


def freeze_rules(
    arch: str,
    freeze: Sequence[str],
    head_lr_mult: float,
    *,
    unfreeze_step: int | None = None,
):
    """--freeze and --head-lr-mult as a partition rule list (labels frozen/backbone/head).

    With `unfreeze_step` (--unfreeze-after, in steps) the frozen label's multiplier is
    `partition.unfreeze_at(unfreeze_step)`: 0 until then, 1 after, in one optimizer state.
    """
    from jtransfer import heads, partition

    if head_lr_mult <= 0:
        raise ConfigError(f"--head-lr-mult must be > 0, got {head_lr_mult}")
    head = re.escape(heads.head_name(arch))
    head_rx = rf"{head}/.*"
    stages = list(partition.groups(arch))
    freezable = stages[:-1]  # the last stage holds the new classifier
    words = list(freeze)

    def frozen(name: str) -> partition.Group:
        if unfreeze_step is None:
            return partition.Group(name, frozen=True)
        return partition.Group(name, partition.unfreeze_at(unfreeze_step))

    if words == ["none"]:
        return [
            (rf"(?!{head}/).*", partition.Group("backbone", 1.0)),
            (head_rx, partition.Group("head", head_lr_mult)),
        ]
    if words == ["backbone"]:
        return [
            (rf"(?!{head}/).*", frozen("backbone")),
            (head_rx, partition.Group("head", head_lr_mult)),
        ]
    unknown = [w for w in words if w not in freezable]
    if unknown:
        raise ConfigError(
            f"--freeze {' '.join(unknown)}: not a stage of {arch}; use none, backbone, or "
            f"the first stages among: {' '.join(freezable)}"
        )
    prefix = freezable[: len(set(words))]
    if set(words) != set(prefix):
        raise ConfigError(
            f"--freeze {' '.join(words)}: frozen stages must be the first ones (a frozen stage "
            f"after a trained one would still need its backward pass); e.g. --freeze "
            f"{' '.join(freezable[: freezable.index(words[-1]) + 1])}"
        )
    groups = partition.groups(arch)
    frozen_rx = "|".join(f"(?:{groups[s]})" for s in prefix)
    return [
        (f"(?!{head}/)(?:{frozen_rx})", frozen("frozen")),
        (f"(?!{head}/)(?!(?:{frozen_rx})$).*", partition.Group("backbone", 1.0)),
        (head_rx, partition.Group("head", head_lr_mult)),
    ]


def initial_variables(args: argparse.Namespace, model, num_classes: int):
    """The starting variables of --weights: a state_dict file, a torchvision tag, or none.

    Args:
        args: parsed options with ``weights``, ``arch`` and ``seed``.
        model: the module the variables are for.
        num_classes: the classifier size; a pretrained head of another size is replaced
            (printed as a note).

    Returns:
        {"params", "batch_stats"}.
    """
    import jax

    import jtransfer as jt

    if args.weights.lower() == "none":
        return jt.models.init(model, jax.random.PRNGKey(args.seed), image_size=32)
    import porting

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", porting.HeadReinitialized)
        _, variables = porting.load_pretrained(
            args.arch, args.weights, num_classes=num_classes, seed=args.seed
        )
    for w in caught:
        if issubclass(w.category, porting.HeadReinitialized):
            print(f"note: {' '.join(str(w.message).split())}")
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return variables


# ---------------------------------------------------------------------------
# Errors in the command line's terms


def _out(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "out", None) or f"runs/{args.arch}").expanduser()


def _has_checkpoints(out: Path) -> bool:
    from jtransfer import checkpoint

    return bool(checkpoint.checkpoint_steps(out))


def _bad_image(e, args: argparse.Namespace) -> str:
    head = f"cannot decode image {e.path}: {e.reason}. The file is missing, corrupt or truncated"
    if args.command == "predict":  # predict leaves it out and classifies the others anyway
        return f"{head}; it was left out"
    if not hasattr(args, "skip_bad_images"):
        return f"{head}; delete or replace it"
    out = _out(args) if args.command == "finetune" else None
    if out is not None and _has_checkpoints(out):
        # --skip-bad-images changes the training set, so it cannot resume this run.
        return (
            f"{head}; delete or replace it and run the same command again to resume from the "
            f"last checkpoint in --out {out}, or leave unreadable images out with "
            "--skip-bad-images in a new run (with a new --out)"
        )
    return f"{head}; delete or replace it, or add --skip-bad-images to leave unreadable images out"


def _no_full_batch(e, args: argparse.Namespace) -> str:
    fits = e.examples * e.shard_count
    per = f" ({e.examples} per process)" if e.shard_count > 1 else ""
    return (
        f"{e.root} has {fits} training images{per}, fewer than one batch of --batch-size "
        f"{e.batch_size * e.shard_count}: use --batch-size {fits} or less, or add images"
    )


def _data_changed(e, args: argparse.Namespace) -> str:
    names = {"num_examples": "training images", "steps_per_epoch": "steps per epoch"}
    details = "; ".join(
        f"{names.get(k, k)}: {old} then, {new} now" for k, (old, new) in e.changed.items()
    )
    out = _out(args)
    return (
        f"the training data in --data {args.data} changed since the checkpoint in --out {out} "
        f"was saved ({details}), so the run cannot resume the same sequence of batches. Put "
        f"the data back as it was to resume this run, or train on the data as it is now in a "
        f"new run: the same command with a new --out"
    )


def _run_in_use(e, args: argparse.Namespace) -> str:
    out = shlex.quote(str(e.directory))
    return e.advice(
        name=f"--out {e.directory}",
        other="pass another --out",
        readers=f"`{PROG} predict --checkpoint {out}` and `{PROG} export` read",
    )


# Python keywords in library messages (jtransfer and porting), and what the command line
# calls them. Each is checked against the real message in tests/test_cli.py.
_PHRASES = (
    (r"\(max_to_keep=(\d+) \+ keep_best=(\d+) \+ 1 being written\)",
     r"(the latest \1 + --keep-best \2 + 1 being written)"),
    (r"choose another directory, or keep fewer checkpoints",
     "choose another --out, or keep fewer checkpoints (a smaller --keep-best)"),
    (r"Delete the directory \(or use another one\) to start from scratch",
     "Delete the --out directory (or pass another --out) to start from scratch"),
    (r"or use a new checkpoint directory", "or pass a new --out"),
    (r"pass arch='(\w+)'", r"pass --arch \1"),
    (r"Pass the architecture the weights were trained with",
     "Pass the --arch the weights were trained with"),
    (r"pass skip_bad_images=True", "add --skip-bad-images"),
    (r"try compute_dtype=None \(float32\) if you use bfloat16",
     "try --compute-dtype float32 if you use bfloat16"),
    (r"pass weights='([^']*)' \(CLI: --weights [^)]*\)", r"pass --weights \1"),
    (r"\(or pass the path of a local copy instead\)", "(or pass a local copy with --weights PATH)"),
    (r"Check the path, or pass a state_dict\.", "Check the --weights path."),
    (r"Pass checkpoint\['(\w+)'\] instead\.",
     r"Save checkpoint['\1'] alone (torch.save(checkpoint['\1'], 'weights.pth')) and pass "
     r"--weights weights.pth."),
    (r" and pass model\.state_dict\(\) \(or the dict of tensors\) instead\.",
     ", save its state_dict (torch.save(sd, 'weights.pth')) and pass --weights weights.pth."),
    (r"Or pass a path to a local \.pth file\.",
     "Or pass --weights with the path of a local .pth file."),
    (r"; save with Checkpointer\(\.\.\., metadata=\{.*?\}\)",
     "; pass the --out directory of a finetune run"),
    (r"^which must be", "--which must be"),
    (r"^seed must be an int", "--seed must be an int"),
)  # fmt: skip


def user_message(e: BaseException, args: argparse.Namespace) -> str | None:
    """The library error `e` told in the terms of the command the user typed, or None.

    The library's messages name Python keywords (``skip_bad_images=True``,
    ``drop_remainder=False``); a shell user needs the flag instead, or another fix when the
    command has no such flag.
    """
    from jtransfer import checkpoint, data

    command = getattr(args, "command", None)
    if isinstance(e, checkpoint.RunInUseError) and e.holder is not None:
        return _run_in_use(e, args)
    if isinstance(e, data.BadImageError) and e.path:
        return _bad_image(e, args)
    if isinstance(e, data.NoFullBatchError) and e.batch_size and command != "predict":
        return _no_full_batch(e, args)
    if isinstance(e, data.LoaderStateMismatchError) and command == "finetune":
        return _data_changed(e, args)
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    changed = text
    for pattern, replacement in _PHRASES:
        changed = re.sub(pattern, replacement, changed)
    return changed if changed != text else None
