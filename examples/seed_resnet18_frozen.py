"""Seed 004: ResNet-18 as a fixed feature extractor -- every layer frozen but a new fc.

The PyTorch recipe (torchvision's transfer-learning tutorial, "ConvNet as fixed feature
extractor", on its ants-vs-bees data):

    model = torchvision.models.resnet18(weights="IMAGENET1K_V1")
    for param in model.parameters():
        param.requires_grad = False
    model.fc = nn.Linear(model.fc.in_features, num_classes)   # new, so requires_grad=True
    optimizer = optim.SGD(model.fc.parameters(), lr=0.001, momentum=0.9)
    scheduler = lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    # 25 epochs, batch 4, RandomResizedCrop(224) + flip; val Resize(256) + CenterCrop(224)

The same in jtransfer: `partition.preset("resnet18", "head")` freezes everything but `fc`
(no optimizer state, no weight decay, and -- since the frozen part is a prefix of the
network -- no backward pass through it at all), an optax staircase schedule is StepLR, and
`fit.fit` runs the jitted epochs.

    python examples/seed_resnet18_frozen.py --data-dir hymenoptera_data \\
        --weights resnet18-f37072fd.pth
    python examples/seed_resnet18_frozen.py --demo          # generated images, no download

--data-dir holds train/ and val/ (or test/) image folders. --weights is a local torchvision
.pth / .safetensors file, a torchvision tag (downloaded), or "none" (random init).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import jax
import optax

import jtransfer as jt
import porting
from jtransfer import data, fit, partition
from jtransfer.errors import JTransferError

ARCH = "resnet18"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, help="folder with train/ and val/ (or test/)")
    p.add_argument("--demo", action="store_true", help="generate a small demo image folder")
    p.add_argument("--weights", default="IMAGENET1K_V1", help="PATH, torchvision tag, or none")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--step-size", type=int, default=7, help="StepLR step_size, in epochs")
    p.add_argument("--gamma", type=float, default=0.1, help="StepLR gamma")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/seed004"))
    args = p.parse_args(argv)
    if (args.data_dir is None) == (not args.demo):
        p.error("pass --data-dir DIR, or --demo for generated images")
    return args


def splits(args: argparse.Namespace) -> tuple[data.ImageFolder, data.ImageFolder]:
    if args.demo:
        root = args.out / "demo_data"
        for seed, split in enumerate(("train", "val")):
            if not (root / split).is_dir():
                data.make_demo_imagefolder(root / split, ("ants", "bees"), 24, 80, seed=seed)
        print(f"DEMO: generated images in {root} (coloured shapes, not ants and bees)")
        args.data_dir = root
    train = data.ImageFolder(args.data_dir / "train")
    val_dir = next(d for d in (args.data_dir / "val", args.data_dir / "test") if d.is_dir())
    val = data.ImageFolder(val_dir)
    data.check_same_classes(train, val)
    return train, val


def load(args: argparse.Namespace, num_classes: int):
    """torchvision weights with `fc` re-initialised for our classes (model.fc = nn.Linear)."""
    if args.weights.lower() == "none":
        model = jt.models.create(ARCH, num_classes=num_classes)
        return model, jt.models.init(model, jax.random.PRNGKey(args.seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", porting.HeadReinitialized)  # it is what we ask for
        return porting.load_pretrained(ARCH, args.weights, num_classes, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train_folder, val_folder = splits(args)
        model, variables = load(args, len(train_folder.classes))
    except JTransferError as e:
        print(f"error: {e}\n(--weights none runs the pipeline with random weights)",
              file=sys.stderr)  # fmt: skip
        return 1
    classes = train_folder.classes
    rules = partition.preset(ARCH, "head")
    frozen = partition.frozen_prefix(ARCH, rules)
    print(f"ResNet-18, weights {args.weights}; {len(classes)} classes {classes}; "
          f"{len(train_folder)} train / {len(val_folder)} val images")  # fmt: skip
    print(f"model.fc = nn.Linear(512, {len(classes)})  # Xavier-uniform weight, zero bias")
    print("for p in model.parameters(): p.requires_grad = False  # except the new fc:")
    print(partition.rules_table(variables["params"], rules))
    print(
        f"optimizer = SGD([{{'params': model.fc.parameters(), 'lr': {args.lr:g}}}], "
        f"momentum={args.momentum:g})\n  # one param group; frozen tensors have no state"
    )
    print(
        f"scheduler = StepLR(optimizer, step_size={args.step_size}, gamma={args.gamma:g})"
        "\n  # an optax staircase schedule, counted in steps"
    )
    print(f"the first {frozen} stages {list(partition.groups(ARCH))[:frozen]} are frozen:\n"
          "  their BatchNorm uses running statistics (model.eval() on them) and no backward\n"
          "  pass runs through them; torch's model.train() would still update those statistics"
          )  # fmt: skip

    train_loader = data.make_loader(
        train_folder, batch_size=args.batch_size, train=True, seed=args.seed, num_epochs=None,
        image_size=args.image_size,
    )  # fmt: skip
    val_loader = data.make_loader(
        val_folder, batch_size=args.batch_size, train=False, image_size=args.image_size,
        resize_size=round(args.image_size * 256 / 224), cache_eval=True,
    )  # fmt: skip
    schedule = optax.exponential_decay(
        args.lr, args.step_size * train_loader.steps_per_epoch, args.gamma, staircase=True
    )
    _, history = fit.fit(
        model, variables, rules, train_loader, val_loader, learning_rate=schedule,
        epochs=args.epochs, momentum=args.momentum, loss_reduction="mean", seed=args.seed,
        arch=ARCH, desc="seed004", progress=False,
    )  # fmt: skip
    best = max(history, key=lambda h: h["test_acc"])
    demo = "DEMO data: " if args.demo else ""
    print(f"{demo}best val acc {best['test_acc']:.3f} (epoch {best['epoch']}); "
          f"final {history[-1]['test_acc']:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    from jtransfer import hostmem

    hostmem.reexec_with_hugepages()  # huge pages for XLA's per-step buffers
    raise SystemExit(main())
