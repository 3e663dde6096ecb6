"""Fine-tune torchvision's ResNet-18 the Flax NNX way: a stateful module, nnx.Optimizer, nnx.jit.

The same recipe as the Linen examples (the model, the ported weights, the rules of who
trains how fast and the BatchNorm policy are the same objects), written as NNX users
write training loops:

    module = jnnx.from_torchvision("resnet18.pth", "resnet18", num_classes=2)
    optimizer = jnnx.make_optimizer(module, partition.finetune("resnet18"),
                                    learning_rate=1e-3, momentum=0.9)
    for batch in loader:
        metrics = jnnx.train_step(module, optimizer, batch)   # updates both in place
    module.eval(); logits = module(images)

    python examples/nnx_finetune.py --data hotdog --weights resnet18-f37072fd.pth
    python examples/nnx_finetune.py --data DIR --weights none --epochs 2 --image-size 64

--data holds train/ and test/ image folders (one subfolder per class). --weights is a
local torchvision .pth / .safetensors file, or "none" for random weights. With
--freeze-backbone only the new fc trains (no optimizer state for the rest and no
backward pass through it); otherwise everything trains, fc at 10x the learning rate.
--export writes the fine-tuned weights as a torchvision state_dict.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import jtransfer.nnx as jnnx
from jtransfer import data, partition, train
from jtransfer.errors import JTransferError

ARCH = "resnet18"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder with train/ and test/")
    p.add_argument("--weights", required=True, help="torchvision .pth/.safetensors, or none")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--freeze-backbone", action="store_true", help="train the new fc only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export", type=Path, help="write the result as a torchvision .pth")
    return p.parse_args(argv)


def load(args: argparse.Namespace, num_classes: int) -> jnnx.Model:
    if args.weights.lower() == "none":
        return jnnx.create(ARCH, num_classes, seed=args.seed)
    import porting

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", porting.HeadReinitialized)  # the new fc is the point
        return jnnx.from_torchvision(args.weights, ARCH, num_classes, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train_folder = data.ImageFolder(args.data / "train")
        test_folder = data.ImageFolder(args.data / "test")
        data.check_same_classes(train_folder, test_folder)
        module = load(args, len(train_folder.classes))
    except JTransferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rules = partition.preset(ARCH, "head") if args.freeze_backbone else partition.finetune(ARCH)
    frozen = partition.frozen_prefix(ARCH, rules)
    optimizer = jnnx.make_optimizer(module, rules, learning_rate=args.lr, momentum=args.momentum)
    print(f"{ARCH} (flax.nnx), weights {args.weights}; classes {train_folder.classes}; "
          f"{len(train_folder)} train / {len(test_folder)} test images")  # fmt: skip
    print(partition.rules_table(jnnx.to_variables(module)["params"], rules))
    if frozen:
        print(f"frozen prefix: {frozen} stages (BatchNorm on running statistics, no backward)")
    else:
        print("every stage trains (BatchNorm in training mode, as torch's net.train())")

    train_loader = data.make_loader(
        train_folder, batch_size=args.batch_size, train=True, seed=args.seed,
        num_epochs=None, image_size=args.image_size,
    )  # fmt: skip
    test_loader = data.make_loader(
        test_folder, batch_size=args.batch_size, train=False, image_size=args.image_size,
        resize_size=round(args.image_size * 256 / 224), cache_eval=True,
    )  # fmt: skip
    batches = iter(train_loader)
    try:
        for epoch in range(1, args.epochs + 1):
            steps = [
                jnnx.train_step(module, optimizer, next(batches), loss_reduction="mean",
                                frozen_stages=frozen)
                for _ in range(train_loader.steps_per_epoch)
            ]  # fmt: skip
            fit = train.summarize(steps)
            test = train.summarize(jnnx.eval_step(module, b) for b in test_loader)
            print(f"epoch {epoch}: train loss {fit['loss']:.4f} acc {fit['accuracy']:.3f}, "
                  f"test loss {test['loss']:.4f} acc {test['accuracy']:.3f}")  # fmt: skip
    finally:
        batches.close()
    if args.export:
        import torch

        import porting

        args.export.parent.mkdir(parents=True, exist_ok=True)
        torch.save(porting.to_torchvision(jnnx.to_variables(module), ARCH), args.export)
        print(f"exported {args.export} (torchvision.models.{ARCH}(num_classes="
              f"{len(train_folder.classes)}).load_state_dict(torch.load(...)))")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
