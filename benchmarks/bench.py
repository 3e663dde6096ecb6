"""jtransfer vs PyTorch (CPU) on the same work: throughput, compile time, memory.

One command:

    python benchmarks/bench.py [--archs resnet18 resnet50 vgg16_bn ...] [--batch 16 32]
                               [--size 112] [--reps 3] [--processes 1] [--quick]
                               [--out benchmarks/RESULTS.md]

For every architecture and batch size both frameworks get the same random
images and the same weights (a torchvision model with random weights and
randomised BatchNorm statistics, ported with `porting.from_torchvision`), and
run five kinds of step:

* ``eval``: torch ``net.eval()`` under ``torch.inference_mode()`` vs the jitted
  ``model.apply(prepared, x, train=False)`` with ``prepared =
  jt.models.prepare_inference(model, variables)``, made once before timing (the
  Winograd kernel transforms, computed once as `fit.evaluate`, `fit.predict`,
  `features.extract` and the CLI's predict do);
* ``apply``: the same torch step vs the jitted ``model.apply(variables, x,
  train=False)`` on the variables as they are (the kernel transforms in every call);
* ``finetune``: one full SGD step on the summed cross-entropy (d2l's recipe:
  lr 5e-5, head x10, weight decay 1e-3, BatchNorm in training mode) -- torch
  ``net.train()`` + ``torch.optim.SGD`` param groups vs
  ``train.make_train_step`` with ``partition.finetune`` rules;
* ``frozen``: only the head trains -- torch ``requires_grad=False`` on the rest
  and the backbone in ``eval()`` vs ``partition.preset(arch, "head")`` with the
  static ``frozen_stages = partition.frozen_prefix(...)`` (stop_gradient, no
  backward through the backbone);
* ``epoch`` (ResNet-18 only: d2l's hot-dog recipe end to end): one pass over a
  generated hot-dog-like ImageFolder, decoding, augmenting and fine-tuning --
  torchvision ``ImageFolder`` + ``DataLoader`` vs ``jtransfer.data.make_loader``
  + the same train step as ``finetune``.

The two frameworks alternate rep by rep in one process (which one goes first
alternates too; each timed call follows an untimed one of the same framework, see
`alternate`), so load from other processes hits both alike; the table shows
medians and ``jt/torch`` = jtransfer images/s over torch images/s (> 1: jtransfer
is faster). jax compile time is the first call minus the steady-state median.
Memory is the peak resident-set growth of the process during a steady-state
step, sampled every few ms from another thread during the untimed call before
each timed one: approximate (allocator caching, sampling granularity), good for
orders of magnitude only.

The jax side runs with the XLA CPU flags in `JAX_XLA_FLAGS`: none, XLA's
defaults (docs/performance.md lists the flags measured and dropped).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# XLA CPU flags for the jax side; they must be in the environment before jax
# creates its CPU client (see `configure_jax`). Empty: XLA's defaults measured
# best (docs/performance.md, "Tried, not kept", lists the flags tried).
JAX_XLA_FLAGS = ""

DEFAULT_ARCHS = ("resnet18", "resnet50", "vgg16_bn")
DEFAULT_BATCHES = (16, 32)
DEFAULT_SIZE = 112
DEFAULT_REPS = 3
MODES = ("eval", "apply", "finetune", "frozen", "epoch")
# The end-to-end epoch (data + train) is d2l's hot-dog recipe, a ResNet-18 one.
EPOCH_ARCHS = ("resnet18",)
EPOCH_BATCHES_PER_EPOCH = 8  # images per epoch = 8 x batch
EPOCH_IMAGE_SIDE = 256  # generated JPEGs, each side 192-320 px (hot-dog photos: ~200-500)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NUM_CLASSES = 2  # the d2l hot-dog head
LR, HEAD_MULT, WEIGHT_DECAY = 5e-5, 10.0, 1e-3  # d2l's fine-tuning recipe


def configure_jax(xla_flags: str | None = JAX_XLA_FLAGS, compile_cache: str | None = None):
    """Sets XLA_FLAGS (appended to the user's) before jax's CPU backend exists.

    Must run before the first jax computation of the process; it raises if the
    backend was already created with other flags, rather than silently measuring
    the wrong configuration.
    """
    if xla_flags:
        have = os.environ.get("XLA_FLAGS", "")
        if xla_flags not in have:
            import jax._src.xla_bridge as xb

            if xb._backends:  # private, but the only way to know it is too late
                raise RuntimeError("configure_jax() must run before jax creates its backend")
            os.environ["XLA_FLAGS"] = f"{have} {xla_flags}".strip()
    if compile_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ---------------------------------------------------------------------------
# Measuring.


def _rss_bytes() -> int:
    """This process's resident set size (psutil; /proc on Linux without it)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


class PeakRss:
    """Peak RSS growth over a call, sampled every `interval` s on a helper thread."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, int]:
        """Runs fn(); returns (seconds, peak RSS minus RSS before, in bytes)."""
        before = _rss_bytes()
        peak = [before]
        done = threading.Event()

        def sample():
            while not done.wait(self.interval):
                peak[0] = max(peak[0], _rss_bytes())

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        done.set()
        t.join()
        peak[0] = max(peak[0], _rss_bytes())
        return dt, peak[0] - before


@dataclasses.dataclass
class Result:
    """One (arch, batch, mode): per-rep seconds of both frameworks, in the order run."""

    arch: str
    batch: int
    size: int
    mode: str
    torch_s: list[float]
    jax_s: list[float]
    torch_first_s: float
    jax_first_s: float
    torch_mem: int
    jax_mem: int
    check: str = ""
    torch_threads: int = 0
    images: int = 0  # images per timed call; 0: one batch
    # jt/torch of each fresh process when the cell was run in several (`merge_processes`).
    process_ratios: list[float] = dataclasses.field(default_factory=list)

    @property
    def torch_ips(self) -> float:
        return (self.images or self.batch) / statistics.median(self.torch_s)

    @property
    def jax_ips(self) -> float:
        return (self.images or self.batch) / statistics.median(self.jax_s)

    @property
    def ratio(self) -> float:
        """jtransfer images/s over torch images/s (> 1: jtransfer faster)."""
        return self.jax_ips / self.torch_ips

    @property
    def paired(self) -> tuple[float, float]:
        """Range of the per-rep ratios torch_s[i] / jax_s[i] (adjacent runs)."""
        r = [t / j for t, j in zip(self.torch_s, self.jax_s, strict=True)]
        return min(r), max(r)

    @property
    def compile_s(self) -> float:
        return max(self.jax_first_s - statistics.median(self.jax_s), 0.0)


def merge_processes(runs: Sequence[Sequence[Result]]) -> list[Result]:
    """One Result per cell from the same cells run in several fresh processes.

    The timed reps are pooled (the table's medians are over all of them), the first
    calls and compile times are medians, memory the largest, the agreement check the
    worst, and `process_ratios` keeps each process's own jt/torch. Needed because a
    cell's ratio moves between processes more than its per-rep spread shows (2-core
    EPYC, ResNet-50 batch-16 fine-tune, eight processes: 0.96-1.11).
    """
    if not runs:
        return []
    keys = [(r.arch, r.batch, r.size, r.mode) for r in runs[0]]
    for run in runs[1:]:
        if [(r.arch, r.batch, r.size, r.mode) for r in run] != keys:
            raise ValueError("merge_processes: the processes ran different cells")
    merged = []
    for cells in zip(*runs, strict=True):
        checks = [c.check for c in cells if c.check]
        threads = [c.torch_threads for c in cells]
        merged.append(
            dataclasses.replace(
                cells[0],
                torch_s=[t for c in cells for t in c.torch_s],
                jax_s=[t for c in cells for t in c.jax_s],
                torch_first_s=statistics.median(c.torch_first_s for c in cells),
                jax_first_s=statistics.median(c.jax_first_s for c in cells),
                torch_mem=max(c.torch_mem for c in cells),
                jax_mem=max(c.jax_mem for c in cells),
                check=max(checks, key=_err) if checks else "",
                torch_threads=max(set(threads), key=threads.count),
                process_ratios=[c.ratio for c in cells],
            )
        )
    return merged


def alternate(
    torch_fn: Callable[[], Any],
    jax_fn: Callable[[], Any],
    reps: int,
    meter: PeakRss,
    after_first: Callable[[], Any] | None = None,
) -> tuple[list[float], list[float], float, float, int, int]:
    """First call of each (torch warm-up, jax compile), then `reps` alternating pairs.

    In every rep each side runs twice in a row and only the second call is timed:
    a call right after the other framework's paid for that framework's memory
    churn (on the 2-core EPYC a ResNet-18 jax step took 616 ms right after a torch
    step, 358 ms right after its own; torch's own steps vary less), and a training
    loop runs its own steps back to back. The first of the two is the one whose
    peak memory `meter` samples: its sampling thread, waking every few ms, slowed
    the call it watched (2 cores, ResNet-18 eval: jax +6-16%, torch +2-5%).

    `after_first` runs between the first calls and the timed reps (e.g. to
    compare the two sides' first results).
    """
    torch_first, _ = meter(torch_fn)
    jax_first, _ = meter(jax_fn)
    if after_first is not None:
        after_first()
    ts, js, tm, jm = [], [], 0, 0
    for i in range(reps):
        order = ((ts, torch_fn, 0), (js, jax_fn, 1))
        for out, fn, which in order if i % 2 == 0 else order[::-1]:
            _, mem = meter(fn)  # settle and sample memory: see the docstring
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
            if which == 0:
                tm = max(tm, mem)
            else:
                jm = max(jm, mem)
    return ts, js, torch_first, jax_first, tm, jm


def race_torch_threads(torch_fn: Callable[[], Any], candidates: Sequence[int]) -> int:
    """Times one torch call per thread count and keeps the fastest (set and returned).

    On an idle machine all cores win; on a loaded one OpenMP's barriers stall
    whenever one of its threads is descheduled, and one thread can be 2-3x faster.
    """
    import torch

    best = None
    for n in dict.fromkeys(candidates):
        torch.set_num_threads(n)
        t0 = time.perf_counter()
        torch_fn()
        dt = time.perf_counter() - t0
        if best is None or dt < best[0]:
            best = (dt, n)
    torch.set_num_threads(best[1])
    return best[1]


# ---------------------------------------------------------------------------
# The two sides.


@dataclasses.dataclass
class Pair:
    """The same network and batch on both sides."""

    arch: str
    net: Any  # torch.nn.Module, eval mode
    model: Any  # flax module
    variables: dict
    x_torch: Any  # (N, 3, H, W)
    y_torch: Any
    batch: dict  # {"image": (N, H, W, 3), "label": (N,)} jax arrays
    # "bfloat16": mixed precision on both sides, torch.autocast("cpu", torch.bfloat16) vs
    # jtransfer compute_dtype=bfloat16 (float32 parameters, statistics and optimizer).
    dtype: str = "float32"


def make_pair(arch: str, batch: int, size: int, seed: int = 0, dtype: str = "float32") -> Pair:
    """A torchvision model with random weights and its port; one random batch."""
    import jax
    import numpy as np
    import torch
    import torchvision

    import jtransfer as jt
    import porting
    from porting.parity import randomize_batchnorm

    torch.manual_seed(seed)
    net = randomize_batchnorm(getattr(torchvision.models, arch)(num_classes=NUM_CLASSES), seed)
    net.eval()
    variables = porting.from_torchvision(net.state_dict(), arch)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
    return Pair(
        arch=arch,
        net=net,
        model=jt.models.create(arch, num_classes=NUM_CLASSES),
        variables=variables,
        x_torch=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
        y_torch=torch.from_numpy(y).long(),
        batch={"image": jax.device_put(x), "label": jax.device_put(y)},
        dtype=dtype,
    )


def _head_name(arch: str) -> str:
    import jtransfer as jt

    return {"fc": "fc", "classifier_6": "classifier.6"}[jt.models.family(arch).head]


def torch_step(pair: Pair, mode: str) -> tuple[Callable[[], Any], Callable[[], float]]:
    """(step, first_value): a torch step of `mode` on a private copy of the net."""
    import torch
    import torch.nn.functional as F

    bf16 = pair.dtype == "bfloat16"
    if mode in ("eval", "apply"):
        net = pair.net.eval()
        out = {}

        def run_eval():
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                out["logits"] = net(pair.x_torch).float()

        return run_eval, lambda: out["logits"].numpy()

    net, opt = _torch_trainer(pair, mode)
    out = {}

    def run_train():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits = net(pair.x_torch)
        loss = F.cross_entropy(logits.float(), pair.y_torch, reduction="sum")
        loss.backward()
        opt.step()
        out["loss"] = loss.detach()

    return run_train, lambda: float(out["loss"])


def _torch_trainer(pair: Pair, mode: str, **to: Any) -> tuple[Any, Any]:
    """(net, optimizer) for a `finetune` or `frozen` step, on a private copy of the net.

    `to`: `Module.to` arguments (device, memory_format) applied before the
    optimizer is built, as torch advises.
    """
    import torch

    net = copy.deepcopy(pair.net).train()
    if to:
        net = net.to(**to)
    head = _head_name(pair.arch)
    named = dict(net.named_parameters())
    head_params = [p for n, p in named.items() if n.startswith(head + ".")]
    body_params = [p for n, p in named.items() if not n.startswith(head + ".")]
    if mode == "finetune":
        groups = [{"params": body_params}, {"params": head_params, "lr": LR * HEAD_MULT}]
    else:  # frozen: only the head trains, the backbone runs in eval() mode
        for p in body_params:
            p.requires_grad_(False)
        for name, child in net.named_children():
            if name not in ("fc", "classifier"):
                child.eval()
        groups = [{"params": head_params}]
    return net, torch.optim.SGD(groups, lr=LR, weight_decay=WEIGHT_DECAY)


def make_epoch_folder(root: Path, batch: int) -> Path:
    """A generated hot-dog-like ImageFolder of 8 x batch JPEGs, 2 classes (the real data
    cannot be downloaded here); reused when it exists."""
    from jtransfer import data

    folder = root / f"hotdog-like-{batch * EPOCH_BATCHES_PER_EPOCH}"
    if not folder.exists():
        n = batch * EPOCH_BATCHES_PER_EPOCH // NUM_CLASSES
        data.make_demo_imagefolder(folder, n_per_class=n, size=EPOCH_IMAGE_SIDE, seed=0)
    return folder


def torch_epoch(pair: Pair, folder: Path, size: int) -> tuple[Callable[[], Any], int]:
    """(epoch, images per epoch): torchvision ImageFolder + DataLoader with d2l's training
    augmentation, then the fine-tune step per batch (decoding in this process)."""
    import torch
    import torch.nn.functional as F
    import torchvision
    from torchvision import transforms as T

    net, opt = _torch_trainer(pair, "finetune")
    augment = T.Compose(
        [
            T.RandomResizedCrop(size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=augment)
    batch = len(pair.y_torch)
    loader = torch.utils.data.DataLoader(dataset, batch, shuffle=True, drop_last=True)

    def run_epoch():
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y, reduction="sum").backward()
            opt.step()

    return run_epoch, len(loader) * batch


def jax_epoch(pair: Pair, folder: Path, size: int) -> tuple[Callable[[], Any], int]:
    """(epoch, images per epoch): `jtransfer.data.make_loader` (grain, decoding in this
    process one batch ahead on a thread) feeding the fine-tune train step."""
    import jax

    from jtransfer import data

    step, state = _jax_trainer(pair, "finetune")
    holder = {"state": state}
    batch = len(pair.y_torch)
    loader = data.make_loader(
        data.ImageFolder(folder), batch_size=batch, train=True, image_size=size
    )

    def run_epoch():
        state = holder["state"]
        for b in loader:
            state, _ = step(state, b)
        holder["state"] = jax.block_until_ready(state)

    return run_epoch, loader.steps_per_epoch * batch


def jax_step(pair: Pair, mode: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(step, first_value): the jtransfer counterpart of `torch_step`."""
    import jax
    import jax.numpy as jnp

    import jtransfer as jt

    model, variables, batch = pair.model, pair.variables, pair.batch
    compute_dtype = jnp.bfloat16 if pair.dtype == "bfloat16" else None
    if compute_dtype is not None:
        model = model.clone(dtype=compute_dtype)
    if mode in ("eval", "apply"):
        if mode == "eval":
            variables = jax.block_until_ready(jt.models.prepare_inference(model, variables))
        apply = jax.jit(lambda v, x: model.apply(v, x, train=False).astype(jnp.float32))
        out = {}

        def run_eval():
            out["logits"] = jax.block_until_ready(apply(variables, batch["image"]))

        return run_eval, lambda: jax.device_get(out["logits"])

    step, state = _jax_trainer(pair, mode, compute_dtype=compute_dtype)
    holder = {"state": state}

    def run_train():
        state, metrics = step(holder["state"], batch)
        holder["state"], holder["metrics"] = jax.block_until_ready((state, metrics))

    return run_train, lambda: float(holder["metrics"]["loss"])


def _jax_trainer(
    pair: Pair, mode: str, donate: bool = True, compute_dtype: Any = None
) -> tuple[Callable, Any]:
    """(train step, initial state) for a `finetune` or `frozen` step (`compute_dtype`:
    as for `train.make_train_step`)."""
    from jtransfer import partition, train

    if mode == "finetune":
        rules, frozen = partition.finetune(pair.arch, HEAD_MULT), 0
    else:
        rules = partition.preset(pair.arch, "head")
        frozen = partition.frozen_prefix(pair.arch, rules)
    params = pair.variables["params"]
    tx = partition.make_optimizer(params, rules, learning_rate=LR, weight_decay=WEIGHT_DECAY)
    step = train.make_train_step(
        pair.model,
        tx,
        loss_reduction="sum",
        frozen_stages=frozen,
        donate=donate,
        compute_dtype=compute_dtype,
    )
    return step, train.create_train_state(pair.model, pair.variables, tx)


def _agreement(mode: str, arch: str, t_val, j_val) -> str:
    import numpy as np

    if mode in ("eval", "apply"):
        t, j = np.asarray(t_val, np.float64), np.asarray(j_val, np.float64)
        return f"logits rel err {np.abs(t - j).max() / max(np.abs(t).max(), 1e-30):.1e}"
    if arch.startswith("vgg"):  # dropout draws differ between the frameworks
        return ""
    return f"1st-step loss rel err {abs(t_val - j_val) / max(abs(t_val), 1e-30):.1e}"


def run_case(
    arch: str,
    batch: int,
    size: int,
    reps: int,
    modes: Sequence[str] = MODES,
    log: Callable[[str], Any] | None = None,
    torch_threads: int | str | None = None,
    epoch_dir: Path | None = None,
    dtype: str = "float32",
) -> list[Result]:
    """Every mode of one (arch, batch) case, torch and jax alternating.

    `epoch` runs for `EPOCH_ARCHS` only, on a generated image folder kept in
    `epoch_dir` (a fresh temporary directory when None).

    `torch_threads`: None keeps torch's setting, an int sets it, "auto" races
    `os.cpu_count()` threads against 1 after the warm-up of every mode and keeps
    the faster (`race_torch_threads`).
    """
    import gc

    import torch

    if isinstance(torch_threads, int):
        torch.set_num_threads(torch_threads)

    log = log or (lambda msg: print(msg, flush=True))
    pair = make_pair(arch, batch, size, dtype=dtype)
    meter = PeakRss()
    results = []
    for mode in modes:
        images = 0
        if mode == "epoch":
            if arch not in EPOCH_ARCHS or dtype != "float32":
                continue
            folder = make_epoch_folder(epoch_dir or Path(tempfile.mkdtemp()), batch)
            t_fn, images = torch_epoch(pair, folder, size)
            j_fn, _ = jax_epoch(pair, folder, size)
            t_val = j_val = lambda: None
        else:
            t_fn, t_val = torch_step(pair, mode)
            j_fn, j_val = jax_step(pair, mode)
        check: list[str] = []

        def after_first(mode=mode, t_fn=t_fn, t_val=t_val, j_val=j_val, check=check):
            check.append("" if mode == "epoch" else _agreement(mode, arch, t_val(), j_val()))
            if torch_threads == "auto":
                race_torch_threads(t_fn, (os.cpu_count() or 1, 1))

        ts, js, tf, jf, tm, jm = alternate(t_fn, j_fn, reps, meter, after_first)
        r = Result(arch, batch, size, mode, ts, js, tf, jf, tm, jm, check[0], images=images)
        r.torch_threads = torch.get_num_threads()
        results.append(r)
        log(
            f"  {arch:16s} b{batch:<3d} {mode:8s} torch {r.torch_ips:7.1f} img/s "
            f"({r.torch_threads} thr)  jax {r.jax_ips:7.1f} img/s  x{r.ratio:.2f}  "
            f"compile {r.compile_s:5.1f}s  {r.check}"
        )
        del t_fn, j_fn, t_val, j_val
        gc.collect()
    return results


# ---------------------------------------------------------------------------
# Report.


def machine_info() -> dict[str, str]:
    import jax
    import jaxlib
    import torch

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return {
        "nproc": str(os.cpu_count()),
        "affinity": str(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else "?",
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch threads": f"{torch.get_num_threads()} intra-op, "
        f"{torch.get_num_interop_threads()} inter-op",
        "jax": f"{jax.__version__} (jaxlib {jaxlib.__version__}, {jax.default_backend()})",
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") or "(none: XLA defaults)",
        # Set by hostmem.reexec_with_hugepages for both frameworks (JTRANSFER_HUGEPAGES=0: off).
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "") or "(none)",
        "load average at start": load,
    }


def _err(check: str) -> float:
    return float(check.rsplit(" ", 1)[1])


def _compile_text(r: Result) -> str:
    # A compile shorter than the step-to-step noise can come out negative.
    raw = r.jax_first_s - statistics.median(r.jax_s)
    return f"{raw:.1f}" if raw > 0 else "< noise"


def markdown(results: Sequence[Result], info: dict[str, str], cfg: dict[str, Any]) -> str:
    processes = cfg.get("processes", 1)
    lines = [
        "# jtransfer vs PyTorch on CPU",
        "",
        f"Command: `{cfg['command']}`",
        "",
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in info.items()) + ".",
        "",
        f"Compute dtype: {cfg.get('dtype', 'float32')}"
        + (
            " (torch.autocast('cpu', torch.bfloat16) vs jtransfer compute_dtype=bfloat16)."
            if cfg.get("dtype") == "bfloat16"
            else "."
        ),
        "",
        f"Images {cfg['size']}x{cfg['size']}, {NUM_CLASSES} classes, {cfg['reps']} timed reps "
        "per cell after one warm-up (jax: compile) call; torch and jax alternate rep by rep in "
        "one process (each timed call right after an untimed one of the same side), so load "
        "from other processes (see the load average above) hits both alike; the ratio of "
        "adjacent runs is the meaningful figure. "
        "`jt/torch` = jtransfer images/s / torch images/s from the medians (> 1: jtransfer "
        "faster); `paired` = min-max of the per-rep ratios. "
        + (
            f"Each (arch, batch) case ran in {processes} fresh processes, in turn: the "
            "medians and `jt/torch` are over all their reps, `processes` = min-max (median) "
            "of the processes' own jt/torch. "
            if processes > 1
            else ""
        )
        + "Compile = jax first call minus "
        "its median (`< noise` where the step-to-step noise exceeds it). Peak dRSS = "
        "growth of the process RSS during a steady-state step, "
        "sampled every 5 ms during the untimed call before each timed one: approximate. "
        "`thr` = torch intra-op threads used "
        + (
            "(`--torch-threads auto`: after the warm-up, one call with nproc threads and one "
            "with 1 thread, the faster kept per cell). "
            if cfg.get("torch_threads") == "auto"
            else ". "
        )
        + "jax runs XLA's CPU thread pool (one thread per core) with XLA_FLAGS as above.",
        "",
        "| arch | batch | step | torch img/s | thr | jtransfer img/s | jt/torch | paired | "
        + ("processes | " if processes > 1 else "")
        + "jax compile s | torch peak dRSS MB | jax peak dRSS MB |",
        "|---|---:|---|---:|---:|---:|---:|---|"
        + ("---|" if processes > 1 else "")
        + "---:|---:|---:|",
    ]
    for r in results:
        lo, hi = r.paired
        per_process = ""
        if processes > 1:
            pr = r.process_ratios
            per_process = f"{min(pr):.2f}-{max(pr):.2f} (median {statistics.median(pr):.2f}) | "
        lines.append(
            f"| {r.arch} | {r.batch} | {r.mode} | {r.torch_ips:.1f} | {r.torch_threads} | "
            f"{r.jax_ips:.1f} | "
            f"{r.ratio:.2f} | {lo:.2f}-{hi:.2f} | {per_process}{_compile_text(r)} | "
            f"{r.torch_mem / 2**20:.0f} | {r.jax_mem / 2**20:.0f} |"
        )
    worst: dict[tuple[str, str], str] = {}
    for r in results:  # the largest relative error per (arch, step) over batch sizes
        key = (r.arch, r.mode)
        if r.check and (key not in worst or _err(r.check) > _err(worst[key])):
            worst[key] = r.check
    if worst:
        checks = "; ".join(f"{a} {m}: {c}" for (a, m), c in worst.items())
        lines += [
            "",
            f"Same computation (first call, torch vs jax, worst over batch sizes): {checks} "
            "(VGG train steps not compared: the dropout draws differ).",
        ]
    lines += [
        "",
        "Steps: eval = `net.eval()` + `torch.inference_mode()` vs jitted `model.apply` on "
        "`models.prepare_inference` variables (Winograd kernel transforms made once, as "
        "jtransfer's evaluate/predict/extract do); apply = the same vs `model.apply` on the "
        "plain variables (transforms in every call); "
        "finetune = full SGD step, summed CE, BN in train mode, head lr x10, wd 1e-3 "
        "(`partition.finetune` + `train.make_train_step`); frozen = head only, backbone "
        "frozen (torch: `requires_grad=False` + backbone `eval()`; jax: "
        "`preset(arch, 'head')`, static `frozen_stages=frozen_prefix(...)`); epoch "
        f"(ResNet-18, d2l's hot-dog recipe) = one pass over a generated hot-dog-like "
        f"ImageFolder ({EPOCH_BATCHES_PER_EPOCH} x batch JPEGs, sides 192-320 px, 2 classes): "
        "decode, RandomResizedCrop + flip + normalise, finetune step per batch; torch: "
        "torchvision `ImageFolder` + `DataLoader(shuffle=True)`, jax: `data.make_loader` "
        "(grain), both decoding in the benchmark process (`num_workers=0` / "
        "`worker_count=0`; jtransfer's loader decodes one batch ahead on a thread). Its "
        "img/s count images per epoch; its compile is the first epoch's extra time.",
        f"Total wall time {cfg['wall_s']:.0f} s; process CPU time {cfg.get('cpu_s', 0):.0f} s "
        f"(an idle machine with {os.cpu_count()} cores would need about CPU / cores).",
        "",
    ]
    return "\n".join(lines)


def write_table(out: Path | None, text: str) -> None:
    """Writes a results table to `out` (its folder created); None writes nothing."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


def _threads(text: str) -> int | str | None:
    if text in ("auto", "default"):
        return None if text == "default" else text
    return int(text)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--archs",
        nargs="+",
        default=None,
        metavar="ARCH",
        help=f"any of jt.models.ARCHS (default: {' '.join(DEFAULT_ARCHS)}; resnet18 with --quick)",
    )
    p.add_argument(
        "--batch",
        nargs="+",
        type=int,
        default=None,
        help=f"batch sizes (default: {' '.join(map(str, DEFAULT_BATCHES))}; 16 with --quick)",
    )
    p.add_argument(
        "--size", type=int, default=DEFAULT_SIZE, help="image side (default %(default)s)"
    )
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help=f"timed reps per cell (default: {DEFAULT_REPS}; 2 with --quick)",
    )
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="bfloat16: torch.autocast('cpu', torch.bfloat16) against jtransfer "
        "compute_dtype=bfloat16, parameters float32 on both sides (the epoch mode runs in "
        "float32 only)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="resnet18, batch 16, 2 reps, each unless --archs, --batch or --reps says "
        "otherwise; writes RESULTS-quick.md unless --out: about a minute per arch",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown table (default: benchmarks/RESULTS.md, the checked-in table; "
        "benchmarks/RESULTS-quick.md with --quick)",
    )
    p.add_argument("--xla-flags", default=JAX_XLA_FLAGS, help="XLA CPU flags for the jax side")
    p.add_argument("--compile-cache", default=None, help="jax persistent compilation cache dir")
    p.add_argument(
        "--torch-threads",
        type=_threads,
        default="auto",
        help="torch.set_num_threads; 'auto' (default) races nproc threads against 1 "
        "after each warm-up and keeps the faster; 'default' leaves torch's own setting",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every (arch, batch) case in this process; by default each case gets a "
        "fresh process when there are several (memory left by earlier cases slowed later "
        "ones by up to 2x on the 2-core EPYC)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run each (arch, batch) case in this many fresh processes, in turn, and pool "
        "their reps (a cell's ratio moves between processes more than within one)",
    )
    p.add_argument("--results-json", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.processes < 1:
        p.error(f"--processes must be at least 1, got {args.processes}")
    if args.processes > 1 and args.in_process:
        p.error("--processes N > 1 runs each case in fresh processes; drop --in-process")
    # --quick picks small defaults; what the command line names explicitly wins over them.
    if args.batch is None:
        args.batch = [16] if args.quick else list(DEFAULT_BATCHES)
    if args.reps is None:
        args.reps = 2 if args.quick else DEFAULT_REPS
    if args.archs is None:
        args.archs = ["resnet18"] if args.quick else list(DEFAULT_ARCHS)
    if args.out is None:
        args.out = Path(__file__).with_name("RESULTS-quick.md" if args.quick else "RESULTS.md")
    import jtransfer as jt  # importing jax creates no backend: XLA flags can still be set

    unknown = [a for a in args.archs if a not in jt.models.ARCHS]
    if unknown:
        p.error(f"unknown --archs {', '.join(unknown)}; choose from {', '.join(jt.models.ARCHS)}")
    return args


def run_case_in_subprocess(arch: str, batch: int, args: argparse.Namespace) -> list[Result]:
    """`run_case` in a fresh Python process (this script, one case), its results read back."""
    threads = args.torch_threads
    with tempfile.TemporaryDirectory(prefix="jtransfer-bench-case-") as tmp:
        out = Path(tmp) / "results.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--archs", arch]
        cmd += ["--batch", str(batch), "--size", str(args.size), "--reps", str(args.reps)]
        cmd += ["--modes", *args.modes, f"--xla-flags={args.xla_flags}", "--dtype", args.dtype]
        cmd += ["--torch-threads", "default" if threads is None else str(threads)]
        cmd += ["--results-json", str(out)]
        if args.compile_cache:
            cmd += ["--compile-cache", args.compile_cache]
        subprocess.run(cmd, check=True)
        return [Result(**r) for r in json.loads(out.read_text())]


def main(argv: Sequence[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    configure_jax(args.xla_flags, args.compile_cache)
    import resource

    start = time.perf_counter()
    info = machine_info()
    print("machine:", "; ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    cases = [(arch, batch) for arch in args.archs for batch in args.batch]
    results = []
    if args.processes > 1:
        # Process p of every case before process p + 1 of any: slow drift of the machine
        # spreads over the cases instead of landing on one.
        runs: dict[tuple[str, int], list[list[Result]]] = {case: [] for case in cases}
        for _ in range(args.processes):
            for arch, batch in cases:
                runs[arch, batch].append(run_case_in_subprocess(arch, batch, args))
        for case in cases:
            results += merge_processes(runs[case])
    elif len(cases) > 1 and not args.in_process:
        for arch, batch in cases:
            results += run_case_in_subprocess(arch, batch, args)
    else:
        with tempfile.TemporaryDirectory(prefix="jtransfer-bench-") as epoch_dir:
            for arch, batch in cases:
                results += run_case(
                    arch,
                    batch,
                    args.size,
                    args.reps,
                    args.modes,
                    torch_threads=args.torch_threads,
                    epoch_dir=Path(epoch_dir),
                    dtype=args.dtype,
                )
    if args.results_json:  # a case run for a parent process: it writes the table
        args.results_json.write_text(json.dumps([dataclasses.asdict(r) for r in results]))
        return results
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cfg = {
        "command": " ".join(["python benchmarks/bench.py", *(argv or sys.argv[1:])]),
        "size": args.size,
        "reps": args.reps,
        "wall_s": time.perf_counter() - start,
        "cpu_s": usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime,
        "torch_threads": args.torch_threads,
        "processes": args.processes,
        "dtype": args.dtype,
    }
    text = markdown(results, info, cfg)
    write_table(args.out, text)
    print()
    print(text)
    return results


if __name__ == "__main__":
    from jtransfer import hostmem

    hostmem.reexec_with_hugepages()  # huge pages for XLA's per-step buffers
    main()
