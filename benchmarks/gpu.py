"""jtransfer vs PyTorch on a GPU: the fine-tune step against torch.compile + AMP + channels_last.

One command (on a machine with a CUDA GPU that both torch and jax see):

    python benchmarks/gpu.py [--archs resnet50] [--batch 128 256] [--size 224]
                             [--modes finetune eval frozen] [--out benchmarks/RESULTS-gpu.md]

(on a machine where jtransfer is not installed: `PYTHONPATH=. python3 benchmarks/gpu.py`).
The default, ResNet-50 fine-tune steps at two batch sizes and two precisions,
is four cells: each compiles on both sides and then times 2 x reps x steps
steps per side (torch.compile of a ResNet-18 train step took about a minute on
the 2-core CPU; its time on a GPU is not measured yet).

For every architecture and batch size both frameworks get the same random images
and the same weights (`bench.make_pair`: a torchvision model with random weights
and randomised BatchNorm statistics, ported with `porting.from_torchvision`), and
each step kind runs at two precisions:

* ``fp32``: torch eager in float32 (NCHW, `cudnn.benchmark`) vs jtransfer in
  float32;
* ``bf16`` (the issue's target for ResNet-50 training): ``torch.compile(net)``
  under ``torch.autocast("cuda", torch.bfloat16)`` on channels_last tensors vs
  jtransfer with ``compute_dtype=jnp.bfloat16`` (parameters, BatchNorm
  statistics, the loss and the optimizer stay float32 on both sides).

Steps are `bench.py`'s: ``finetune`` is d2l's full SGD step (summed
cross-entropy, head lr x10, weight decay 1e-3, BatchNorm in training mode),
``frozen`` trains the head only, ``eval`` is the inference forward. Off the CPU
jtransfer's convolutions are XLA's own (cuDNN), see `jtransfer.models.conv`.

Each timed call runs `--steps` steps back to back and then waits for the device
(`torch.cuda.synchronize`, `jax.block_until_ready`); the two frameworks
alternate call by call after warm-up (`bench.alternate`), and the table gives
medians per step and ``jt/torch`` (> 1: jtransfer faster).

TFLOP/s counts model FLOPs: 2 x multiply-adds of every convolution and linear
layer of the forward pass (forward hooks on the torch net), x3 for a fine-tune
step (forward, input gradient, weight gradient), x1 for eval and for the
frozen step (its backward covers the head alone, which is not counted).
``% peak`` divides by the card's dense bfloat16 peak from NVIDIA's datasheets
(`BF16_PEAK_TFLOPS`, matched on the device name), and the header also gives a
bfloat16 8192^3 matrix product measured by torch in the same run, the ceiling a
real kernel reaches on that card.

Memory: torch's ``torch.cuda.max_memory_allocated`` over the cell; jax's
``peak_bytes_in_use`` of the device, which jax cannot reset, so it is the
process's peak so far (cells run in the order of `--modes`, each at bf16 then fp32).

`--device cpu` runs the same code on the CPU (torch.compile through inductor's
C++ backend, autocast on the CPU): for checking the script, not for numbers.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# jax must not take 75% of the GPU up front: torch shares the card in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

DEFAULT_ARCHS = ("resnet50",)
DEFAULT_BATCHES = (128, 256)
DEFAULT_SIZE = 224
DEFAULT_REPS = 5
DEFAULT_STEPS = 10
MODES = ("eval", "finetune", "frozen")
PRECISIONS = ("bf16", "fp32")

# Dense (no sparsity) bfloat16 tensor-core peaks in TFLOP/s, NVIDIA datasheets.
# Matched in order against the lower-cased device name.
BF16_PEAK_TFLOPS = (
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),
    ("gh200", 989.0),
    ("a100", 312.0),
    ("l40s", 362.0),
    ("l4", 121.0),
    ("a10", 125.0),
)


def _load_bench():
    """benchmarks/bench.py as a module (this folder is not a package)."""
    if "jt_bench" in sys.modules:
        return sys.modules["jt_bench"]
    spec = importlib.util.spec_from_file_location("jt_bench", Path(__file__).with_name("bench.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["jt_bench"] = module
    spec.loader.exec_module(module)
    return module


def bf16_peak(device_name: str) -> float | None:
    """The datasheet dense bf16 peak (TFLOP/s) for a device name, None if unknown."""
    name = device_name.lower()
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def forward_flops(net: Any, x: Any) -> int:
    """2 x multiply-adds of every Conv2d and Linear in one forward pass of `x`."""
    import torch

    total = [0]

    def conv_hook(module, inputs, output):
        kh, kw = module.kernel_size
        per_out = (module.in_channels // module.groups) * kh * kw
        total[0] += 2 * output.numel() * per_out

    def linear_hook(module, inputs, output):
        total[0] += 2 * output.numel() * module.in_features

    hooks = []
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = net.training
    try:
        net.eval()
        with torch.inference_mode():
            net(x)
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    return total[0]


def matmul_tflops(device: str, n: int = 8192, reps: int = 10) -> float:
    """torch bf16 n x n x n products, TFLOP/s (the mean of `reps` after 3 warm-ups)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


class _Plain:
    """`bench.alternate`'s meter without memory sampling (device memory is read apart)."""

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, int]:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0, 0


@dataclasses.dataclass
class Cell(_load_bench().Result):
    """`bench.Result` for one (arch, batch, mode, precision), seconds per step.

    Its medians, `ratio` and `paired` are bench's; `size` is the image side.
    """

    precision: str = "fp32"
    flops: float = 0.0  # model FLOPs per step

    def tflops(self, side: str) -> float:
        return self.flops / statistics.median(getattr(self, f"{side}_s")) / 1e12


def torch_side(
    bench: Any, pair: Any, mode: str, precision: str, device: str, steps: int
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(call running `steps` steps then waiting for the device, first value)."""
    import torch
    import torch.nn.functional as F

    fast = precision == "bf16"
    layout = torch.channels_last if fast else torch.contiguous_format
    x = pair.x_torch.to(device).contiguous(memory_format=layout)
    y = pair.y_torch.to(device)

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=fast)

    out: dict[str, Any] = {}
    if mode == "eval":
        net = copy.deepcopy(pair.net).to(device=device, memory_format=layout).eval()
        fn = torch.compile(net) if fast else net

        def run_eval():
            with torch.inference_mode(), autocast():
                for _ in range(steps):
                    out["v"] = fn(x)
            _sync(device)

        return run_eval, lambda: out["v"].float().cpu().numpy()

    net, opt = bench._torch_trainer(pair, mode, device=device, memory_format=layout)
    fn = torch.compile(net) if fast else net

    def run_train():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with autocast():
                logits = fn(x)
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            loss.backward()
            opt.step()
            out.setdefault("first", loss.detach())
        _sync(device)

    return run_train, lambda: float(out["first"])


def jax_side(
    bench: Any, pair: Any, mode: str, precision: str, steps: int
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """The jtransfer counterpart of `torch_side`."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if precision == "bf16" else None
    out: dict[str, Any] = {}
    if mode == "eval":
        model = pair.model if dtype is None else pair.model.clone(dtype=dtype)
        apply = jax.jit(lambda v, x: model.apply(v, x, train=False))

        def run_eval():
            for _ in range(steps):
                out["v"] = apply(pair.variables, pair.batch["image"])
            jax.block_until_ready(out["v"])

        return run_eval, lambda: jax.device_get(out["v"]).astype("float32")

    step, state = bench._jax_trainer(pair, mode, donate=True, compute_dtype=dtype)
    holder = {"state": state}

    def run_train():
        state = holder["state"]
        for _ in range(steps):
            state, metrics = step(state, pair.batch)
            out.setdefault("first", metrics)
        holder["state"] = jax.block_until_ready(state)

    return run_train, lambda: float(out["first"]["loss"])


def _jax_peak_bytes() -> int:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("peak_bytes_in_use", 0))


def run_case(
    arch: str, batch: int, args: argparse.Namespace, log: Callable[[str], Any] = print
) -> list[Cell]:
    """Every (mode, precision) of one (arch, batch), torch and jax alternating."""
    import gc

    import torch

    bench = _load_bench()
    pair = bench.make_pair(arch, batch, args.size)
    fwd = forward_flops(pair.net, pair.x_torch[:1]) * batch
    cells = []
    for mode in args.modes:
        for precision in args.precisions:
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t_fn, t_val = torch_side(bench, pair, mode, precision, args.device, args.steps)
            j_fn, j_val = jax_side(bench, pair, mode, precision, args.steps)
            first: dict[str, float] = {}

            def compare(t_val=t_val, j_val=j_val, first=first):
                first["t"], first["j"] = t_val(), j_val()

            ts, js, tf, jf, _, _ = bench.alternate(t_fn, j_fn, args.reps, _Plain(), compare)
            flops = fwd * (3 if mode == "finetune" else 1)
            check = bench._agreement(mode, arch, first["t"], first["j"])
            cell = Cell(
                arch=arch,
                batch=batch,
                size=args.size,
                mode=mode,
                torch_s=[t / args.steps for t in ts],
                jax_s=[j / args.steps for j in js],
                torch_first_s=tf,
                jax_first_s=jf,
                torch_mem=torch.cuda.max_memory_allocated() if args.device == "cuda" else 0,
                jax_mem=_jax_peak_bytes() if args.device == "cuda" else 0,
                check=check,
                precision=precision,
                flops=flops,
            )
            cells.append(cell)
            log(
                f"  {arch:9s} b{batch:<4d} {mode:8s} {precision}  torch {cell.torch_ips:8.1f} "
                f"img/s  jax {cell.jax_ips:8.1f} img/s  x{cell.ratio:.2f}  "
                f"jax {cell.tflops('jax'):6.1f} TFLOP/s  {cell.check}"
            )
            del t_fn, j_fn, t_val, j_val
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return cells


def machine_info(device: str) -> dict[str, str]:
    import jax
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__}
    info["jax"] = f"{jax.__version__} ({jax.default_backend()}: {jax.devices()[0].device_kind})"
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        peak = bf16_peak(info["gpu"])
        info["bf16 peak"] = f"{peak:.0f} TFLOP/s (datasheet, dense)" if peak else "unknown"
        info["bf16 8192^3 matmul (torch, this run)"] = f"{matmul_tflops(device):.0f} TFLOP/s"
    else:
        info["gpu"] = "none (--device cpu: a check of the script, not a measurement)"
    return info


def markdown(cells: Sequence[Cell], info: dict[str, str], cfg: dict[str, Any]) -> str:
    peak = bf16_peak(info.get("gpu", ""))
    lines = [
        "# jtransfer vs PyTorch on a GPU",
        "",
        f"Command: `{cfg['command']}`",
        "",
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in info.items()) + ".",
        "",
        f"Images {cfg['size']}x{cfg['size']}; each timed call is {cfg['steps']} steps back "
        f"to back, {cfg['reps']} timed calls per side after warm-up (torch: compile, jax: "
        "compile), alternating. Per-step medians. `bf16`: torch.compile + autocast(bf16) + "
        "channels_last vs jtransfer `compute_dtype=bfloat16`; `fp32`: torch eager float32 vs "
        "jtransfer float32. TFLOP/s = model FLOPs (2 x conv/linear multiply-adds, x3 for "
        "a fine-tune step) / median step time; % peak against the dense bf16 peak above. "
        "Memory: torch max allocated in the cell; jax device peak so far in the process.",
        "",
        *table(cells, peak, cfg["steps"]),
        "",
        f"Total wall time {cfg['wall_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def table(cells: Sequence[Cell], peak: float | None, steps: int) -> list[str]:
    """The markdown table of `cells` (lines); % of `peak` (dense bf16 TFLOP/s) when known."""
    lines = [
        "| arch | batch | step | precision | torch img/s | jtransfer img/s | jt/torch | "
        "paired | torch TFLOP/s | jax TFLOP/s | jax % bf16 peak | jax compile s | "
        "torch MiB | jax MiB | check |",
        "|---|---:|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in cells:
        lo, hi = c.paired
        pct = f"{100 * c.tflops('jax') / peak:.1f}" if peak else "-"
        compile_s = max(c.jax_first_s - steps * statistics.median(c.jax_s), 0.0)
        lines.append(
            f"| {c.arch} | {c.batch} | {c.mode} | {c.precision} | {c.torch_ips:.0f} | "
            f"{c.jax_ips:.0f} | {c.ratio:.2f} | {lo:.2f}-{hi:.2f} | "
            f"{c.tflops('torch'):.1f} | {c.tflops('jax'):.1f} | {pct} | {compile_s:.1f} | "
            f"{c.torch_mem / 2**20:.0f} | {c.jax_mem / 2**20:.0f} | {c.check} |"
        )
    return lines


def prepare(device: str) -> None:
    """Stops (SystemExit, saying what to do) unless torch and jax both see a CUDA GPU;
    then turns on `cudnn.benchmark`. Nothing to check for ``"cpu"``."""
    import jax
    import torch

    if device != "cuda":
        return
    if not torch.cuda.is_available():
        raise SystemExit("gpu.py: torch sees no CUDA GPU (--device cpu runs the script on the CPU)")
    if jax.default_backend() != "gpu":
        raise SystemExit(
            f"gpu.py: jax's backend is {jax.default_backend()!r}, not 'gpu': install a "
            "CUDA jaxlib (pip install -U 'jax[cuda12]' or 'jax[cuda13]')"
        )
    torch.backends.cudnn.benchmark = True


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=list(DEFAULT_ARCHS))
    p.add_argument("--batch", nargs="+", type=int, default=list(DEFAULT_BATCHES))
    p.add_argument("--size", type=int, default=DEFAULT_SIZE)
    p.add_argument("--reps", type=int, default=DEFAULT_REPS, help="timed calls per side")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps per timed call")
    p.add_argument(
        "--modes", nargs="+", default=["finetune"], choices=MODES, help="default: finetune"
    )
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS-gpu.md"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Cell]:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    prepare(args.device)
    start = time.perf_counter()
    info = machine_info(args.device)
    print("machine:", "; ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    cfg = {
        "command": " ".join(["python benchmarks/gpu.py", *(argv or sys.argv[1:])]),
        "size": args.size,
        "reps": args.reps,
        "steps": args.steps,
    }
    cells: list[Cell] = []
    for arch in args.archs:
        for batch in args.batch:
            cells += run_case(arch, batch, args)
            # The table so far after every case: a run cut short keeps what it measured.
            text = markdown(cells, info, {**cfg, "wall_s": time.perf_counter() - start})
            _load_bench().write_table(args.out, text)
    print()
    print(text)
    return cells


if __name__ == "__main__":
    main()
