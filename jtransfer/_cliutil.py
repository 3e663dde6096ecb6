"""What the shell commands share: `--freeze` as partition rules, `--weights` as variables.

`jtransfer.cli` (finetune) and `jtransfer.lr_find` (lr-find) both read these options, and the
lr-find command is part of the CLI; keeping them here lets each import this module and
neither import the other.
"""

from __future__ import annotations

import argparse
import re
import warnings
from collections.abc import Sequence

from jtransfer.errors import ConfigError

__all__ = ["freeze_rules", "initial_variables"]


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
