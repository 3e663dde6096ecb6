"""Reliability spec: every bad input fails loudly, names its cause and its fix, and loses nothing.

Each `Case` below is one bad input: the area it belongs to, how to build it, the call that
must fail, the error type (a `jtransfer.errors` class, a warning for a recoverable problem, or
a CLI exit code) and what the message must name: the file, key or value at fault, and what to
do (a word such as "pass", "delete", "use" or a flag). Where the failure could destroy
something already saved (a cached download, a checkpoint, files beside a zip), `intact`
checks that it is still there and usable.

`markdown_table()` renders the table in docs/reliability.md (a test keeps it current):
    python -c "from tests.test_reliability import markdown_table; print(markdown_table())"

Everything is kept cheap: no model is compiled (shapes come from `jax.eval_shape`), the
checkpoints hold a tiny dict, and the torchvision state_dict is built once per module.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import jtransfer as jt
from jtransfer import _lockfile, checkpoint, cli, data, download, partition, train
from jtransfer.checkpoint import Checkpointer, CheckpointWarning
from jtransfer.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DownloadError,
    JTransferError,
    NonFiniteLossError,
    PortingError,
)

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
import porting  # noqa: E402

# Error handling, not convolution numerics: XLA's own convolutions, which compile much
# faster (tests/conftest.py).
XLA_CONVOLUTIONS = True

# tensorstore may leave an asyncio callback behind when reading a damaged file fails.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

Input = dict[str, Any]


@dataclass(frozen=True)
class Case:
    """One bad input and what must happen.

    Attributes:
        name: test id and the table's "bad input" column.
        area: weights, download, data, checkpoint, config or cli.
        make_input: ``(tmp_path, env) -> dict`` building the bad input in ``tmp_path``.
        call: ``(input) -> result``: the call that must fail (a CLI case returns
            ``(exit code, stderr)``; a warning case returns what the call recovered).
        error_type: the exception class raised, the warning class emitted, or the exit code.
        must_mention: substrings of the message (case-insensitive), formatted with the input
            dict, so ``"{path}"`` is the offending file: the cause, then the fix.
        intact: ``(input, result) -> None`` checking that nothing already saved was lost.
        xfail: why the library does not do this yet (strict xfail), or None.
    """

    name: str
    area: str
    make_input: Callable[[Path, Any], Input]
    call: Callable[[Input], Any]
    error_type: type[BaseException] | int
    must_mention: tuple[str, ...]
    intact: Callable[[Input, Any], None] | None = None
    xfail: str | None = None


# ---------------------------------------------------------------------------------------------
# Shared inputs, built once per module


class Env:
    """Things several cases need: a resnet18 state_dict and a tiny two-step checkpoint dir."""

    def __init__(self, root: Path) -> None:
        torch.manual_seed(0)
        self.sd = torchvision.models.resnet18().state_dict()
        self.ckpt_template = root / "ckpt-template"
        with Checkpointer(
            self.ckpt_template,
            max_to_keep=3,
            best_metric=None,
            async_save=False,
            metadata={"arch": "resnet18", "num_classes": 2},
        ) as ckpt:
            ckpt.save(tiny_state(1), force=True)
            ckpt.save(tiny_state(2), force=True)


def tiny_state(step: int, num_classes: int = 2) -> dict[str, Any]:
    """A checkpointable pytree with a step: all a Checkpointer needs, no model, no compile."""
    return {
        "step": jnp.asarray(step, jnp.int32),
        "params": {
            "fc": {
                "kernel": jnp.full((4, num_classes), float(step), jnp.float32),
                "bias": jnp.zeros((num_classes,), jnp.float32),
            }
        },
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    return Env(tmp_path_factory.mktemp("reliability"))


# ---------------------------------------------------------------------------------------------
# Small builders


def _sd_without(sd, key: str) -> dict:
    return {k: v for k, v in sd.items() if k != key}


def _write_jpeg(path: Path, value: int = 128, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    return path


def _image_folder(root: Path, classes=("a", "b"), per_class: int = 1) -> Path:
    for c in classes:
        for i in range(per_class):
            _write_jpeg(root / c / f"{i}.jpg", value=i + 10 * len(c))
    return root


def _copy_ckpt(tmp: Path, env: Env) -> Path:
    directory = tmp / "ckpt"
    shutil.copytree(env.ckpt_template, directory)
    return directory


def _garble_json(step_dir: Path) -> None:
    (step_dir / "progress" / "metadata").write_text("{not json")


def _restore_latest(directory: Path, meta: dict, state: dict, quarantine: bool = True):
    with Checkpointer(directory, best_metric=None, metadata=meta) as ckpt:
        return ckpt.restore_latest(checkpoint.abstract_state(state), quarantine=quarantine)


def _steps_loadable(directory: Path, steps: list[int]) -> None:
    """The listed checkpoints are still there and restore bit-exactly."""
    assert checkpoint.checkpoint_steps(directory) == steps
    with Checkpointer(directory, best_metric=None, async_save=False) as ckpt:
        for step in steps:
            got = ckpt.restore(step, checkpoint.abstract_state(tiny_state(step)))
            np.testing.assert_array_equal(got.state["params"]["fc"]["kernel"], float(step))


def _run_cli(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


def _no_part_files(directory: Path) -> None:
    assert not [p.name for p in directory.iterdir() if p.name.endswith(".part")]


# --------------------------------------------------------------------------------------------
# Weights (porting)


def _truncated_pth(tmp: Path, env: Env) -> Input:
    path = tmp / "r18.pth"
    torch.save({k: env.sd[k] for k in ("fc.weight", "fc.bias")}, path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return {"path": str(path)}


class _Evil:
    def __reduce__(self):
        return (os.makedirs, ("/tmp/jtransfer-reliability-pwned",))


def _pickle_with_code(tmp: Path, env: Env) -> Input:
    path = tmp / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"fc.weight": _Evil()}, f, protocol=2)
    return {"path": str(path)}


def _not_run(inp: Input, _) -> None:
    """The pickled code did not run."""
    assert not os.path.exists("/tmp/jtransfer-reliability-pwned")


def _pth_file(tmp: Path, env: Env, sd) -> Input:
    path = tmp / "weights.pth"
    torch.save(sd, path)
    return {"path": str(path)}


def _corrupt_safetensors(tmp: Path, env: Env) -> Input:
    path = tmp / "r18.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    return {"path": str(path)}


def _mis_shaped(tmp: Path, env: Env) -> Input:
    sd = dict(env.sd)
    sd["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    return {"sd": sd}


def _server_down(tmp: Path, env: Env) -> Input:
    torch_home = tmp / "torch"
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "other-weights.pth").write_bytes(b"cached earlier")
    return {
        "torch_home": str(torch_home),
        "cache": cache,
        "base": (tmp / "mirror-that-is-down").as_uri(),
        "file": "resnet18-f37072fd.pth",
    }


def _load_from_down_server(inp: Input):
    env_vars = {"TORCH_HOME": inp["torch_home"], "JTRANSFER_WEIGHTS_BASE_URL": inp["base"]}
    with mock.patch.dict(os.environ, env_vars):
        return porting.load_pretrained("resnet18", "IMAGENET1K_V1", progress=False)


def _cache_untouched(inp: Input, _) -> None:
    """Other cached weights intact, no partial file."""
    cache = inp["cache"]
    assert (cache / "other-weights.pth").read_bytes() == b"cached earlier"
    assert sorted(p.name for p in cache.iterdir()) == ["other-weights.pth"]


WEIGHTS = [
    Case(
        "truncated .pth file",
        "weights",
        _truncated_pth,
        lambda i: porting.from_torchvision(i["path"], "resnet18"),
        PortingError,
        ("{path}", "truncated", "delete it"),
    ),
    Case(
        "pickle that needs code to load",
        "weights",
        _pickle_with_code,
        lambda i: porting.from_torchvision(i["path"], "resnet18"),
        PortingError,
        ("{path}", "refused for safety", "weights_only=False", "pass"),
        intact=_not_run,
    ),
    Case(
        "weights file does not exist",
        "weights",
        lambda tmp, env: {"path": str(tmp / "nope.pth")},
        lambda i: porting.from_torchvision(i["path"], "resnet18"),
        PortingError,
        ("not found", "{path}", "check the path"),
    ),
    Case(
        "corrupt .safetensors file",
        "weights",
        _corrupt_safetensors,
        lambda i: porting.from_torchvision(i["path"], "resnet18"),
        PortingError,
        ("{path}", "corrupt", "delete it"),
    ),
    Case(
        "training checkpoint instead of a state_dict",
        "weights",
        lambda tmp, env: _pth_file(tmp, env, {"state_dict": dict(env.sd), "epoch": 3}),
        lambda i: porting.from_torchvision(i["path"], "resnet18"),
        PortingError,
        ("'state_dict'", "pass checkpoint['state_dict']"),
    ),
    Case(
        "resnet18 weights loaded as resnet34",
        "weights",
        lambda tmp, env: {"sd": env.sd},
        lambda i: porting.from_torchvision(i["sd"], "resnet34"),
        PortingError,
        (
            "does not fit resnet34",
            "missing (80): layer1.2.bn1.running_mean",
            "pass arch='resnet18'",
        ),
    ),
    Case(
        "tensor of the wrong shape",
        "weights",
        _mis_shaped,
        lambda i: porting.from_torchvision(i["sd"], "resnet18"),
        PortingError,
        ("conv1.weight: checkpoint (64, 3, 5, 5), resnet18 needs (64, 3, 7, 7)", "load_matching"),
    ),
    Case(
        "state_dict missing a key",
        "weights",
        lambda tmp, env: {"sd": _sd_without(env.sd, "layer1.0.bn1.running_mean")},
        lambda i: porting.from_torchvision(i["sd"], "resnet18"),
        PortingError,
        ("missing (1): layer1.0.bn1.running_mean", "load_matching"),
    ),
    Case(
        "keys prefixed 'module.' (DataParallel)",
        "weights",
        lambda tmp, env: {"sd": {f"module.{k}": v for k, v in env.sd.items()}},
        lambda i: porting.from_torchvision(i["sd"], "resnet18"),
        PortingError,
        ("module.conv1.weight", "strip that prefix"),
    ),
    Case(
        "unknown torchvision weights tag",
        "weights",
        lambda tmp, env: {"tag": "IMAGENET1K_V9"},
        lambda i: porting.load_pretrained("resnet18", i["tag"], progress=False),
        ConfigError,
        ("'{tag}'", "IMAGENET1K_V1", "pass a path"),
    ),
    Case(
        "weights server unreachable",
        "weights",
        _server_down,
        _load_from_down_server,
        DownloadError,
        ("{base}/{file}", "weights='/path/to/{file}'", "--weights"),
        intact=_cache_untouched,
    ),
]


# --------------------------------------------------------------------------------------------
# Downloads and archives


def _download_setup(tmp: Path, env: Env) -> Input:
    src = tmp / "server" / "file.bin"
    src.parent.mkdir()
    src.write_bytes(b"the bytes the server sends")
    cache = tmp / "cache"
    cache.mkdir()
    (cache / "good-earlier.bin").write_bytes(b"good")
    return {"url": src.as_uri(), "dest": str(cache / "file.bin"), "cache": cache}


def _fetch_wrong_hash(inp: Input):
    return download.fetch(inp["url"], inp["dest"], sha256_prefix="deadbeef", progress=False)


def _cache_clean(inp: Input, _) -> None:
    """No bad file at dest, no .part left, other cached files intact."""
    cache = inp["cache"]
    assert not Path(inp["dest"]).exists()  # no corrupt file is ever left at dest
    _no_part_files(cache)
    assert (cache / "good-earlier.bin").read_bytes() == b"good"


def _corrupt_cached(tmp: Path, env: Env) -> Input:
    inp = _download_setup(tmp, env)
    Path(inp["dest"]).write_bytes(b"half a file")
    return inp


def _zip_slip(tmp: Path, env: Env) -> Input:
    zip_path = tmp / "evil.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        z.writestr("data/ok.txt", "fine")
        z.writestr("../escaped.txt", "outside")
    target = tmp / "extract"
    (target / "data").mkdir(parents=True)
    (target / "data" / "kept.txt").write_text("extracted earlier")
    return {"zip": str(zip_path), "target": target, "outside": tmp / "escaped.txt"}


def _nothing_written(inp: Input, _) -> None:
    """Nothing written outside or inside; earlier files intact."""
    assert not inp["outside"].exists()
    assert not (inp["target"] / "data" / "ok.txt").exists()
    assert (inp["target"] / "data" / "kept.txt").read_text() == "extracted earlier"


def _corrupt_zip(tmp: Path, env: Env) -> Input:
    zip_path = tmp / "hotdog.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        z.writestr("hotdog/train/a/1.jpg", b"x" * 1000)
    blob = zip_path.read_bytes()
    zip_path.write_bytes(blob[: len(blob) // 3])
    return {"zip": str(zip_path), "target": tmp / "extract"}


DOWNLOAD = [
    Case(
        "download does not match its checksum",
        "download",
        _download_setup,
        _fetch_wrong_hash,
        DownloadError,
        ("{url}", "expected sha256 starting with deadbeef", "nothing was saved", "run again"),
        intact=_cache_clean,
    ),
    Case(
        "cached file does not match its checksum",
        "download",
        _corrupt_cached,
        _fetch_wrong_hash,
        DownloadError,
        ("{dest}", "removed", "run again", "{url}"),
        intact=_cache_clean,
    ),
    Case(
        "zip entry '../escaped.txt' (zip slip)",
        "download",
        _zip_slip,
        lambda i: download.safe_extract_zip(i["zip"], i["target"]),
        DataError,
        ("{zip}", "'../escaped.txt'", "outside", "nothing was extracted"),
        intact=_nothing_written,
    ),
    Case(
        "truncated zip archive",
        "download",
        _corrupt_zip,
        lambda i: download.safe_extract_zip(i["zip"], i["target"]),
        DataError,
        ("{zip}", "corrupt", "delete {zip} and download it again"),
    ),
]


# --------------------------------------------------------------------------------------------
# Data


def _truncated_jpeg(tmp: Path, env: Env) -> Input:
    root = _image_folder(tmp / "train")
    bad = _write_jpeg(root / "a" / "truncated.jpg", size=64)
    blob = bad.read_bytes()
    bad.write_bytes(blob[: len(blob) // 2])
    return {"root": str(root), "path": str(bad)}


def _bad_image_skipped(inp: Input, _) -> None:
    """Only this file is listed by skip_bad_images; the good ones are kept."""
    folder = data.ImageFolder(inp["root"])
    loader = data.make_loader(folder, batch_size=1, train=False, skip_bad_images=True)
    assert [path for path, _ in loader.bad_files] == [inp["path"]]
    assert len(folder) == 3  # two good images kept, one skipped


def _empty_class(tmp: Path, env: Env) -> Input:
    root = _image_folder(tmp / "train")
    (root / "c").mkdir()
    (root / "c" / "notes.txt").write_text("not an image")
    return {"root": str(root), "empty": str(root / "c")}


def _classes_differ(tmp: Path, env: Env) -> Input:
    return {
        "train": str(_image_folder(tmp / "train", classes=("cat", "dog"))),
        "test": str(_image_folder(tmp / "test", classes=("cat", "hotdog"))),
    }


def _all_unreadable(tmp: Path, env: Env) -> Input:
    root = tmp / "train"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        (root / c / "x.jpg").write_bytes(b"not a jpeg")
    return {"root": str(root), "path": str(root / "a" / "x.jpg")}


def _empty_dir(tmp: Path, env: Env) -> Input:
    (tmp / "train").mkdir()
    (tmp / "train" / "readme.txt").write_text("images go in class folders")
    return {"root": str(tmp / "train")}


DATA = [
    Case(
        "truncated JPEG",
        "data",
        _truncated_jpeg,
        lambda i: data.load_image(i["path"]),
        DataError,
        ("{path}", "truncated", "skip_bad_images=True"),
        intact=_bad_image_skipped,
    ),
    Case(
        "data folder does not exist",
        "data",
        lambda tmp, env: {"root": str(tmp / "no-such-folder")},
        lambda i: data.ImageFolder(i["root"]),
        DataError,
        ("{root}", "does not exist", "pass a folder with one sub-folder per class"),
    ),
    Case(
        "data folder without class folders",
        "data",
        _empty_dir,
        lambda i: data.ImageFolder(i["root"]),
        DataError,
        ("{root}", "no class folders", "point it at the folder above the class folders"),
    ),
    Case(
        "class folder without images",
        "data",
        _empty_class,
        lambda i: data.ImageFolder(i["root"]),
        DataError,
        ("{empty}", "no image files", "add images, or remove the folder"),
    ),
    Case(
        "train and test classes differ",
        "data",
        _classes_differ,
        lambda i: data.check_same_classes(
            data.ImageFolder(i["train"]), data.ImageFolder(i["test"])
        ),
        DataError,
        ("{train}", "{test}", "['dog']", "['hotdog']", "give both folders the same class"),
    ),
    Case(
        "every image unreadable (skip_bad_images)",
        "data",
        _all_unreadable,
        lambda i: data.make_loader(
            data.ImageFolder(i["root"]), batch_size=1, train=False, skip_bad_images=True
        ),
        DataError,
        ("{root}", "{path}", "replace"),
    ),
    Case(
        "batch_size=0",
        "data",
        lambda tmp, env: {"root": str(_image_folder(tmp / "train"))},
        lambda i: data.make_loader(data.ImageFolder(i["root"]), batch_size=0, train=True),
        ConfigError,
        ("batch_size", "got 0", "must be positive"),
    ),
]


# --------------------------------------------------------------------------------------------
# Checkpoints


def _corrupt_latest(tmp: Path, env: Env) -> Input:
    directory = _copy_ckpt(tmp, env)
    _garble_json(directory / "2")
    return {"dir": directory, "step_dir": str(directory / "2")}


def _fell_back_to_step_1(inp: Input, restored) -> None:
    """Restored step 1 bit-exactly; bad step moved aside, not deleted."""
    assert restored.step == 1
    np.testing.assert_array_equal(restored.state["params"]["fc"]["kernel"], 1.0)
    # The unreadable one is moved aside for inspection, not deleted; step 1 is untouched.
    assert len(list(inp["dir"].glob("corrupt-2-*"))) == 1
    _steps_loadable(inp["dir"], [1])


def _all_corrupt(tmp: Path, env: Env) -> Input:
    directory = _copy_ckpt(tmp, env)
    for step in (1, 2):
        _garble_json(directory / str(step))
    return {"dir": directory}


def _restore_quietly(inp: Input):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        return _restore_latest(inp["dir"], {}, tiny_state(0), quarantine=False)


def _both_still_there(inp: Input, _) -> None:
    """Both checkpoints still there (not deleted)."""
    assert checkpoint.checkpoint_steps(inp["dir"]) == [1, 2]


def _checkpoints_kept(inp: Input, _) -> None:
    """Both checkpoints still there and loadable bit-exactly."""
    _steps_loadable(inp["dir"], [1, 2])


def _unwritable(tmp: Path, env: Env) -> Input:
    blocker = tmp / "a-file"
    blocker.write_text("a file, not a folder")
    return {"dir": str(blocker / "ckpt"), "blocker": blocker}


def _blocker_kept(inp: Input, _) -> None:
    """The file in the way is untouched."""
    assert inp["blocker"].read_text() == "a file, not a folder"


def _write_lock(
    directory: Path, host: str | None = None, pid: int | None = None, path: str | None = None
) -> Input:
    """A writer lock as a run on `host` (default: this one) with `pid` (default: alive) left it,
    created at `path` (default: where it is)."""
    directory.mkdir(parents=True, exist_ok=True)
    pid = os.getppid() if pid is None else pid  # a live process that is not this one
    holder = {
        "host": host or socket.gethostname(),
        "pid": pid,
        "command": "python -m jtransfer finetune --data d --out run",
        "started": time.time() - 60,
        "token": "the-other-run",
        "pid_start": None if host else _lockfile._pid_start(pid),
    }
    lock = directory / checkpoint.WRITER_LOCK
    holder["path"] = path or str(lock.resolve())
    lock.write_text(json.dumps(holder))
    return {"dir": directory, "pid": pid, "lock": str(lock), "lock_text": lock.read_text()}


def _dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def _lock_and_checkpoints_kept(inp: Input, _) -> None:
    """The other run's lock and both checkpoints untouched"""
    assert Path(inp["lock"]).read_text() == inp["lock_text"]
    assert checkpoint.checkpoint_steps(inp["dir"]) == [1, 2]
    assert [checkpoint.read_progress(inp["dir"], s)["step"] for s in (1, 2)] == [1, 2]


def _took_over(inp: Input, restored) -> None:
    """Resumed from the latest checkpoint; the lock released at close"""
    assert restored.step == 2
    assert not Path(inp["lock"]).exists()


CHECKPOINTS = [
    Case(
        "latest checkpoint corrupt",
        "checkpoint",
        _corrupt_latest,
        lambda i: _restore_latest(i["dir"], {}, tiny_state(0)),
        CheckpointWarning,
        ("{step_dir}", "unreadable", "falling back to step 1", "moved it to"),
        intact=_fell_back_to_step_1,
    ),
    Case(
        "every checkpoint corrupt",
        "checkpoint",
        _all_corrupt,
        _restore_quietly,
        CheckpointError,
        ("every checkpoint in {dir} is unreadable", "step 2", "step 1", "delete the directory"),
        intact=_both_still_there,
    ),
    Case(
        "checkpoint of another arch",
        "checkpoint",
        lambda tmp, env: {"dir": _copy_ckpt(tmp, env)},
        lambda i: _restore_latest(i["dir"], {"arch": "resnet34", "num_classes": 2}, tiny_state(0)),
        CheckpointError,
        ("arch: checkpoint 'resnet18', now 'resnet34'", "use a new checkpoint directory"),
        intact=_checkpoints_kept,
    ),
    Case(
        "checkpoint with another num_classes",
        "checkpoint",
        lambda tmp, env: {"dir": _copy_ckpt(tmp, env)},
        lambda i: _restore_latest(
            i["dir"], {"arch": "resnet18", "num_classes": 3}, tiny_state(0, num_classes=3)
        ),
        CheckpointError,
        (
            "num_classes: checkpoint 2, now 3",
            "params/fc/kernel: checkpoint (4, 2), model (4, 3)",
            "resume with the same settings",
        ),
        intact=_checkpoints_kept,
    ),
    Case(
        "checkpoint directory not writable",
        "checkpoint",
        _unwritable,
        lambda i: Checkpointer(i["dir"]),
        CheckpointError,
        ("cannot write checkpoints to {dir}", "choose a writable directory"),
        intact=_blocker_kept,
    ),
    Case(
        "inference from a missing checkpoint dir",
        "checkpoint",
        lambda tmp, env: {"dir": str(tmp / "runs" / "nothing")},
        lambda i: checkpoint.load_for_inference(i["dir"]),
        CheckpointError,
        ("{dir}", "does not exist", "pass the --out directory"),
    ),
    Case(
        "inference from a dir with no checkpoint",
        "checkpoint",
        lambda tmp, env: {"dir": str(tmp)},
        lambda i: checkpoint.load_for_inference(i["dir"]),
        CheckpointError,
        ("{dir}", "no complete checkpoint", "pass the --out directory"),
    ),
    Case(
        "second writer on a directory a live run writes",
        "checkpoint",
        lambda tmp, env: _write_lock(_copy_ckpt(tmp, env)),
        lambda i: Checkpointer(i["dir"]),
        checkpoint.RunInUseError,
        ("{dir} is in use", "(pid {pid} on", "since", "kill {pid}", "use another directory"),
        intact=_lock_and_checkpoints_kept,
    ),
    Case(
        "second writer on a directory locked from another host",
        "checkpoint",
        lambda tmp, env: _write_lock(_copy_ckpt(tmp, env), host="node-7"),
        lambda i: Checkpointer(i["dir"]),
        checkpoint.RunInUseError,
        ("{dir} is in use", "on node-7", "if it is not", "rm {lock}"),
        intact=_lock_and_checkpoints_kept,
    ),
    Case(
        "lock left by a run killed on this host",
        "checkpoint",
        lambda tmp, env: _write_lock(_copy_ckpt(tmp, env), pid=_dead_pid()),
        lambda i: _restore_latest(i["dir"], {}, tiny_state(0)),
        CheckpointWarning,
        ("(pid {pid} on", "is no longer running", "takes over its lock"),
        intact=_took_over,
    ),
    Case(
        "directory copied with the lock of the run writing the original",
        "checkpoint",
        lambda tmp, env: _write_lock(_copy_ckpt(tmp, env), path="/runs/original/.lock"),
        lambda i: _restore_latest(i["dir"], {}, tiny_state(0)),
        CheckpointWarning,
        ("(pid {pid} on", "writes elsewhere", "copied here from /runs/original", "takes over"),
        intact=_took_over,
    ),
    Case(
        "inference before a live run's first checkpoint",
        "checkpoint",
        lambda tmp, env: _write_lock(tmp / "run"),
        lambda i: checkpoint.load_for_inference(i["dir"]),
        CheckpointError,
        ("{dir}", "no complete checkpoint yet", "(pid {pid} on", "try again once it has saved"),
    ),
]


# --------------------------------------------------------------------------------------------
# Configuration: models, partition rules, optimizer, train step


SMALL_PARAMS = {
    "conv1": {"kernel": jnp.zeros((3, 3, 3, 4))},
    "fc": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros((2,))},
}


def _nothing(tmp: Path, env: Env) -> Input:
    return {}


def _wrong_variables(tmp: Path, env: Env) -> Input:
    model3 = jt.models.create("resnet18", num_classes=3)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return {"variables": dict(jax.eval_shape(model3.init, jax.random.PRNGKey(0), x))}


CONFIG = [
    Case(
        "unknown architecture",
        "config",
        lambda tmp, env: {"arch": "resnet19"},
        lambda i: jt.models.create(i["arch"]),
        ConfigError,
        ("'{arch}'", "choose one of", "resnet18"),
    ),
    Case(
        "num_classes=0",
        "config",
        _nothing,
        lambda i: jt.models.create("resnet18", num_classes=0),
        ConfigError,
        ("num_classes", "got 0", ">= 1"),
    ),
    Case(
        "rules leave a parameter uncovered",
        "config",
        _nothing,
        lambda i: partition.make_optimizer(SMALL_PARAMS, [("fc/.*", 10.0)], learning_rate=0.1),
        ConfigError,
        ("1 parameter(s) match no rule", "conv1/kernel", "add a rule"),
    ),
    Case(
        "overlapping rules",
        "config",
        _nothing,
        lambda i: partition.make_optimizer(
            SMALL_PARAMS, [("fc/.*", 10.0), (".*", 1.0)], learning_rate=0.1
        ),
        ConfigError,
        ("match several rules", "fc/kernel", "rule 0 'fc/.*', rule 1 '.*'", "disjoint"),
    ),
    Case(
        "unknown rule spec 'froze'",
        "config",
        _nothing,
        lambda i: partition.make_optimizer(
            SMALL_PARAMS, [("fc/.*", "froze"), ("(?!fc/).*", 1.0)], learning_rate=0.1
        ),
        ConfigError,
        ("'froze'", 'use "frozen"'),
    ),
    Case(
        "unknown optimizer name",
        "config",
        _nothing,
        lambda i: partition.make_optimizer(
            SMALL_PARAMS, [(".*", 1.0)], learning_rate=0.1, optimizer="adamx"
        ),
        ConfigError,
        ("'adamx'", "use one of", "sgd"),
    ),
    Case(
        "momentum given to adam",
        "config",
        _nothing,
        lambda i: partition.make_optimizer(
            SMALL_PARAMS, [(".*", 1.0)], learning_rate=0.1, optimizer="adam", momentum=0.9
        ),
        ConfigError,
        ("momentum=0.9", "'adam'", "pass b1="),
    ),
    Case(
        "loss_reduction='avg'",
        "config",
        _nothing,
        lambda i: train.make_train_step(
            jt.models.create("resnet18", 2), optax.sgd(0.1), loss_reduction="avg"
        ),
        ConfigError,
        ("loss_reduction", "'avg'", "one of", "'mean'"),
    ),
    Case(
        "bn_policy='eval'",
        "config",
        _nothing,
        lambda i: train.make_train_step(
            jt.models.create("resnet18", 2), optax.sgd(0.1), bn_policy="eval"
        ),
        ConfigError,
        ("bn_policy", "'eval'", "one of", "'frozen'"),
    ),
    Case(
        "frozen_stages beyond the model",
        "config",
        _nothing,
        lambda i: train.make_train_step(
            jt.models.create("resnet18", 2), optax.sgd(0.1), frozen_stages=9
        ),
        ConfigError,
        ("frozen_stages=9", "freeze 0..", "head"),
    ),
    Case(
        "variables of another num_classes",
        "config",
        _wrong_variables,
        lambda i: train.create_train_state(
            jt.models.create("resnet18", num_classes=2), i["variables"], optax.sgd(0.1)
        ),
        ConfigError,
        ("params/fc/kernel: shape (512, 3), the model needs (512, 2)", "same arch and num_classes"),
    ),
    Case(
        "NaN loss",
        "config",
        lambda tmp, env: {"step": 17},
        lambda i: train.check_finite({"loss": jnp.asarray(jnp.nan)}, i["step"]),
        NonFiniteLossError,
        ("nan", "step {step}", "lower it"),
    ),
    Case(
        "Checkpointer(max_to_keep=0)",
        "config",
        lambda tmp, env: {"dir": str(tmp / "ckpt")},
        lambda i: Checkpointer(i["dir"], max_to_keep=0),
        ConfigError,
        ("max_to_keep must be >= 1", "got 0"),
    ),
]


# --------------------------------------------------------------------------------------------
# Command line


def _data_without_test(tmp: Path, env: Env) -> Input:
    root = tmp / "data"
    _image_folder(root / "train")
    _image_folder(root / "extra")
    return {"data": str(root)}


def _out_not_created(inp: Input, _) -> None:
    """Refused before anything was written: no --out directory"""
    assert not Path(inp["out"]).exists()


TINY_RUN = ["--weights", "none", "--image-size", "32", "--batch-size", "2", "--epochs", "1"]


def _tiny_data(tmp: Path, per_class: int = 1) -> Path:
    root = tmp / "data"
    _image_folder(root / "train", per_class=per_class)
    _image_folder(root / "test")
    return root


def _locked_out(tmp: Path, env: Env, host: str | None = None) -> Input:
    return {"data": str(_tiny_data(tmp)), **_write_lock(tmp / "out", host=host)}


def _finetune_locked(inp: Input):
    return _run_cli(["finetune", "--data", inp["data"], *TINY_RUN, "--out", inp["dir"]])


def _lock_kept_nothing_written(inp: Input, _) -> None:
    """The other run's lock untouched, nothing written beside it"""
    assert Path(inp["lock"]).read_text() == inp["lock_text"]
    assert os.listdir(inp["dir"]) == [checkpoint.WRITER_LOCK]


def _bad_test_image(tmp: Path, env: Env) -> Input:
    root = _tiny_data(tmp)
    bad = root / "test" / "a" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    return {"data": str(root), "bad": str(bad), "out": str(tmp / "out")}


def _lock_released(inp: Input, _) -> None:
    """The run's lock is released, no checkpoint written"""
    assert not (Path(inp["out"]) / checkpoint.WRITER_LOCK).exists()
    assert checkpoint.checkpoint_steps(inp["out"]) == []


CLI = [
    Case(
        "finetune without --data (usage error)",
        "cli",
        _nothing,
        lambda i: _run_cli(["finetune", "--arch", "resnet18"]),
        2,
        ("--data", "see --help"),
    ),
    Case(
        "finetune --data that does not exist",
        "cli",
        lambda tmp, env: {"data": str(tmp / "no-data")},
        lambda i: _run_cli(["finetune", "--data", i["data"], "--out", Path(i["data"]).parent]),
        1,
        ("error:", "--data {data} does not exist", "pass a folder holding train/ and test/"),
    ),
    Case(
        "finetune --data without test/",
        "cli",
        _data_without_test,
        lambda i: _run_cli(["finetune", "--data", i["data"], "--out", Path(i["data"]).parent]),
        1,
        ("--data {data}", "must hold train/ and test/", "['extra', 'train']"),
    ),
    Case(
        "finetune --unfreeze-after with nothing frozen",
        "cli",
        lambda tmp, env: {"out": str(tmp / "out")},
        lambda i: _run_cli(["finetune", "--data", "x", "--unfreeze-after", "1", "--out", i["out"]]),
        1,
        ("--unfreeze-after 1", "needs something frozen", "add --freeze backbone"),
        intact=_out_not_created,
    ),
    Case(
        "finetune --unfreeze-after not below --epochs",
        "cli",
        lambda tmp, env: {"out": str(tmp / "out")},
        lambda i: _run_cli(
            ["finetune", "--data", "x", "--freeze", "backbone", "--epochs", "3"]
            + ["--unfreeze-after", "3", "--out", i["out"]]
        ),
        1,
        ("--unfreeze-after 3 must be less than --epochs 3", "nothing is ever unfrozen", "raise"),
        intact=_out_not_created,
    ),
    Case(
        "finetune --skip-nonfinite 0",
        "cli",
        lambda tmp, env: {"out": str(tmp / "out")},
        lambda i: _run_cli(["finetune", "--data", "x", "--skip-nonfinite", "0", "--out", i["out"]]),
        1,
        ("--skip-nonfinite 0", "must be >= 1"),
        intact=_out_not_created,
    ),
    Case(
        "finetune --out that another run writes",
        "cli",
        _locked_out,
        _finetune_locked,
        1,
        ("--out {dir} is in use", "(pid {pid} on", "kill {pid}", "pass another --out"),
        intact=_lock_kept_nothing_written,
    ),
    Case(
        "finetune --out locked by a run on another host",
        "cli",
        lambda tmp, env: _locked_out(tmp, env, host="node-7"),
        _finetune_locked,
        1,
        ("--out {dir} is in use", "on node-7", "if it is not", "rm {lock}"),
        intact=_lock_kept_nothing_written,
    ),
    Case(
        "finetune on fewer training images than --batch-size",
        "cli",
        lambda tmp, env: {"data": str(_tiny_data(tmp)), "out": str(tmp / "out")},
        lambda i: _run_cli(
            ["finetune", "--data", i["data"], *TINY_RUN, "--batch-size", "8", "--out", i["out"]]
        ),
        1,
        ("has 2 training images", "--batch-size 8", "use --batch-size 2 or less"),
        intact=_lock_released,
    ),
    Case(
        "finetune with an unreadable test image",
        "cli",
        _bad_test_image,
        lambda i: _run_cli(["finetune", "--data", i["data"], *TINY_RUN, "--out", i["out"]]),
        1,
        ("cannot decode image {bad}", "add --skip-bad-images"),
        intact=_lock_released,
    ),
    Case(
        "predict --checkpoint that does not exist",
        "cli",
        lambda tmp, env: {"dir": str(tmp / "runs" / "none"), "img": str(tmp / "x.jpg")},
        lambda i: _run_cli(["predict", "--checkpoint", i["dir"], i["img"]]),
        1,
        ("{dir}", "does not exist", "pass the --out directory"),
    ),
]


CASES: list[Case] = WEIGHTS + DOWNLOAD + DATA + CHECKPOINTS + CONFIG + CLI


def _params() -> list:
    return [
        pytest.param(
            case,
            id=case.name,
            marks=[pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else [],
        )
        for case in CASES
    ]


def test_cases_are_distinct_and_cover_every_area():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)) >= 20
    assert {c.area for c in CASES} == {"weights", "download", "data", "checkpoint", "config", "cli"}


@pytest.mark.parametrize("case", _params())
def test_bad_input_fails_loudly_and_helpfully(case: Case, tmp_path: Path, env: Env):
    inp = case.make_input(tmp_path, env)
    result = None
    if isinstance(case.error_type, int):  # the CLI: an exit code and a one-line error
        code, stderr = case.call(inp)
        assert code == case.error_type, stderr
        lines = stderr.strip().splitlines()
        if code == cli.EXIT_USAGE:  # argparse prints the usage, then the one error line
            assert lines and "error:" in lines[-1], stderr
        else:
            assert len(lines) == 1, stderr
        message = lines[-1]
    elif issubclass(case.error_type, Warning):  # recovered from, but said so
        with pytest.warns(case.error_type) as record:
            result = case.call(inp)
        message = "\n".join(str(w.message) for w in record if isinstance(w.message, Warning))
    else:
        with pytest.raises(case.error_type) as info:
            case.call(inp)
        assert isinstance(info.value, JTransferError)
        message = str(info.value)
    for needle in case.must_mention:
        assert needle.format(**inp).lower() in message.lower(), (needle, message)
    if case.intact is not None:
        case.intact(inp, result)


# --------------------------------------------------------------------------------------------
# The table in docs/reliability.md


def _error_name(case: Case) -> str:
    if isinstance(case.error_type, int):
        return f"exit code {case.error_type}"
    return case.error_type.__name__


def markdown_table() -> str:
    """The cases as a markdown table: area | bad input | error | message names | kept."""

    def cell(text: str) -> str:
        return re.sub(r"\{(\w+)\}", r"<\1>", text).replace("|", "\\|")

    rows = [
        "| area | bad input | error | message names | still true after the failure |",
        "| --- | --- | --- | --- | --- |",
    ]
    for case in CASES:
        names = ", ".join(f"`{cell(m)}`" for m in case.must_mention)
        error = _error_name(case) + (" (not yet: xfail)" if case.xfail else "")
        kept = (case.intact.__doc__ or "").strip().rstrip(".") if case.intact else ""
        rows.append(f"| {case.area} | {cell(case.name)} | {error} | {names} | {cell(kept)} |")
    return "\n".join(rows)


def test_docs_table_lists_every_case():
    """docs/reliability.md shows exactly the cases tested here, so the page cannot go stale."""
    page = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
    assert markdown_table() in page.read_text(), (
        "docs/reliability.md is out of date: paste the output of "
        'python -c "from tests.test_reliability import markdown_table; print(markdown_table())"'
    )
