"""A library lever measured without editing jtransfer: max-pool backward on XLA CPU.

    python benchmarks/maxpool_lever.py [--archs resnet18 vgg16_bn] [--batch 16] [--size 112]

`flax.linen.max_pool` lowers to `reduce_window`, whose gradient is XLA's
`select_and_scatter`, slow on CPU. `max_pool_first` computes the same pooling
from k*k strided slices and has a custom VJP that sends each output's gradient
to the FIRST maximal input of its window (row-major), as torch's max_pool2d
backward and `select_and_scatter` do -- so ties (frequent after a ReLU) keep
torch's gradients, unlike a plain `jnp.maximum` chain, which splits them.

The script checks it against the stock pooling (forward bit-identical,
gradient allclose), then times the full fine-tune train step of each arch with
the stock model and with the model's pooling function swapped in
(`jtransfer.models.resnet.max_pool_3x3_s2` / `jtransfer.models.vgg.max_pool_2x2`),
both compiled in this process and run alternately.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

HERE = Path(__file__).resolve().parent


def _geometry(shape, k, s, p):
    _, h, w, _ = shape
    hp, wp = h + 2 * p, w + 2 * p
    return hp, wp, (hp - k) // s + 1, (wp - k) // s + 1


def _windows(xp, k, s, ho, wo):
    n, _, _, c = xp.shape
    return [
        lax.slice(
            xp, (0, i, j, 0), (n, i + s * (ho - 1) + 1, j + s * (wo - 1) + 1, c), (1, s, s, 1)
        )
        for i in range(k)
        for j in range(k)
    ]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_first(x, k: int, s: int, p: int):
    """torch.nn.MaxPool2d(k, s, p) on NHWC (floor mode), -inf padding, first-max gradient."""
    return _fwd(x, k, s, p)[0]


def _fwd(x, k, s, p):
    _, _, ho, wo = _geometry(x.shape, k, s, p)
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf) if p else x
    windows = _windows(xp, k, s, ho, wo)
    out, idx = windows[0], jnp.zeros(windows[0].shape, jnp.int8)
    for n, w in enumerate(windows[1:], 1):
        better = w > out  # strict: an earlier window position keeps ties
        out = jnp.where(better, w, out)
        idx = jnp.where(better, jnp.int8(n), idx)
    return out, (idx, x.shape)


def _bwd(k, s, p, res, g):
    idx, shape = res
    _, h, w, _ = shape
    hp, wp, ho, wo = _geometry(shape, k, s, p)
    zero = jnp.zeros((), g.dtype)
    gx = None
    for n in range(k * k):
        i, j = divmod(n, k)
        gk = jnp.where(idx == n, g, zero)
        # Put gk[a, b] at (i + s*a, j + s*b): interior padding s - 1.
        cfg = (
            (0, 0, 0),
            (i, hp - i - (s * (ho - 1) + 1), s - 1),
            (j, wp - j - (s * (wo - 1) + 1), s - 1),
            (0, 0, 0),
        )
        part = lax.pad(gk, zero, cfg)
        gx = part if gx is None else gx + part
    return (gx[:, p : p + h, p : p + w, :],)


max_pool_first.defvjp(_fwd, _bwd)


def fast_3x3_s2(x):
    """Drop-in for `jtransfer.models.layers.max_pool_3x3_s2`."""
    return max_pool_first(x, 3, 2, 1)


def fast_2x2(x):
    """Drop-in for `jtransfer.models.layers.max_pool_2x2`."""
    return max_pool_first(x, 2, 2, 0)


PATCHES = {"resnet": ("max_pool_3x3_s2", fast_3x3_s2), "vgg": ("max_pool_2x2", fast_2x2)}


@contextlib.contextmanager
def patched(arch: str):
    """The arch's model module uses the fast pooling while the context is open."""
    import jtransfer as jt
    from jtransfer.models import resnet, vgg

    fam = jt.models.family(arch).name
    module = {"resnet": resnet, "vgg": vgg}[fam]
    name, fn = PATCHES[fam]
    old = getattr(module, name)
    setattr(module, name, fn)
    try:
        yield
    finally:
        setattr(module, name, old)


def check_pooling(seed: int = 0) -> dict[str, float]:
    """Max |gradient difference| of the fast pooling vs flax's, on ReLU'd input (ties)."""
    from jtransfer.models import layers

    rng = np.random.default_rng(seed)
    out = {}
    for name, stock, fast, shape in (
        ("3x3/2 pad 1", layers.max_pool_3x3_s2, fast_3x3_s2, (2, 15, 14, 8)),
        ("2x2/2", layers.max_pool_2x2, fast_2x2, (2, 15, 14, 8)),
    ):
        x = jnp.asarray(rng.standard_normal(shape, np.float32))
        y = stock(jax.nn.relu(x))
        g = jnp.asarray(rng.standard_normal(y.shape, np.float32))
        if not bool(jnp.array_equal(y, fast(jax.nn.relu(x)))):
            raise AssertionError(f"{name}: forward differs")
        ga = jax.grad(lambda x, f=stock, g=g: jnp.sum(f(jax.nn.relu(x)) * g))(x)
        gb = jax.grad(lambda x, f=fast, g=g: jnp.sum(f(jax.nn.relu(x)) * g))(x)
        out[name] = float(jnp.abs(ga - gb).max())
    return out


def measure(arch: str, batch: int, size: int, reps: int) -> dict:
    sys.path.insert(0, str(HERE))
    import bench

    pair = bench.make_pair(arch, batch, size)
    stock, _ = bench.jax_step(pair, "finetune")
    t0 = time.perf_counter()
    stock()
    first_stock = time.perf_counter() - t0
    with patched(arch):
        fast, _ = bench.jax_step(pair, "finetune")
        t0 = time.perf_counter()
        fast()  # traced (and compiled) with the fast pooling
        first_fast = time.perf_counter() - t0
    ts, tf = [], []
    for i in range(reps):
        order = ((ts, stock), (tf, fast)) if i % 2 == 0 else ((tf, fast), (ts, stock))
        for out, fn in order:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return {
        "stock_s": statistics.median(ts),
        "fast_s": statistics.median(tf),
        "speedup": statistics.median(a / b for a, b in zip(ts, tf, strict=True)),
        "first_stock_s": first_stock,
        "first_fast_s": first_fast,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["resnet18", "vgg16_bn"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    print("gradient max |diff| vs flax max_pool (ReLU'd input):", check_pooling())
    print(
        f"full fine-tune step, batch {args.batch}, {args.size}px, {args.reps} alternating reps "
        "(shared machine: noisy)"
    )
    for arch in args.archs:
        r = measure(arch, args.batch, args.size, args.reps)
        print(
            f"  {arch:9s} stock {r['stock_s']:.3f} s  fast pooling {r['fast_s']:.3f} s  "
            f"speed-up x{r['speedup']:.2f} (median of paired ratios)"
        )


if __name__ == "__main__":
    main()
