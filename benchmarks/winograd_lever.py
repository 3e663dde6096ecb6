"""Winograd F(2x2, 3x3) for the 3x3 stride-1 convolutions (jtransfer/models/winograd.py), measured.

    python benchmarks/winograd_lever.py [--archs resnet18 resnet50 vgg16_bn] [--batch 16]
                                        [--size 112] [--reps 5] [--modes eval finetune]

For each arch and mode, one process compiles bench.py's jtransfer step twice,
with Winograd (the library's default) and with those layers on the direct
convolution path instead (`conv._is_winograd` patched to False while tracing),
checks that the two agree (logits / first-step loss, relative error), then
times them alternately, rep by rep, beside torch eager on the same batch. The
ratio `wino/direct` > 1 means Winograd is faster. Its eval is `model.apply` on
the plain variables (bench.py's `apply` step): both paths transform their
kernels in every call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402


def _variant(pair, mode: str, winograd: bool):
    from jtransfer.models import conv

    original = conv._is_winograd
    if not winograd:
        conv._is_winograd = lambda *args: False
    try:
        # eval on plain variables (bench's "apply"): prepared ones would carry transforms
        # made with Winograd on, which the direct variant refuses.
        fn, value = bench.jax_step(pair, "apply" if mode == "eval" else mode)
        fn()  # trace and compile while the patch holds
    finally:
        conv._is_winograd = original
    return fn, value


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["resnet18", "resnet50", "vgg16_bn"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--modes", nargs="+", default=["eval", "finetune"], choices=["eval", "finetune"])
    args = p.parse_args(argv)
    bench.configure_jax()
    info = bench.machine_info()
    print("machine:", "; ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    print("| arch | step | direct ms | winograd ms | torch ms | wino/direct | jt/torch | agree |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for arch in args.archs:
        pair = bench.make_pair(arch, args.batch, args.size)
        for mode in args.modes:
            wino, wino_val = _variant(pair, mode, True)
            direct, direct_val = _variant(pair, mode, False)
            agree = bench._agreement(mode, arch, direct_val(), wino_val()) or "dropout differs"
            torch_fn, _ = bench.torch_step(pair, mode)
            torch_fn()
            fns = {"direct": direct, "wino": wino, "torch": torch_fn}
            times = {k: [] for k in fns}
            for rep in range(args.reps):
                order = list(fns.items())
                for name, fn in order if rep % 2 == 0 else order[::-1]:
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(
                f"| {arch} | {mode} | {med['direct']:.0f} | {med['wino']:.0f} | {med['torch']:.0f} "
                f"| {med['direct'] / med['wino']:.2f} | {med['torch'] / med['wino']:.2f} "
                f"| {agree} |",
                flush=True,
            )


if __name__ == "__main__":
    from jtransfer import hostmem

    hostmem.reexec_with_hugepages()  # huge pages for XLA's per-step buffers
    main()
