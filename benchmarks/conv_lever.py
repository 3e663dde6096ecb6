"""The matrix-product convolution backward (jtransfer/models/conv.py), measured.

    python benchmarks/conv_lever.py [--archs resnet18 resnet50 vgg16_bn] [--batch 16]
                                    [--size 112] [--reps 5]

For each arch, one process compiles the gradient of the summed cross-entropy
(BatchNorm in train mode, what a full fine-tune step differentiates) twice:
with XLA's own convolution gradient (`lax.conv_general_dilated` swapped into
the model, as before) and with jtransfer's `conv_general_dilated`, checks the
two gradients agree (rounding only), then times them alternately, rep by rep,
beside torch's forward + backward of the same model on the same batch
(`net.train()`, summed loss) with 1 and with nproc intra-op threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import jtransfer as jt  # noqa: E402
from jtransfer.models import resnet, vgg  # noqa: E402


def _grad_fn(model, batch_stats, x, y):
    def loss(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(1)},
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum(), updates

    return jax.jit(jax.grad(loss, has_aux=True))


def _compiled(arch, variables, x, y, stock: bool):
    """The gradient function, compiled, with XLA's conv gradient if `stock`."""
    saved = resnet.conv_general_dilated, vgg.conv_general_dilated
    if stock:
        resnet.conv_general_dilated = vgg.conv_general_dilated = lax.conv_general_dilated
    try:
        model = jt.models.create(arch, num_classes=2)
        fn = _grad_fn(model, variables["batch_stats"], x, y)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(variables["params"]))
        return fn, time.perf_counter() - t0
    finally:
        resnet.conv_general_dilated, vgg.conv_general_dilated = saved


def _torch_step(arch, batch, size):
    import torch
    import torchvision

    net = getattr(torchvision.models, arch)(num_classes=2)
    net.train()
    xt = torch.randn(batch, 3, size, size)
    yt = torch.arange(batch) % 2

    def step():
        net.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(xt), yt, reduction="sum").backward()

    return torch, step


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(arch: str, batch: int, size: int, reps: int) -> dict:
    variables = jt.models.init(
        jt.models.create(arch, num_classes=2), jax.random.key(0), image_size=size
    )
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, 3), dtype=np.float32))
    y = jnp.asarray(np.arange(batch) % 2)
    params = variables["params"]
    stock, stock_compile = _compiled(arch, variables, x, y, stock=True)
    fast, fast_compile = _compiled(arch, variables, x, y, stock=False)
    g_stock, g_fast = stock(params)[0], fast(params)[0]
    # Relative to the largest gradient entry of the model: a conv bias before a
    # train-mode BatchNorm has a gradient of zero up to rounding on both sides.
    pairs = list(zip(jax.tree.leaves(g_stock), jax.tree.leaves(g_fast), strict=True))
    scale = max(float(jnp.max(jnp.abs(a))) for a, _ in pairs)
    rel = max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs) / scale
    torch, torch_step = _torch_step(arch, batch, size)
    threads = sorted({1, os.cpu_count() or 1})
    times: dict[str, list[float]] = {"xla": [], "jtransfer": []}
    times.update({f"torch{t}": [] for t in threads})
    for t in threads:
        torch.set_num_threads(t)
        torch_step()
    for _ in range(reps):
        times["xla"].append(_timed(lambda: jax.block_until_ready(stock(params))))
        times["jtransfer"].append(_timed(lambda: jax.block_until_ready(fast(params))))
        for t in threads:
            torch.set_num_threads(t)
            times[f"torch{t}"].append(_timed(torch_step))
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = {
        k: statistics.median(a / b for a, b in zip(v, times["jtransfer"], strict=True))
        for k, v in times.items()
    }
    return {
        "arch": arch,
        "rel": rel,
        "med": med,
        "paired": paired,
        "compile": (stock_compile, fast_compile),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["resnet18", "resnet50", "vgg16_bn"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"batch {args.batch}, {args.size}x{args.size} px, {args.reps} alternating reps\n")
    torch_cols = [f"torch{t}" for t in sorted({1, os.cpu_count() or 1})]
    head = ["arch", "XLA conv grad ms", "jtransfer ms", "speedup"]
    head += [f"{c} ms" for c in torch_cols] + [f"jt vs {c}" for c in torch_cols]
    head += ["grad rel diff", "compile s (XLA / jt)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for arch in args.archs:
        r = run(arch, args.batch, args.size, args.reps)
        med, paired = r["med"], r["paired"]
        row = [arch, f"{med['xla'] * 1e3:.0f}", f"{med['jtransfer'] * 1e3:.0f}"]
        row += [f"{paired['xla']:.2f}"]
        row += [f"{med[c] * 1e3:.0f}" for c in torch_cols]
        row += [f"{paired[c]:.2f}" for c in torch_cols]
        row += [f"{r['rel']:.1e}", f"{r['compile'][0]:.1f} / {r['compile'][1]:.1f}"]
        print("| " + " | ".join(row) + " |", flush=True)
    print(
        "\nspeedup and `jt vs X`: median over reps of X's time / jtransfer's time in the same "
        "rep (> 1: jtransfer faster)."
    )


if __name__ == "__main__":
    main()
