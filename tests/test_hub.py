"""``hf-hub:ORG/NAME`` weights through huggingface_hub against a hub on 127.0.0.1.

The server answers the hub's ``resolve`` URLs as huggingface.co does: HEAD and GET, the
``X-Repo-Commit`` and ``ETag`` headers, weights files redirected to a blob URL with
``X-Linked-Size`` / ``X-Linked-Etag`` (as LFS files are), ``Range`` requests, and the
``X-Error-Code`` of a missing repo or file. huggingface_hub reads ``HF_ENDPOINT``,
``HF_HOME`` and ``HF_HUB_OFFLINE`` when it is imported, so the fixture sets them and
reloads its ``constants`` module (and restores both afterwards).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from jtransfer import checkpoint, cli, data
from jtransfer.errors import DownloadError, PortingError

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
hf_constants = pytest.importorskip("huggingface_hub.constants")
safetensors_torch = pytest.importorskip("safetensors.torch")
import porting  # noqa: E402  (needs torch)
from porting import parity  # noqa: E402

# Downloading and loading, not convolution numerics (tests/conftest.py).
XLA_CONVOLUTIONS = True

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "timm/resnet18.test_in1k"


class Hub:
    """What the server holds and what it was asked."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.drop_once: set[str] = set()  # blobs whose first GET stops halfway


def _handler(hub: Hub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _send(self, code: int, headers: dict[str, str], body: bytes = b"") -> None:
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command == "GET" and body:
                self.wfile.write(body)

        def _blob(self, sha: str) -> None:
            content = next(
                (c for files in hub.repos.values() for c in files.values() if _sha(c) == sha),
                None,
            )
            if content is None:
                return self._send(404, {"Content-Length": "0"})
            start = 0
            if m := re.match(r"bytes=(\d+)-", self.headers.get("Range") or ""):
                start = int(m.group(1))
            body = content[start:]
            headers = {"ETag": f'"{sha}"', "Accept-Ranges": "bytes"}
            headers["Content-Length"] = str(len(body))
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
            if self.command == "GET" and sha in hub.drop_once:
                hub.drop_once.discard(sha)
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return None
            return self._send(206 if start else 200, headers, body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
            if m := re.match(r"^/blobs/([0-9a-f]{64})$", self.path):
                return self._blob(m.group(1))
            m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", self.path)
            if m is None or m.group(1) not in hub.repos:
                headers = {"X-Error-Code": "RepoNotFound", "Content-Length": "0"}
                return self._send(404, headers)
            files = hub.repos[m.group(1)]
            name = m.group(3)
            if name not in files:
                headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}
                return self._send(404, {**headers, "Content-Length": "0"})
            content = files[name]
            if name.endswith((".safetensors", ".bin")):
                # LFS: redirected to a CDN ("localhost" is another host than the endpoint's
                # 127.0.0.1, so the client takes the metadata from this response, as from
                # huggingface.co's redirects to its CDN).
                port = self.server.server_address[1]
                return self._send(
                    302,
                    {
                        "Location": f"http://localhost:{port}/blobs/{_sha(content)}",
                        "X-Repo-Commit": COMMIT,
                        "X-Linked-Etag": f'"{_sha(content)}"',
                        "X-Linked-Size": str(len(content)),
                        "Content-Length": "0",
                    },
                )
            headers = {
                "X-Repo-Commit": COMMIT,
                "ETag": f'"{hashlib.sha1(content).hexdigest()}"',
                "Content-Length": str(len(content)),
            }
            return self._send(200, headers, content)

    return Handler


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@pytest.fixture(scope="module")
def server():
    hub = Hub()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield hub
    httpd.shutdown()
    httpd.server_close()


@contextlib.contextmanager
def hub_env(monkeypatch, home: Path, endpoint: str, offline: bool = False):
    """HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE as huggingface_hub reads them at import."""
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    importlib.reload(hf_constants)
    try:
        yield
    finally:
        monkeypatch.undo()
        importlib.reload(hf_constants)


@pytest.fixture(scope="module")
def timm_r18():
    """A timm resnet18 (random weights, randomised BatchNorm), 3 classes, as repo files."""
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=3)
    parity.randomize_batchnorm(net)
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    cfg = dict(net.pretrained_cfg)
    cfg.update(interpolation="bicubic", crop_pct=0.95, mean=[0.5, 0.5, 0.5], std=[0.25] * 3)
    config = {"architecture": "resnet18", "num_classes": 3, "pretrained_cfg": cfg}
    return {
        "model.safetensors": safetensors_torch.save(sd),
        "config.json": json.dumps(config, default=list).encode(),
    }, sd


def _half_written(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if p.name.endswith(".incomplete")]


def _blobs(home: Path) -> list[Path]:
    return [p for p in home.rglob("blobs/*") if p.is_file()]


def test_hub_weights_download_cache_and_load_offline(server, timm_r18, tmp_path, monkeypatch):
    files, sd = timm_r18
    server.repos[REPO] = files
    blob = _sha(files["model.safetensors"])
    server.drop_once.add(blob)  # the first transfer breaks off halfway: resumed with Range
    with hub_env(monkeypatch, tmp_path, server.url):
        model, variables = porting.load_pretrained(None, f"hf-hub:{REPO}")
    want = porting.from_torchvision({k: v.numpy() for k, v in sd.items()}, "resnet18")
    import jax

    assert model.num_classes == 3
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, variables, want)))
    ranges = [r for method, path, r in server.requests if path.endswith(blob) and r]
    assert ranges and ranges[0].startswith("bytes=")
    assert not _half_written(tmp_path)
    # Offline, with the server gone from the picture: the cache serves both files.
    with hub_env(monkeypatch, tmp_path, "http://127.0.0.1:9", offline=True):
        _, again = porting.load_pretrained("resnet18", f"hf-hub:{REPO}", num_classes=3)
        view = porting.hub.preprocessing(f"hf-hub:{REPO}", image_size=32)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, again, want)))
    assert (view.interpolation, view.crop_size, view.resize_size) == ("bicubic", 32, 33)


def test_offline_without_a_cached_copy_says_how_to_pass_a_file(tmp_path, monkeypatch):
    import time

    waits = []  # huggingface_hub backs off 1+2+4+8+8 s before giving up on a dead server
    for endpoint, offline in (("http://127.0.0.1:9", False), ("http://127.0.0.1:9", True)):
        with hub_env(monkeypatch, tmp_path, endpoint, offline=offline):
            monkeypatch.setattr(time, "sleep", waits.append)
            with pytest.raises(DownloadError) as e:
                porting.load_pretrained("resnet18", f"hf-hub:{REPO}")
        assert bool(waits) is not offline  # offline mode fails at once, without a request
        waits.clear()
        text = str(e.value)
        assert REPO in text
        assert f"{endpoint}/{REPO}/resolve/main/config.json" in text
        assert "--weights /path/model.safetensors" in text
    assert not _half_written(tmp_path) and not _blobs(tmp_path)


def test_a_repo_without_weights_and_an_unknown_repo(server, timm_r18, tmp_path, monkeypatch):
    server.repos["timm/config-only"] = {"config.json": timm_r18[0]["config.json"]}
    with hub_env(monkeypatch, tmp_path, server.url):
        with pytest.raises(DownloadError, match="has no weights file: neither .*model.safetensors"):
            porting.load_pretrained(None, "hf-hub:timm/config-only")
        with pytest.raises(DownloadError, match="hub repo timm/nothing-here was not found"):
            porting.load_pretrained(None, "hf-hub:timm/nothing-here")
    assert not _half_written(tmp_path)


def test_pytorch_model_bin_when_there_is_no_safetensors(server, timm_r18, tmp_path, monkeypatch):
    files, sd = timm_r18
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    server.repos["timm/bin-only"] = {"pytorch_model.bin": buffer.getvalue(), **files}
    del server.repos["timm/bin-only"]["model.safetensors"]
    with hub_env(monkeypatch, tmp_path, server.url):
        _, variables = porting.load_pretrained(None, "hf-hub:timm/bin-only")
    kernel = np.asarray(variables["params"]["fc"]["kernel"])
    assert np.array_equal(kernel, sd["fc.weight"].numpy().T)


def test_truncated_weights_are_refused_and_evicted_from_the_cache(
    server, timm_r18, tmp_path, monkeypatch
):
    files = dict(timm_r18[0])
    files["model.safetensors"] = files["model.safetensors"][:100_000]  # the server's is cut
    server.repos["timm/truncated"] = files
    with hub_env(monkeypatch, tmp_path, server.url):
        with pytest.raises(PortingError, match="unreadable, so they were removed from the hub"):
            porting.load_pretrained(None, "hf-hub:timm/truncated")
    left = {p.name for p in _blobs(tmp_path)}
    assert _sha(files["model.safetensors"]) not in left  # config.json's blob stays
    assert not _half_written(tmp_path)
    snapshot = next(tmp_path.rglob("snapshots/*"))
    assert not (snapshot / "model.safetensors").exists()


def test_a_config_of_an_unsupported_architecture(server, timm_r18, tmp_path, monkeypatch):
    files = dict(timm_r18[0])
    files["config.json"] = json.dumps({"architecture": "resnet50d"}).encode()
    server.repos["timm/resnet50d.test"] = files
    server.repos[REPO] = timm_r18[0]
    with hub_env(monkeypatch, tmp_path, server.url):
        with pytest.raises(PortingError, match="'resnet50d' is not one jtransfer builds"):
            porting.load_pretrained(None, "hf-hub:timm/resnet50d.test")
        with pytest.raises(PortingError, match=r"holds resnet18 weights .*arch='resnet34'"):
            porting.load_pretrained("resnet34", f"hf-hub:{REPO}")
    assert not _half_written(tmp_path)
    # The config is checked before the weights are downloaded: none were asked for.
    assert not [
        path for _, path, _ in server.requests if "resnet50d.test/resolve/main/model" in path
    ]


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_finetune_from_the_hub_records_timms_preprocessing_for_predict(
    server, timm_r18, tmp_path, monkeypatch
):
    server.repos[REPO] = timm_r18[0]
    root = tmp_path / "data"
    data.make_demo_imagefolder(root / "train", n_per_class=4, size=40, seed=0)
    data.make_demo_imagefolder(root / "test", n_per_class=2, size=40, seed=1)
    out = tmp_path / "run"
    with hub_env(monkeypatch, tmp_path / "hf", server.url):
        code, stdout, stderr = run_cli(
            "finetune", "--data", root, "--weights", f"hf-hub:{REPO}", "--image-size", "32",
            "--batch-size", "4", "--epochs", "1", "--out", out, "--compile-cache", "off",
        )  # fmt: skip
    assert code == 0, stderr
    assert stdout.startswith("resnet18, 2 classes")  # the arch came from config.json
    meta = checkpoint.read_metadata(out, checkpoint.checkpoint_steps(out)[-1])
    assert meta["config"]["weights"] == f"hf-hub:{REPO}"
    assert meta["preprocessing"] == {
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "interpolation": "bicubic",
        "crop_size": 32,
        "resize_size": 33,  # floor(32 / 0.95), the shorter side
        "crop_pct": 0.95,
        "source": "timm",
    }
    image = next((root / "test").rglob("*.*"))
    code, stdout, stderr = run_cli("predict", "--checkpoint", out, image)
    assert code == 0, stderr
    path, label, prob = stdout.strip().split("\t")
    # predict's probability is the model's on timm's view of the image, not d2l's.
    from jtransfer.preprocess import Preprocessing

    model, variables, _ = checkpoint.load_for_inference(out, "latest")
    view = Preprocessing.from_dict(meta["preprocessing"])
    x = view.eval(data.load_image(image))[None]
    logits = np.asarray(model.apply(variables, x, train=False))[0]
    p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert label == meta["classes"][int(p.argmax())]
    assert abs(float(prob) - float(p.max())) < 1e-3
    code, _, stderr = run_cli("export", "--checkpoint", out, "--out", tmp_path / "r18.pth")
    assert code == 0, stderr
    sidecar = json.loads((tmp_path / "r18.json").read_text())
    assert sidecar["preprocessing"] == meta["preprocessing"]
