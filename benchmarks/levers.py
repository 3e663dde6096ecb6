"""Cheap performance levers for jtransfer on CPU, measured on ResNet-18 (issue 8, item 3).

    python benchmarks/levers.py [--batch 16] [--size 112] [--reps 5]
                                [--out benchmarks/LEVERS.md]

XLA flags are read once per process, so every configuration lives in its own
worker process, set up once (weights ported, steps compiled), then driven step
by step by this script: one eval call and one fine-tune step of every worker in
turn, rep after rep, starting with a different worker each rep. All
configurations are thus measured interleaved in time -- the cross-process form
of alternating torch and jax in one process -- and load from other jobs on a
shared machine hits them alike. A lever is judged by the median over reps of
its time relative to the reference measured in the same rep.

Levers:

* XLA CPU flags (``XLA_FLAGS``) for the jax side: single-threaded Eigen,
  oneDNN, XNNPACK, fast math;
* ``intra_op_parallelism_threads``: not an XLA flag (checked: with dashes XLA
  aborts on the unknown flag, without them the token is ignored), so not run;
* torch threads (``torch.set_num_threads``): all cores vs 1;
* buffer donation of the train step (``make_train_step(donate=...)``, on by default);
* jax's persistent compilation cache: compile time of a first process that
  fills a fresh cache and of a second one that finds it (run one after the other).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARK = "LEVER> "
MODES = ("eval", "finetune")


@dataclasses.dataclass(frozen=True)
class Lever:
    name: str
    side: str  # "jax" or "torch"
    setting: str
    xla: str = ""
    torch_threads: int | None = None
    donate: bool = True


def levers(nproc: int) -> tuple[Lever, ...]:
    return (
        Lever("jax baseline", "jax", "XLA defaults, donation on"),
        Lever(
            "jax eigen-1-thread",
            "jax",
            "`--xla_cpu_multi_thread_eigen=false`",
            xla="--xla_cpu_multi_thread_eigen=false",
        ),
        Lever("jax onednn", "jax", "`--xla_cpu_use_onednn=true`", xla="--xla_cpu_use_onednn=true"),
        Lever(
            "jax xnnpack", "jax", "`--xla_cpu_use_xnnpack=true`", xla="--xla_cpu_use_xnnpack=true"
        ),
        Lever(
            "jax fast-math",
            "jax",
            "`--xla_cpu_enable_fast_math=true`",
            xla="--xla_cpu_enable_fast_math=true",
        ),
        Lever("jax no-donation", "jax", "`make_train_step(donate=False)`", donate=False),
        Lever(
            f"torch {nproc} threads",
            "torch",
            f"`torch.set_num_threads({nproc})` (torch's default)",
            torch_threads=nproc,
        ),
        Lever("torch 1 thread", "torch", "`torch.set_num_threads(1)`", torch_threads=1),
    )


# ---------------------------------------------------------------------------
# Worker: one configuration, serving "run one step of mode M" requests.


def _reply(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(cfg: dict) -> None:
    sys.path.insert(0, str(HERE))
    import bench

    bench.configure_jax(cfg.get("xla") or None, cfg.get("cache"))
    import torch

    if cfg.get("torch_threads"):
        torch.set_num_threads(cfg["torch_threads"])
    pair = bench.make_pair("resnet18", cfg["batch"], cfg["size"])
    steps, first = {}, {}
    for mode in cfg["modes"]:
        if cfg["side"] == "jax":
            fn, _ = bench.jax_step(pair, mode, cfg.get("donate", True))
        else:
            fn, _ = bench.torch_step(pair, mode)
        t0 = time.perf_counter()
        fn()
        first[mode] = time.perf_counter() - t0
        steps[mode] = fn
    info = {"first": first, "torch_threads": torch.get_num_threads()}
    if cfg.get("cache"):
        info["cache_files"] = sum(len(f) for _, _, f in os.walk(cfg["cache"]))
    _reply(info)
    for line in sys.stdin:
        mode = line.strip()
        if not mode:
            break
        t0 = time.perf_counter()
        steps[mode]()
        _reply({"s": time.perf_counter() - t0})


class Worker:
    """A `serve` subprocess."""

    def __init__(self, cfg: dict):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        raise RuntimeError(f"worker exited with {self.proc.wait()}")

    def run(self, mode: str) -> float:
        self.proc.stdin.write(mode + "\n")
        self.proc.stdin.flush()
        return self.read()["s"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def one_shot(cfg: dict) -> dict:
    """Set-up (first calls) of one worker, then one timed call per mode; closes it."""
    w = Worker(cfg)
    try:
        info = w.read()
        info["s"] = {m: w.run(m) for m in cfg["modes"]}
        return info
    finally:
        w.close()


# ---------------------------------------------------------------------------
# Report.


def _rel(times: dict, name: str, ref: str, mode: str) -> float:
    """Median over reps of ref time / lever time (> 1: the lever is faster)."""
    pairs = zip(times[ref][mode], times[name][mode], strict=True)
    return statistics.median(r / t for r, t in pairs)


def markdown(all_levers, setup, times, cache, cfg, info) -> str:
    batch = cfg["batch"]
    jax_ref, torch_ref = (
        all_levers[0].name,
        next(lv.name for lv in all_levers if lv.side == "torch"),
    )
    lines = [
        "# Performance levers (ResNet-18, CPU)",
        "",
        f"Command: `{cfg['command']}`",
        "",
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in info.items()) + ".",
        "",
        f"Batch {batch}, {cfg['size']}x{cfg['size']} images; each configuration in its own "
        f"process, all driven in turn for {cfg['reps']} reps (one eval call and one full "
        "fine-tune step each per rep), so load from other processes (load average above) hits "
        "all alike; "
        "`vs ref` = median over reps of the reference's time / the lever's time in the same "
        f"rep (> 1: lever faster; reference: `{jax_ref}` for jax rows, `{torch_ref}` for "
        "torch rows); `vs torch` likewise against each torch row (jt/torch images/s). "
        "Compile = first call minus median.",
        "",
        "| lever | setting | eval img/s | eval vs ref | train img/s | train vs ref | "
        "train compile s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for lv in all_levers:
        t = times[lv.name]
        ref = jax_ref if lv.side == "jax" else torch_ref
        compile_s = (
            f"{max(setup[lv.name]['first']['finetune'] - statistics.median(t['finetune']), 0):.1f}"
            if lv.side == "jax"
            else "-"
        )
        lines.append(
            f"| {lv.name} | {lv.setting} | {batch / statistics.median(t['eval']):.1f} | "
            f"{_rel(times, lv.name, ref, 'eval'):.2f} | "
            f"{batch / statistics.median(t['finetune']):.1f} | "
            f"{_rel(times, lv.name, ref, 'finetune'):.2f} | {compile_s} |"
        )
    torch_rows = [lv.name for lv in all_levers if lv.side == "torch"]
    lines += [
        "",
        "jax configurations against each torch configuration (jt/torch, median of per-rep "
        "ratios; > 1: jtransfer faster):",
        "",
        "| jax lever | " + " | ".join(f"eval vs {n} | train vs {n}" for n in torch_rows) + " |",
        "|---|" + "---:|---:|" * len(torch_rows),
    ]
    for lv in all_levers:
        if lv.side != "jax":
            continue
        cells = [f"{_rel(times, lv.name, n, m):.2f}" for n in torch_rows for m in MODES]
        lines.append(f"| {lv.name} | " + " | ".join(cells) + " |")
    if cache:
        lines += [
            "",
            "Persistent compilation cache (`jax_compilation_cache_dir`, "
            "`jax_persistent_cache_min_compile_time_secs=0`): jax compile time (first call "
            "minus one later call) of a process that fills a fresh cache, then of a second "
            "process that finds it.",
            "",
            "| process | eval compile s | train compile s | cache files |",
            "|---|---:|---:|---:|",
        ]
        for name, r in cache.items():
            c = {m: max(r["first"][m] - r["s"][m], 0.0) for m in MODES}
            lines.append(
                f"| {name} | {c['eval']:.1f} | {c['finetune']:.1f} | {r.get('cache_files')} |"
            )
    lines += ["", f"Total wall time {cfg['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-cache-test", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "LEVERS.md")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve:
        serve(json.loads(args.serve))
        return
    sys.path.insert(0, str(HERE))
    import bench

    start = time.perf_counter()
    base = {"batch": args.batch, "size": args.size, "modes": list(MODES)}
    all_levers = levers(os.cpu_count() or 1)
    workers, setup = {}, {}
    try:
        # Set up one at a time (compiling in parallel would distort compile times).
        for lv in all_levers:
            cfg = {**base, "side": lv.side, "xla": lv.xla, "donate": lv.donate}
            cfg["torch_threads"] = lv.torch_threads
            workers[lv.name] = Worker(cfg)
            setup[lv.name] = workers[lv.name].read()
            print(f"set up {lv.name}: first calls {setup[lv.name]['first']}", flush=True)
        times = {lv.name: {m: [] for m in MODES} for lv in all_levers}
        names = [lv.name for lv in all_levers]
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for mode in MODES:
                for name in order:
                    times[name][mode].append(workers[name].run(mode))
            print(f"rep {rep + 1}/{args.reps} done", flush=True)
    finally:
        for w in workers.values():
            w.close()
    cache = {}
    if not args.no_cache_test:
        with tempfile.TemporaryDirectory(prefix="jt-cache-") as d:
            for name in ("1st process (cold cache)", "2nd process (warm cache)"):
                cache[name] = one_shot({**base, "side": "jax", "cache": d})
                print(f"cache: {name}: {cache[name]}", flush=True)
    info = bench.machine_info()
    info.pop("XLA_FLAGS", None)
    info.pop("torch threads", None)
    cfg = {
        "command": " ".join(["python benchmarks/levers.py", *(argv or sys.argv[1:])]),
        **base,
        "reps": args.reps,
        "wall_s": time.perf_counter() - start,
    }
    text = markdown(all_levers, setup, times, cache, cfg, info)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(
        json.dumps({"setup": setup, "times": times, "cache": cache}, indent=1)
    )
    print()
    print(text)


if __name__ == "__main__":
    main()
