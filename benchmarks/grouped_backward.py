"""Grouped 3x3 convolutions on the CPU, forward + backward: jtransfer's against torch's.

Per layer (default): ResNeXt-50's grouped layers (32 groups; 4, 8, 16, 32 channels per
group; the map sizes an input of `--size` px gives them, stride 1 and 2), forward and
backward (input and kernel gradients) of `jtransfer.models.conv.grouped_conv2d` against
torch's ``F.conv2d(groups=32)`` with ``backward()``, ms, min over reps, and the sum over
the network's grouped layers (each layer times its count).

``--step``: the whole ResNeXt-50 fine-tune step (SGD, summed cross-entropy, BatchNorm in
train mode), jitted twice in one process, once with the narrow layers' gradients by
im2col's products batched over groups (the form before blocks of whole groups) and once
with the current ones, timed alternately; wall and CPU seconds per step, and each compile.
See docs/performance.md, "Grouped convolutions".

Usage::

    python benchmarks/grouped_backward.py                 # per layer, 112 px, batch 16
    python benchmarks/grouped_backward.py --step --reps 10 --size 224
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jtransfer.models import conv  # noqa: E402

GROUPS = 32
PAD = ((1, 1), (1, 1))
# ResNeXt-50 32x4d's grouped layers: (input map as a fraction of the input size, channels,
# stride, how many).
LAYERS = [(4, 128, 1, 3), (4, 256, 2, 1), (8, 256, 1, 3), (8, 512, 2, 1), (16, 512, 1, 5)]
LAYERS += [(16, 1024, 2, 1), (32, 1024, 1, 2)]


def best_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def time_layer(side: int, channels: int, stride: int, batch: int, reps: int):
    """(jtransfer, torch) ms for forward + backward of one grouped layer."""
    import torch

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, side, side, channels)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, channels // GROUPS, channels)) * 0.1, jnp.float32)

    def layer(x, k):
        return conv.grouped_conv2d(x, k, (stride, stride), PAD, GROUPS)

    y = jax.jit(layer)(x, k)
    gy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    both = jax.jit(lambda x, k, gy: jax.vjp(layer, x, k)[1](gy))
    jt_ms = best_ms(lambda: jax.block_until_ready(both(x, k, gy)), reps)

    xt = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous().requires_grad_()
    kt = torch.tensor(np.asarray(k)).permute(3, 2, 0, 1).contiguous().requires_grad_()
    gt = torch.tensor(np.asarray(gy)).permute(0, 3, 1, 2).contiguous()

    def torch_step():
        xt.grad = kt.grad = None
        out = torch.nn.functional.conv2d(xt, kt, stride=stride, padding=1, groups=GROUPS)
        out.backward(gt)

    return jt_ms, best_ms(torch_step, reps)


def per_layer(size: int, batch: int, reps: int) -> None:
    import torch

    torch.set_num_threads(2)
    print("| map, channels, stride (x count) | jtransfer fwd+bwd ms | torch fwd+bwd ms |")
    print("|---|---:|---:|")
    total_jt = total_torch = 0.0
    for div, channels, stride, count in LAYERS:
        side = -(-size // div)
        jt_ms, torch_ms = time_layer(side, channels, stride, batch, reps)
        total_jt += count * jt_ms
        total_torch += count * torch_ms
        print(f"| {side}, {channels}, {stride} (x{count}) | {jt_ms:.1f} | {torch_ms:.1f} |")
    print(f"| all of ResNeXt-50's grouped layers | {total_jt:.0f} | {total_torch:.0f} |")


def im2col_backward(strides, padding, groups, precision, residuals, g):
    """The narrow layers' gradients before blocks: im2col's products batched over groups
    (the input gradient at stride 1 by `_grouped_taps`, as now)."""
    x, kernel = residuals
    kh, kw, cin_g, cout = kernel.shape
    if cin_g > conv._TAPS_MAX_GROUP_CHANNELS:
        return conv._grouped_bwd(strides, padding, groups, precision, residuals, g)
    g = g.astype(x.dtype)
    _, vjp = jax.vjp(
        lambda x, k: conv._grouped_im2col(x, k, strides, padding, groups, precision), x, kernel
    )
    dx_im2col, dk = vjp(g)
    if strides != (1, 1) or cout // groups > conv._TAPS_MAX_GROUP_CHANNELS:
        return dx_im2col.astype(x.dtype), dk.astype(kernel.dtype)
    dx, _ = conv._grouped_bwd(strides, padding, groups, precision, residuals, g)
    return dx, dk.astype(kernel.dtype)


def whole_step(size: int, batch: int, reps: int) -> None:
    import optax

    import jtransfer as jt

    model = jt.models.create("resnext50_32x4d")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(x)

    def loss(params, stats, x, y):
        logits, new = model.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum(), new

    def make_step():
        @jax.jit
        def step(params, stats, x, y):
            (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params, stats, x, y)
            params = jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)
            return params, new["batch_stats"], value

        return step

    current = conv._grouped_bwd
    steps = {}
    args = (variables["params"], variables["batch_stats"], x, y)
    try:
        for name, bwd in (("im2col", im2col_backward), ("blocks", current)):
            conv.grouped_conv2d.defvjp(conv._grouped_fwd, bwd)
            steps[name] = make_step()
            t0 = time.perf_counter()
            loss_value = float(jax.block_until_ready(steps[name](*args))[2])
            print(
                f"{name}: compile + first step {time.perf_counter() - t0:.1f} s, loss {loss_value}"
            )
    finally:
        conv.grouped_conv2d.defvjp(conv._grouped_fwd, current)
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for r in range(reps):
        for name in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(steps[name](*args))
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    for name in steps:
        w, c = np.array(wall[name]), np.array(cpu[name])
        print(
            f"{name}: wall min {1e3 * w.min():.0f} ms, median {1e3 * np.median(w):.0f} ms; "
            f"CPU median {np.median(c):.2f} s per step"
        )
    ratio_min = min(wall["blocks"]) / min(wall["im2col"])
    ratio_median = np.median(wall["blocks"]) / np.median(wall["im2col"])
    print(f"blocks / im2col: {ratio_min:.3f} by min, {ratio_median:.3f} by median")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=112, help="input size in px (default 112)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--step", action="store_true", help="the whole fine-tune step, A/B")
    args = p.parse_args(argv)
    print(
        f"{platform.processor() or platform.machine()}, jax {jax.__version__}, "
        f"input {args.size} px, batch {args.batch}, min of {args.reps}"
    )
    if args.step:
        whole_step(args.size, args.batch, args.reps)
    else:
        per_layer(args.size, args.batch, args.reps)


if __name__ == "__main__":
    main()
