"""Grouped 3x3 convolutions on the CPU: jtransfer's forward forms, XLA's and torch's, per layer.

For ResNeXt-like layers (32 or 64 groups of 4, 8 or 16 channels, maps 56 to 14, stride 1
and 2) it times, in one process, the forward forms of `jtransfer.models.conv.grouped_conv2d`:
the elementwise sum over taps (`_grouped_taps`) and one XLA convolution per group
(`_per_group`), beside XLA's own grouped convolution and torch's ``F.conv2d(groups=G)``:
milliseconds, min over reps. `_TAPS_MAX_GROUP_CHANNELS` picks between jtransfer's two
(docs/performance.md, "Grouped convolutions").

Usage::

    python benchmarks/grouped_layers.py            # batch 8, the table in the docs (~2 min)
    python benchmarks/grouped_layers.py --batch 2 --reps 2 --groups 32 --widths 4
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jtransfer.models import conv  # noqa: E402

PAD = ((1, 1), (1, 1))


def best_ms(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def xla_form(x, kernel, stride: int, groups: int):
    """XLA's own grouped convolution."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        PAD,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


def per_group_form(x, kernel, stride: int, groups: int):
    return conv._per_group(x, kernel, (stride, stride), PAD, groups, None)


def taps_form(x, kernel, stride: int, groups: int):
    return conv._grouped_taps(x, kernel, (stride, stride), PAD, groups)


def main(argv: list[str] | None = None) -> list[dict]:
    """Prints the table; returns its rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--groups", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--widths", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--sizes", type=int, nargs="+", default=[56, 28, 14])
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    print(f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(
        "| groups | map | channels (per group) | stride | taps ms | per group ms | XLA grouped ms "
        "| torch ms | rel err |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    rows = []
    for groups in args.groups:
        for width in args.widths:
            channels = groups * width
            for size in args.sizes:
                for stride in (1, 2):
                    x = rng.standard_normal((args.batch, size, size, channels), np.float32)
                    k = rng.standard_normal((3, 3, width, channels), np.float32)
                    xj, kj = jnp.asarray(x), jnp.asarray(k)
                    taps = jax.jit(taps_form, static_argnums=(2, 3))
                    per_group = jax.jit(per_group_form, static_argnums=(2, 3))
                    xla = jax.jit(xla_form, static_argnums=(2, 3))
                    ref = xla(xj, kj, stride, groups)
                    err = max(
                        float(jnp.abs(f(xj, kj, stride, groups) - ref).max())
                        for f in (taps, per_group)
                    )
                    err /= float(jnp.abs(ref).max())
                    t_taps = best_ms(taps, xj, kj, stride, groups, reps=args.reps)
                    t_per_group = best_ms(per_group, xj, kj, stride, groups, reps=args.reps)
                    t_xla = best_ms(xla, xj, kj, stride, groups, reps=args.reps)
                    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
                    tk = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous()
                    with torch.inference_mode():
                        t_torch = best_ms(
                            functools.partial(F.conv2d, stride=stride, padding=1, groups=groups),
                            tx,
                            tk,
                            reps=args.reps,
                        )
                    rows.append(
                        dict(
                            groups=groups,
                            size=size,
                            width=width,
                            stride=stride,
                            taps_ms=t_taps,
                            per_group_ms=t_per_group,
                            xla_ms=t_xla,
                            torch_ms=t_torch,
                            rel_err=err,
                        )
                    )
                    print(
                        f"| {groups} | {size} | {channels} ({width}) | {stride} | {t_taps:.1f} "
                        f"| {t_per_group:.1f} | {t_xla:.1f} | {t_torch:.1f} | {err:.0e} |",
                        flush=True,
                    )
    return rows


if __name__ == "__main__":
    main()
