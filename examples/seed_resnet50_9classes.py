"""Seed 000: ResNet-50 with its fc replaced for 9 classes, the whole network fine-tuned.

The PyTorch recipe:

    model = torchvision.models.resnet50(weights="IMAGENET1K_V1")   # pretrained=True
    model.fc = nn.Linear(model.fc.in_features, 9)                   # 2048 -> 9
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    model.train()   # BatchNorm in training mode everywhere
    ...
    torch.save(model.state_dict(), "resnet50_9classes.pth")

In jtransfer the weights are ported by name (`porting.from_torchvision(..., num_classes=9)`
re-initialises `fc` and says so), one rule `(".*", 1.0)` puts every parameter in a single
param group, `fit.fit` trains, and `porting.to_torchvision` writes a state_dict that
`torchvision.models.resnet50(num_classes=9).load_state_dict(..., strict=True)` accepts.

    python examples/seed_resnet50_9classes.py --data-dir DIR --weights resnet50-0676ba61.pth
    python examples/seed_resnet50_9classes.py --demo        # 9 generated classes, no download

DIR holds train/ and val/ (or test/) image folders with 9 class sub-folders each.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import jax

import jtransfer as jt
import porting
from jtransfer import data, fit, partition
from jtransfer.errors import ConfigError, JTransferError

ARCH = "resnet50"
NUM_CLASSES = 9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, help="folder with train/ and val/ (or test/)")
    p.add_argument("--demo", action="store_true", help="generate 9 classes of demo images")
    p.add_argument("--weights", default="IMAGENET1K_V1", help="PATH, torchvision tag, or none")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/seed000"))
    p.add_argument("--export", type=Path, help="write the fine-tuned model as a torch .pth")
    args = p.parse_args(argv)
    if (args.data_dir is None) == (not args.demo):
        p.error("pass --data-dir DIR, or --demo for generated images")
    return args


def nine_class_splits(args: argparse.Namespace) -> tuple[data.ImageFolder, data.ImageFolder]:
    root = args.data_dir
    if args.demo:
        root = args.out / "demo_data"
        names = [f"class_{i}" for i in range(NUM_CLASSES)]
        for seed, (split, n) in enumerate((("train", 8), ("val", 4))):
            if not (root / split).is_dir():
                data.make_demo_imagefolder(root / split, names, n, 80, seed=seed)
        print(f"DEMO: 9 classes of generated images in {root}")
    val_dir = root / "val" if (root / "val").is_dir() else root / "test"
    train, val = data.ImageFolder(root / "train"), data.ImageFolder(val_dir)
    data.check_same_classes(train, val)
    if len(train.classes) != NUM_CLASSES:
        raise ConfigError(
            f"this recipe is for {NUM_CLASSES} classes; {train.root} has "
            f"{len(train.classes)}: {train.classes}"
        )
    return train, val


def ported_weights(args: argparse.Namespace):
    """torchvision's ResNet-50 in Flax, `fc` re-initialised for 9 classes."""
    model = jt.models.create(ARCH, num_classes=NUM_CLASSES)
    if args.weights.lower() == "none":
        return model, jt.models.init(model, jax.random.PRNGKey(args.seed))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", porting.HeadReinitialized)
        _, variables = porting.load_pretrained(ARCH, args.weights, NUM_CLASSES, seed=args.seed)
    for w in caught:
        print(f"porting: {w.message}")
    return model, variables


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train_folder, val_folder = nine_class_splits(args)
        model, variables = ported_weights(args)
    except JTransferError as e:
        print(f"error: {e}\n(--weights none runs the pipeline with random weights)",
              file=sys.stderr)  # fmt: skip
        return 1
    rules = [(".*", partition.Group("all", 1.0))]  # optim.SGD(model.parameters(), ...)
    print(f"ResNet-50, weights {args.weights}; classes {train_folder.classes}; "
          f"{len(train_folder)} train / {len(val_folder)} val images")  # fmt: skip
    print(f"model.fc = nn.Linear(2048, {NUM_CLASSES})  # Xavier-uniform weight, zero bias")
    print("every parameter has requires_grad=True; one optimizer param group:")
    print(partition.rules_table(variables["params"], rules))
    print(
        f"optimizer = SGD(model.parameters(), lr={args.lr:g}, momentum={args.momentum:g})\n"
        "criterion = CrossEntropyLoss()  # the mean over the batch\n"
        "model.train()  # BatchNorm in training mode: batch statistics, running ones updated"
    )

    train_loader = data.make_loader(
        train_folder, batch_size=args.batch_size, train=True, seed=args.seed, num_epochs=None,
        image_size=args.image_size,
    )  # fmt: skip
    val_loader = data.make_loader(
        val_folder, batch_size=args.batch_size, train=False, image_size=args.image_size,
        resize_size=round(args.image_size * 256 / 224),
    )  # fmt: skip
    state, history = fit.fit(
        model, variables, rules, train_loader, val_loader, learning_rate=args.lr,
        epochs=args.epochs, momentum=args.momentum, loss_reduction="mean", seed=args.seed,
        arch=ARCH, desc="seed000", progress=False,
    )  # fmt: skip
    demo = "DEMO data: " if args.demo else ""
    print(f"{demo}val acc after {args.epochs} epoch(s): {history[-1]['test_acc']:.3f}")
    if args.export:
        import torch

        trained = {"params": state.params, "batch_stats": state.batch_stats}
        args.export.parent.mkdir(parents=True, exist_ok=True)
        torch.save(porting.to_torchvision(trained, ARCH), args.export)
        print(f"torch.save(model.state_dict(), {str(args.export)!r}); load it with "
              f"torchvision.models.resnet50(num_classes={NUM_CLASSES}).load_state_dict("
              "torch.load(path, weights_only=True))")  # fmt: skip
    return 0


if __name__ == "__main__":
    from jtransfer import hostmem

    hostmem.reexec_with_hugepages()  # huge pages for XLA's per-step buffers
    raise SystemExit(main())
