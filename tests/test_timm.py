"""timm checkpoints: parity against timm's own forward, layout and architecture errors, and
timm's preprocessing reproduced on decoded JPEGs.

The parity models are timm's, with random weights, random biases and randomised
BatchNorm statistics (`porting.parity`), saved as a hub repo would hold them
(``model.safetensors`` and a ``config.json`` with ``architecture`` and
``pretrained_cfg``), and loaded back through `porting.load_pretrained`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jtransfer.nnx as jnnx
from jtransfer import data, train
from jtransfer.errors import ConfigError, PortingError
from jtransfer.preprocess import Preprocessing

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")
import porting  # noqa: E402  (needs torch)
from porting import parity  # noqa: E402

TARGET = 1e-5  # max|jax - timm| / max|timm|, as tests/test_parity.py

# What is tested here is the mapping of timm's weights, not convolution numerics
# (tests/test_parity.py runs both convolution paths): XLA's own convolutions compile faster.
XLA_CONVOLUTIONS = True


def save_timm_repo(net, folder: Path, architecture: str) -> Path:
    """Writes `net` as a timm hub repo holds it: model.safetensors and config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    safetensors_torch.save_file(sd, str(folder / "model.safetensors"))
    config = {
        "architecture": architecture,
        "num_classes": net.num_classes,
        "pretrained_cfg": dict(net.pretrained_cfg),
    }
    (folder / "config.json").write_text(json.dumps(config, default=list))
    return folder


def random_timm(name: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    net = timm.create_model(name, pretrained=False, **kwargs)
    parity.randomize_biases(parity.randomize_batchnorm(net, seed), seed)
    return net.eval()


# (timm model, jtransfer arch, input size, batch): timm's VGG is torchvision's at 224 px
# (see porting.timm), so VGG-BN runs there, at batch 1 (its first Linear is 400 MB).
CASES = [
    ("resnet18.a1_in1k", "resnet18", 64, 2),
    ("resnext50_32x4d.a1h_in1k", "resnext50_32x4d", 64, 2),
    ("vgg11_bn.tv_in1k", "vgg11_bn", 224, 1),
]


@pytest.fixture(scope="module", params=CASES, ids=[c[1] for c in CASES])
def ported(request, tmp_path_factory):
    name, arch, size, batch = request.param
    net = random_timm(name, num_classes=10)
    folder = save_timm_repo(net, tmp_path_factory.mktemp(arch), arch)
    return net, arch, folder, size, batch


def test_timm_weights_compute_what_timm_computes(ported):
    net, arch, folder, size, batch = ported
    model, variables = porting.load_pretrained(None, folder)  # arch from config.json
    assert model.num_classes == 10
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with parity.full_float32(), torch.no_grad():
        want = net(x).numpy()
        got = model.apply(variables, x.numpy().transpose(0, 2, 3, 1), train=False)
    assert parity.rel_err(got, want) < TARGET


def test_a_timm_file_with_config_beside_it_loads_as_the_directory(tmp_path):
    import jax

    folder = save_timm_repo(random_timm("resnet18", num_classes=3), tmp_path / "r18", "resnet18")
    _, from_dir = porting.load_pretrained("resnet18", folder)
    _, from_file = porting.load_pretrained(None, folder / "model.safetensors")
    leaves = jax.tree.leaves(jax.tree.map(np.array_equal, from_dir, from_file))
    assert leaves and all(leaves)
    module = jnnx.from_pretrained(None, folder)  # NNX: the same sources
    assert module.arch == "resnet18"
    leaves = jax.tree.leaves(jax.tree.map(np.array_equal, jnnx.to_variables(module), from_dir))
    assert all(leaves)


def test_vgg_head_maps_onto_torchvision_classifier():
    """pre_logits.fc1 (7x7 conv), fc2 (1x1), head.fc become classifier.0/3/6 Linears."""
    from porting.timm import timm_to_torchvision

    sd = {
        "features.0.weight": np.zeros((64, 3, 3, 3), np.float32),
        "pre_logits.fc1.weight": np.arange(4 * 512 * 49, dtype=np.float32).reshape(4, 512, 7, 7),
        "pre_logits.fc1.bias": np.zeros(4, np.float32),
        "pre_logits.fc2.weight": np.ones((4, 4, 1, 1), np.float32),
        "head.fc.weight": np.ones((3, 4), np.float32),
    }
    out = timm_to_torchvision(sd, "vgg11")
    assert sorted(out) == [
        "classifier.0.bias",
        "classifier.0.weight",
        "classifier.3.weight",
        "classifier.6.weight",
        "features.0.weight",
    ]
    # torch's flatten of a (512, 7, 7) map is channel-first: row k of fc1, flattened C,H,W.
    assert np.array_equal(out["classifier.0.weight"][1], sd["pre_logits.fc1.weight"][1].ravel())
    assert out["classifier.3.weight"].shape == (4, 4)


def test_a_layout_that_is_not_torchvisions_names_the_keys(tmp_path):
    net = timm.create_model("resnet18d", pretrained=False, num_classes=10)  # deep stem
    folder = tmp_path / "r18d"
    folder.mkdir()
    safetensors_torch.save_file(net.state_dict(), str(folder / "model.safetensors"))
    with pytest.raises(PortingError) as e:
        porting.load_pretrained("resnet18", folder)
    text = str(e.value)
    assert "not in torchvision's resnet18 layout" in text
    assert "conv1.0.weight" in text and "missing" in text


def test_config_architecture_must_agree_with_arch(tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")  # never read: the config is checked first
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet34"}))
    with pytest.raises(PortingError, match=r"holds resnet34 weights.*arch='resnet50'"):
        porting.load_pretrained("resnet50", folder)
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet50d"}))
    with pytest.raises(PortingError, match="architecture 'resnet50d' is not one jtransfer builds"):
        porting.load_pretrained(None, folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(PortingError, match="could not read .*config.json"):
        porting.load_pretrained("resnet50", folder)


def test_a_directory_without_weights_says_what_it_holds(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PortingError, match=r"holds no weights file .*config\.json"):
        porting.load_pretrained("resnet18", tmp_path)


# --- preprocessing ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[Path]:
    """Non-square photos-like JPEGs (smooth gradients plus noise), decoded as users' files."""
    folder = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    paths = []
    for k, (h, w) in enumerate([(300, 451), (517, 260), (90, 70)]):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, (xx + yy) / (h + w)], axis=-1) * 200
        img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img{k}.jpg"
        Image.fromarray(img).save(path, quality=90)
        paths.append(path)
    return paths


def timm_eval(cfg: dict, img: Image.Image) -> np.ndarray:
    t = timm.data.create_transform(**cfg)
    return t(img).numpy().transpose(1, 2, 0)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("crop_pct", [0.875, 0.95])
def test_eval_view_equals_timms(jpegs, interpolation, crop_pct):
    cfg = {
        "input_size": (3, 64, 64),
        "interpolation": interpolation,
        "crop_pct": crop_pct,
        "mean": (0.5, 0.4, 0.3),
        "std": (0.2, 0.25, 0.3),
    }
    view = Preprocessing.from_pretrained_cfg(cfg)
    assert view.resize_size == math.floor(64 / crop_pct)
    for path in jpegs:
        img = data.load_image(path)
        want = timm_eval(cfg, img)
        got = view.eval(img)
        assert got.shape == want.shape == (64, 64, 3)
        assert np.abs(got - want).max() <= 1e-6
        # The uint8 view (what predict and embed_dataset send) normalises to the same bits.
        pixels = view.eval_pixels(img)
        assert pixels.dtype == np.uint8
        on_device = np.asarray(train.normalize_images(pixels[None], view.mean, view.std))[0]
        assert np.array_equal(on_device, got)


def test_eval_view_of_real_timm_configs(jpegs):
    """What resolve_data_config makes of a timm model's pretrained_cfg, at its 224 px."""
    img = data.load_image(jpegs[0])
    for name in ("resnet50.a1_in1k", "vgg16_bn.tv_in1k"):  # bicubic 0.95, bilinear 0.875
        net = timm.create_model(name, pretrained=False, num_classes=2)
        cfg = timm.data.resolve_data_config({}, model=net)
        view = Preprocessing.from_pretrained_cfg(dict(net.pretrained_cfg))
        assert np.abs(view.eval(img) - timm_eval(cfg, img)).max() <= 1e-6


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_train_crop_equals_timms_for_the_same_box(jpegs, interpolation):
    import torchvision.transforms.functional as F
    from timm.data.transforms import str_to_interp_mode

    img = data.load_image(jpegs[1])
    box = (31, 17, 200, 150)  # top, left, height, width
    want = np.asarray(F.resized_crop(img, *box, [48, 48], str_to_interp_mode(interpolation)))
    got = np.asarray(data.resized_crop(img, *box, [48, 48], interpolation))
    assert np.array_equal(got, want)


def test_preprocessing_round_trips_and_reads_older_runs():
    view = Preprocessing.from_pretrained_cfg(
        {"pretrained_cfg": {"interpolation": "bicubic", "crop_pct": 0.95}}, image_size=32
    )
    assert Preprocessing.from_dict(json.loads(json.dumps(view.to_dict()))) == view
    old = {"image_size": 32, "resize_size": [37, 37], "mean": [0.5] * 3, "std": [0.2] * 3}
    assert Preprocessing.from_metadata(old) == Preprocessing(
        mean=(0.5,) * 3, std=(0.2,) * 3, crop_size=32, resize_size=(37, 37)
    )
    with pytest.raises(ConfigError, match="interpolation 'lanczos' is not supported"):
        Preprocessing.from_pretrained_cfg({"interpolation": "lanczos"})
