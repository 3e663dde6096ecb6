"""Input pipeline: jtransfer's ``make_loader`` against torchvision's ``DataLoader``.

Both read the same generated photo-like JPEGs (several sizes) and apply the same transforms:
train ``RandomResizedCrop(224)`` + flip + ``ToTensor`` + ``Normalize``, eval
``Resize([256, 256])`` + ``CenterCrop(224)`` + ``ToTensor`` + ``Normalize``, batch 32. For
every worker count (0, 1, 2 and ``os.cpu_count()``) the loaders take turns, rep by rep, in
this one process, so a machine shared with other work slows both alike and the ratios stay
meaningful. jtransfer runs three ways: the default float32 batches (torchvision-exact),
uint8 batches (normalised later on the device), and uint8 with the decode cache (built at
construction, so its time to the first batch includes decoding every image once; its img/s
is what every epoch runs at). A second table: the reduced-size JPEG decode (``draft=True``)
against the exact decode on 4000x3000 photos.

torch runs with one intra-op thread (``torch.set_num_threads(1)``), as its DataLoader workers
do: with 0 workers its default threads race our 2 cores with the benchmark's own threads.

Per cell: images/s over one epoch after the first batch (the steady state; the time to the
first batch, worker start-up included, is its own column), images/s per core used
(``min(workers, cpus)``, at least 1), and the peak resident memory of the process tree (the
benchmark process and its workers, sampled every 20 ms; a forked torch worker's pages shared
with its parent count once per process, as ``ps`` shows them).

Usage::

    python benchmarks/loader_bench.py            # the table in docs/performance.md (~7 min)
    python benchmarks/loader_bench.py --quick    # smoke run (~1-2 min)
    python benchmarks/loader_bench.py --out LOADER.md --json LOADER.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jtransfer import data  # noqa: E402

BATCH = 32
SIZES = ((500, 375), (375, 500), (1024, 768), (768, 1024), (640, 480))  # (width, height)
BIG = (4000, 3000)


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like image: smooth colour gradients, blobs and sensor noise (JPEG-realistic)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 6.28)]
        c = 128 + 80 * np.sin(fx * 6.28 * x / width + phase) * np.cos(fy * 6.28 * y / height)
        channels.append(c)
    pixels = np.stack(channels, -1)
    pixels += rng.normal(0, 12, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_folder(root: Path, n: int, sizes, seed: int = 0) -> data.ImageFolder:
    """``n`` JPEGs (quality 90) over two classes, cycling through ``sizes``."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = root / ("a" if i % 2 == 0 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        width, height = sizes[i % len(sizes)]
        photo(rng, width, height).save(cls / f"{i:05d}.jpg", quality=90)
    return data.ImageFolder(root)


class TreeMemory:
    """Peak RSS of this process plus its children, sampled in a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self._interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self._interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def torch_loader(root: Path, train: bool, workers: int):
    import torch
    from torchvision import datasets
    from torchvision import transforms as T

    normalize = T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)
    if train:
        tf = T.Compose(
            [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
        )
    else:
        tf = T.Compose([T.Resize([256, 256]), T.CenterCrop(224), T.ToTensor(), normalize])
    dataset = datasets.ImageFolder(str(root), transform=tf)
    return torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, shuffle=train, drop_last=train, num_workers=workers
    )


def jt_loader(folder: data.ImageFolder, train: bool, workers: int, variant: str):
    kwargs = {"decode_cache_mb": 0, "dtype": np.float32}
    if variant.startswith("uint8"):
        kwargs["dtype"] = np.uint8
    if variant == "uint8+cache":
        kwargs["decode_cache_mb"] = 4096
    if variant == "draft":
        kwargs["draft"] = True
    return data.make_loader(folder, batch_size=BATCH, train=train, worker_count=workers, **kwargs)


def time_epoch(make) -> tuple[float, float, int, int]:
    """(first-batch seconds, steady images/s, images, peak tree RSS) of one pass."""
    with TreeMemory() as memory:
        t0 = time.perf_counter()
        loader = make()
        it = iter(loader)
        next(it)
        t1 = time.perf_counter()
        images = 0
        for batch in it:
            images += len(batch[1] if isinstance(batch, list) else batch["label"])
        t2 = time.perf_counter()
        if hasattr(it, "close"):
            it.close()
        del it, loader
    return t1 - t0, images / (t2 - t1) if images else float("nan"), images, memory.peak


@dataclass
class Cell:
    mode: str
    workers: int
    variant: str
    first_s: list[float] = field(default_factory=list)
    ips: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)

    @property
    def median_ips(self) -> float:
        return statistics.median(self.ips)


def run_main_table(root: Path, folder, worker_counts, reps: int, variants) -> list[Cell]:
    import torch

    torch.set_num_threads(1)
    # Warm-up: imports and first-call costs (torch's ImageFolder scan, jax) off the clock.
    time_epoch(functools.partial(torch_loader, root, True, 0))
    time_epoch(functools.partial(jt_loader, folder, True, 0, "float32"))
    cells: dict[tuple, Cell] = {}
    for rep in range(reps):
        for mode in ("train", "eval"):
            train = mode == "train"
            for workers in worker_counts:
                order = ["torch", *variants]
                if rep % 2:  # alternate who goes first
                    order.reverse()
                for variant in order:
                    if variant == "torch":
                        make = functools.partial(torch_loader, root, train, workers)
                    else:
                        make = functools.partial(jt_loader, folder, train, workers, variant)
                    first, ips, _, rss = time_epoch(make)
                    cell = cells.setdefault((mode, workers, variant), Cell(mode, workers, variant))
                    cell.first_s.append(first)
                    cell.ips.append(ips)
                    cell.rss.append(rss)
                    print(
                        f"rep {rep} {mode:5s} workers={workers} {variant:12s} "
                        f"{ips:7.1f} img/s  first batch {first:5.2f} s  "
                        f"peak RSS {rss / 2**20:6.0f} MiB",
                        flush=True,
                    )
    return list(cells.values())


def run_draft_table(folder, reps: int, workers: int) -> list[dict]:
    """Exact vs reduced-size decode on big photos, plus how far the pixels move."""
    rows = []
    for mode in ("train", "eval"):
        train = mode == "train"

        def loader(draft: bool, dtype=np.float32, train=train):
            return data.make_loader(
                folder,
                batch_size=2,
                train=train,
                worker_count=workers,
                draft=draft,
                dtype=dtype,
                decode_cache_mb=0,
            )

        times = {False: [], True: []}
        for rep in range(reps):
            for draft in (False, True) if rep % 2 == 0 else (True, False):
                t0 = time.perf_counter()
                n = sum(len(b["label"]) for b in loader(draft))
                times[draft].append(n / (time.perf_counter() - t0))
        exact, reduced = (
            np.concatenate([b["image"] for b in loader(d, np.uint8)]).astype(int)
            for d in (False, True)
        )
        diff = np.abs(exact - reduced)
        rows.append(
            {
                "mode": mode,
                "exact_ips": statistics.median(times[False]),
                "draft_ips": statistics.median(times[True]),
                "mean_abs_diff": float(diff.mean()),
                "p99_abs_diff": float(np.percentile(diff, 99)),
                "max_abs_diff": int(diff.max()),
            }
        )
        print(rows[-1], flush=True)
    return rows


def markdown(cells: list[Cell], draft_rows: list[dict], meta: dict) -> str:
    cpus = meta["cpus"]
    by = {(c.mode, c.workers, c.variant): c for c in cells}
    variants = [
        v for v in ("float32", "uint8", "uint8+cache") if any(c.variant == v for c in cells)
    ]
    lines = [
        f"`{meta['command']}` on {meta['machine']} ({cpus} CPUs, load average before the run "
        f"{meta['load']}); batch {BATCH}, {meta['images']} JPEGs of {meta['sizes']}, "
        f"median of {meta['reps']} alternating reps.",
        "",
        "| mode | workers | torchvision img/s | "
        + " | ".join(f"jtransfer {v} img/s (x torch)" for v in variants)
        + " | img/s per core (torch / float32 / uint8) | first batch s (torch / float32) "
        "| peak RSS MiB (torch / float32) |",
        "|---|---|---|" + "---|" * len(variants) + "---|---|---|",
    ]
    for mode in ("train", "eval"):
        for workers in sorted({c.workers for c in cells}):
            t = by.get((mode, workers, "torch"))
            if t is None:
                continue
            cores = max(1, min(workers, cpus))
            row = [mode, str(workers), f"{t.median_ips:.0f}"]
            for v in variants:
                j = by[(mode, workers, v)]
                row.append(f"{j.median_ips:.0f} ({j.median_ips / t.median_ips:.2f}x)")
            f32, u8 = by[(mode, workers, "float32")], by.get((mode, workers, "uint8"))
            per_core = [t.median_ips / cores, f32.median_ips / cores]
            per_core.append(u8.median_ips / cores if u8 else float("nan"))
            row.append(" / ".join(f"{x:.0f}" for x in per_core))
            row.append(f"{statistics.median(t.first_s):.2f} / {statistics.median(f32.first_s):.2f}")
            row.append(f"{max(t.rss) / 2**20:.0f} / {max(f32.rss) / 2**20:.0f}")
            lines.append("| " + " | ".join(row) + " |")
    if draft_rows:
        lines += [
            "",
            f"Reduced-size decode (`draft=True`) on {meta['big_images']} JPEGs of 4000x3000, "
            f"batch 2, {meta['draft_workers']} workers:",
            "",
            "| mode | exact img/s | draft img/s | speed-up | mean abs pixel diff (uint8) "
            "| 99th pct | max |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in draft_rows:
            lines.append(
                f"| {r['mode']} | {r['exact_ips']:.1f} | {r['draft_ips']:.1f} | "
                f"{r['draft_ips'] / r['exact_ips']:.2f}x | {r['mean_abs_diff']:.2f} | "
                f"{r['p99_abs_diff']:.0f} | {r['max_abs_diff']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> tuple[list[Cell], list[dict]]:
    global BATCH
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few images, workers 0 and 2, 1 rep")
    parser.add_argument("--images", type=int, help="photo-sized JPEGs (default 320, quick 96)")
    parser.add_argument("--big", type=int, help="4000x3000 JPEGs for the draft table (default 8)")
    parser.add_argument("--reps", type=int, help="alternating reps (default 3, quick 1)")
    parser.add_argument("--workers", type=int, nargs="+", help="worker counts")
    parser.add_argument("--batch", type=int, default=BATCH, help="batch size (default 32)")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    args = parser.parse_args(argv)
    BATCH = args.batch
    cpus = os.cpu_count() or 1
    images = args.images or (96 if args.quick else 320)
    big = args.big if args.big is not None else (2 if args.quick else 8)
    reps = args.reps or (1 if args.quick else 3)
    workers = args.workers or ([0, 2] if args.quick else sorted({0, 1, 2, cpus}))
    variants = ["float32", "uint8"] if args.quick else ["float32", "uint8", "uint8+cache"]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        t0 = time.perf_counter()
        folder = make_folder(root, images, SIZES)
        print(f"wrote {images} JPEGs in {time.perf_counter() - t0:.1f} s", flush=True)
        cells = run_main_table(root, folder, workers, reps, variants)
        draft_rows = []
        if big:
            big_folder = make_folder(Path(tmp) / "big", big, [BIG, BIG[::-1]], seed=1)
            draft_rows = run_draft_table(big_folder, max(1, reps - 1), workers=0)
    meta = {
        "command": "python benchmarks/loader_bench.py"
        + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
        "machine": platform.processor() or platform.machine(),
        "cpus": cpus,
        "load": load,
        "images": images,
        "sizes": ", ".join(f"{w}x{h}" for w, h in SIZES),
        "reps": reps,
        "big_images": big,
        "draft_workers": 0,
    }
    table = markdown(cells, draft_rows, meta)
    print(table)
    if args.out:
        args.out.write_text(table)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"meta": meta, "cells": [asdict(c) for c in cells], "draft": draft_rows}, indent=1
            )
        )
    return cells, draft_rows


if __name__ == "__main__":
    main()
