"""Two of anything at once, with real `python -m jtransfer` processes on one run directory.

One writer per run directory: a second `finetune` on the same --out is refused at once,
naming the first (host, pid, command, since when), while the first ends and exports. Readers
(`predict`, `load_for_inference`) called again and again while a run saves every step read
only complete checkpoints and say which step they read. One run serves all of these (a
module fixture). A run killed with SIGKILL leaves its lock behind, and the same command
takes it over and resumes bit-identically: tests/test_kill_resume.py checks that on its
kills; the bad-input table (tests/test_reliability.py) has the lock's other cases.

The runs use test_kill_resume's model and sizes (resnet18 from random init, 32 px, batches of
8), so they share its compiled steps through the session's compilation cache.
"""

from __future__ import annotations

import contextlib
import io
import re
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_subprocess import command, partial_saves, python_m_jtransfer, subprocess_env

from jtransfer import checkpoint, cli, data
from jtransfer.checkpoint import WRITER_LOCK, CheckpointWarning

# Training machinery, not convolution numerics: XLA's own convolutions (tests/conftest.py).
XLA_CONVOLUTIONS = True

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

COMMON = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8"]
EVERY_STEP = [*COMMON, "--epochs", "2", "--save-every", "1"]  # 8 steps, a save after each
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("concurrency")


@pytest.fixture(scope="module")
def env(workdir) -> dict[str, str]:
    return {**subprocess_env(workdir / "xla-cache"), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def dataset(workdir) -> Path:
    root = workdir / "data"
    data.make_demo_imagefolder(root / "train", n_per_class=16, size=40, seed=0)
    data.make_demo_imagefolder(root / "test", n_per_class=4, size=40, seed=1)
    return root


def finetune(dataset: Path, out: Path, config: list[str]) -> list:
    return ["finetune", "--data", dataset, *config, "--out", out]


def in_process(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {TIMEOUT_S} s"
        time.sleep(0.01)


@dataclass
class SharedRun:
    """A finetune run that saved every step while a second writer and readers tried it."""

    out: Path
    pid: int
    second: subprocess.CompletedProcess
    before_first_save: str | None  # predict's error before any checkpoint, if it came first
    steps: list[int]  # what load_for_inference read, in order
    predicted: list[str]  # predict's stderr, each time
    returncode: int
    log: str


@pytest.fixture(scope="module")
def shared_run(dataset, workdir, env) -> SharedRun:
    out = workdir / "shared"
    argv = finetune(dataset, out, EVERY_STEP)
    image = next((dataset / "test").rglob("*.jpg"))
    log = workdir / "first.log"
    with log.open("w") as f:
        first = subprocess.Popen(command(argv), env=env, stdout=f, stderr=f, text=True)
    try:
        wait_for((out / WRITER_LOCK).exists, first, "lock")
        before = None
        if not checkpoint.checkpoint_steps(out):
            code, _, stderr = in_process("predict", "--checkpoint", out, image)
            if code == 1 and not checkpoint.checkpoint_steps(out):
                before = stderr
        second = python_m_jtransfer(argv, env, timeout=TIMEOUT_S)
        wait_for(lambda: checkpoint.checkpoint_steps(out), first, "first checkpoint")
        steps, predicted = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("error", CheckpointWarning)  # never a half-written one
            while first.poll() is None:
                _, _, meta = checkpoint.load_for_inference(out, "latest")
                steps.append(meta["step"])
                if len(predicted) < 2:
                    code, stdout, stderr = in_process("predict", "--checkpoint", out, image)
                    assert code == 0 and stdout.startswith(f"{image}\t"), stderr
                    predicted.append(stderr)
                time.sleep(0.2)  # leave the run some CPU
        returncode = first.wait(TIMEOUT_S)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    return SharedRun(out, first.pid, second, before, steps, predicted, returncode, log.read_text())


def test_a_second_writer_is_refused_at_once_naming_the_first(shared_run):
    run = shared_run
    assert run.second.returncode == 1, run.second.stderr
    (line,) = run.second.stderr.strip().splitlines()
    for needle in (
        f"--out {run.out} is in use",
        f"pid {run.pid} on {socket.gethostname()}, since ",
        "python -m jtransfer finetune --data",
        f"kill {run.pid}",
        "pass another --out",
        "predict --checkpoint",
    ):
        assert needle in line, (needle, line)


def test_readers_take_the_latest_complete_checkpoint_and_say_which(shared_run):
    run = shared_run
    if run.before_first_save is not None:
        assert "no complete checkpoint yet" in run.before_first_save
        assert f"pid {run.pid}" in run.before_first_save
    assert run.steps == sorted(run.steps) and len(set(run.steps)) >= 2, run.steps
    assert len(run.predicted) == 2
    for stderr in run.predicted:
        assert re.match(r"reading step \d+ of .* \(the best by test accuracy\)", stderr)


def test_the_first_writer_ends_as_if_alone_and_exports(shared_run, workdir):
    run = shared_run
    assert run.returncode == 0, run.log
    assert checkpoint.checkpoint_steps(run.out)[-1] == 8
    assert not (run.out / WRITER_LOCK).exists() and partial_saves(run.out) == []
    code, stdout, stderr = in_process("export", "--checkpoint", run.out, "--out", workdir / "m.pth")
    assert code == 0, stderr
    assert "(step " in stdout and (workdir / "m.pth").exists()


def test_resuming_after_the_training_data_changed_says_what_to_do(shared_run, dataset):
    out = shared_run.out
    argv = finetune(dataset, out, [*COMMON, "--epochs", "3", "--save-every", "1"])
    added = dataset / "train" / "hotdog" / "added.jpg"
    added.write_bytes(next((dataset / "train" / "hotdog").iterdir()).read_bytes())
    try:
        code, stdout, stderr = in_process(*argv)
    finally:
        added.unlink()
    assert code == 1, stderr
    assert "resuming from step 8 (" in stdout
    (error,) = stderr.strip().splitlines()
    for needle in (
        f"the training data in --data {dataset} changed since the checkpoint in --out {out}",
        "training images: 32 then, 33 now",
        "Put the data back as it was to resume this run",
        "the same command with a new --out",
    ):
        assert needle in error, (needle, error)
    assert "afresh" not in error
    assert checkpoint.checkpoint_steps(out)[-1] == 8 and not (out / WRITER_LOCK).exists()
