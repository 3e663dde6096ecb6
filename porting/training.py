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
moves a gradient by up to ~10%; the runs then drift apart at the rate torch
float32 drifts from torch float64. `compare(float64_reference=True)` runs torch
in float64 too and reports that drift beside jtransfer's (`torch_noise`).

`python -m porting.training` prints the per-step tables and a summary.

Relative error of a tensor = max|jax - torch| / max|torch|, worst over tensors,
where max|torch| is the largest the tensor has been so far in the run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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
from porting.parity import randomize_batchnorm
from porting.torchvision import from_torchvision, to_torchvision, torch_key

QUANTITIES = ("loss", "grads", "params", "batch_stats")


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


@dataclass
class StepRecord:
    """One training step, keyed by torch state_dict names, as numpy.

    `grads` is the gradient of the trainable parameters at the step's start;
    `params` (trainable ones only) and `batch_stats` the values after the update.
    `frozen_changed` lists the frozen parameters that are no longer bit-identical
    to their initial value (checked on the last step of `run_jax`; else None).
    """

    loss: float
    grads: dict[str, np.ndarray]
    params: dict[str, np.ndarray]
    batch_stats: dict[str, np.ndarray]
    frozen_changed: list[str] | None = None


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


def _jax_model(s: Scenario):
    return jt.models.create(s.arch, num_classes=s.num_classes, **_no_dropout(s.arch))


def torch_net(s: Scenario) -> torch.nn.Module:
    """The scenario's torchvision model: random weights and BatchNorm, a new Xavier head."""
    torch.manual_seed(s.seed)
    net = randomize_batchnorm(_torch_model(s), s.seed)
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
        dtype: torch.float64 gives the reference that float32 rounding is measured against.

    Yields:
        A StepRecord per batch (lazily, so large models are not held 10 times).
    """
    net = _torch_model(s)
    net.load_state_dict(state_dict)
    net.to(dtype)
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
        x = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()).to(dtype)
        y = torch.from_numpy(batch["label"].astype(np.int64))
        opt.zero_grad()
        loss = loss_fn(net(x), y)
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
        )


def _select(tree, keep: set[str]):
    """The leaves of a params tree whose '/'-joined path is in `keep`, as a nested dict."""
    flat = traverse_util.flatten_dict(tree, sep="/")
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k in keep}, sep="/")


def run_jax(
    s: Scenario, state_dict: dict[str, torch.Tensor], batches: Sequence[dict[str, np.ndarray]]
) -> Iterator[StepRecord]:
    """Trains the ported model with `jtransfer.train`; yields one record per step.

    The optimizer is `partition.make_optimizer(params, s.rules, ...)`, the step
    `train.make_train_step(..., frozen_stages=partition.frozen_prefix(...),
    return_grads=True)`: the gradients recorded are the ones the step applied.

    Args:
        s, state_dict, batches: as `run_torch`.

    Yields:
        A StepRecord per batch; the last one also says which frozen parameters changed.
    """
    variables = from_torchvision(state_dict, s.arch)
    model = _jax_model(s)
    tx = partition.make_optimizer(
        variables["params"],
        list(s.rules),
        learning_rate=s.lr,
        momentum=s.momentum,
        weight_decay=s.weight_decay,
    )
    trainable = {path for path in flax_paths(s).values() if lr_mult_of(s, path) is not None}
    state = train.create_train_state(model, variables, tx, seed=s.seed)
    train_step = train.make_train_step(
        model,
        tx,
        loss_reduction=s.loss_reduction,
        bn_policy=s.bn_policy,
        frozen_stages=s.frozen_stages,
        return_grads=True,
    )
    for i, batch in enumerate(batches):
        state, metrics = train_step(state, jax.tree.map(jnp.asarray, batch))
        train.check_finite(metrics, i)
        grads = _select(metrics["grads"], trainable)
        record = StepRecord(
            float(metrics["loss"]),
            _numpy(to_torchvision({"params": grads}, s.arch)),
            _numpy(to_torchvision({"params": _select(state.params, trainable)}, s.arch)),
            _numpy(to_torchvision({"batch_stats": state.batch_stats}, s.arch)),
        )
        if i == len(batches) - 1:
            before = traverse_util.flatten_dict(variables["params"], sep="/")
            after = traverse_util.flatten_dict(state.params, sep="/")
            record.frozen_changed = [
                k for k in before if k not in trainable and not np.array_equal(before[k], after[k])
            ]
        yield record


def _numpy(sd) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def _max_abs(x: np.ndarray) -> float:
    return float(np.max(np.abs(x))) if x.size else 0.0


def tensor_errors(
    got: dict[str, np.ndarray], ref: dict[str, np.ndarray], scale: dict[str, float] | None = None
) -> dict[str, float]:
    """Relative error per tensor, max|got - ref| / max|ref|; `ref` is the reference.

    Args:
        got, ref: tensors by name.
        scale: per name, the largest max|ref| seen so far in the run; updated here
            and used as the denominator, so that a tensor passing near zero (a
            2-element bias that starts at 0) does not divide by ~0.

    Returns:
        {name: relative error}.
    """
    scale = {} if scale is None else scale
    out = {}
    for k, b in ref.items():
        scale[k] = max(scale.get(k, 0.0), _max_abs(b))
        # Subtract in the reference's dtype (float64 for the float64 reference).
        diff = _max_abs(got[k].astype(b.dtype, copy=False) - b)
        out[k] = diff / scale[k] if scale[k] else diff
    return out


def step_errors(
    got: StepRecord, ref: StepRecord, scales: dict[str, dict[str, float]]
) -> tuple[dict[str, float], dict[str, str], dict[str, dict[str, float]]]:
    """Relative errors of one step of `got` against `ref`.

    Args:
        got, ref: the same step of two runs; `ref` is the reference.
        scales: per quantity, the running scales of `tensor_errors` (updated).

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
        per_tensor[q] = tensor_errors(getattr(got, q), getattr(ref, q), scales.setdefault(q, {}))
    where = {q: max(t, key=t.get) for q, t in per_tensor.items()}
    errors = {q: per_tensor[q][where[q]] for q in QUANTITIES}
    return errors, where, per_tensor


@dataclass
class ParityReport:
    """Per step, the worst relative error of each quantity.

    Attributes:
        scenario: what ran.
        steps: jtransfer (float32) against torch (float32), per step.
        torch_noise: torch float32 against torch float64 from the same start:
            how far float32 rounding alone moves torch. Empty if not measured.
        jax_vs_f64: jtransfer (float32) against torch float64. Empty if not measured.
        worst_tensor: per step, the tensor behind each figure of `steps`.
        tensors: per step, {quantity: {tensor: error}} of jax against torch.
        seconds: wall time.
    """

    scenario: Scenario
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

    def __str__(self) -> str:
        s = self.scenario
        lines = [
            f"{s.name}: {s.arch}, {s.batch_size}x{s.image_size}px, lr {s.lr:g}, momentum "
            f"{s.momentum:g}, wd {s.weight_decay:g}, loss {s.loss_reduction}, frozen stages "
            f"{s.frozen_stages} ({self.seconds:.0f}s)",
            "      jax vs torch (float32)"
            + " " * 28
            + ("| torch f32 vs torch f64" if self.torch_noise else ""),
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


def compare(s: Scenario, *, float64_reference: bool = True, torch_threads: int = 1) -> ParityReport:
    """Runs `s` through torch and jtransfer from the same weights and batches.

    Args:
        s: the scenario.
        float64_reference: also run torch in float64, to show how far float32
            rounding alone takes torch (`ParityReport.torch_noise`).
        torch_threads: torch intra-op threads while it runs.

    Returns:
        The ParityReport (relative errors per step; torch float32 is the reference).

    Raises:
        AssertionError: the two sides train different parameters, or jtransfer
            changed a frozen one.
    """
    t0 = time.perf_counter()
    net = torch_net(s)
    state_dict = copy.deepcopy(net.state_dict())
    batches = make_batches(s)
    report = ParityReport(s)
    scales: list[dict[str, dict[str, float]]] = [{}, {}, {}]
    with _torch_threads(torch_threads):
        runs = [run_torch(s, state_dict, batches), run_jax(s, state_dict, batches)]
        if float64_reference:
            runs.append(run_torch(s, state_dict, batches, dtype=torch.float64))
        for records in zip(*runs, strict=True):
            ref, got = records[0], records[1]
            errors, where, per_tensor = step_errors(got, ref, scales[0])
            report.steps.append(errors)
            report.worst_tensor.append(where)
            report.tensors.append(per_tensor)
            if float64_reference:
                report.torch_noise.append(step_errors(ref, records[2], scales[1])[0])
                report.jax_vs_f64.append(step_errors(got, records[2], scales[2])[0])
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
        series = [("jtransfer vs torch", "steps")]
        if r.torch_noise:
            series.append(("torch f32 vs torch f64", "torch_noise"))
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
    p.add_argument("-q", "--quiet", action="store_true", help="only the summary table")
    args = p.parse_args(argv)
    reports = []
    for name in args.scenarios:
        s = SCENARIOS[name]
        if args.steps:
            s = replace(s, steps=args.steps)
        if args.seed is not None:
            s = replace(s, seed=args.seed)
        reports.append(compare(s))
        print(f"{name}: {reports[-1].seconds:.0f}s" if args.quiet else reports[-1], flush=True)
    print(markdown(reports))


if __name__ == "__main__":
    main()
