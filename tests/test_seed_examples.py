"""The seed recipes in examples/ run end to end on generated images and random torchvision
weights, and say what they do in PyTorch's terms."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

from jtransfer import data

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

# The recipes' plumbing, not convolution numerics: XLA's own convolutions, which
# compile much faster (tests/conftest.py).
XLA_CONVOLUTIONS = True

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_checkpoint(arch: str, folder: Path) -> Path:
    """A torchvision model with random weights, saved as users save theirs."""
    torch.manual_seed(0)
    path = folder / f"{arch}_random.pth"
    torch.save(getattr(torchvision.models, arch)().state_dict(), path)
    return path


def image_folders(root: Path, classes, n_train: int, n_val: int) -> Path:
    data.make_demo_imagefolder(root / "train", classes, n_train, size=64, seed=0)
    data.make_demo_imagefolder(root / "val", classes, n_val, size=64, seed=1)
    return root


def run(name: str, argv: list[str], capsys) -> str:
    t0 = time.perf_counter()
    code = example(name).main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    print(f"{name}: {time.perf_counter() - t0:.1f} s")
    return out


def test_seed_004_resnet18_frozen_but_a_new_fc(tmp_path, capsys):
    root = image_folders(tmp_path / "ants_bees", ("ants", "bees"), 6, 3)
    out = run("seed_resnet18_frozen", [
        "--data-dir", str(root), "--weights", str(random_checkpoint("resnet18", tmp_path)),
        "--epochs", "1", "--batch-size", "4", "--image-size", "64", "--out", str(tmp_path),
    ], capsys)  # fmt: skip
    assert "requires_grad = False" in out and "model.fc = nn.Linear(512, 2)" in out
    assert "SGD([{'params': model.fc.parameters(), 'lr': 0.001}], momentum=0.9)" in out
    assert "StepLR(optimizer, step_size=7, gamma=0.1)" in out
    assert "the first 5 stages ['stem', 'layer1', 'layer2', 'layer3', 'layer4'] are frozen" in out
    assert "best val acc" in out and "DEMO" not in out


def test_seed_002_vgg16_feature_extractor_trains_classifier_6_on_cached_features(tmp_path, capsys):
    root = image_folders(tmp_path / "pets", ("cat", "dog"), 4, 2)
    argv = [
        "--data-dir", str(root), "--weights", str(random_checkpoint("vgg16", tmp_path)),
        "--epochs", "2", "--batch-size", "2", "--image-size", "32", "--out", str(tmp_path),
    ]  # fmt: skip
    out = run("seed_vgg16_feature_extractor", argv, capsys)
    assert "model.classifier[6] = nn.Linear(4096, 2)" in out
    assert "requires_grad=False on model.features" in out
    assert "SGD(model.classifier[6].parameters(), lr=0.001, momentum=0.9)" in out
    assert "8 + 4 images -> 4096-d pre-logits" in out and "val acc" in out
    assert len(list((tmp_path / "feature_cache").glob("vgg16-prelogits-*.npz"))) == 2


def test_seed_000_resnet50_fc_replaced_for_9_classes_and_exported(tmp_path, capsys):
    classes = [f"kind_{i}" for i in range(9)]
    root = image_folders(tmp_path / "nine", classes, 1, 1)
    exported = tmp_path / "resnet50_9.pth"
    out = run("seed_resnet50_9classes", [
        "--data-dir", str(root), "--weights", str(random_checkpoint("resnet50", tmp_path)),
        "--epochs", "1", "--batch-size", "3", "--image-size", "32", "--out", str(tmp_path),
        "--export", str(exported),
    ], capsys)  # fmt: skip
    assert "fc was re-initialised" in out or "re-initialised" in out
    assert "model.fc = nn.Linear(2048, 9)" in out and "requires_grad=True" in out
    assert "SGD(model.parameters(), lr=0.001, momentum=0.9)" in out
    net = torchvision.models.resnet50(num_classes=9)
    net.load_state_dict(torch.load(exported, weights_only=True), strict=True)


def test_a_recipe_without_data_says_how_to_pass_it(capsys):
    with pytest.raises(SystemExit):
        example("seed_resnet18_frozen").main([])
    assert "--data-dir DIR, or --demo" in capsys.readouterr().err
