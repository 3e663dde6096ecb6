"""Who trains how fast: parameter rules as data -> one optax transform.

A rule list is an ordered list of `(regex, spec)` pairs. Each regex is matched
with `re.fullmatch` (as big_vision does) against a parameter's '/'-joined path
inside `variables["params"]`, e.g. `layer1_0/conv1/kernel` or `classifier_6/bias`.
fullmatch, not search: with search, `conv1` would also catch
`layer1_0/conv1/kernel`; with fullmatch a rule says exactly what it covers.

Every parameter must be matched by exactly one rule. Rules are NOT
first-match-wins: a parameter that no rule or several rules match is an error
that lists the paths, so an overlap can never silently decide a learning rate.

A spec is a `Group` (label, lr multiplier, frozen, weight decay) or shorthand:
a float multiplier, an optax schedule (step -> multiplier), or "frozen".
Most users need no regex: `groups(arch)` names each model stage, and
`rules`, `preset`, `finetune`, `layerwise` and `gradual_unfreeze` build rule
lists from those names. `make_optimizer` turns rules into an
`optax.multi_transform` where frozen labels get `optax.set_to_zero()` (no
optimizer state at all) and the rest torch-style SGD / Adam / AdamW.

Example:
    >>> import jtransfer as jt
    >>> from jtransfer import partition
    >>> rules = partition.finetune("resnet18", head_lr_mult=10.0)
    >>> [(regex, g.name, g.lr_mult) for regex, g in rules]
    [('(?!fc/).*', 'backbone', 1.0), ('fc/.*', 'head', 10.0)]
    >>> model = jt.models.create("resnet18", num_classes=2)
    >>> params = jt.models.random_variables(model, image_size=32)["params"]
    >>> print(partition.rules_table(params, rules))
    label     #tensors     #params  lr mult  frozen
    backbone        60  11,176,512        1  no
    head             2       1,026       10  no
    total           62  11,177,538
    >>> tx = partition.make_optimizer(params, rules, learning_rate=5e-5, weight_decay=1e-3)
    >>> opt_state = tx.init(params)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtransfer import models
from jtransfer.errors import ConfigError

Schedule = optax.Schedule
Spec = Union["Group", float, str, Schedule]
Rule = tuple[str, Spec]
Rules = Sequence[Rule]

FROZEN = "frozen"
_SHOWN_PATHS = 20  # paths listed in an error before "... and N more"


@dataclass(frozen=True)
class Group:
    """How the parameters of one label train.

    Attributes:
        name: the label (shown in `rules_table`, key of `optax.multi_transform`).
        lr_mult: multiplier of the base learning rate, or a schedule
            `step -> multiplier`. A step at which a schedule gives 0 is a frozen
            step: no update and the label's optimizer state is left untouched,
            as torch does for a parameter with `requires_grad=False`.
        frozen: never trained: `optax.set_to_zero()`, no optimizer state, no
            weight decay. A static `lr_mult` of 0 means the same.
        weight_decay: overrides `make_optimizer`'s `weight_decay` for this label.
    """

    name: str
    lr_mult: float | Schedule = 1.0
    frozen: bool = False
    weight_decay: float | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a Group needs a non-empty string name, got {self.name!r}")
        if not callable(self.lr_mult):
            if isinstance(self.lr_mult, bool) or not isinstance(self.lr_mult, (int, float)):
                raise ConfigError(
                    f"Group {self.name!r}: lr_mult must be a number or a schedule "
                    f"(step -> multiplier), got {self.lr_mult!r}"
                )
            if self.lr_mult < 0:
                raise ConfigError(
                    f"Group {self.name!r}: lr_mult must be >= 0, got {self.lr_mult}; "
                    "use 0 or frozen=True to freeze"
                )
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ConfigError(
                f"Group {self.name!r}: weight_decay must be >= 0 or None, got {self.weight_decay}"
            )

    @property
    def is_frozen(self) -> bool:
        """Statically frozen: `frozen=True` or a constant multiplier of 0."""
        return self.frozen or (not callable(self.lr_mult) and self.lr_mult == 0)

    def mult_at(self, step) -> float | jax.Array:
        """The lr multiplier at `step` (0 when frozen)."""
        if self.is_frozen:
            return 0.0
        return self.lr_mult(step) if callable(self.lr_mult) else self.lr_mult


def as_group(spec: Spec, name: str | None = None) -> Group:
    """Expands shorthand into a Group.

    Args:
        spec: a Group (returned as is), "frozen", a float multiplier or a schedule.
        name: label for shorthand; default "frozen", "x<mult>" (e.g. "x10") or
            "schedule" for a callable.

    Returns:
        The Group.
    """
    if isinstance(spec, Group):
        return spec
    if isinstance(spec, str):
        if spec != FROZEN:
            raise ConfigError(
                f'unknown spec {spec!r}: use "frozen", a float, a schedule or a Group'
            )
        return Group(name or FROZEN, frozen=True)
    if callable(spec):
        return Group(name or "schedule", lr_mult=spec)
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise ConfigError(f'unknown spec {spec!r}: use "frozen", a float, a schedule or a Group')
    return Group(name or f"x{spec:g}", lr_mult=float(spec))


# ---------------------------------------------------------------------------
# Named groups per model family, derived from the registry.


@functools.lru_cache(maxsize=32)
def _abstract_params(arch: str) -> dict:
    """The params tree of `arch` as ShapeDtypeStructs (no compute)."""
    model = models.create(arch)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    return shapes["params"]


def _resnet_stage_patterns(arch: str, fam: models.Family) -> dict[str, str]:
    # Stages after the stem are `<stage>_<block>` modules plus the head; the stem
    # is whatever top-level module belongs to none of them (conv1, bn1).
    stem, *blocks, head_stage = fam.stages
    out = {s: rf"{s}_\d+/.*" for s in blocks}
    out[head_stage] = rf"{re.escape(fam.head)}/.*"
    claimed = [re.compile(p) for p in out.values()]
    stem_modules = sorted(
        m for m in _abstract_params(arch) if not any(c.fullmatch(f"{m}/x") for c in claimed)
    )
    return {stem: rf"({'|'.join(map(re.escape, stem_modules))})/.*", **out}


def _vgg_stage_patterns(arch: str, fam: models.Family) -> dict[str, str]:
    # Walk the cfg as VGG._forward numbers `features_<idx>`: a conv, then its
    # BatchNorm if any, then a ReLU; each "M" pool closes a block.
    from jtransfer.models import vgg

    variant = fam.variants[arch]
    *block_names, classifier = fam.stages
    out, idx, with_params = {}, 0, []
    for v in variant["cfg"]:
        if v == vgg.M:
            out[block_names[len(out)]] = rf"features_({'|'.join(map(str, with_params))})/.*"
            idx, with_params = idx + 1, []
            continue
        with_params.append(idx)
        if variant["batch_norm"]:
            with_params.append(idx + 1)
        idx += 3 if variant["batch_norm"] else 2
    out[classifier] = r"classifier_\d+/.*"
    return out


_STAGE_PATTERNS = {"resnet": _resnet_stage_patterns, "vgg": _vgg_stage_patterns}


def groups(arch: str) -> dict[str, str]:
    """The model's stages as named groups: {stage name: path regex}, in forward order.

    ResNet: "stem" (conv1, bn1), "layer1".."layer4", "fc". VGG: "block1".."block5"
    (the `features_*` layers up to each max-pool), "classifier" (classifier_0/3/6).
    The names are `jt.models.family(arch).stages`.

    Args:
        arch: one of `jt.models.ARCHS`.

    Returns:
        Ordered dict of group name -> regex (fullmatch on the '/'-joined param path).

    Example:
        >>> groups("resnet18")["layer1"]
        'layer1_\\\\d+/.*'
    """
    fam = models.family(arch)
    return _STAGE_PATTERNS[fam.name](arch, fam)


def _head_patterns(arch: str) -> tuple[str, str]:
    """(backbone regex, head regex): the head layer that `num_classes` resizes, and the rest."""
    head = re.escape(models.family(arch).head)
    return rf"(?!{head}/).*", rf"{head}/.*"


# ---------------------------------------------------------------------------
# Rule builders.


def rules(arch: str, *, default: Spec | None = None, **specs: Spec) -> list[Rule]:
    """A rule list from group names, so no regex is needed.

    Args:
        arch: one of `jt.models.ARCHS`.
        default: spec of every group not named in `specs`; None leaves them out
            (then `label_params` reports their parameters as uncovered).
        **specs: group name (see `groups(arch)`) -> spec. Shorthand specs are
            labelled with the group name; a `Group` keeps its own name, so two
            groups given the same Group share one label.

    Returns:
        [(regex, Group), ...] in the model's stage order.

    Example:
        >>> r = rules("resnet18", default="frozen", layer4=1.0, fc=10.0)
        >>> [g.name for _, g in r]
        ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'fc']
    """
    named = groups(arch)
    unknown = sorted(set(specs) - set(named))
    if unknown:
        raise ConfigError(
            f"{arch} has no group(s) {', '.join(map(repr, unknown))}; "
            f"choose from: {', '.join(named)}"
        )
    out = []
    for name, pattern in named.items():
        spec = specs.get(name, default)
        if spec is not None:
            out.append((pattern, as_group(spec, name)))
    return out


PRESETS = ("head", "backbone", "full")


def preset(arch: str, name: str) -> list[Rule]:
    """Common freezing patterns with two labels, "backbone" and "head".

    The head is the layer `num_classes` resizes (ResNet `fc`, VGG
    `classifier_6`); the backbone is every other parameter (for VGG that
    includes classifier_0 and classifier_3).

    Args:
        arch: one of `jt.models.ARCHS`.
        name: "head": train only the head, backbone frozen (feature extraction,
            d2l's / torch's `requires_grad=False` on the body); "backbone": train
            the backbone, head frozen (e.g. a fixed or already-trained
            classifier); "full": both trained at the base learning rate.

    Returns:
        The rule list.

    Example:
        >>> [(g.name, g.is_frozen) for _, g in preset("resnet18", "head")]
        [('backbone', True), ('head', False)]
    """
    trained = {"head": ("head",), "backbone": ("backbone",), "full": ("backbone", "head")}
    if name not in trained:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    backbone, head = _head_patterns(arch)
    return [
        (backbone, Group("backbone", frozen="backbone" not in trained[name])),
        (head, Group("head", frozen="head" not in trained[name])),
    ]


def finetune(arch: str, head_lr_mult: float | Schedule = 10.0) -> list[Rule]:
    """d2l's fine-tuning recipe: backbone at the base lr, the new head at 10x.

    Args:
        arch: one of `jt.models.ARCHS`.
        head_lr_mult: multiplier of the head's learning rate.

    Returns:
        [(backbone regex, Group("backbone", 1.0)), (head regex, Group("head", head_lr_mult))].

    Example:
        >>> [(g.name, g.lr_mult) for _, g in finetune("vgg16")]
        [('backbone', 1.0), ('head', 10.0)]
    """
    backbone, head = _head_patterns(arch)
    return [(backbone, Group("backbone", 1.0)), (head, Group("head", head_lr_mult))]


def layerwise(arch: str, decay: float) -> list[Rule]:
    """timm-style layer-wise lr decay over the model's stages.

    With stages s_0..s_D (`groups(arch)`, the last one holding the head), stage
    i gets multiplier `decay ** (D - i)`: the head stage 1.0, the stem `decay**D`.

    Args:
        arch: one of `jt.models.ARCHS`.
        decay: in (0, 1].

    Returns:
        One rule per stage, labelled with the stage name.

    Example:
        >>> [round(g.lr_mult, 4) for _, g in layerwise("resnet18", 0.5)]
        [0.0312, 0.0625, 0.125, 0.25, 0.5, 1.0]
    """
    if not 0 < decay <= 1:
        raise ConfigError(f"layer decay must be in (0, 1], got {decay}")
    named = groups(arch)
    depth = len(named) - 1
    return [
        (pattern, Group(name, decay ** (depth - i)))
        for i, (name, pattern) in enumerate(named.items())
    ]


def unfreeze_at(step: int, lr_mult: float | Schedule = 1.0) -> Schedule:
    """A multiplier schedule: 0 before `step`, `lr_mult` from `step` on.

    Use it as any group's spec to unfreeze stages one after the other without
    re-compiling, e.g. `rules(arch, layer4=unfreeze_at(100), fc=10.0, default="frozen")`.

    Args:
        step: first step that trains (a step counts optimizer updates, from 0).
        lr_mult: multiplier from then on; a schedule is evaluated at the global step.

    Returns:
        step -> multiplier.
    """
    if step < 0:
        raise ConfigError(f"unfreeze step must be >= 0, got {step}")

    def schedule(count):
        after = lr_mult(count) if callable(lr_mult) else lr_mult
        return jnp.where(jnp.asarray(count) < step, 0.0, after)

    return schedule


def gradual_unfreeze(
    arch: str,
    frozen_steps: int,
    head_lr_mult: float = 10.0,
    body_lr_mult: float = 1.0,
) -> list[Rule]:
    """Train the head alone for `frozen_steps`, then everything, in one compile.

    The backbone's multiplier is a schedule (0, then `body_lr_mult`), so the
    optimizer state has one structure across both phases: one jitted update
    serves the whole run and a checkpoint resumes across the phase change.
    While it is 0 the backbone's optimizer state is not touched, so the first
    unfrozen step is torch's first step after `requires_grad=True` (momentum
    buffer = that step's gradient). Pass `frozen_prefix_schedule(arch, rules)`'s
    value as the model's traced `frozen_stages` so BatchNorm keeps its running
    statistics while frozen.

    Args:
        arch: one of `jt.models.ARCHS`.
        frozen_steps: steps (optimizer updates) with the backbone frozen.
        head_lr_mult: head multiplier throughout.
        body_lr_mult: backbone multiplier once unfrozen.

    Returns:
        [(backbone regex, Group("backbone", schedule)), (head regex, Group("head", head_lr_mult))].
    """
    backbone, head = _head_patterns(arch)
    return [
        (backbone, Group("backbone", unfreeze_at(frozen_steps, body_lr_mult))),
        (head, Group("head", head_lr_mult)),
    ]


# ---------------------------------------------------------------------------
# Matching rules against parameters.


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _listing(lines: list[str]) -> list[str]:
    shown = [f"  {line}" for line in lines[:_SHOWN_PATHS]]
    if len(lines) > _SHOWN_PATHS:
        shown.append(f"  ... and {len(lines) - _SHOWN_PATHS} more")
    return shown


def _compile(rule_list: Rules) -> tuple[list[tuple[re.Pattern, Group]], dict[str, Group]]:
    if isinstance(rule_list, (str, Mapping)) or not isinstance(rule_list, Sequence):
        raise ConfigError(
            "rules must be a list of (regex, spec) pairs, e.g. finetune(arch) or "
            f"[(r'fc/.*', 10.0), (r'(?!fc/).*', 1.0)]; got {type(rule_list).__name__}"
        )
    compiled, by_label = [], {}
    for i, rule in enumerate(rule_list):
        if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ConfigError(f"rule {i} must be a (regex, spec) pair, got {rule!r}")
        pattern, spec = rule
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"rule {i}: invalid regex {pattern!r}: {e}") from None
        group = as_group(spec)
        if by_label.setdefault(group.name, group) != group:
            raise ConfigError(
                f"label {group.name!r} is given two different specs: {by_label[group.name]} "
                f"and {group}; give each spec its own name, or reuse the same Group object"
            )
        compiled.append((regex, group))
    return compiled, by_label


def _check_params(params) -> None:
    if isinstance(params, Mapping) and "params" in params and "batch_stats" in params:
        raise ConfigError(
            'got the whole variables dict ({"params", "batch_stats"}); pass variables["params"]'
        )


def _resolve(params, rule_list: Rules) -> tuple[Any, dict[str, Group]]:
    """(labels pytree, {label: Group}); raises if a path matches no rule or several."""
    _check_params(params)
    compiled, by_label = _compile(rule_list)
    uncovered, ambiguous = [], []

    def label(path, _):
        p = _path_str(path)
        hits = [(i, g) for i, (rx, g) in enumerate(compiled) if rx.fullmatch(p)]
        if not hits:
            uncovered.append(p)
            return None
        if len(hits) > 1:
            which = ", ".join(f"rule {i} {compiled[i][0].pattern!r}" for i, _ in hits)
            ambiguous.append(f"{p}: {which}")
        return hits[0][1].name

    labels = jax.tree_util.tree_map_with_path(label, params)
    if uncovered or ambiguous:
        lines = []
        if uncovered:
            lines.append(f"{len(uncovered)} parameter(s) match no rule:")
            lines += _listing(uncovered)
        if ambiguous:
            lines.append(f"{len(ambiguous)} parameter(s) match several rules:")
            lines += _listing(ambiguous)
        lines.append(
            "Every parameter must match exactly one rule (re.fullmatch on the '/'-joined "
            "path; rules are not first-match-wins). Fix: add a rule for the uncovered paths "
            "and make overlapping regexes disjoint (e.g. r'(?!fc/).*' for 'all but fc'), or "
            "build rules from group names with partition.rules(arch, default=..., **specs) "
            "(names: partition.groups(arch))."
        )
        raise ConfigError("\n".join(lines))
    return labels, by_label


def label_params(params, rule_list: Rules):
    """The label of every parameter: a pytree of strings shaped like `params`.

    Args:
        params: `variables["params"]` (arrays or ShapeDtypeStructs).
        rule_list: [(regex, spec), ...]; each regex must fullmatch exactly the
            paths it is meant for.

    Returns:
        Pytree of label strings, the `param_labels` of `optax.multi_transform`.

    Raises:
        ConfigError: listing the paths that match no rule or several.

    Example:
        >>> label_params({"fc": {"bias": 0.0}, "conv1": {"kernel": 0.0}}, finetune("resnet18"))
        {'conv1': {'kernel': 'backbone'}, 'fc': {'bias': 'head'}}
    """
    return _resolve(params, rule_list)[0]


def frozen_params(params, rule_list: Rules):
    """Which parameters are frozen for the whole run: a pytree of bools like `params`.

    True for a leaf whose label is statically frozen (`Group.is_frozen`: "frozen",
    `frozen=True` or a constant multiplier 0); a schedule that may unfreeze
    later counts as trained. Pass it as `train.make_train_step(frozen_params=...)`
    so that the frozen leaves' gradients are constant zeros, free even where the
    step reads every gradient (`skip_nonfinite`); `jtransfer.fit` and `lr_find`
    do.

    Args:
        params: `variables["params"]` (arrays or ShapeDtypeStructs).
        rule_list: the rules the optimizer was made from.

    Returns:
        Pytree of Python bools.

    Example:
        >>> frozen_params({"fc": {"bias": 0.0}, "conv1": {"kernel": 0.0}},
        ...               preset("resnet18", "head"))
        {'conv1': {'kernel': True}, 'fc': {'bias': False}}
    """
    labels, by_label = _resolve(params, rule_list)
    return jax.tree.map(lambda label: by_label[label].is_frozen, labels)


def _mult_text(group: Group) -> str:
    if group.is_frozen:
        return "-"
    if callable(group.lr_mult):
        return f"{float(group.lr_mult(0)):g} (sched)"
    return f"{group.lr_mult:g}"


def rules_table(params, rule_list: Rules) -> str:
    """A printable summary: one row per label.

    Columns: label, #tensors, #params, lr mult (the value at step 0 followed by
    "(sched)" for a schedule; "-" when frozen), frozen.

    Args:
        params: `variables["params"]` (arrays or ShapeDtypeStructs).
        rule_list: the rules.

    Returns:
        The table as text, ending with a total row.
    """
    labels, by_label = _resolve(params, rule_list)
    counts = {name: [0, 0] for name in by_label}
    for lab, leaf in zip(jax.tree.leaves(labels), jax.tree.leaves(params), strict=True):
        counts[lab][0] += 1
        counts[lab][1] += int(np.prod(np.shape(leaf)))
    rows = [("label", "#tensors", "#params", "lr mult", "frozen")]
    for name, group in by_label.items():
        n_t, n_p = counts[name]
        rows.append((name, str(n_t), f"{n_p:,}", _mult_text(group), _frozen_text(group)))
    total_t = sum(c[0] for c in counts.values())
    total_p = sum(c[1] for c in counts.values())
    rows.append(("total", str(total_t), f"{total_p:,}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    align = ["<", ">", ">", ">", "<"]
    return "\n".join(
        "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(r, align, widths, strict=True)).rstrip()
        for r in rows
    )


def _frozen_text(group: Group) -> str:
    if group.is_frozen:
        return "yes"
    return "at step 0" if callable(group.lr_mult) and float(group.lr_mult(0)) == 0 else "no"


# ---------------------------------------------------------------------------
# Rules -> optax.


class GatedState(NamedTuple):
    """State of a transform that pauses while its lr multiplier is 0."""

    count: jax.Array
    inner: optax.OptState


def _pause_when_zero(inner: optax.GradientTransformation, mult: Schedule):
    """`inner`, but a step where `mult(step) == 0` outputs 0 and keeps the state as it was."""

    def init_fn(params):
        return GatedState(jnp.zeros([], jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None):
        active = jnp.asarray(mult(state.count)) != 0
        new_updates, new_inner = inner.update(updates, state.inner, params)
        new_updates = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates)
        new_inner = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_inner, state.inner)
        return new_updates, GatedState(optax.safe_increment(state.count), new_inner)

    return optax.GradientTransformation(init_fn, update_fn)


def _times(lr: float | Schedule, mult: float | Schedule) -> float | Schedule:
    if not callable(lr) and not callable(mult):
        return lr * mult  # Python floats, as torch computes a param group's lr

    def schedule(count):
        a = lr(count) if callable(lr) else lr
        b = mult(count) if callable(mult) else mult
        return a * b

    return schedule


OPTIMIZERS = ("sgd", "adam", "adamw")


def _chain(*transforms: optax.GradientTransformation) -> optax.GradientTransformation:
    return optax.chain(*transforms) if transforms else optax.identity()


def _label_transform(group, learning_rate, optimizer, momentum, nesterov, weight_decay, kw):
    if group.is_frozen:
        return optax.set_to_zero()
    lr = _times(learning_rate, group.lr_mult)
    wd = weight_decay if group.weight_decay is None else group.weight_decay
    coupled = [optax.add_decayed_weights(wd)] if wd else []
    tail = [optax.scale_by_learning_rate(lr)]
    if callable(optimizer):
        stateful = _chain(*coupled, optimizer(lr, **kw))
        tail = []
    elif optimizer == "sgd":
        stateful = _chain(*coupled, *([optax.trace(momentum, nesterov)] if momentum else []))
    elif optimizer == "adam":
        stateful = _chain(*coupled, optax.scale_by_adam(nesterov=nesterov, **kw))
    else:  # adamw: decoupled decay, scaled by the lr as optax.adamw and torch.optim.AdamW do
        stateful = optax.scale_by_adam(nesterov=nesterov, **kw)
        tail = [*([optax.add_decayed_weights(wd)] if wd else []), *tail]
    if callable(group.lr_mult):
        stateful = _pause_when_zero(stateful, group.lr_mult)
    return _chain(stateful, *tail)


def make_optimizer(
    params,
    rule_list: Rules,
    *,
    learning_rate: float | Schedule,
    optimizer: str | Callable[..., optax.GradientTransformation] = "sgd",
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    **kw,
) -> optax.GradientTransformation:
    """One optax transform for all labels: `optax.multi_transform` over the rules.

    Per label (lr = `learning_rate * lr_mult`, both may be schedules, multiplied per step):

    * frozen: `optax.set_to_zero()` -- zero updates, no optimizer state, no decay;
    * "sgd": `chain(add_decayed_weights(wd), trace(momentum, nesterov),
      scale_by_learning_rate(lr))`, which is exactly torch.optim.SGD with one
      param group per label (coupled decay: d = g + wd*p; buf = m*buf + d; p -= lr*buf);
    * "adam": coupled decay then Adam (torch.optim.Adam's `weight_decay`);
    * "adamw": Adam then decoupled decay scaled by lr (optax.adamw, torch.optim.AdamW);
    * a callable `optimizer(lr, **kw) -> GradientTransformation`: coupled decay
      (if `weight_decay`) then your transform.

    A label whose multiplier is a schedule pauses while the multiplier is 0: zero
    update and untouched state (momentum, Adam moments and step count), as torch
    behaves for `requires_grad=False` parameters. For a callable optimizer this
    pauses its own schedule's count too.

    Args:
        params: `variables["params"]` (arrays or ShapeDtypeStructs).
        rule_list: the rules, e.g. `finetune(arch)`.
        learning_rate: base lr (a float or an optax schedule).
        optimizer: "sgd", "adam", "adamw" or a callable as above.
        momentum: SGD momentum (torch's, dampening 0); 0 keeps no buffer.
        nesterov: Nesterov momentum (SGD), or NAdam for "adam"/"adamw".
        weight_decay: default decay of every trained label (Group.weight_decay overrides).
        **kw: options of `optax.scale_by_adam` (b1, b2, eps, ...) or of the callable.

    Returns:
        The GradientTransformation; `init(params)` holds state only for trained labels.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"conv1": {"kernel": jnp.ones((3, 3, 3, 8))},
        ...           "fc": {"kernel": jnp.ones((8, 2)), "bias": jnp.ones(2)}}
        >>> tx = make_optimizer(params, finetune("resnet18"), learning_rate=0.5)
        >>> grads = jax.tree.map(jnp.ones_like, params)
        >>> updates, _ = tx.update(grads, tx.init(params), params)
        >>> float(updates["conv1"]["kernel"][0, 0, 0, 0]), float(updates["fc"]["bias"][0])
        (-0.5, -5.0)
    """
    _, by_label = _resolve(params, rule_list)
    if not callable(optimizer) and optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)} or a "
            "callable lr -> optax.GradientTransformation"
        )
    if momentum < 0 or weight_decay < 0:
        raise ConfigError(
            f"momentum and weight_decay must be >= 0, got {momentum} and {weight_decay}"
        )
    if optimizer != "sgd" and momentum:
        raise ConfigError(
            f"momentum={momentum} is an SGD option; for {optimizer!r} pass b1=... instead"
        )
    if optimizer == "sgd" and nesterov and not momentum:
        raise ConfigError("nesterov=True needs momentum > 0 (as torch.optim.SGD requires)")
    if optimizer == "sgd" and kw:
        raise ConfigError(f"SGD takes no options {sorted(kw)}; use momentum/nesterov/weight_decay")
    if callable(optimizer) and nesterov:
        raise ConfigError("nesterov applies to the built-in optimizers; configure your callable")
    transforms = {
        name: _label_transform(
            group, learning_rate, optimizer, momentum, nesterov, weight_decay, kw
        )
        for name, group in by_label.items()
    }
    return optax.multi_transform(transforms, label_params(params, rule_list))


# ---------------------------------------------------------------------------
# Rules -> the model's `frozen_stages`.


def _stage_groups(arch: str, rule_list: Rules) -> list[list[Group]]:
    """For each stage (forward order), the Groups its parameters are labelled with."""
    labels, by_label = _resolve(_abstract_params(arch), rule_list)
    stage_rx = [re.compile(p) for p in groups(arch).values()]
    per_stage: list[set[str]] = [set() for _ in stage_rx]

    def visit(path, lab):
        p = _path_str(path)
        for i, rx in enumerate(stage_rx):
            if rx.fullmatch(p):
                per_stage[i].add(lab)

    jax.tree_util.tree_map_with_path(visit, labels)
    return [[by_label[name] for name in sorted(labs)] for labs in per_stage]


def frozen_prefix(arch: str, rule_list: Rules) -> int:
    """How many leading stages are statically frozen: the model's static `frozen_stages`.

    Passing it as `frozen_stages` makes the model stop gradients after that
    prefix (no backward through it) and run its BatchNorm on running statistics.

    Args:
        arch: one of `jt.models.ARCHS` (stages: `groups(arch)`).
        rule_list: the rules.

    Returns:
        The number of leading stages whose every parameter is frozen.

    Example:
        >>> frozen_prefix("resnet18", preset("resnet18", "head"))
        5
    """
    n = 0
    for stage in _stage_groups(arch, rule_list):
        if not all(g.is_frozen for g in stage):
            break
        n += 1
    return n


def frozen_prefix_schedule(arch: str, rule_list: Rules) -> Callable[[Any], jax.Array]:
    """`frozen_prefix` per step, for schedule multipliers: step -> int32 scalar.

    At each step, the number of leading stages whose every label is frozen or has
    multiplier 0. Pass it as the model's traced `frozen_stages` (BatchNorm keeps
    running statistics in those stages) without re-compiling. `step` counts
    optimizer updates done before this one, as the optimizer's own count does.

    Args:
        arch: one of `jt.models.ARCHS`.
        rule_list: the rules.

    Returns:
        A jittable function of the step.

    Example:
        >>> f = frozen_prefix_schedule("resnet18", gradual_unfreeze("resnet18", 100))
        >>> int(f(99)), int(f(100))
        (5, 0)
    """
    stages = _stage_groups(arch, rule_list)

    def at(step):
        zero = jnp.stack(
            [
                jnp.all(jnp.stack([jnp.asarray(g.mult_at(step)) == 0 for g in stage] or [True]))
                for stage in stages
            ]
        )
        return jnp.sum(jnp.cumprod(zero.astype(jnp.int32))).astype(jnp.int32)

    return at


__all__ = [
    "FROZEN",
    "OPTIMIZERS",
    "PRESETS",
    "GatedState",
    "Group",
    "Rule",
    "Rules",
    "Spec",
    "as_group",
    "finetune",
    "frozen_params",
    "frozen_prefix",
    "frozen_prefix_schedule",
    "gradual_unfreeze",
    "groups",
    "label_params",
    "layerwise",
    "make_optimizer",
    "preset",
    "rules",
    "rules_table",
    "unfreeze_at",
]
