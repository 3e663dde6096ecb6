"""The one-shot GPU check: devices, float32 parity, ResNet-50 training cells and the loader.

One run answers, on a GPU machine lent for a few minutes, whether jtransfer works there
and how fast it is. On a lent H100/H200 (the `device` tool: python3 there has torch, jax,
flax, optax and orbax but not grain), from the repository root, with
``carry: [".whl"]`` and the wheels that benchmarks/README.md says how to fetch in ``.whl``:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \\
    PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py \\
        --out $OUT/RESULTS-gpu-check.md

(``timeout_s`` 600; the default ``--budget-s 450`` aims at under 8 minutes: it skips
what would no longer fit but never stops a stage that has started). Anywhere else:
``python benchmarks/gpu_check.py [--out benchmarks/RESULTS-gpu-check.md]``.

Stages, in this order, each timed and guarded: a stage that raises is reported with its
error and the next one still runs.

1. ``devices``: ``jax.devices()`` holds a GPU and ``torch.cuda.is_available()``, and each
   computes on it (``--device cpu``: the CPU, and the report says so).
2. ``parity``: `porting.parity.measure` for resnet50 and vgg16_bn (eval logits and stage
   features at 224 px, train mode at 97 px as tests/test_parity.py, batch 2) at full
   float32 (`porting.parity.full_float32`: jax ``highest``, torch TF32 off) against the
   1e-5 target; then the same eval forward at each framework's default precision (TF32 on
   a GPU) against torch's CPU float32, to show what TF32 costs. jax runs on the GPU, the
   torch reference on the CPU (and on the GPU for the TF32 table).
3. ``cells``: `benchmarks/gpu.py`'s ResNet-50 fine-tune cells (batch 256, 224 px) at bf16
   (``torch.compile`` + autocast + channels_last vs ``compute_dtype=bfloat16``) and fp32,
   with model TFLOP/s and % of the card's dense bf16 peak; few reps, so the stage fits
   about 4 minutes on an H100 (torch.compile's first call is most of it).
4. ``loader``: `jtransfer.data.make_loader` (RandomResizedCrop(224) + flip + normalise,
   as the training loader does) over a generated ImageFolder of photo-sized JPEGs in a
   temporary folder, ``worker_count = os.cpu_count()``, batch 256: images/s after the
   first batch; torchvision's ImageFolder + DataLoader with as many workers beside it.

Budget: ``--budget-s`` (default 450) seconds from the start; before each stage (and each
cell of stage 3) the check compares the time left with that part's estimate (`STAGES`,
`CELL_ESTIMATES`: guesses until a GPU has run it) and skips it, saying so, when it would
not fit. The markdown report (``--out``) and a JSON file beside it (same name, ``.json``) are
rewritten before and after every stage, so a run cut short keeps what finished and shows
which stage was running. The report states the card (name, memory), driver and CUDA,
the jax, torch and flax versions and the host's CPU cores. Exit status 1 when a stage
failed or raised.

``--device cpu`` runs every stage on the CPU (a check of the script, no figures);
``--quick`` shrinks sizes, batches and reps (and on the CPU leaves out the bf16 cell,
whose ``torch.compile`` takes minutes there). tests/test_benchmarks_smoke.py runs
``--device cpu --quick``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# jax must not take 75% of the GPU up front: torch shares the card in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ARCHS = ("resnet50", "vgg16_bn")
TARGET = 1e-5  # tests/test_parity.py's
CELL_ARCH = "resnet50"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The work of one run: the full check or ``--quick``."""

    parity_size: int  # eval forward (and the TF32 table)
    parity_train_size: int  # train-mode forward
    cell_batch: int
    cell_size: int
    cell_reps: int  # timed calls per side (gpu.py --reps)
    cell_steps: int  # steps per timed call (gpu.py --steps)
    loader_images: int
    loader_image_side: int  # typical JPEG side; each side varies by +-25%
    loader_batch: int
    loader_batches: int  # timed batches, at least 2 per worker


FULL = Sizes(224, 97, 256, 224, 3, 5, 512, 350, 256, 32)
QUICK = Sizes(64, 64, 2, 64, 1, 1, 16, 350, 4, 3)

# Seconds a part is expected to take (full on an H100, --quick on the 2-core CPU), for
# the budget: guesses until a GPU has run the check. torch.compile of a ResNet-50 train
# step and jax's compiles dominate the bf16 cell.
Estimate = tuple[float, float]
CELL_ESTIMATES: dict[str, Estimate] = {"bf16": (150, 60), "fp32": (60, 15)}


@dataclasses.dataclass
class Outcome:
    """What a stage returns: a one-line result, markdown details, data for the JSON."""

    summary: str
    details: str = ""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    # ok; partial: parts skipped for the budget; fail: ran and missed its target;
    # skipped: nothing fitted the budget
    status: str = "ok"


@dataclasses.dataclass
class StageResult:
    name: str
    title: str
    status: str = "pending"  # pending, running, then an Outcome's status or error
    seconds: float = 0.0
    summary: str = ""
    details: str = ""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    title: str
    run: Callable[[Check], Outcome]
    estimate: Estimate  # seconds (full, --quick); stage 3 budgets each cell instead


class Check:
    """One run: its options, clock, budget, machine line and report."""

    def __init__(self, args: argparse.Namespace, stages: Sequence[Stage]) -> None:
        self.args = args
        self.sizes = QUICK if args.quick else FULL
        self.start = time.perf_counter()
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.info: dict[str, str] = {}
        self.results = [StageResult(s.name, s.title) for s in stages]
        self.stages = list(stages)
        self.command = " ".join(["python3 benchmarks/gpu_check.py", *args.argv])

    @property
    def cuda(self) -> bool:
        return self.args.device == "cuda"

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def fits(self, part: str, estimate: Estimate) -> str | None:
        """None if `part`, expected to take `estimate`, fits the time left; else why not."""
        need, left = estimate[1 if self.args.quick else 0], self.left()
        if need <= left:
            return None
        return (
            f"skipped: {max(left, 0):.0f} s of the {self.args.budget_s:.0f} s budget left, "
            f"{part} needs about {need:.0f} s"
        )

    def log(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {text}", flush=True)

    def run(self) -> list[StageResult]:
        self.info = machine_info(self.cuda)
        self.log("machine: " + "; ".join(f"{k}: {v}" for k, v in self.info.items()))
        for stage, result in zip(self.stages, self.results, strict=True):
            why = self.fits(stage.name, stage.estimate)
            if why:
                result.status, result.summary = "skipped", why
                self.log(f"{stage.name}: {why}")
                self.write()
                continue
            result.status = "running"
            self.write()
            self.log(f"{stage.name}: {stage.title}")
            t0 = time.perf_counter()
            try:
                out = stage.run(self)
            except (Exception, SystemExit) as e:  # one stage must not end the run
                result.status = "error"
                result.summary = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                result.details = "```\n" + traceback.format_exc()[-4000:] + "```"
            else:
                result.status = out.status
                result.summary, result.details, result.data = out.summary, out.details, out.data
            result.seconds = time.perf_counter() - t0
            self.log(f"{stage.name}: {result.status} in {result.seconds:.1f} s: {result.summary}")
            self.write()
        return self.results

    # -- the report ----------------------------------------------------------------------

    def markdown(self) -> str:
        running = [r.name for r in self.results if r.status == "running"]
        pending = [r.name for r in self.results if r.status == "pending"]
        if running:
            state = f"in progress (if this is the last word: cut short during `{running[0]}`)"
        elif pending:
            state = "in progress"
        else:
            state = "finished"
        lines = [
            "# jtransfer: the one-shot GPU check",
            "",
            f"Command: `{self.command}`",
            "",
            f"Started {self.started:%Y-%m-%d %H:%M:%S} UTC; {self.elapsed():.0f} s of the "
            f"{self.args.budget_s:.0f} s budget used; {state}.",
            "",
        ]
        if not self.cuda:
            lines += [
                "**`--device cpu`: every stage ran on the CPU. A check of the script, "
                "not a measurement.**",
                "",
            ]
        lines += ["## Machine", ""]
        lines += [f"- {k}: {v}" for k, v in self.info.items()]
        lines += [
            "",
            "## Stages",
            "",
            "| # | stage | status | seconds | result |",
            "|---:|---|---|---:|---|",
        ]
        for i, r in enumerate(self.results, 1):
            summary = r.summary.replace("|", "/")
            lines.append(f"| {i} | {r.name} | {r.status} | {r.seconds:.1f} | {summary} |")
        for i, r in enumerate(self.results, 1):
            lines += ["", f"## {i}. {r.name}: {r.title}", "", f"Status: {r.status}"]
            if r.summary:
                lines[-1] += f". {r.summary}"
            if r.details:
                lines += ["", r.details.rstrip()]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        out: Path = self.args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(self.markdown())
        record = {
            "command": self.command,
            "started_utc": self.started.isoformat(),
            "elapsed_s": self.elapsed(),
            "budget_s": self.args.budget_s,
            "device": self.args.device,
            "quick": self.args.quick,
            "machine": self.info,
            "stages": [dataclasses.asdict(r) for r in self.results],
        }
        out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str) + "\n")


# -- the machine -----------------------------------------------------------------------------

DISTRIBUTIONS = (
    "jax",
    "jaxlib",
    "jax-cuda13-plugin",
    "jax-cuda12-plugin",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "torch",
    "torchvision",
    "numpy",
    "pillow",
)


def _guarded(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as e:  # the machine line never stops the check
        return f"unknown ({type(e).__name__}: {e})"


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _nvidia_smi() -> str:
    query = "name,memory.total,driver_version"
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    return out.replace("\n", "; ")


def _versions() -> str:
    found = []
    for name in DISTRIBUTIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(f"{name} {importlib.metadata.version(name)}")
    return ", ".join(found)


def _card() -> str:
    import torch

    props = torch.cuda.get_device_properties(0)
    return (
        f"{props.name}, {props.total_memory / 2**30:.1f} GiB, "
        f"{props.multi_processor_count} SMs (torch)"
    )


def _cuda_versions() -> str:
    import torch

    return f"CUDA {torch.version.cuda} (torch's build), cuDNN {torch.backends.cudnn.version()}"


def machine_info(cuda: bool) -> dict[str, str]:
    """The card, driver, CUDA, package versions and host cores; each entry guarded."""
    info = {}
    if cuda:
        info["card"] = _guarded(_card)
        info["nvidia-smi (name, memory, driver)"] = _guarded(_nvidia_smi)
        info["CUDA"] = _guarded(_cuda_versions)
    else:
        info["card"] = "none: --device cpu"
    info["python"] = f"{sys.version.split()[0]} ({sys.executable})"
    info["packages"] = _guarded(_versions)
    info["host"] = _guarded(
        lambda: (
            f"{os.cpu_count()} CPU cores ({len(os.sched_getaffinity(0))} usable), "
            f"{_cpu_model()}, {platform.system()} {platform.release()}"
        )
    )
    return info


# -- stage 1: devices ------------------------------------------------------------------------


def stage_devices(check: Check) -> Outcome:
    import jax
    import jax.numpy as jnp
    import torch

    backend = jax.default_backend()
    jdevs = [f"{d} ({d.device_kind})" for d in jax.devices()]
    jsum = float(jnp.arange(1024.0).sum())  # a computation on jax's default device
    torch_cuda = torch.cuda.is_available()
    lines = [
        f"- jax {jax.__version__}: backend `{backend}`, devices {', '.join(jdevs)}; "
        f"a sum on it: {jsum:.0f}",
        f"- torch {torch.__version__}: `torch.cuda.is_available()` = {torch_cuda}, "
        f"{torch.cuda.device_count()} device(s)",
    ]
    data: dict[str, Any] = {"jax_backend": backend, "jax_devices": jdevs, "torch_cuda": torch_cuda}
    if check.cuda:
        if torch_cuda:
            tsum = float(torch.arange(1024.0, device="cuda").sum())
            lines.append(f"- torch on `{torch.cuda.get_device_name()}`: a sum on it: {tsum:.0f}")
        ok = backend == "gpu" and torch_cuda
        summary = f"jax {backend} ({jdevs[0]}), torch cuda {torch_cuda}" + (
            "" if ok else ": NOT BOTH ON THE GPU; later stages run where they can"
        )
        return Outcome(summary, "\n".join(lines), data, "ok" if ok else "fail")
    summary = f"--device cpu: jax {backend}, torch on the CPU (no GPU asked for)"
    return Outcome(summary, "\n".join(lines), data, "ok" if backend == "cpu" else "fail")


# -- stage 2: parity -------------------------------------------------------------------------


def precision_costs(arch: str, net: Any, variables: Any, size: int, cuda: bool) -> dict[str, float]:
    """Eval logits' relative error against torch's CPU float32, per side and precision.

    jax (on its default device) at its default precision, and on a GPU also at
    ``highest``, and torch at its default precision and under
    `porting.parity.full_float32`. On a GPU the defaults use TF32 (XLA for every float32
    convolution and product, torch for cuDNN convolutions); the CPU has no TF32.
    """
    import jax
    import jax.numpy as jnp
    import torch

    import jtransfer as jt
    from porting import parity

    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = net(x).numpy()
    kwargs = {"dropout": 0.0} if arch.startswith("vgg") else {}
    model = jt.models.create(arch, **kwargs)
    # The matmul precision is part of jit's cache key: each context compiles its own.
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    x_nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    errors = {"jax default": parity.rel_err(forward(variables, x_nhwc), ref)}
    if not cuda:
        return errors  # no TF32 on the CPU: "highest" computes the same (and compiles again)
    with jax.default_matmul_precision("highest"):
        errors["jax highest"] = parity.rel_err(forward(variables, x_nhwc), ref)
    gnet, gx = copy.deepcopy(net).cuda(), x.cuda()
    with torch.no_grad():
        errors["torch default"] = parity.rel_err(gnet(gx).cpu().numpy(), ref)
        with parity.full_float32():
            errors["torch full float32"] = parity.rel_err(gnet(gx).cpu().numpy(), ref)
    del gnet, gx
    torch.cuda.empty_cache()
    return errors


def _cell(value: float | str | None, spec: str = ".1e") -> str:
    if value is None:
        return "-"
    return value.replace("|", "/") if isinstance(value, str) else format(value, spec)


def stage_parity(check: Check) -> Outcome:
    import porting
    from porting import parity

    s = check.sizes
    rows, costs, verdicts, ok = [], {}, [], True
    for arch in ARCHS:
        # `measure`'s own defaults, made here to serve the TF32 table too.
        net = parity.torch_model(arch)
        variables = porting.from_torchvision(net.state_dict(), arch)
        try:  # one architecture's failure must not lose the other's rows
            r = parity.measure(
                arch,
                sizes=(s.parity_size,),
                train_size=s.parity_train_size,
                batch=2,
                net=net,
                variables=variables,
            )
        except Exception as e:
            ok = False
            verdicts.append(f"{arch} ERROR {type(e).__name__}: {e}".splitlines()[0][:300])
            check.log(f"  {verdicts[-1]}")
            continue
        rows.append(r)
        eval_ok = r.eval_logits <= TARGET and r.eval_features <= TARGET
        train_ok = r.train_within_target(TARGET)
        ok = ok and eval_ok and train_ok
        verdicts.append(
            f"{arch} eval {'ok' if eval_ok else 'OVER'} ({max(r.eval_logits, r.eval_features):.1e})"
            f", train {'ok' if train_ok else 'OVER'}"
        )
        check.log(f"  {verdicts[-1]} ({r.seconds:.0f} s)")
        try:  # a broken TF32 table must not lose the parity rows above
            costs[arch] = precision_costs(arch, net, variables, s.parity_size, check.cuda)
        except Exception as e:
            costs[arch] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
        del net, variables
        check.log(f"  {arch} default precision: {costs[arch]}")
    names = list(dict.fromkeys(n for c in costs.values() for n in c))
    details = [
        f"Full float32 (`porting.parity.measure(arch, sizes=({s.parity_size},), "
        f"train_size={s.parity_train_size}, batch=2)`, both sides under "
        "`porting.parity.full_float32()`), jax on "
        f"{'the GPU' if check.cuda else 'the CPU'}, torch on the CPU; relative error "
        f"max|jax - torch| / max|torch|, target {TARGET:.0e} "
        "(train mode: `ArchParity.train_within_target`):",
        "",
        parity.markdown(rows).rstrip(),
        "",
        f"What the default precision costs: eval logits at {s.parity_size} px, batch 2, "
        "against torch's CPU float32 (`default` is TF32 on a GPU; the CPU has none):",
        "",
        "| arch | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
        *(
            f"| {a} | " + " | ".join(_cell(c.get(n)) for n in names) + " |"
            for a, c in costs.items()
        ),
    ]
    tf32 = ", ".join(f"{a} {_cell(c.get('jax default'), '.0e')}" for a, c in costs.items())
    summary = "; ".join(verdicts) + f" (target {TARGET:.0e}); jax default precision: {tf32}"
    data = {
        "full_float32": [dataclasses.asdict(r) for r in rows],
        "default_precision_eval_logits": costs,
    }
    return Outcome(summary, "\n".join(details), data, "ok" if ok else "fail")


# -- stage 3: the training cells -------------------------------------------------------------


def load_gpu_bench() -> Any:
    """benchmarks/gpu.py as a module (this folder is not a package)."""
    if "jt_gpu_bench" in sys.modules:
        return sys.modules["jt_gpu_bench"]
    path = Path(__file__).with_name("gpu.py")
    spec = importlib.util.spec_from_file_location("jt_gpu_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["jt_gpu_bench"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def stage_cells(check: Check) -> Outcome:
    gpu = load_gpu_bench()
    s, device = check.sizes, check.args.device
    gpu.prepare(device)
    info = gpu.machine_info(device)
    peak = gpu.bf16_peak(info["gpu"])
    precisions = list(gpu.PRECISIONS)
    notes = []
    if check.args.quick and not check.cuda:
        precisions.remove("bf16")
        notes.append("bf16 left out (`--quick` on the CPU: torch.compile takes minutes there)")
    cells = []
    for precision in precisions:
        why = check.fits(f"the {precision} cell", CELL_ESTIMATES[precision])
        if why:
            notes.append(f"{precision} {why}")
            check.log(f"  {precision}: {why}")
            continue
        argv = ["--device", device, "--archs", CELL_ARCH, "--batch", str(s.cell_batch)]
        argv += ["--size", str(s.cell_size), "--reps", str(s.cell_reps)]
        argv += ["--steps", str(s.cell_steps), "--precisions", precision]
        cells += gpu.run_case(CELL_ARCH, s.cell_batch, gpu.parse_args(argv), log=check.log)
    if not cells:
        return Outcome("; ".join(notes), status="skipped")

    def line(c: Any) -> str:
        pct = f", {100 * c.tflops('jax') / peak:.0f}% of {peak:.0f}" if peak else ""
        return (
            f"{c.precision}: jax {c.jax_ips:.0f} img/s ({c.tflops('jax'):.3g} TFLOP/s{pct}) "
            f"vs torch {c.torch_ips:.0f} img/s, x{c.ratio:.2f}"
        )

    details = [
        f"`benchmarks/gpu.py` cells (`run_case`): {CELL_ARCH} fine-tune, batch {s.cell_batch}, "
        f"{s.cell_size} px, {s.cell_reps} timed calls of {s.cell_steps} steps per side after "
        "the first (compile) call. bf16: `torch.compile` + autocast(bfloat16) + "
        "channels_last vs jtransfer `compute_dtype=bfloat16`; fp32: torch eager vs "
        "jtransfer float32, each at its default float32 precision. gpu.py's docstring has "
        "the protocol.",
        "",
        "- " + "; ".join(f"{k}: {v}" for k, v in info.items()),
        *(f"- {n}" for n in notes),
        "",
        *gpu.table(cells, peak, s.cell_steps),
    ]
    data = {
        "info": info,
        "bf16_peak_tflops": peak,
        "notes": notes,
        "cells": [
            {
                **dataclasses.asdict(c),
                "torch_ips": c.torch_ips,
                "jax_ips": c.jax_ips,
                "ratio": c.ratio,
                "jax_tflops": c.tflops("jax"),
                "torch_tflops": c.tflops("torch"),
            }
            for c in cells
        ],
    }
    status = "partial" if any("skipped" in n for n in notes) else "ok"
    return Outcome("; ".join(line(c) for c in cells), "\n".join(details), data, status)


# -- stage 4: the loader ---------------------------------------------------------------------


def time_batches(
    batches: Iterator[Any], batch: int, warmup: int, count: int
) -> tuple[float, float]:
    """(seconds to the first batch, images/s over `count` batches after `warmup` more).

    Workers start together, so the batches right after the first were made alongside it
    and come at once: `warmup` (at least the batches the workers hold ready) keeps them
    out of the timed window.
    """
    t0 = time.perf_counter()
    next(batches)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        next(batches)
    t1 = time.perf_counter()
    for _ in range(count):
        next(batches)
    return first, count * batch / (time.perf_counter() - t1)


def torchvision_batches(folder: Path, batch: int, workers: int, size: int) -> Iterator[Any]:
    """Endless batches of torchvision's ImageFolder + DataLoader, d2l's training transform."""
    import torch
    import torchvision
    from torchvision import transforms as T

    from jtransfer.data import IMAGENET_MEAN, IMAGENET_STD

    augment = T.Compose(
        [
            T.RandomResizedCrop(size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=augment)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    while True:
        yield from loader


def stage_loader(check: Check) -> Outcome:
    from PIL import Image

    from jtransfer import data

    s = check.sizes
    workers = os.cpu_count() or 1
    # torch's DataLoader holds 2 batches per worker ready (prefetch_factor); grain's fewer.
    warmup, count = 2 * workers, max(s.loader_batches, 2 * workers)
    root = Path(tempfile.mkdtemp(prefix="jtransfer-gpu-check-"))
    try:
        t0 = time.perf_counter()
        folder = data.make_demo_imagefolder(
            root / "train", n_per_class=s.loader_images // 2, size=s.loader_image_side, seed=0
        )
        made_s = time.perf_counter() - t0
        files = [Path(p) for p, _ in folder.samples]
        shapes = [Image.open(p).size for p in files]
        mean_kb = sum(p.stat().st_size for p in files) / len(files) / 1024
        mean_w = sum(w for w, _ in shapes) / len(shapes)
        mean_h = sum(h for _, h in shapes) / len(shapes)
        check.log(f"  {len(files)} JPEGs, mean {mean_w:.0f}x{mean_h:.0f}, {mean_kb:.0f} KiB")

        loader = data.make_loader(
            folder,
            batch_size=s.loader_batch,
            train=True,
            num_epochs=None,
            worker_count=workers,
            image_size=224,
        )
        it = iter(loader)
        try:
            jt_first, jt_ips = time_batches(it, s.loader_batch, warmup, count)
        finally:
            it.close()
        check.log(f"  jtransfer: {jt_ips:.0f} img/s (first batch after {jt_first:.1f} s)")

        # The DataLoader forks its workers (its default): they run PIL and torch's CPU
        # code only, never jax, so jax's warning about forking a threaded process is moot.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
            tv = torchvision_batches(Path(folder.root), s.loader_batch, workers, 224)
            try:
                tv_first, tv_ips = time_batches(tv, s.loader_batch, warmup, count)
            finally:
                tv.close()
        check.log(f"  torchvision: {tv_ips:.0f} img/s (first batch after {tv_first:.1f} s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    details = [
        f"{len(files)} generated JPEGs (`data.make_demo_imagefolder`, mean "
        f"{mean_w:.0f}x{mean_h:.0f} px, {mean_kb:.0f} KiB, written in {made_s:.1f} s), "
        f"RandomResizedCrop(224) + flip + ImageNet normalisation to float32, batch "
        f"{s.loader_batch}, {workers} workers (`os.cpu_count()`), endless epochs; images/s "
        f"over {count} batches after the first and {warmup} more.",
        "",
        "| loader | workers | first batch s | img/s |",
        "|---|---:|---:|---:|",
        f"| `jtransfer.data.make_loader` (grain, spawned workers) | {workers} | "
        f"{jt_first:.1f} | {jt_ips:.0f} |",
        f"| torchvision ImageFolder + DataLoader (forked workers) | {workers} | "
        f"{tv_first:.1f} | {tv_ips:.0f} |",
    ]
    data_ = {
        "images": len(files),
        "mean_size": [mean_w, mean_h],
        "mean_kib": mean_kb,
        "workers": workers,
        "batch": s.loader_batch,
        "jtransfer": {"first_batch_s": jt_first, "images_per_s": jt_ips},
        "torchvision": {"first_batch_s": tv_first, "images_per_s": tv_ips},
    }
    summary = (
        f"jtransfer {jt_ips:.0f} img/s, torchvision DataLoader {tv_ips:.0f} img/s "
        f"({workers} workers, batch {s.loader_batch})"
    )
    return Outcome(summary, "\n".join(details), data_)


STAGES = (
    Stage("devices", "jax and torch see the GPU", stage_devices, (15, 5)),
    Stage("parity", "parity at full float32, and what TF32 costs", stage_parity, (90, 20)),
    Stage(
        "cells",
        "ResNet-50 fine-tune vs torch.compile + AMP + channels_last",
        stage_cells,
        (0, 0),
    ),
    Stage("loader", "the loader's images/s with all host cores", stage_loader, (60, 10)),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="tiny sizes: a check of the script")
    p.add_argument("--budget-s", type=float, default=450.0, help="seconds for the whole run")
    names = [s.name for s in STAGES]
    p.add_argument("--stages", nargs="+", default=names, choices=names, help="default: all")
    p.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).with_name("RESULTS-gpu-check.md"),
        help="markdown report; the JSON goes beside it",
    )
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: Sequence[str] | None = None) -> list[StageResult]:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import torch

        # A check of the script, not figures: OpenMP barriers crawl on a loaded small CPU.
        torch.set_num_threads(1)
    check = Check(args, [s for s in STAGES if s.name in args.stages])
    results = check.run()
    print()
    print(f"{'stage':8s} {'status':8s} {'s':>6s}  result")
    for r in results:
        print(f"{r.name:8s} {r.status:8s} {r.seconds:6.1f}  {r.summary}")
    print(f"\n{check.elapsed():.0f} s; report: {args.out} (and {args.out.with_suffix('.json')})")
    return results


if __name__ == "__main__":
    sys.exit(1 if any(r.status in ("fail", "error") for r in main()) else 0)
