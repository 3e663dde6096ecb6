"""Seed 002: VGG-16 as a feature extractor -- frozen, classifier[6] replaced and trained alone.

The PyTorch recipe:

    model = torchvision.models.vgg16(weights="IMAGENET1K_V1")
    for param in model.features.parameters():
        param.requires_grad = False
    model.classifier[6] = nn.Linear(4096, num_classes)
    optimizer = optim.SGD(model.classifier[6].parameters(), lr=0.001, momentum=0.9)

Only classifier[6] is in the optimizer, so classifier[0] and classifier[3] keep their
ImageNet weights as well: everything up to the 4096-d pre-logits is a fixed function. Two
ways to train it here:

* ``--method probe`` (default): run VGG-16 once over the images in eval mode, cache the
  4096-d features on disk (`features.embed_dataset`), train the new layer on them with the
  same SGD (`features.fit_linear_probe`, all epochs in one jit), and put it back into the
  model (`features.insert_head`). Each later epoch costs a matrix product instead of a VGG-16
  forward pass. What it gives up: augmentation (each image is seen as the evaluation
  transform shows it) and dropout after classifier[0] and [3].
* ``--method finetune``: the literal recipe, with augmentation and dropout (`fit.fit` with
  `partition.preset("vgg16", "head")`; the frozen conv blocks get no backward pass).

    python examples/seed_vgg16_feature_extractor.py --data-dir DIR --weights vgg16-397923af.pth
    python examples/seed_vgg16_feature_extractor.py --demo   # generated images, no download
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import jax

import jtransfer as jt
import porting
from jtransfer import data, features, fit, partition
from jtransfer.errors import JTransferError

ARCH = "vgg16"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, help="folder with train/ and val/ (or test/)")
    p.add_argument("--demo", action="store_true", help="generate a small demo image folder")
    p.add_argument("--weights", default="IMAGENET1K_V1", help="PATH, torchvision tag, or none")
    p.add_argument("--method", choices=("probe", "finetune"), default="probe")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/seed002"))
    p.add_argument("--cache-dir", type=Path, help="feature cache (default: OUT/feature_cache)")
    p.add_argument("--export", type=Path, help="probe: write the model as a torchvision .pth")
    args = p.parse_args(argv)
    if (args.data_dir is None) == (not args.demo):
        p.error("pass --data-dir DIR, or --demo for generated images")
    return args


def folders(args: argparse.Namespace) -> tuple[data.ImageFolder, data.ImageFolder]:
    root = args.data_dir
    if args.demo:
        root = args.out / "demo_data"
        for seed, split in enumerate(("train", "val")):
            if not (root / split).is_dir():
                data.make_demo_imagefolder(root / split, ("cat", "dog"), 16, 80, seed=seed)
        print(f"DEMO: generated images in {root} (coloured shapes)")
    val_dir = root / "val" if (root / "val").is_dir() else root / "test"
    train, val = data.ImageFolder(root / "train"), data.ImageFolder(val_dir)
    data.check_same_classes(train, val)
    return train, val


def vgg16(args: argparse.Namespace, num_classes: int):
    """torchvision's VGG-16 in Flax with a new classifier[6] (`classifier_6`)."""
    model = jt.models.create(ARCH, num_classes=num_classes)
    if args.weights.lower() == "none":
        return model, jt.models.init(model, jax.random.PRNGKey(args.seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", porting.HeadReinitialized)  # it is what we ask for
        _, variables = porting.load_pretrained(ARCH, args.weights, num_classes, seed=args.seed)
    return model, variables


def probe(args, model, variables, train_folder, val_folder) -> float:
    """Cached 4096-d features -> SGD on classifier[6] alone -> back into the model."""
    cache = args.cache_dir or args.out / "feature_cache"
    resize = round(args.image_size * 256 / 224)  # torchvision's Resize(256) at 224
    t0 = time.perf_counter()
    embed = dict(
        cache_dir=cache, arch=ARCH, weights_id=Path(args.weights).stem,
        image_size=args.image_size, resize_size=resize, batch_size=args.batch_size,
    )  # fmt: skip
    x_train, y_train = features.embed_dataset(model, variables, train_folder, **embed)
    x_val, y_val = features.embed_dataset(model, variables, val_folder, **embed)
    print(f"features: {x_train.shape[0]} + {x_val.shape[0]} images -> {x_train.shape[1]}-d "
          f"pre-logits (eval mode) in {time.perf_counter() - t0:.1f} s,\n  cached in {cache}: "
          "the next run with these images and weights skips VGG-16")  # fmt: skip
    t0 = time.perf_counter()
    head = features.fit_linear_probe(
        x_train, y_train, len(train_folder.classes), method="sgd", lr=args.lr,
        momentum=args.momentum, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
    )  # fmt: skip
    print(f"trained classifier[6] for {args.epochs} epochs on the cached features in "
          f"{time.perf_counter() - t0:.2f} s; train acc "
          f"{features.probe_accuracy(head, x_train, y_train):.3f}")  # fmt: skip
    # The model with the new classifier[6] predicts exactly probe_logits(head, pre-logits):
    # score the cached validation features instead of running VGG-16 again.
    variables = features.insert_head(variables, ARCH, head)
    if args.export:
        import torch

        args.export.parent.mkdir(parents=True, exist_ok=True)
        torch.save(porting.to_torchvision(variables, ARCH), args.export)
        print(f"wrote {args.export}: torchvision.models.vgg16(num_classes={head['bias'].shape[0]})"
              ".load_state_dict(torch.load(path, weights_only=True)) loads it")  # fmt: skip
    return features.probe_accuracy(head, x_val, y_val)


def finetune(args, model, variables, train_folder, val_folder) -> float:
    """The literal recipe: augmentation, dropout, frozen blocks without a backward pass."""
    train_loader = data.make_loader(
        train_folder, batch_size=args.batch_size, train=True, seed=args.seed, num_epochs=None,
        image_size=args.image_size,
    )  # fmt: skip
    val_loader = data.make_loader(
        val_folder, batch_size=args.batch_size, train=False, image_size=args.image_size,
        resize_size=round(args.image_size * 256 / 224),
    )  # fmt: skip
    _, history = fit.fit(
        model, variables, partition.preset(ARCH, "head"), train_loader, val_loader,
        learning_rate=args.lr, epochs=args.epochs, momentum=args.momentum,
        loss_reduction="mean", seed=args.seed, arch=ARCH, desc="seed002", progress=False,
    )  # fmt: skip
    return history[-1]["test_acc"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train_folder, val_folder = folders(args)
        model, variables = vgg16(args, len(train_folder.classes))
    except JTransferError as e:
        print(f"error: {e}\n(--weights none runs the pipeline with random weights)",
              file=sys.stderr)  # fmt: skip
        return 1
    n = len(train_folder.classes)
    rules = partition.preset(ARCH, "head")
    print(f"VGG-16, weights {args.weights}; {n} classes {train_folder.classes}; "
          f"{len(train_folder)} train / {len(val_folder)} val images")  # fmt: skip
    print(f"model.classifier[6] = nn.Linear(4096, {n})  # Xavier-uniform weight, zero bias")
    print(
        "requires_grad=False on model.features; classifier[0] and [3] are not in the\n"
        "optimizer either, so they stay as loaded:"
    )
    print(partition.rules_table(variables["params"], rules))
    print(
        f"optimizer = SGD(model.classifier[6].parameters(), lr={args.lr:g}, "
        f"momentum={args.momentum:g})\ncriterion = CrossEntropyLoss()  # mean; "
        f"method: {args.method}"
    )
    run = probe if args.method == "probe" else finetune
    accuracy = run(args, model, variables, train_folder, val_folder)
    demo = "DEMO data: " if args.demo else ""
    print(f"{demo}val acc {accuracy:.3f} after {args.epochs} epoch(s) ({args.method})")
    return 0


if __name__ == "__main__":
    from jtransfer import hostmem

    hostmem.reexec_with_hugepages()  # huge pages for XLA's per-step buffers
    raise SystemExit(main())
