"""What NNX costs: the `jtransfer.nnx` train / eval steps against the Linen ones, one process.

    python benchmarks/nnx_vs_linen.py [--arch resnet18] [--batch 16] [--size 112] [--reps 5]
                                      [--modes finetune frozen eval]

Both paths get the same random weights and the same batch and compute the same
numbers (tests/test_nnx.py checks it bit for bit): ``finetune`` is one SGD step with
momentum on every parameter (d2l's rates: body x1, head x10), ``frozen`` trains only
the head with the static frozen prefix (no backward through the backbone), ``eval``
is the eval step. Linen: `train.make_train_step` / `train.make_eval_step` on a
`TrainState`; NNX: `jtransfer.nnx.train_step` / `eval_step` on a module and its
`nnx.Optimizer`.

Step time: the two paths alternate rep by rep (which one goes first alternates too),
so load from other processes hits both alike; each side's median is printed, and
``nnx/linen`` (> 1: NNX is slower). Compile time: the first call minus the median
step, for each side; the side compiled first alternates between modes. The NNX step
adds per call what NNX's graph bookkeeping costs in Python (splitting the module
and optimizer into arrays and merging the results back); XLA runs the same
computation.
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

MODES = ("finetune", "frozen", "eval")


def _block(tree):
    jax.block_until_ready(tree)
    return tree


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    _block(fn())
    return time.perf_counter() - t0


def _linen_and_nnx(arch: str, mode: str, variables, batch, num_classes: int):
    """Two step closures (each runs one step on its own state) for the Linen and NNX paths."""
    model = jt.models.create(arch, num_classes=num_classes)
    if mode == "eval":
        linen_step = train.make_eval_step(model)
        module = jnnx.from_variables(arch, variables)
        return (lambda: linen_step(variables, batch)), (lambda: jnnx.eval_step(module, batch))
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
    return linen, (lambda: jnnx.train_step(module, optimizer, batch, frozen_stages=frozen))


def measure(arch: str, mode: str, batch_size: int, size: int, reps: int, nnx_first: bool):
    """{"linen"|"nnx": {"compile": s, "steps": [s, ...]}} for one mode."""
    rng = np.random.default_rng(0)
    num_classes = 2
    model = jt.models.create(arch, num_classes=num_classes)
    variables = jt.models.random_variables(model, image_size=size)
    batch = {
        "image": jnp.asarray(rng.normal(size=(batch_size, size, size, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, num_classes, batch_size), jnp.int32),
    }
    linen, nnx = _linen_and_nnx(arch, mode, variables, batch, num_classes)
    sides = {"linen": linen, "nnx": nnx}
    order = ["nnx", "linen"] if nnx_first else ["linen", "nnx"]
    first = {name: _timed(sides[name]) for name in order}
    steps: dict[str, list[float]] = {"linen": [], "nnx": []}
    for rep in range(reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            _timed(sides[name])  # untimed: each timed call follows one of its own kind
            steps[name].append(_timed(sides[name]))
    return {
        name: {"compile": first[name] - statistics.median(steps[name]), "steps": steps[name]}
        for name in sides
    }


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
        f"{'mode':<9} {'linen step':>11} {'nnx step':>9} {'nnx/linen':>9}  "
        f"{'linen compile':>13} {'nnx compile':>11} {'nnx/linen':>9}"
    )
    results = {}
    for i, mode in enumerate(args.modes):
        r = measure(args.arch, mode, args.batch, args.size, args.reps, nnx_first=i % 2 == 1)
        lin, nnx = (statistics.median(r[k]["steps"]) for k in ("linen", "nnx"))
        lc, nc = r["linen"]["compile"], r["nnx"]["compile"]
        print(
            f"{mode:<9} {lin * 1e3:>9.1f}ms {nnx * 1e3:>7.1f}ms {nnx / lin:>9.3f}  "
            f"{lc:>12.2f}s {nc:>10.2f}s {nc / lc:>9.3f}"
        )
        results[mode] = r
    return results


if __name__ == "__main__":
    main()
