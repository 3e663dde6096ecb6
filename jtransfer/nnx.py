"""Flax NNX: the same models, weights and recipes, as stateful `nnx.Module` objects.

The Linen modules of `jtransfer.models` stay the one model definition. A `Model`
holds a Linen module and its variables as NNX `Param` / `BatchStat` objects laid
out by the Linen paths (``conv1/kernel``, ``layer1_0/bn1/mean``, the layout
``flax.nnx.bridge.ToNNX`` gives), and every forward pass is that Linen module's
``apply``. So ported weights, `partition` rules, the BatchNorm policy and the frozen
prefix of `jtransfer.train` mean here what they mean there, and a training run ends
where the Linen one ends (tests/test_nnx.py checks it bit for bit).

Why not ``ToNNX`` itself: its call treats every attribute of the wrapper as a Linen
variable, so it cannot carry the ``use_running_average`` flag that NNX's
``module.eval()`` / ``module.train()`` switch, and it replaces the BatchNorm
statistics' objects on each update where `Model` updates them in place.

* `from_torchvision`, `create`, `from_variables` make a `Model`; `to_variables` gives
  back Linen ``{"params", "batch_stats"}`` for `porting.to_torchvision`,
  `jtransfer.features` or `jtransfer.checkpoint`.
* ``module(x)`` gives logits, ``module.features(x)`` the pre-logits and
  ``module.feature_maps(x)`` every stage, as the Linen methods do. A new `Model` is
  in training mode (as torch's and NNX's modules are): ``module.eval()`` runs
  BatchNorm on running statistics (and turns VGG's dropout off), ``module.train()``
  back.
* `make_optimizer` is `partition.make_optimizer` over the module's params, as an
  `nnx.Optimizer`; `train_step` and `eval_step` are `nnx.jit`-compiled and share
  `jtransfer.train`'s loss, BatchNorm policy and frozen prefix; `make_train_step`
  binds the train step to one module and optimizer, for less Python per step.
* `training_state` / `load_training_state` turn a module and its optimizer into the
  pytree `jtransfer.checkpoint.Checkpointer` saves, and back.

Example:
    >>> import jax.numpy as jnp
    >>> import jtransfer.nnx as jnnx
    >>> from jtransfer import partition
    >>> module = jnnx.create("resnet18", num_classes=2)
    >>> rules = partition.preset("resnet18", "head")  # train fc only
    >>> opt = jnnx.make_optimizer(module, rules, learning_rate=0.1, momentum=0.9)
    >>> batch = {"image": jnp.zeros((2, 32, 32, 3)), "label": jnp.array([0, 1])}
    >>> metrics = jnnx.train_step(module, opt, batch, frozen_stages=5)
    >>> int(metrics["count"]), int(opt.step[...])
    (2, 1)
    >>> module.eval()
    >>> module(batch["image"]).shape
    (2, 2)
    >>> variables = jnnx.to_variables(module)  # Linen variables, e.g. for porting.to_torchvision
    >>> variables["params"]["fc"]["kernel"].shape
    (512, 2)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.nnx.bridge import variables as bridge_variables

from jtransfer import models, partition, train
from jtransfer.errors import ConfigError

Array = jax.Array
Variables = dict[str, Any]
Batch = Mapping[str, Array]
Metrics = dict[str, Array]

# Attributes of `Model` itself; a Linen top-level layer may not use these names.
_OWN = ("arch", "linen", "use_running_average", "rngs")


class Model(nnx.Module):
    """A jtransfer Linen model and its variables as one NNX module.

    Build it with `create`, `from_variables` or `from_torchvision`. The layers' variables
    are attributes named as the Linen layers (``module.fc["kernel"]`` is an `nnx.Param`,
    ``module.bn1["mean"]`` an `nnx.BatchStat`); `to_variables` gives the Linen dict.

    Attributes:
        arch: the architecture name, one of `jtransfer.models.ARCHS`.
        linen: the Linen module every forward pass applies.
        use_running_average: BatchNorm on running statistics (and no dropout): set by
            ``module.eval()``, cleared by ``module.train()``.
        rngs: the dropout stream (VGG's classifier in training mode).
    """

    def __init__(self, arch: str, linen: nn.Module, variables: Mapping[str, Any], seed: int = 0):
        """Wraps `linen` with `variables` (checked to fit); use the factory functions."""
        train._check_fits(linen, variables)
        self.arch = arch
        self.linen = linen
        self.use_running_average = False
        self.rngs = nnx.Rngs(dropout=seed)
        tree = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
        # Copies: the module's arrays are its own, whoever else holds the variables.
        tree = jax.tree.map(jnp.array, tree)
        for name, layer in bridge_variables.linen_vars_to_nnx_attrs(tree).items():
            if name in _OWN:
                raise ConfigError(f"{arch}: a layer named {name!r} would hide Model.{name}")
            setattr(self, name, nnx.data(layer))

    def __call__(self, x: Array, frozen_stages: int | Array = 0) -> Array:
        """Logits (N, num_classes) for ImageNet-normalised NHWC float32 images.

        Args:
            x: the images, (N, H, W, 3).
            frozen_stages: as the Linen model's (`jtransfer.train`): in training mode the
                first k stages run BatchNorm on running statistics, and a static k stops
                the gradient at their end.
        """
        return self._apply(x, None, frozen_stages)

    def features(self, x: Array, frozen_stages: int | Array = 0) -> Array:
        """Pre-logits, as the Linen ``model.features``: ResNet's pooled layer4, VGG's 4096-d."""
        return self._apply(x, type(self.linen).features, frozen_stages)

    def feature_maps(self, x: Array, frozen_stages: int | Array = 0) -> dict[str, Array]:
        """Every stage's output by name, as the Linen ``model.feature_maps``."""
        return self._apply(x, type(self.linen).feature_maps, frozen_stages)

    def _apply(self, x: Array, method: Callable[..., Any] | None, frozen_stages) -> Any:
        variables = _linen_variables(self)
        if self.use_running_average:
            return self.linen.apply(variables, x, method=method)
        out, updates = self.linen.apply(
            variables,
            x,
            train=True,
            frozen_stages=frozen_stages,
            method=method,
            mutable=["batch_stats"],
            rngs={"dropout": self.rngs.dropout()},
        )
        _set_batch_stats(self, updates.get("batch_stats", {}))  # VGG without BN has none
        return out


def _linen_variables(module: Model) -> Variables:
    return {
        "params": nnx.to_pure_dict(nnx.state(module, nnx.Param)),
        "batch_stats": nnx.to_pure_dict(nnx.state(module, nnx.BatchStat)),
    }


def _set_batch_stats(module: Model, batch_stats: Mapping[str, Any]) -> None:
    state = nnx.state(module, nnx.BatchStat)
    nnx.replace_by_pure_dict(state, batch_stats)
    nnx.update(module, state)


def _check_module(module: Any, what: str) -> Model:
    if not isinstance(module, Model):
        raise ConfigError(
            f"{what} takes a jtransfer.nnx.Model, got {type(module).__name__}; build one with "
            "jtransfer.nnx.create, from_variables or from_torchvision"
        )
    return module


# ---------------------------------------------------------------------------
# Making a module, and its Linen variables.


def from_variables(
    arch: str, variables: Mapping[str, Any], *, seed: int = 0, **model_kwargs: Any
) -> Model:
    """A `Model` holding Linen `variables` (copied).

    Args:
        arch: one of `jtransfer.models.ARCHS`.
        variables: ``{"params", "batch_stats"}``, e.g. from `porting.from_torchvision` or
            `jtransfer.checkpoint.load_for_inference`; ``num_classes`` is read from the head.
        seed: seed of the dropout stream.
        **model_kwargs: options of `jtransfer.models.create` (``dtype``, VGG's ``dropout``).

    Returns:
        The module, in training mode.

    Raises:
        ConfigError: unknown `arch`, or variables that do not fit it (each problem listed).
    """
    fam = models.family(arch)
    if not isinstance(variables, Mapping) or "params" not in variables:
        got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ConfigError(
            f"from_variables needs {{'params': ..., 'batch_stats': ...}}, got {got}; a "
            "TrainState's are {'params': state.params, 'batch_stats': state.batch_stats}"
        )
    head = variables["params"].get(fam.head, {}).get("kernel")
    if head is None:
        raise ConfigError(
            f"the variables have no {fam.head}/kernel, so they are not {arch}'s; pass the "
            "arch they were made for"
        )
    linen = models.create(arch, num_classes=int(head.shape[-1]), **model_kwargs)
    return Model(arch, linen, variables, seed)


def create(arch: str, num_classes: int = 1000, *, seed: int = 0, **model_kwargs: Any) -> Model:
    """A `Model` with random weights (`jtransfer.models.random_variables`), no compile.

    He-normal kernels and random BatchNorm statistics: for tests, benchmarks and
    from-scratch baselines. For torch's own initialisation use
    ``from_variables(arch, jtransfer.models.init(linen, key))``.

    Args:
        arch: one of `jtransfer.models.ARCHS`.
        num_classes: classes of the head.
        seed: seed of the weights and of the dropout stream.
        **model_kwargs: options of `jtransfer.models.create`.

    Returns:
        The module, in training mode.

    Raises:
        ConfigError: unknown `arch` or `num_classes` < 1.
    """
    linen = models.create(arch, num_classes=num_classes, **model_kwargs)
    return Model(arch, linen, models.random_variables(linen, image_size=32, seed=seed), seed)


def from_torchvision(
    src: str | os.PathLike | Mapping[str, Any],
    arch: str,
    num_classes: int | None = None,
    *,
    seed: int = 0,
    **model_kwargs: Any,
) -> Model:
    """A `Model` holding torchvision weights, ported by `porting.from_torchvision`.

    torch is imported here, not when `jtransfer.nnx` is.

    Args:
        src: a torchvision state_dict, or a ``.pth`` / ``.safetensors`` path.
        arch: the architecture it belongs to, one of `jtransfer.models.ARCHS`.
        num_classes: None keeps the checkpoint's; another number re-initialises the head
            and warns with `porting.HeadReinitialized`.
        seed: seed of a re-initialised head and of the dropout stream.
        **model_kwargs: options of `jtransfer.models.create`.

    Returns:
        The module, in training mode.

    Raises:
        PortingError: listing every missing, unexpected and mis-shaped key.
    """
    import porting

    variables = porting.from_torchvision(src, arch, num_classes=num_classes, seed=seed)
    return from_variables(arch, variables, seed=seed, **model_kwargs)


def from_pretrained(
    arch: str | None,
    weights: str | os.PathLike = "DEFAULT",
    num_classes: int | None = None,
    *,
    seed: int = 0,
    **model_kwargs: Any,
) -> Model:
    """A `Model` from any source `porting.load_pretrained` takes.

    torchvision tags and files, and timm weights (``hf-hub:timm/resnet50.a1_in1k``, or a
    local directory / file with its config.json; see the weights guide).

    Args:
        arch: one of `jtransfer.models.ARCHS`; None takes timm's config.json's.
        weights: as in `porting.load_pretrained`.
        num_classes: None keeps the checkpoint's; another number re-initialises the head.
        seed: seed of a re-initialised head and of the dropout stream.
        **model_kwargs: options of `jtransfer.models.create`.

    Returns:
        The module, in training mode.
    """
    import porting
    from porting import hub

    if hub.is_timm_source(weights):
        arch, variables, _ = hub.load_timm(weights, arch, num_classes=num_classes, seed=seed)
    else:
        _, variables = porting.load_pretrained(arch, weights, num_classes, seed=seed)
    return from_variables(arch, variables, seed=seed, **model_kwargs)


def to_variables(module: Model) -> Variables:
    """A copy of the module's Linen variables ``{"params", "batch_stats"}``.

    For `porting.to_torchvision`, `jtransfer.features`, `jtransfer.checkpoint` or the
    Linen model ``module.linen.apply``. A copy, because the train steps donate the
    module's own arrays: it stays valid as training goes on.
    """
    return _copy(_linen_variables(_check_module(module, "to_variables")))


def _copy(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


# ---------------------------------------------------------------------------
# Recipes: the optimizer and the jitted steps.


def make_optimizer(module: Model, rule_list: partition.Rules, **options: Any) -> nnx.Optimizer:
    """`partition.make_optimizer` over the module's params, as an `nnx.Optimizer`.

    The rules mean what they mean for Linen: a frozen label has no optimizer state and
    gets no update, multipliers scale the learning rate, a schedule multiplier of 0 pauses
    a label (gradual unfreezing, `partition.gradual_unfreeze`).

    Args:
        module: a `Model`.
        rule_list: the rules, e.g. `partition.finetune(module.arch)`.
        **options: `partition.make_optimizer`'s (``learning_rate``, ``optimizer``,
            ``momentum``, ``nesterov``, ``weight_decay``, ...).

    Returns:
        ``nnx.Optimizer(module, tx, wrt=nnx.Param)``; its ``step`` counts updates.

    Raises:
        ConfigError: as `partition.make_optimizer` (parameters no rule or several rules
            match, bad options).
    """
    params = nnx.as_pure(nnx.state(_check_module(module, "make_optimizer"), nnx.Param))
    tx = partition.make_optimizer(params, rule_list, **options)
    return nnx.Optimizer(module, tx, wrt=nnx.Param)


def train_step(
    module: Model,
    optimizer: nnx.Optimizer,
    batch: Batch,
    *,
    loss_reduction: str = "sum",
    bn_policy: str = "train",
    frozen_stages: train.FrozenStages = 0,
) -> Metrics:
    """One jitted training step: updates `module` and `optimizer` in place.

    The loss, BatchNorm policy and frozen prefix are `jtransfer.train.make_train_step`'s
    (its ``_loss_fn``), whatever mode the module is in: this step runs the model in
    training mode. It donates the module's and optimizer's arrays, as the Linen step
    donates its state: an array read out of them before the step
    (``module.fc["kernel"][...]``) is deleted by it, while `to_variables` and
    `training_state` give copies, which stay valid.

    Args:
        module: a `Model`.
        optimizer: from `make_optimizer` on this module.
        batch: ``{"image": (N, H, W, 3), "label": int32 (N,)}``, the images float32
            normalised or uint8 pixels normalised in the step with ImageNet's mean and std
            (`jtransfer.train.normalize_images`).
        loss_reduction: "sum" (d2l) or "mean" (torch's default).
        bn_policy: "train" (torch ``net.train()``) or "frozen" (running statistics).
        frozen_stages: a static int k: the first k stages run BatchNorm on running
            statistics and no backward pass runs through them (e.g.
            ``partition.frozen_prefix(module.arch, rules)``); or a function of the step,
            e.g. ``partition.frozen_prefix_schedule(module.arch, rules)``, evaluated at
            ``optimizer.step`` (make it once: each new function compiles a new step).

    Returns:
        "loss" (the differentiated loss) and the summable "loss_sum", "correct", "count"
        (`jtransfer.train.summarize`).

    Raises:
        ConfigError: an unknown option, or more frozen stages than the model has.
    """
    _check_step(module, optimizer, loss_reduction, bn_policy, frozen_stages, "train_step")
    return _train_step(module, optimizer, batch, loss_reduction, bn_policy, frozen_stages)


def make_train_step(
    module: Model,
    optimizer: nnx.Optimizer,
    *,
    loss_reduction: str = "sum",
    bn_policy: str = "train",
    frozen_stages: train.FrozenStages = 0,
) -> Callable[[Batch], Metrics]:
    """`train_step` bound to one module and optimizer: ``step(batch) -> metrics``.

    The same compiled computation with less Python per call: the module and optimizer
    are flattened once, here (``nnx.jit_partial``), where `train_step` walks them at
    every call (docs/performance.md has the difference). Their variables still update
    in place, so `to_variables`, `training_state` and `load_training_state` work as
    with `train_step`; their structure must not change while the step is in use.

    Args:
        module: a `Model`.
        optimizer: from `make_optimizer` on this module.
        loss_reduction: as for `train_step`.
        bn_policy: as for `train_step`.
        frozen_stages: as for `train_step`.

    Returns:
        The jitted step, updating `module` and `optimizer` in place.

    Raises:
        ConfigError: an unknown option, or more frozen stages than the model has.
    """
    _check_step(module, optimizer, loss_reduction, bn_policy, frozen_stages, "make_train_step")
    body = functools.partial(
        _train_step_body,
        loss_reduction=loss_reduction,
        bn_policy=bn_policy,
        frozen_stages=frozen_stages,
    )
    # Argument 0 of the jitted function is the list of bound module and optimizer arrays.
    return nnx.jit_partial(body, module, optimizer, donate_argnums=0, graph=False)


def _check_step(module, optimizer, loss_reduction, bn_policy, frozen_stages, what) -> None:
    _check_module(module, what)
    train._check_options(module.linen, loss_reduction, bn_policy, frozen_stages)
    if not isinstance(optimizer, nnx.Optimizer):
        raise ConfigError(
            f"{what} takes an nnx.Optimizer, got {type(optimizer).__name__}; make one "
            "with jtransfer.nnx.make_optimizer(module, rules, learning_rate=...)"
        )


def _train_step_body(module, optimizer, batch, loss_reduction, bn_policy, frozen_stages):
    fs = frozen_stages
    if callable(fs):
        # The Linen step evaluates the schedule at its int32 step; this one counts updates.
        fs = jnp.asarray(fs(optimizer.step[...].astype(jnp.int32)), jnp.int32)
    loss_fn = train._loss_fn(module.linen, loss_reduction, bn_policy)
    rng = module.rngs.dropout()

    def loss(m: Model):
        variables = _linen_variables(m)
        value, (batch_stats, metrics) = loss_fn(
            variables["params"], variables["batch_stats"], batch, rng, fs
        )
        _set_batch_stats(m, batch_stats)
        return value, metrics

    grads, metrics = nnx.grad(loss, has_aux=True)(module)
    optimizer.update(module, grads)
    return metrics


# Tree mode (graph=False): NNX's cheaper call path; a Model shares no Variable objects.
# Donated as the Linen step donates its state: the step writes every parameter (a frozen
# one too, unchanged), and without donation each write would be a copy.
_train_step = nnx.jit(
    _train_step_body, static_argnums=(3, 4, 5), donate_argnums=(0, 1), graph=False
)


def eval_step(module: Model, batch: Batch) -> Metrics:
    """One jitted evaluation step, BatchNorm on running statistics (any module mode).

    Args:
        module: a `Model`.
        batch: as for `train_step`.

    Returns:
        "loss" (mean over the batch) and the summable "loss_sum", "correct", "count", as
        `jtransfer.train.make_eval_step`'s (which this runs).
    """
    return _eval_step(_check_module(module, "eval_step"), batch)


@functools.partial(nnx.jit, graph=False)
def _eval_step(module, batch):
    return _linen_eval_step(module.linen)(_linen_variables(module), batch)


@functools.lru_cache(maxsize=8)
def _linen_eval_step(linen: nn.Module) -> Callable[[Variables, Batch], Metrics]:
    return train.make_eval_step(linen)


# ---------------------------------------------------------------------------
# Checkpoints.


def training_state(module: Model, optimizer: nnx.Optimizer) -> dict[str, Any]:
    """What a checkpoint of an NNX run holds, as one pytree of arrays.

    ``{"step", "params", "batch_stats", "opt_state", "rng"}``, laid out as a Linen
    `jtransfer.train.TrainState`, so `jtransfer.checkpoint.Checkpointer` saves it and
    `jtransfer.checkpoint.load_for_inference` reads its weights back.

    Args:
        module: a `Model`.
        optimizer: its optimizer.

    Returns:
        The pytree: copies, which later (donating) train steps leave valid.
    """
    return {
        "step": jnp.copy(optimizer.step[...]),
        **to_variables(module),
        "opt_state": _copy(nnx.as_pure(optimizer.opt_state)),
        "rng": {  # raw key bits: Orbax saves uint32 arrays, not typed PRNG keys
            "key": jax.random.key_data(module.rngs.dropout.key[...]),
            "count": jnp.copy(module.rngs.dropout.count[...]),
        },
    }


def load_training_state(module: Model, optimizer: nnx.Optimizer, state: Mapping[str, Any]) -> None:
    """Puts a `training_state` (e.g. restored by a Checkpointer) into `module` and `optimizer`.

    Args:
        module: a `Model` of the same arch and classes as the saved one.
        optimizer: made by `make_optimizer` with the same rules and options.
        state: the restored pytree.

    Raises:
        ConfigError: the state does not fit the module or the optimizer.
    """
    _check_module(module, "load_training_state")
    train._check_fits(module.linen, state)
    want = jax.tree.structure(nnx.as_pure(optimizer.opt_state))
    if jax.tree.structure(state["opt_state"]) != want:
        raise ConfigError(
            "the saved optimizer state does not fit this optimizer; make it with the same "
            "rules and options (momentum, optimizer) as the run that saved it"
        )
    for name in ("params", "batch_stats"):
        target = nnx.state(module, nnx.Param if name == "params" else nnx.BatchStat)
        nnx.replace_by_pure_dict(target, state[name])
        nnx.update(module, target)
    stream = module.rngs.dropout
    stream.key[...] = jax.random.wrap_key_data(
        jnp.asarray(state["rng"]["key"]), impl=jax.random.key_impl(stream.key[...])
    )
    stream.count[...] = jnp.asarray(state["rng"]["count"], stream.count[...].dtype)
    nnx.update(optimizer.opt_state, nnx.state(state["opt_state"]))
    optimizer.step[...] = jnp.asarray(state["step"], optimizer.step[...].dtype)


__all__ = [
    "Model",
    "create",
    "eval_step",
    "from_torchvision",
    "from_variables",
    "load_training_state",
    "make_optimizer",
    "make_train_step",
    "to_variables",
    "train_step",
    "training_state",
]
