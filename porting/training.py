"""Training parity: the same weights and batches through torch and jtransfer, step by step.

A `Scenario` is one fine-tuning recipe written once: learning rate, momentum,
weight decay, loss reduction and `jtransfer.partition` rules. `run_torch`
trains a torchvision model with it (torch.optim.SGD, one param group per lr
multiplier, `requires_grad=False` for frozen parameters, `net.train()`),
`run_jax` trains the ported model with `partition.make_optimizer` and
`train.make_train_step`, and `compare` gives per step the relative error of the
loss, the gradients, the updated parameters and the BatchNorm running statistics.

BatchNorm in a frozen part: jtransfer runs it on running statistics (one
meaning everywhere, see `jtransfer.train`). torch's `net.train()` would still
update the running statistics of frozen layers (and normalise them with batch
statistics), so the torch side puts the statically frozen stages in `eval()`
mode, as feature extraction does (seed 004).

What float32 allows: where the backward pass runs through training-mode
BatchNorm and ReLUs (d2l's full fine-tuning, seed 003's layer4), a
pre-activation within rounding of 0 can land on either side of the ReLU kink in
torch, in jtransfer or in torch float64, and with small maps one flipped element
moves a gradient far beyond rounding (docs/parity.md); the runs then drift apart
at the rate torch float32 drifts from torch float64.
`compare(float64_reference=True)` runs torch in float64 too and reports that
drift beside jtransfer's (`torch_noise`).

What float64 shows: `compare(precision="float64")` runs torch in float64 and
jtransfer in float64 (jax x64, float64 parameters and BatchNorm statistics).
There no pre-activation comes within rounding of a kink, both sides take the
same branch at every ReLU, and what is left of the difference is float64
rounding: the check of the algorithm that float32 cannot give. x64 must be
enabled before jax makes its first array, so it runs in its own process:
`python -m porting.training --float64`.

Checking the check: `compare(..., recipe_error=NAME)` trains the jax side with
one of `RECIPE_ERRORS` (a wrong head multiplier, a wrong weight decay) while
torch keeps the scenario's recipe; the errors must then be large.

`python -m porting.training` prints the per-step tables and a summary
(`--json PATH` also writes them as JSON).

Relative error of a tensor = max|jax - torch| / max|torch|, worst over tensors,
where max|torch| is the largest the tensor has been so far in the run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from flax import traverse_util

import jtransfer as jt
from jtransfer import partition, train
from porting.parity import full_float32, randomize_batchnorm, randomize_biases
from porting.torchvision import _to_torch, from_torchvision, torch_key

QUANTITIES = ("loss", "grads", "params", "batch_stats")
# Both sides compute in the same dtype: the float32 product, or float64 to check
# the algorithm where rounding cannot flip a ReLU.
# "bfloat16" is mixed precision on both sides: float32 parameters, optimizer and
# BatchNorm statistics, the forward and backward in bfloat16 (torch.autocast on the
# CPU; jtransfer's compute_dtype); its reference run is torch in float32.
PRECISIONS = {
    "float32": (torch.float32, jnp.float32),
    "float64": (torch.float64, jnp.float64),
    "bfloat16": (torch.bfloat16, jnp.bfloat16),
}


@dataclass(frozen=True)
class Scenario:
    """One recipe, run identically by `run_torch` and `run_jax`.

    Attributes:
        name: short label for reports.
        arch: one of `jt.models.ARCHS`.
        lr: base learning rate.
        rules: `jtransfer.partition` rules ((regex fullmatching the Flax path, spec));
            jax builds its optimizer from them with `partition.make_optimizer`, torch
            one param group per label (lr * multiplier) and `requires_grad=False`
            for frozen labels. `partition.frozen_prefix(arch, rules)` stages are
            frozen statically on the jax side and put in eval() mode on the torch side.
        momentum, weight_decay: torch.optim.SGD's (coupled weight decay).
        loss_reduction: "sum" (d2l) or "mean".
        num_classes: classes of the re-initialised head (Xavier-uniform weight).
        image_size, batch_size, steps: the synthetic batches.
        bn_policy: jtransfer's; "frozen" puts every torch BatchNorm in eval() mode.
        seed: weights, BN statistics and batches.
    """

    name: str
    arch: str
    lr: float
    rules: tuple[partition.Rule, ...]
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss_reduction: str = "sum"
    num_classes: int = 2
    image_size: int = 64
    batch_size: int = 4
    steps: int = 10
    bn_policy: str = "train"
    seed: int = 0

    @property
    def frozen_stages(self) -> int:
        """Leading stages whose parameters are all frozen (static on the jax side)."""
        return partition.frozen_prefix(self.arch, list(self.rules))


SCENARIOS = {
    # d2l 14.2: body lr 5e-5, fc 10x, wd 1e-3, no momentum, summed loss, new 2-class fc.
    "d2l": Scenario(
        "d2l",
        "resnet18",
        lr=5e-5,
        rules=tuple(partition.finetune("resnet18", head_lr_mult=10.0)),
        weight_decay=1e-3,
        loss_reduction="sum",
    ),
    # seed 003: per-layer groups, momentum 0.9, wd 1e-4; layer4 + fc train, the rest frozen.
    "per_layer": Scenario(
        "per_layer",
        "resnet18",
        lr=1e-3,
        rules=tuple(partition.rules("resnet18", default="frozen", layer4=1.0, fc=10.0)),
        momentum=0.9,
        weight_decay=1e-4,
        loss_reduction="mean",
    ),
    # VGG-11-BN, features frozen (blocks 1-5, BatchNorm in eval mode), dropout off; the
    # last two classifier layers train (classifier_0's 103M weights stay frozen so the
    # run fits a test's time on 2 cores).
    "vgg_frozen_features": Scenario(
        "vgg_frozen_features",
        "vgg11_bn",
        lr=1e-3,
        rules=(
            (r"features_.*|classifier_0/.*", "frozen"),
            (r"classifier_3/.*", 1.0),
            (r"classifier_6/.*", 10.0),
        ),
        momentum=0.9,
        weight_decay=5e-4,
        loss_reduction="mean",
        image_size=32,
    ),
    # d2l's rates on a VGG-11-BN whose features train: every convolution's bias feeds a
    # train-mode BatchNorm, which cancels it (see `zero_gradient_biases`). classifier_0's
    # 103M weights stay frozen so that the run fits a test's memory and time.
    "vgg_bn_features": Scenario(
        "vgg_bn_features",
        "vgg11_bn",
        lr=5e-5,
        rules=(
            (r"features_.*|classifier_3/.*", 1.0),
            (r"classifier_0/.*", "frozen"),
            (r"classifier_6/.*", 10.0),
        ),
        weight_decay=1e-3,
        loss_reduction="sum",
        image_size=72,
        batch_size=6,
        steps=4,
    ),
    # Feature extraction (seed 004): only fc trains, the backbone is frozen in eval mode.
    "frozen_backbone": Scenario(
        "frozen_backbone",
        "resnet18",
        lr=1e-2,
        rules=tuple(partition.preset("resnet18", "head")),
        momentum=0.9,
        weight_decay=1e-4,
        loss_reduction="mean",
    ),
}


def _head_rule_index(s: Scenario) -> int:
    head = f"{jt.models.family(s.arch).head}/kernel"
    hits = [i for i, (rx, _) in enumerate(s.rules) if re.fullmatch(rx, head)]
    if len(hits) != 1:
        raise ValueError(f"{s.name}: {len(hits)} rules match {head}; exactly one must")
    return hits[0]


def _head_lr_mult_off(s: Scenario) -> Scenario:
    i = _head_rule_index(s)
    rx, spec = s.rules[i]
    group = partition.as_group(spec)
    wrong = replace(group, lr_mult=group.lr_mult / 10)
    return replace(s, rules=(*s.rules[:i], (rx, wrong), *s.rules[i + 1 :]))


# Mistakes a port of a recipe can make; `compare(..., recipe_error=...)` gives one
# to the jax side only, to show that the comparison catches it.
RECIPE_ERRORS = {
    # The head trains at a tenth of its rate (d2l: 1x, the body's rate, for 10x).
    "head_lr_mult": _head_lr_mult_off,
    # Ten times the weight decay.
    "weight_decay": lambda s: replace(s, weight_decay=10 * s.weight_decay),
}


@dataclass
class StepRecord:
    """One training step, keyed by torch state_dict names, as numpy.

    `grads` is the gradient of the trainable parameters at the step's start;
    `params` (trainable ones only) and `batch_stats` the values after the update.
    `frozen_changed` lists the frozen parameters that are no longer bit-identical
    to their initial value (checked on the last step of `run_jax`; else None).
    `loss_dtype` is the dtype the loss was computed in.
    """

    loss: float
    grads: dict[str, np.ndarray]
    params: dict[str, np.ndarray]
    batch_stats: dict[str, np.ndarray]
    frozen_changed: list[str] | None = None
    loss_dtype: str = "float32"


def make_batches(s: Scenario) -> list[dict[str, np.ndarray]]:
    """`s.steps` batches of standard-normal NHWC images and random labels."""
    rng = np.random.default_rng(s.seed + 1)
    return [
        {
            "image": rng.standard_normal((s.batch_size, s.image_size, s.image_size, 3)).astype(
                np.float32
            ),
            "label": rng.integers(0, s.num_classes, s.batch_size).astype(np.int32),
        }
        for _ in range(s.steps)
    ]


def _no_dropout(arch: str) -> dict[str, float]:
    # Dropout masks cannot be shared between torch and jax; parity runs without.
    return {"dropout": 0.0} if jt.models.family(arch).name == "vgg" else {}


def _torch_model(s: Scenario) -> torch.nn.Module:
    return getattr(torchvision.models, s.arch)(num_classes=s.num_classes, **_no_dropout(s.arch))


def _jax_model(s: Scenario, dtype=jnp.float32):
    return jt.models.create(s.arch, num_classes=s.num_classes, dtype=dtype, **_no_dropout(s.arch))


def torch_net(s: Scenario) -> torch.nn.Module:
    """The scenario's torchvision model: random weights, biases and BatchNorm, a new Xavier head."""
    torch.manual_seed(s.seed)
    net = randomize_biases(randomize_batchnorm(_torch_model(s), s.seed), s.seed)
    # d2l: `finetune_net.fc = nn.Linear(512, 2); nn.init.xavier_uniform_(fc.weight)`.
    head = net.get_submodule(_torch_head(s.arch))
    torch.nn.init.xavier_uniform_(head.weight)
    return net


def _torch_head(arch: str) -> str:
    return torch_key(("params", jt.models.family(arch).head, "bias")).rpartition(".")[0]


def flax_paths(s: Scenario) -> dict[str, str]:
    """torch parameter name -> Flax path ("layer1.0.conv1.weight" -> "layer1_0/conv1/kernel")."""
    model = _jax_model(s)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = {}
    for path, _ in flat:
        keys = tuple(k.key for k in path)
        out[torch_key(("params", *keys))] = "/".join(keys)
    return out


def lr_mult_of(s: Scenario, flax_path: str) -> float | None:
    """The lr multiplier the scenario's rules give a Flax parameter path (None: frozen).

    Matched here independently of `partition` (same documented semantics:
    re.fullmatch, exactly one rule per parameter), so the torch side does not
    inherit a labelling bug from the code under test.
    """
    hits = [partition.as_group(spec) for rx, spec in s.rules if re.fullmatch(rx, flax_path)]
    if len(hits) != 1:
        raise ValueError(f"{s.name}: {len(hits)} rules match {flax_path}; exactly one must")
    group = hits[0]
    return None if group.is_frozen else float(group.lr_mult)


def _torch_stages(net: torch.nn.Module, arch: str) -> list[list[torch.nn.Module]]:
    """The modules of each of jtransfer's stages (less the head), in forward order."""
    if jt.models.family(arch).name == "resnet":
        return [[net.conv1, net.bn1], *[[getattr(net, f"layer{i}")] for i in range(1, 5)]]
    stages, current = [], []
    for m in net.features:
        current.append(m)
        if isinstance(m, torch.nn.MaxPool2d):
            stages.append(current)
            current = []
    return stages


def run_torch(
    s: Scenario,
    state_dict: dict[str, torch.Tensor],
    batches: Sequence[dict[str, np.ndarray]],
    dtype: torch.dtype = torch.float32,
) -> Iterator[StepRecord]:
    """Trains torchvision's model with the scenario's recipe; yields one record per step.

    Param groups per lr multiplier, `requires_grad=False` for frozen parameters,
    `net.train()` with the statically frozen stages in `eval()` mode.

    Args:
        s: the scenario.
        state_dict: initial weights (from `torch_net(s).state_dict()`).
        batches: NHWC numpy batches (transposed to NCHW here).
        dtype: torch.float64 gives the reference that float32 rounding is measured against;
            torch.bfloat16 is mixed precision (float32 model and optimizer, the forward
            under `torch.autocast("cpu", torch.bfloat16)`).

    Yields:
        A StepRecord per batch (lazily, so large models are not held 10 times).
    """
    autocast = dtype == torch.bfloat16
    net = _torch_model(s)
    net.load_state_dict(state_dict)
    net.to(torch.float32 if autocast else dtype)
    names = flax_paths(s)
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in net.named_parameters():
        mult = lr_mult_of(s, names[name])
        p.requires_grad_(mult is not None)
        if mult is not None:
            groups.setdefault(mult, []).append(p)
    opt = torch.optim.SGD(
        [{"params": ps, "lr": s.lr * mult} for mult, ps in groups.items()],
        lr=s.lr,
        momentum=s.momentum,
        weight_decay=s.weight_decay,
    )
    loss_fn = torch.nn.CrossEntropyLoss(reduction=s.loss_reduction)
    net.train()
    for stage in _torch_stages(net, s.arch)[: s.frozen_stages]:
        for m in stage:
            m.eval()
    if s.bn_policy == "frozen":
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    for batch in batches:
        x = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
        x = x if autocast else x.to(dtype)
        y = torch.from_numpy(batch["label"].astype(np.int64))
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = net(x)
        # The loss in float32, as jtransfer computes it.
        loss = loss_fn(logits.float() if autocast else logits, y)
        loss.backward()
        grads = {n: p.grad.numpy().copy() for n, p in trainable}
        opt.step()
        yield StepRecord(
            loss.item(),
            grads,
            {n: p.detach().numpy().copy() for n, p in trainable},
            {
                n: b.numpy().copy()
                for n, b in net.named_buffers()
                if n.endswith(("running_mean", "running_var"))
            },
            loss_dtype=str(loss.dtype).removeprefix("torch."),
        )


def _select(tree, keep: set[str]):
    """The leaves of a params tree whose '/'-joined path is in `keep`, as a nested dict."""
    flat = traverse_util.flatten_dict(tree, sep="/")
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k in keep}, sep="/")


def run_jax(
    s: Scenario,
    state_dict: dict[str, torch.Tensor],
    batches: Sequence[dict[str, np.ndarray]],
    dtype=jnp.float32,
) -> Iterator[StepRecord]:
    """Trains the ported model with `jtransfer.train`; yields one record per step.

    The optimizer is `partition.make_optimizer(params, s.rules, ...)`, the step
    `train.make_train_step(..., frozen_stages=partition.frozen_prefix(...),
    return_grads=True)`: the gradients recorded are the ones the step applied.

    Args:
        s, state_dict, batches: as `run_torch`.
        dtype: jnp.float64 computes in float64 (the model's `dtype`, float64
            parameters and statistics); jax x64 must be enabled. jnp.bfloat16 is
            mixed precision (`compute_dtype=jnp.bfloat16`, float32 parameters).

    Yields:
        A StepRecord per batch; the last one also says which frozen parameters changed.

    Raises:
        RuntimeError: float64 asked for without jax x64.
    """
    if jnp.dtype(dtype) == jnp.float64 and not jax.config.jax_enable_x64:
        raise RuntimeError(
            "float64 needs jax x64, enabled before jax makes any array: run "
            "`python -m porting.training --float64`, or set JAX_ENABLE_X64=1"
        )
    mixed = jnp.dtype(dtype) == jnp.bfloat16
    param_dtype = jnp.float32 if mixed else dtype
    variables = jax.tree.map(lambda a: a.astype(param_dtype), from_torchvision(state_dict, s.arch))
    model = _jax_model(s, param_dtype)
    tx = partition.make_optimizer(
        variables["params"],
        list(s.rules),
        learning_rate=s.lr,
        momentum=s.momentum,
        weight_decay=s.weight_decay,
    )
    trainable = {path for path in flax_paths(s).values() if lr_mult_of(s, path) is not None}
    frozen_mask = partition.frozen_params(variables["params"], list(s.rules))
    # Fingerprints, not a copy, of the frozen weights' start: the check on the last step
    # then costs no second copy of them (VGG's 103M-weight classifier_0: 0.8 GB in float64).
    frozen_at_start = {
        k: _fingerprint(v)
        for k, v in traverse_util.flatten_dict(variables["params"], sep="/").items()
        if k not in trainable
    }
    state = train.create_train_state(model, variables, tx, seed=s.seed)
    del variables
    train_step = train.make_train_step(
        model,
        tx,
        loss_reduction=s.loss_reduction,
        bn_policy=s.bn_policy,
        frozen_stages=s.frozen_stages,
        return_grads=True,
        compute_dtype=jnp.bfloat16 if mixed else None,
        # As `fit` builds it: frozen leaves get a stop_gradient.
        frozen_params=frozen_mask,
    )
    for i, batch in enumerate(batches):
        state, metrics = train_step(state, jax.tree.map(jnp.asarray, batch))
        train.check_finite(metrics, i)
        grads = _select(metrics["grads"], trainable)
        record = StepRecord(
            float(metrics["loss"]),
            _torch_named({"params": grads}, s.arch),
            _torch_named({"params": _select(state.params, trainable)}, s.arch),
            _torch_named({"batch_stats": state.batch_stats}, s.arch),
            loss_dtype=str(metrics["loss"].dtype),
        )
        if i == len(batches) - 1:
            after = traverse_util.flatten_dict(state.params, sep="/")
            record.frozen_changed = [
                k for k, start in frozen_at_start.items() if _fingerprint(after[k]) != start
            ]
        yield record


def _fingerprint(x) -> tuple[str, tuple[int, ...], bytes]:
    # Equal fingerprints: the same dtype, shape and bits (a 256-bit hash of the bytes).
    a = np.asarray(x)
    return str(a.dtype), a.shape, hashlib.sha256(np.ascontiguousarray(a).data).digest()


def _torch_named(variables, arch: str) -> dict[str, np.ndarray]:
    """{torch key: numpy array in torch's layout}, in the arrays' own dtype.

    `to_torchvision` without its float32 cast (and `num_batches_tracked`), so
    that a float64 run is compared in float64.
    """
    fam = jt.models.family(arch)
    flat = traverse_util.flatten_dict(dict(variables))
    # np.array copies: the train step donates (reuses) the buffers of the state.
    return {torch_key(p): _to_torch(np.array(v), p, fam) for p, v in flat.items()}


def _max_abs(x: np.ndarray) -> float:
    return float(np.max(np.abs(x))) if x.size else 0.0


def zero_gradient_biases(s: Scenario) -> dict[str, str]:
    """{bias: weight} of the convolutions whose bias has a true gradient of exactly 0.

    A convolution followed by a BatchNorm that normalises with batch statistics
    (VGG-BN's, with `bn_policy="train"`): the BatchNorm subtracts each channel's
    batch mean, so the bias cancels from the loss. Both frameworks still compute a
    gradient for it, rounding noise of the size of the float's epsilon times the
    layer's gradients, and two noises compared to each other differ by ~100%.
    `compare` measures such a gradient against its layer's weight gradient instead
    (docs/parity.md, "A conv bias before a train-mode BatchNorm").
    """
    if s.bn_policy != "train":
        return {}
    net = _torch_model(s)
    out = {}
    for name, module in net.named_modules():
        if not isinstance(module, torch.nn.Sequential):
            continue
        children = list(module.named_children())
        for (i, a), (_, b) in itertools.pairwise(children):
            if isinstance(a, torch.nn.Conv2d) and isinstance(b, torch.nn.BatchNorm2d):
                if a.bias is not None:
                    prefix = f"{name}.{i}" if name else i
                    out[f"{prefix}.bias"] = f"{prefix}.weight"
    return out


def tensor_errors(
    got: dict[str, np.ndarray],
    ref: dict[str, np.ndarray],
    scale: dict[str, float] | None = None,
    scale_from: dict[str, str] | None = None,
) -> dict[str, float]:
    """Relative error per tensor, max|got - ref| / max|ref|; `ref` is the reference.

    Args:
        got, ref: tensors by name.
        scale: per name, the largest max|ref| seen so far in the run; updated here
            and used as the denominator, so that a tensor passing near zero (a
            2-element bias that starts at 0) does not divide by ~0.
        scale_from: {name: other name}: measure `name` against the scale of `other`
            (a gradient that is rounding noise around 0, see `zero_gradient_biases`).

    Returns:
        {name: relative error}.
    """
    scale = {} if scale is None else scale
    scale_from = scale_from or {}
    for k, b in ref.items():
        scale[k] = max(scale.get(k, 0.0), _max_abs(b))
    out = {}
    for k, b in ref.items():
        # Subtract in the reference's dtype (float64 for the float64 reference).
        diff = _max_abs(got[k].astype(b.dtype, copy=False) - b)
        denominator = scale[scale_from[k]] if k in scale_from and scale_from[k] in ref else scale[k]
        out[k] = diff / denominator if denominator else diff
    return out


def step_errors(
    got: StepRecord,
    ref: StepRecord,
    scales: dict[str, dict[str, float]],
    grad_scale_from: dict[str, str] | None = None,
) -> tuple[dict[str, float], dict[str, str], dict[str, dict[str, float]]]:
    """Relative errors of one step of `got` against `ref`.

    Args:
        got, ref: the same step of two runs; `ref` is the reference.
        scales: per quantity, the running scales of `tensor_errors` (updated).
        grad_scale_from: `tensor_errors`'s `scale_from` for the gradients.

    Returns:
        ({quantity: worst error}, {quantity: tensor behind it},
        {quantity: {tensor: error}}); the loss counts as one tensor named "loss".
    """
    if set(got.grads) != set(ref.grads):
        raise AssertionError(
            f"trainable parameters differ: only in the first run "
            f"{sorted(set(got.grads) - set(ref.grads))}, only in the reference "
            f"{sorted(set(ref.grads) - set(got.grads))}"
        )
    per_tensor = {"loss": {"loss": abs(got.loss - ref.loss) / max(abs(ref.loss), 1e-30)}}
    for q in QUANTITIES[1:]:
        per_tensor[q] = tensor_errors(
            getattr(got, q),
            getattr(ref, q),
            scales.setdefault(q, {}),
            grad_scale_from if q == "grads" else None,
        )
    where = {q: max(t, key=t.get) for q, t in per_tensor.items()}
    errors = {q: per_tensor[q][where[q]] for q in QUANTITIES}
    return errors, where, per_tensor


@dataclass
class ParityReport:
    """Per step, the worst relative error of each quantity.

    Attributes:
        scenario: what ran (torch's recipe).
        precision: "float32" or "float64", the dtype both sides computed in.
        recipe_error: the `RECIPE_ERRORS` entry the jax side ran with, or None.
        jax_loss_dtype: the dtype jtransfer's train step computed the loss in.
        steps: jtransfer against torch, both in `precision`, per step.
        torch_noise: torch float32 against torch float64 from the same start:
            how far float32 rounding alone moves torch (for "bfloat16": torch
            bfloat16 against torch float32). Empty if not measured.
        jax_vs_f64: jtransfer against that reference (torch float64; float32 for
            "bfloat16"). Empty if not measured.
        worst_tensor: per step, the tensor behind each figure of `steps`.
        tensors: per step, {quantity: {tensor: error}} of jax against torch.
        seconds: wall time.
    """

    scenario: Scenario
    precision: str = "float32"
    recipe_error: str | None = None
    jax_loss_dtype: str = ""
    steps: list[dict[str, float]] = field(default_factory=list)
    torch_noise: list[dict[str, float]] = field(default_factory=list)
    jax_vs_f64: list[dict[str, float]] = field(default_factory=list)
    worst_tensor: list[dict[str, str]] = field(default_factory=list)
    tensors: list[dict[str, dict[str, float]]] = field(default_factory=list)
    seconds: float = 0.0

    def worst(self, quantity: str, first_steps: int | None = None, of: str = "steps") -> float:
        """Worst error of `quantity` over the first `first_steps` steps (default all).

        `of` picks the series: "steps" (jax vs torch), "torch_noise" or "jax_vs_f64".
        """
        return max(step[quantity] for step in getattr(self, of)[:first_steps])

    def summary(self) -> dict[str, float]:
        """{"<quantity>@1": worst at step 1, "<quantity>@<N>": worst over all N steps}."""
        n = len(self.steps)
        out = {}
        for q in QUANTITIES:
            out[f"{q}@1"] = self.worst(q, 1)
            out[f"{q}@{n}"] = self.worst(q)
        return out

    def _noise_label(self) -> str:
        if self.precision == "bfloat16":
            return "torch bf16 vs torch f32"
        return "torch f32 vs torch f64"

    def to_json(self) -> dict:
        """The figures as plain JSON types (what `--json` writes)."""
        return {
            "scenario": self.scenario.name,
            "arch": self.scenario.arch,
            "precision": self.precision,
            "recipe_error": self.recipe_error,
            "jax_loss_dtype": self.jax_loss_dtype,
            "summary": self.summary(),
            "steps": self.steps,
            "worst_tensor": self.worst_tensor,
            "torch_noise": self.torch_noise,
            "jax_vs_f64": self.jax_vs_f64,
            "seconds": self.seconds,
        }

    def __str__(self) -> str:
        s = self.scenario
        wrong = f", jax side with recipe error {self.recipe_error!r}" if self.recipe_error else ""
        loss_note = ""
        if self.jax_loss_dtype and self.jax_loss_dtype != self.precision:
            loss_note = f"; jax loss in {self.jax_loss_dtype}"
        lines = [
            f"{s.name}: {s.arch}, {s.batch_size}x{s.image_size}px, lr {s.lr:g}, momentum "
            f"{s.momentum:g}, wd {s.weight_decay:g}, loss {s.loss_reduction}, frozen stages "
            f"{s.frozen_stages}{wrong} ({self.seconds:.0f}s)",
            f"      jax vs torch ({self.precision}{loss_note})"
            + " " * 28
            + (f"| {self._noise_label()}" if self.torch_noise else ""),
            "step "
            + "".join(f"{q:>12}" for q in QUANTITIES)
            + ("  | " + "".join(f"{q:>12}" for q in QUANTITIES) if self.torch_noise else ""),
        ]
        for i, step in enumerate(self.steps):
            line = f"{i + 1:4d} " + "".join(f"{step[q]:12.2e}" for q in QUANTITIES)
            if self.torch_noise:
                line += "  | " + "".join(f"{self.torch_noise[i][q]:12.2e}" for q in QUANTITIES)
            lines.append(line)
        return "\n".join(lines)


@contextlib.contextmanager
def _torch_threads(n: int):
    # torch's intra-op threads fight XLA's for 2 cores; one thread is faster here.
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compare(
    s: Scenario,
    *,
    precision: str = "float32",
    float64_reference: bool = True,
    recipe_error: str | None = None,
    torch_threads: int = 1,
) -> ParityReport:
    """Runs `s` through torch and jtransfer from the same weights and batches.

    Args:
        s: the scenario.
        precision: "float32", "float64" for both sides (jax x64 must be
            enabled: run it as `python -m porting.training --float64`), or
            "bfloat16": mixed precision on both sides (see `PRECISIONS`).
        float64_reference: in float32, also run torch in float64, to show how far
            float32 rounding alone takes torch (`ParityReport.torch_noise`); in
            bfloat16, torch in float32, to show how far bfloat16 takes it.
        recipe_error: a key of `RECIPE_ERRORS`: the jax side trains with that
            mistake, torch with the scenario's recipe (checks that the check fails).
        torch_threads: torch intra-op threads while it runs.

    Both sides compute float32 convolutions and products in full float32, not a GPU's
    TensorFloat-32 (`porting.parity.full_float32`).

    Returns:
        The ParityReport (relative errors per step; torch is the reference).

    Raises:
        AssertionError: the two sides train different parameters, or jtransfer
            changed a frozen one.
        RuntimeError: float64 without jax x64.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    t0 = time.perf_counter()
    torch_dtype, jax_dtype = PRECISIONS[precision]
    float64_reference = float64_reference and precision in ("float32", "bfloat16")
    # The reference that the precision's own rounding is measured against.
    reference_dtype = torch.float32 if precision == "bfloat16" else torch.float64
    jax_s = RECIPE_ERRORS[recipe_error](s) if recipe_error else s
    # The net itself is not kept: its state_dict's tensors are all either side reads.
    state_dict = torch_net(s).state_dict()
    batches = make_batches(s)
    report = ParityReport(s, precision, recipe_error)
    scales: list[dict[str, dict[str, float]]] = [{}, {}, {}]
    noise_grads = zero_gradient_biases(s)
    with _torch_threads(torch_threads), full_float32():
        runs = [
            run_torch(s, state_dict, batches, dtype=torch_dtype),
            run_jax(jax_s, state_dict, batches, dtype=jax_dtype),
        ]
        if float64_reference:
            runs.append(run_torch(s, state_dict, batches, dtype=reference_dtype))
        for records in zip(*runs, strict=True):
            ref, got = records[0], records[1]
            report.jax_loss_dtype = got.loss_dtype
            errors, where, per_tensor = step_errors(got, ref, scales[0], noise_grads)
            report.steps.append(errors)
            report.worst_tensor.append(where)
            report.tensors.append(per_tensor)
            if float64_reference:
                report.torch_noise.append(step_errors(ref, records[2], scales[1], noise_grads)[0])
                report.jax_vs_f64.append(step_errors(got, records[2], scales[2], noise_grads)[0])
            if got.frozen_changed:
                raise AssertionError(
                    f"{s.name}: jtransfer changed frozen parameters {got.frozen_changed}"
                )
    report.seconds = time.perf_counter() - t0
    return report


def markdown(reports: Sequence[ParityReport]) -> str:
    """A markdown table: per scenario, worst error at step 1 and over all steps.

    Where torch float64 ran, a second row gives torch float32's own error
    against it: the float32 floor that jtransfer's row is to be read against.
    """
    head = (
        "| scenario | compared | steps | "
        + " | ".join(f"{q} @1 / @N" for q in QUANTITIES)
        + " |\n|---|---|---|"
        + "---|" * len(QUANTITIES)
        + "\n"
    )
    rows = []
    for r in reports:
        series = [(f"jtransfer vs torch ({r.precision})", "steps")]
        if r.torch_noise:
            series.append((r._noise_label(), "torch_noise"))
        for label, of in series:
            cells = " | ".join(
                f"{r.worst(q, 1, of=of):.1e} / {r.worst(q, of=of):.1e}" for q in QUANTITIES
            )
            rows.append(
                f"| {r.scenario.name} ({r.scenario.arch}) | {label} | {len(r.steps)} | {cells} |\n"
            )
    return head + "".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--steps", type=int, default=None, help="override each scenario's steps")
    p.add_argument("--seed", type=int, default=None, help="override each scenario's seed")
    p.add_argument(
        "--float64",
        action="store_true",
        help="both sides in float64 (enables jax x64): the check of the algorithm",
    )
    p.add_argument(
        "--recipe-error",
        nargs="+",
        choices=list(RECIPE_ERRORS),
        default=[None],
        help="give the jax side this mistake (to see the comparison fail); several run one "
        "after the other in this process, one report each",
    )
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="only the summary table")
    args = p.parse_args(argv)
    if args.float64:
        # Before any jax array exists; arrays made earlier would stay float32.
        jax.config.update("jax_enable_x64", True)
    precision = "float64" if args.float64 else "float32"
    reports = []
    for name in args.scenarios:
        s = SCENARIOS[name]
        if args.steps:
            s = replace(s, steps=args.steps)
        if args.seed is not None:
            s = replace(s, seed=args.seed)
        for error in args.recipe_error:
            reports.append(compare(s, precision=precision, recipe_error=error))
            print(f"{name}: {reports[-1].seconds:.0f}s" if args.quiet else reports[-1], flush=True)
    print(markdown(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_json() for r in reports], f, indent=1)


if __name__ == "__main__":
    main()
