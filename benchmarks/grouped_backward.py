"""Grouped 3x3 convolutions on the CPU, forward + backward: jtransfer's against torch's.

Per layer (default): ResNeXt-50's grouped layers (32 groups; 4, 8, 16, 32 channels per
group; the map sizes an input of `--size` px gives them, stride 1 and 2), forward and
backward (input and kernel gradients) of `jtransfer.models.conv.grouped_conv2d`, the same
with the gradients as they were before (`before_backward`), and torch's
``F.conv2d(groups=32)`` with ``backward()``, alternating, ms, min over reps, and the sums
over the network's grouped layers (each layer times its count).

``--step``: the whole ResNeXt-50 fine-tune step (SGD, summed cross-entropy, BatchNorm in
train mode), jitted twice in one process, once with the grouped layers' gradients as they
were before XLA's kernel gradient per block and the wide layers' input gradient by phases
(`before_backward`) and once with the current ones, timed alternately; wall and CPU
seconds per step, and each compile.
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
    """(jtransfer, jtransfer before, torch) ms for forward + backward of one grouped layer;
    the three alternate rep by rep, so load from other processes hits each alike."""
    import torch

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, side, side, channels)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, channels // GROUPS, channels)) * 0.1, jnp.float32)
    strides = (stride, stride)

    def layer(x, k):
        return conv.grouped_conv2d(x, k, strides, PAD, GROUPS)

    @jax.custom_vjp
    def before(x, k):
        return layer(x, k)

    before.defvjp(
        lambda x, k: (layer(x, k), (x, k)),
        lambda res, g: before_backward(strides, PAD, GROUPS, None, res, g),
    )

    y = jax.jit(layer)(x, k)
    gy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    steps = {
        name: jax.jit(lambda x, k, gy, f=f: jax.vjp(f, x, k)[1](gy))
        for name, f in (("current", layer), ("before", before))
    }

    xt = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous().requires_grad_()
    kt = torch.tensor(np.asarray(k)).permute(3, 2, 0, 1).contiguous().requires_grad_()
    gt = torch.tensor(np.asarray(gy)).permute(0, 3, 1, 2).contiguous()

    def torch_step():
        xt.grad = kt.grad = None
        out = torch.nn.functional.conv2d(xt, kt, stride=stride, padding=1, groups=GROUPS)
        out.backward(gt)

    calls = {name: (lambda f=f: jax.block_until_ready(f(x, k, gy))) for name, f in steps.items()}
    calls["torch"] = torch_step
    times = {name: [] for name in calls}
    for fn in calls.values():
        fn()  # compile / warm up
    for _ in range(reps):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return tuple(1e3 * min(times[name]) for name in ("current", "before", "torch"))


def per_layer(size: int, batch: int, reps: int) -> None:
    import torch

    torch.set_num_threads(2)
    print(
        "| map, channels, stride (x count) | jtransfer fwd+bwd ms | before (`before_backward`) "
        "ms | torch fwd+bwd ms |"
    )
    print("|---|---:|---:|---:|")
    totals = np.zeros(3)
    for div, channels, stride, count in LAYERS:
        side = -(-size // div)
        ms = time_layer(side, channels, stride, batch, reps)
        totals += count * np.array(ms)
        print(
            f"| {side}, {channels}, {stride} (x{count}) | "
            + " | ".join(f"{t:.1f}" for t in ms)
            + " |"
        )
    print("| all of ResNeXt-50's grouped layers | " + " | ".join(f"{t:.0f}" for t in totals) + " |")


def im2col(x, kernel, strides, padding, groups: int, precision):
    """The grouped convolution as im2col: the k*k taps gathered into (positions, groups,
    k*k*Cin/G) and one matrix product batched over groups (the wide stride-2 layers' form
    before)."""
    kh, kw, cin_g, cout = kernel.shape
    sh, sw = strides
    (pt, pb), (pl, pr) = padding
    n = x.shape[0]
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = (xp.shape[1] - kh) // sh + 1
    wo = (xp.shape[2] - kw) // sw + 1
    taps = [
        jax.lax.slice(
            xp,
            (0, i, j, 0),
            (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, x.shape[3]),
            (1, sh, sw, 1),
        ).reshape(n * ho * wo, groups, 1, cin_g)
        for i in range(kh)
        for j in range(kw)
    ]
    cols = jnp.concatenate(taps, axis=2).reshape(n * ho * wo, groups, kh * kw * cin_g)
    # (kh, kw, Cin/G, (G, Cout/G)) -> (G, kh * kw * Cin/G, Cout/G), taps in the cols' order.
    k = kernel.reshape(kh * kw * cin_g, groups, cout // groups).transpose(1, 0, 2)
    acc = jnp.promote_types(jnp.promote_types(x.dtype, kernel.dtype), jnp.float32)
    dims = (((2,), (1,)), ((1,), (0,)))
    y = jax.lax.dot_general(cols, k, dims, precision=precision, preferred_element_type=acc)
    return y.astype(x.dtype).transpose(1, 0, 2).reshape(n, ho, wo, cout)


def products_kernel_grad(x, g, kernel_shape, strides, padding, groups, precision):
    """A narrow layer's kernel gradient before XLA's per block: per tap, one dense matrix
    product batched over the blocks of whole groups, the groups' diagonal parts kept."""
    kh, kw, cin_g, cout = kernel_shape
    cout_g = cout // groups
    sh, sw = strides
    (pt, pb), (pl, pr) = padding
    n, ho, wo, _ = g.shape
    per_block = conv._groups_per_block(groups, cin_g)
    blocks, bin_, bout = groups // per_block, per_block * cin_g, per_block * cout_g
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    positions = n * ho * wo
    g3 = g.reshape(positions, blocks, bout).transpose(1, 0, 2)
    taps = []
    for i in range(kh):
        for j in range(kw):
            seen = xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
            seen = seen.reshape(positions, blocks, bin_).transpose(1, 0, 2)
            dense = conv._matmul(seen, g3, (1, 1), precision, batched=True)
            dense = dense.reshape(blocks, per_block, cin_g, per_block, cout_g)
            taps.append(jnp.einsum("bkiko->ibko", dense).reshape(cin_g, cout))
    return jnp.stack(taps).reshape(kernel_shape)


def before_backward(strides, padding, groups, precision, residuals, g):
    """The backward before this form: narrow layers' kernel gradient by
    `products_kernel_grad`; wide layers' gradients XLA's of one convolution per group at
    stride 1 and of `im2col` at stride 2, both ways."""
    x, kernel = residuals
    if kernel.shape[2] > conv._TAPS_MAX_GROUP_CHANNELS:
        form = conv._per_group if tuple(strides) == (1, 1) else im2col
        _, vjp = jax.vjp(lambda x, k: form(x, k, strides, padding, groups, precision), x, kernel)
        dx, dk = vjp(g.astype(x.dtype))
        return dx.astype(x.dtype), dk.astype(kernel.dtype)
    dx, _ = conv._grouped_bwd(strides, padding, groups, precision, residuals, g)
    g = g.astype(x.dtype)
    dk = products_kernel_grad(x, g, kernel.shape, strides, padding, groups, precision)
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
        for name, bwd in (("before", before_backward), ("current", current)):
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
    ratio_min = min(wall["current"]) / min(wall["before"])
    ratio_median = np.median(wall["current"]) / np.median(wall["before"])
    print(f"current / before: {ratio_min:.3f} by min, {ratio_median:.3f} by median")


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
