"""Linear probe on cached features vs frozen-backbone fine-tune: time per epoch.

    python benchmarks/probe_vs_finetune.py [--arch resnet18] [--images 160] [--size 64]
                                           [--batch 16] [--epochs 5]

Both train the same new head with the same SGD on the same batches in the same order, from
the same initialisation, on the evaluation view of the images (no augmentation), so they
end with the same head (printed as a check):

* frozen fine-tune: `partition.preset(arch, "head")` and the static `frozen_stages` (no
  backward pass through the backbone, BatchNorm on running statistics) -- the fastest a
  fine-tune gets. Its images are decoded once and kept in memory, so its epochs time only
  the model, not the input pipeline (which favours it);
* linear probe: `features.embed_dataset` runs the backbone once (decoding included) and
  caches the pre-logits on disk; `features.fit_linear_probe` then runs every epoch in one
  jit. Its first epoch is the embedding plus a fit; a second run finds the cache.

"later epochs" are the median over epochs 2..E of the fine-tune, and the probe's fit time
for E epochs (compiled, second call) divided by E. Weights are random (the timing does not
depend on them); the data are generated images.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import jtransfer as jt
from jtransfer import data, features, heads, partition, train


def timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18", choices=jt.models.ARCHS)
    p.add_argument("--images", type=int, default=160, help="training images (2 classes)")
    p.add_argument("--size", type=int, default=64, help="model input size")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    args = p.parse_args(argv)
    arch, n, size, batch, epochs = args.arch, args.images, args.size, args.batch, args.epochs
    n -= n % batch  # whole batches only, so both sides take the same steps

    tmp = Path(tempfile.mkdtemp(prefix="probe_vs_finetune."))
    folder = data.make_demo_imagefolder(tmp / "train", n_per_class=n // 2, size=round(size * 1.25))
    backbone = jt.models.create(arch)
    variables = jt.models.random_variables(backbone, size)
    resize = (round(size * 256 / 224),) * 2
    embed = dict(arch=arch, image_size=size, resize_size=resize, batch_size=batch)
    sgd = dict(method="sgd", lr=args.lr, momentum=args.momentum, batch_size=batch, seed=0)

    # Linear probe: embed once (cold cache), fit; then the warm cache and the fit alone.
    (x, y), embed_s = timed(
        lambda: features.embed_dataset(backbone, variables, folder, cache_dir=tmp / "c", **embed)
    )
    head, first_fit_s = timed(lambda: features.fit_linear_probe(x, y, 2, epochs=epochs, **sgd))
    _, warm_embed_s = timed(
        lambda: features.embed_dataset(backbone, variables, folder, cache_dir=tmp / "c", **embed)
    )
    _, fit_s = timed(lambda: features.fit_linear_probe(x, y, 2, epochs=epochs, **sgd))
    probe_epoch_s = fit_s / epochs

    # Frozen fine-tune on the same batches.
    model = jt.models.create(arch, num_classes=2)
    start = heads.replace_head(variables, arch, 2, seed=0)
    rules = partition.preset(arch, "head")
    tx = partition.make_optimizer(
        start["params"], rules, learning_rate=args.lr, momentum=args.momentum
    )
    state = train.create_train_state(model, start, tx)
    step = train.make_train_step(
        model, tx, loss_reduction="mean", frozen_stages=partition.frozen_prefix(arch, rules)
    )
    (everything,) = data.make_loader(
        folder, batch_size=n, train=False, image_size=size, resize_size=resize
    )
    epoch_s = []
    for epoch in range(epochs):
        order = features.epoch_order(n, 0, epoch).reshape(-1, batch)
        t0 = time.perf_counter()
        for rows in order:
            batch_ = {"image": everything["image"][rows], "label": everything["label"][rows]}
            state, _ = step(state, batch_)
        jax.block_until_ready(state.params)
        epoch_s.append(time.perf_counter() - t0)
    later_s = statistics.median(epoch_s[1:]) if epochs > 1 else epoch_s[0]
    diff = float(np.abs(np.asarray(head["kernel"]) - np.asarray(state.params["fc"]["kernel"]))
                 .max()) if arch.startswith("resnet") else float("nan")  # fmt: skip

    device = jax.devices()[0]
    print(f"probe vs frozen fine-tune: {arch}, {n} images at {size} px, batch {batch}, "
          f"SGD lr {args.lr:g} momentum {args.momentum:g}, {epochs} epochs; "
          f"{device.platform} ({os.cpu_count()} cores visible)")  # fmt: skip
    print(f"{'':34}{'first epoch':>14}{'later epochs':>18}")
    print(f"{'frozen fine-tune':34}{epoch_s[0]:>12.2f} s{later_s:>14.4f} s/ep")
    print(f"{'linear probe, cold cache':34}{embed_s + first_fit_s / epochs:>12.2f} s"
          f"{probe_epoch_s:>14.6f} s/ep   (embedding {embed_s:.2f} s)")  # fmt: skip
    print(f"{'linear probe, warm cache':34}{warm_embed_s + probe_epoch_s:>12.2f} s"
          f"{probe_epoch_s:>14.6f} s/ep")  # fmt: skip
    print(f"later epochs: the probe is {later_s / probe_epoch_s:,.0f}x faster per epoch; "
          f"first epoch: {epoch_s[0] / (embed_s + first_fit_s / epochs):.1f}x (cold cache), "
          f"{epoch_s[0] / (warm_embed_s + probe_epoch_s):,.0f}x (warm)")  # fmt: skip
    print(f"same head from both: max |kernel difference| = {diff:.1e}")


if __name__ == "__main__":
    main()
