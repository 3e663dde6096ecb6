"""Loading torchvision weights: strict by name, loud on every mismatch, safe to read."""

from __future__ import annotations

import functools
import hashlib
import http.server
import pickle
import subprocess
import sys
import threading
import warnings

import jax
import numpy as np
import pytest

import jtransfer as jt

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
import porting  # noqa: E402
from porting.parity import randomize_batchnorm  # noqa: E402


@functools.cache
def _resnet18_sd():
    torch.manual_seed(0)
    return randomize_batchnorm(torchvision.models.resnet18()).state_dict()


@pytest.fixture
def sd():
    return dict(_resnet18_sd())


def test_import_jtransfer_does_not_import_torch():
    code = "import sys, jtransfer, jtransfer.models; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_torch_keys_follow_flax_paths_by_one_rule():
    assert porting.torch_key(("params", "layer1_0", "conv1", "kernel")) == "layer1.0.conv1.weight"
    assert (
        porting.torch_key(("batch_stats", "layer2_0", "downsample_1", "var"))
        == "layer2.0.downsample.1.running_var"
    )
    assert porting.torch_key(("params", "classifier_6", "bias")) == "classifier.6.bias"


@pytest.mark.parametrize("arch", jt.models.ARCHS)
def test_expected_keys_are_exactly_torchvisions(arch):
    net = torch.device("meta")
    with net:
        tv = getattr(torchvision.models, arch)()
    want = {k: tuple(v.shape) for k, v in tv.state_dict().items() if "num_batches" not in k}
    assert porting.expected_keys(arch) == want


def test_missing_unexpected_and_misshaped_keys_are_all_listed_in_one_error(sd):
    del sd["layer1.0.conv1.weight"]
    sd["layer9.extra.weight"] = torch.zeros(3)
    sd["layer2.0.bn1.running_mean"] = torch.zeros(7)
    with pytest.raises(porting.PortingError) as e:
        porting.from_torchvision(sd, "resnet18")
    msg = str(e.value)
    assert "missing (1): layer1.0.conv1.weight" in msg
    assert "unexpected (1): layer9.extra.weight" in msg
    assert "layer2.0.bn1.running_mean: checkpoint (7,), resnet18 needs (128,)" in msg
    assert "load_matching" in msg


def test_wrong_arch_is_named(sd):
    with pytest.raises(
        porting.PortingError, match="These are resnet18 weights: pass arch='resnet18'"
    ):
        porting.from_torchvision(sd, "resnet34")


def test_dataparallel_prefix_is_explained(sd):
    with pytest.raises(porting.PortingError, match="start with 'module.'"):
        porting.from_torchvision({"module." + k: v for k, v in sd.items()}, "resnet18")


def test_training_checkpoint_wrapper_is_explained(sd, tmp_path):
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    with pytest.raises(porting.PortingError, match=r"checkpoint\['state_dict'\]"):
        porting.from_torchvision(tmp_path / "ckpt.pth", "resnet18")


def test_truncated_file_is_a_porting_error(sd, tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(sd, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(porting.PortingError, match="truncated"):
        porting.from_torchvision(path, "resnet18")


def test_missing_file_is_a_porting_error(tmp_path):
    with pytest.raises(porting.PortingError, match="not found"):
        porting.from_torchvision(tmp_path / "nope.pth", "resnet18")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused_not_executed(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"fc.weight": _Evil()}, f)
    with pytest.raises(porting.PortingError, match="refused for safety"):
        porting.from_torchvision(path, "resnet18")
    assert "this must never run" not in capsys.readouterr().out


def test_pth_and_safetensors_paths_load_the_same(sd, tmp_path):
    from safetensors.torch import save_file

    torch.save(sd, tmp_path / "r18.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "r18.safetensors"))
    a = porting.from_torchvision(tmp_path / "r18.pth", "resnet18")
    b = porting.from_torchvision(tmp_path / "r18.safetensors", "resnet18")
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), a, b))


def test_corrupt_safetensors_is_a_porting_error(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(porting.PortingError, match="corrupt"):
        porting.from_torchvision(tmp_path / "bad.safetensors", "resnet18")


def test_new_num_classes_reinitialises_the_head_and_says_so(sd):
    with pytest.warns(porting.HeadReinitialized, match="1000 classes, num_classes=2"):
        v = porting.from_torchvision(sd, "resnet18", num_classes=2)
    kernel, bias = np.asarray(v["params"]["fc"]["kernel"]), np.asarray(v["params"]["fc"]["bias"])
    assert kernel.shape == (512, 2) and not bias.any()
    bound = np.sqrt(6 / (512 + 2))  # Xavier-uniform
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.5 * bound
    conv = np.asarray(v["params"]["conv1"]["kernel"])
    np.testing.assert_array_equal(conv, sd["conv1.weight"].numpy().transpose(2, 3, 1, 0))


def test_same_num_classes_does_not_warn(sd):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        porting.from_torchvision(sd, "resnet18", num_classes=1000)


def test_exported_state_dict_loads_strict_into_a_new_head_size(sd):
    with pytest.warns(porting.HeadReinitialized):
        v = porting.from_torchvision(sd, "resnet18", num_classes=5)
    out = porting.to_torchvision(v, "resnet18")
    net = torchvision.models.resnet18(num_classes=5)
    net.load_state_dict(out, strict=True)
    assert int(out["bn1.num_batches_tracked"]) == 0
    # The tensors own their memory: changing them in place leaves the jax variables as they
    # were (a bias, exported as it is stored, and a transposed conv kernel).
    before = {
        k: np.array(v["params"][k]["bias" if k == "fc" else "kernel"]) for k in ("fc", "conv1")
    }
    for key in ("fc.bias", "conv1.weight"):
        assert out[key].is_contiguous()
        out[key].add_(1.0)
    np.testing.assert_array_equal(v["params"]["fc"]["bias"], before["fc"])
    np.testing.assert_array_equal(v["params"]["conv1"]["kernel"], before["conv1"])


def test_load_matching_reports_loaded_skipped_and_left_at_init(sd):
    model = jt.models.create("resnet18", num_classes=2)
    init = jt.models.init(model, jax.random.PRNGKey(0), image_size=32)
    v, report = porting.load_matching(sd, init, "resnet18")
    assert set(report.skipped) == {"fc.weight", "fc.bias"}
    assert set(report.left_at_init) == {"fc.weight", "fc.bias"}
    assert len(report.loaded) == len(sd) - 2 - sum("num_batches" in k for k in sd)
    np.testing.assert_array_equal(v["params"]["fc"]["kernel"], init["params"]["fc"]["kernel"])
    np.testing.assert_array_equal(v["batch_stats"]["bn1"]["mean"], sd["bn1.running_mean"].numpy())
    assert "skipped 2" in str(report)


@pytest.mark.parametrize(
    ("arch", "same_keys_as"),
    [
        ("resnext50_32x4d", "resnet50"),
        ("wide_resnet50_2", "resnet50"),
        ("resnext101_32x8d", "resnet101"),
        ("resnext101_64x4d", "resnext101_32x8d"),
        ("wide_resnet101_2", "resnet101"),
    ],
)
def test_wrong_arch_among_same_named_keys_is_told_apart_by_shapes(arch, same_keys_as):
    # torchvision's ResNeXt and Wide ResNet use ResNet's key names: only widths differ.
    sd = {k: np.zeros(shape, np.float32) for k, shape in porting.expected_keys(arch).items()}
    with pytest.raises(porting.PortingError) as e:
        porting.from_torchvision(sd, same_keys_as)
    assert f"These are {arch} weights: pass arch='{arch}'" in str(e.value)


# torchvision 0.2x's published files for the grouped / wide ResNets (the enums'
# URLs); DEFAULT is the newest tag, and resnext101_64x4d has only V1.
_TV_FILES = {
    ("resnext50_32x4d", "IMAGENET1K_V1"): "resnext50_32x4d-7cdf4587.pth",
    ("resnext50_32x4d", "IMAGENET1K_V2"): "resnext50_32x4d-1a0047aa.pth",
    ("resnext50_32x4d", "DEFAULT"): "resnext50_32x4d-1a0047aa.pth",
    ("resnext101_32x8d", "IMAGENET1K_V1"): "resnext101_32x8d-8ba56ff5.pth",
    ("resnext101_32x8d", "IMAGENET1K_V2"): "resnext101_32x8d-110c445d.pth",
    ("resnext101_32x8d", "DEFAULT"): "resnext101_32x8d-110c445d.pth",
    ("resnext101_64x4d", "IMAGENET1K_V1"): "resnext101_64x4d-173b62eb.pth",
    ("resnext101_64x4d", "DEFAULT"): "resnext101_64x4d-173b62eb.pth",
    ("wide_resnet50_2", "IMAGENET1K_V1"): "wide_resnet50_2-95faca4d.pth",
    ("wide_resnet50_2", "IMAGENET1K_V2"): "wide_resnet50_2-9ba9bcbe.pth",
    ("wide_resnet50_2", "DEFAULT"): "wide_resnet50_2-9ba9bcbe.pth",
    ("wide_resnet101_2", "IMAGENET1K_V1"): "wide_resnet101_2-32ee1156.pth",
    ("wide_resnet101_2", "IMAGENET1K_V2"): "wide_resnet101_2-d733dc28.pth",
    ("wide_resnet101_2", "DEFAULT"): "wide_resnet101_2-d733dc28.pth",
}


@pytest.mark.parametrize(("arch", "tag"), sorted(_TV_FILES))
def test_grouped_and_wide_resnet_weight_tags_name_torchvisions_files(arch, tag, monkeypatch):
    monkeypatch.delenv(porting.io.BASE_URL_ENV, raising=False)
    name = _TV_FILES[arch, tag]
    assert porting.io.weights_url(arch, tag) == f"https://download.pytorch.org/models/{name}"
    assert porting.io.hash_prefix(name) == name.rsplit("-", 1)[1].split(".")[0]


def test_resnext101_64x4d_has_no_v2_weights():
    with pytest.raises(jt.ConfigError, match="DEFAULT, IMAGENET1K_V1. Or pass a path"):
        porting.load_pretrained("resnext101_64x4d", weights="IMAGENET1K_V2")


def test_unknown_arch_and_weights_tag_are_config_errors():
    with pytest.raises(jt.ConfigError, match="resnet18"):
        jt.models.create("resnet19")
    with pytest.raises(jt.ConfigError, match="IMAGENET1K_V1"):
        porting.load_pretrained("resnet18", weights="IMAGENET9K")


# --- load_pretrained against a server on 127.0.0.1 --------------------------------


@pytest.fixture
def weights_server(tmp_path, monkeypatch):
    """Serves files from a folder on a free local port; yields (folder, base_url)."""
    root = tmp_path / "srv"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(porting.io.BASE_URL_ENV, f"http://127.0.0.1:{server.server_port}/models")
    (root / "models").mkdir()
    try:
        yield root / "models", tmp_path / "torch_home" / "hub" / "checkpoints"
    finally:
        server.shutdown()
        server.server_close()


def _publish(folder, sd, name="resnet18-f37072fd.pth", honest=True):
    """Writes sd under torchvision's file name; `honest` makes the name's hash prefix right."""
    tmp = folder / "tmp.pth"
    torch.save(sd, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    if honest:
        name = f"resnet18-{digest[:8]}.pth"
    tmp.rename(folder / name)
    return name


def test_load_pretrained_downloads_verifies_and_caches(weights_server, sd, monkeypatch):
    folder, cache = weights_server
    name = _publish(folder, sd)
    # torchvision's enum names its own file; point it at ours by patching the URL lookup.
    base = porting.io.weights_url
    monkeypatch.setattr(
        porting.io, "weights_url", lambda a, w: base(a, w).rsplit("/", 1)[0] + "/" + name
    )
    with pytest.warns(porting.HeadReinitialized):
        model, v = porting.load_pretrained(
            "resnet18", "IMAGENET1K_V1", num_classes=2, progress=False
        )
    assert (cache / name).is_file()
    assert v["params"]["fc"]["kernel"].shape == (512, 2)
    assert model.num_classes == 2
    (folder / name).unlink()  # the cached copy is reused: no network needed now
    _, v2 = porting.load_pretrained("resnet18", "IMAGENET1K_V1", progress=False)
    np.testing.assert_array_equal(v2["params"]["conv1"]["kernel"], v["params"]["conv1"]["kernel"])


def test_corrupted_download_is_rejected_and_leaves_nothing_in_the_cache(weights_server, sd):
    folder, cache = weights_server
    _publish(folder, sd, name="resnet18-f37072fd.pth", honest=False)  # wrong hash for its name
    with pytest.raises(jt.DownloadError, match="f37072fd"):
        porting.load_pretrained("resnet18", "IMAGENET1K_V1", progress=False)
    assert not cache.exists() or not any(cache.iterdir())


def test_offline_error_names_the_url_and_how_to_pass_a_local_file(weights_server, monkeypatch):
    monkeypatch.setenv(porting.io.BASE_URL_ENV, "http://127.0.0.1:9/models")  # discard port
    with pytest.raises(jt.DownloadError) as e:
        porting.load_pretrained("resnet18", "IMAGENET1K_V1", progress=False)
    msg = str(e.value)
    assert "http://127.0.0.1:9/models/resnet18-f37072fd.pth" in msg
    assert "--weights" in msg and "weights=" in msg


def test_offline_resnext_download_names_its_url_file_and_hash(weights_server, monkeypatch):
    monkeypatch.setenv(porting.io.BASE_URL_ENV, "http://127.0.0.1:9/models")  # discard port
    with pytest.raises(jt.DownloadError) as e:
        porting.load_pretrained("resnext50_32x4d", "IMAGENET1K_V2", progress=False)
    msg = str(e.value)
    assert "http://127.0.0.1:9/models/resnext50_32x4d-1a0047aa.pth" in msg
    assert "--weights /path/to/resnext50_32x4d-1a0047aa.pth" in msg


def test_load_pretrained_accepts_a_local_path(sd, tmp_path):
    torch.save(sd, tmp_path / "mine.pth")
    model, v = porting.load_pretrained("resnet18", tmp_path / "mine.pth")
    assert model.num_classes == 1000
    np.testing.assert_array_equal(v["batch_stats"]["bn1"]["var"], sd["bn1.running_var"].numpy())
