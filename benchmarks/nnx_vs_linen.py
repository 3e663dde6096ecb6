"""What NNX costs: the `jtransfer.nnx` train / eval steps against the Linen ones, one process.

    python benchmarks/nnx_vs_linen.py [--arch resnet18] [--batch 16] [--size 112] [--reps 5]
                                      [--modes finetune frozen eval]

Both paths get the same random weights and the same batch and compute the same
numbers (tests/test_nnx.py checks it bit for bit): ``finetune`` is one SGD step with
momentum on every parameter (d2l's rates: body x1, head x10), ``frozen`` trains only
the head with the static frozen prefix (no backward through the backbone), ``eval``
is the eval step. Linen: `train.make_train_step` / `train.make_eval_step` on a
`TrainState`; NNX: `jtransfer.nnx.train_step` / `eval_step` on a module and its
`nnx.Optimizer`; "bound": `jtransfer.nnx.make_train_step`, the same step bound to one
module and optimizer (flattened once, not at every call).

Step time: the paths alternate rep by rep (which one goes first alternates too), so
load from other processes hits them alike; the Linen median is printed, and
``nnx/linen``, ``bound/linen`` (> 1: NNX is slower). Compile time: the first call
minus the median step, for each side; the side compiled first rotates between modes.

XLA runs the same computation on every path; what NNX adds is Python per call
(flattening the module and optimizer into arrays and writing the results back).
``dispatch`` measures that alone: the time a frozen step at batch 1, 16 px takes to
return without waiting for its result, per call, averaged over many calls. It is
what a fast accelerator would leave exposed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jtransfer as jt
import jtransfer.nnx as jnnx
from jtransfer import partition, train

MODES = ("finetune", "frozen", "eval", "dispatch")
DISPATCH_CALLS = 20  # jax keeps a bounded number of calls in flight; stay under it


def _block(tree):
    jax.block_until_ready(tree)
    return tree


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    _block(fn())
    return time.perf_counter() - t0


def _sides(arch: str, mode: str, variables, batch, num_classes: int) -> dict[str, Callable]:
    """One step closure per path, each running one step on its own state."""
    model = jt.models.create(arch, num_classes=num_classes)
    if mode == "eval":
        linen_step = train.make_eval_step(model)
        module = jnnx.from_variables(arch, variables)
        return {
            "linen": lambda: linen_step(variables, batch),
            "nnx": lambda: jnnx.eval_step(module, batch),
        }
    rules = partition.finetune(arch) if mode == "finetune" else partition.preset(arch, "head")
    frozen = partition.frozen_prefix(arch, rules)
    opts = dict(learning_rate=5e-5, momentum=0.9, weight_decay=1e-3)
    tx = partition.make_optimizer(variables["params"], rules, **opts)
    step = train.make_train_step(model, tx, frozen_stages=frozen)
    holder = {"state": train.create_train_state(model, variables, tx)}

    def linen():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics

    module = jnnx.from_variables(arch, variables)
    optimizer = jnnx.make_optimizer(module, rules, **opts)
    bound_module = jnnx.from_variables(arch, variables)
    bound = jnnx.make_train_step(
        bound_module, jnnx.make_optimizer(bound_module, rules, **opts), frozen_stages=frozen
    )
    return {
        "linen": linen,
        "nnx": lambda: jnnx.train_step(module, optimizer, batch, frozen_stages=frozen),
        "bound": lambda: bound(batch),
    }


def measure(arch: str, mode: str, batch_size: int, size: int, reps: int, rotate: int):
    """{side: {"compile": s, "steps": [s, ...]}} for one mode; sides: linen, nnx, bound."""
    rng = np.random.default_rng(0)
    num_classes = 2
    model = jt.models.create(arch, num_classes=num_classes)
    variables = jt.models.random_variables(model, image_size=size)
    batch = {
        "image": jnp.asarray(rng.normal(size=(batch_size, size, size, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, num_classes, batch_size), jnp.int32),
    }
    sides = _sides(arch, mode, variables, batch, num_classes)
    names = list(sides)
    order = names[rotate % len(names) :] + names[: rotate % len(names)]
    first = {name: _timed(sides[name]) for name in order}
    steps: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            _timed(sides[name])  # untimed: each timed call follows one of its own kind
            steps[name].append(_timed(sides[name]))
    return {
        name: {"compile": first[name] - statistics.median(steps[name]), "steps": steps[name]}
        for name in names
    }


def dispatch(arch: str, calls: int = DISPATCH_CALLS) -> dict[str, float]:
    """Seconds per call for each side's frozen step to return (not to finish), tiny batch."""
    model = jt.models.create(arch, num_classes=2)
    variables = jt.models.random_variables(model, image_size=16)
    batch = {"image": jnp.zeros((1, 16, 16, 3), jnp.float32), "label": jnp.zeros(1, jnp.int32)}
    sides = _sides(arch, "frozen", variables, batch, 2)
    out = {}
    for name, fn in sides.items():
        for _ in range(3):  # compile, then jax's fast call path is in place
            _block(fn())
        t0 = time.perf_counter()
        for _ in range(calls):
            result = fn()
        out[name] = (time.perf_counter() - t0) / calls
        _block(result)
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18", choices=jt.models.ARCHS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = p.parse_args(argv)
    print(
        f"{args.arch}, batch {args.batch}, {args.size} px, {args.reps} reps; {_cpu_name()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; jax {jax.__version__}"
    )
    print(
        f"{'mode':<9} {'linen step':>10} {'nnx step':>9} {'nnx/linen':>9} {'bound/linen':>11}  "
        f"{'linen compile':>13} {'nnx compile':>11} {'nnx/linen':>9}"
    )
    results = {}
    for i, mode in enumerate(m for m in args.modes if m != "dispatch"):
        r = measure(args.arch, mode, args.batch, args.size, args.reps, rotate=i)
        med = {name: statistics.median(side["steps"]) for name, side in r.items()}
        bound = f"{med['bound'] / med['linen']:>11.3f}" if "bound" in med else f"{'-':>11}"
        lc, nc = r["linen"]["compile"], r["nnx"]["compile"]
        print(
            f"{mode:<9} {med['linen'] * 1e3:>8.1f}ms {med['nnx'] * 1e3:>7.1f}ms "
            f"{med['nnx'] / med['linen']:>9.3f} {bound}  {lc:>12.2f}s {nc:>10.2f}s {nc / lc:>9.3f}"
        )
        results[mode] = r
    if "dispatch" in args.modes:
        d = dispatch(args.arch)
        print(
            "dispatch (Python per call, frozen step, batch 1 at 16 px): "
            + ", ".join(f"{name} {s * 1e3:.2f} ms" for name, s in d.items())
        )
        results["dispatch"] = d
    return results


if __name__ == "__main__":
    main()
