"""Multi-process fine-tuning (jax.distributed, gloo on CPU): it matches a single-process run,
and a run killed mid-training resumes from its last complete checkpoint to the same end, bit
for bit; a process whose peer died exits within the heartbeat timeout instead of hanging."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from memory_lock import one_at_a_time

from jtransfer import _lockfile, checkpoint, data, distributed
from jtransfer.errors import ConfigError
from jtransfer.models import conv

# Training machinery, not convolution numerics: XLA's own convolutions, which
# compile much faster (tests/conftest.py).
XLA_CONVOLUTIONS = True

# 32 training images, global batch 8: 4 steps per epoch, 8 in all, checkpoints at steps 2
# and 6 (mid-epoch) and 4 and 8 (epoch ends). The first three ResNet stages are frozen to keep
# compilation short; layer4 and fc still train (SGD with momentum, BatchNorm statistics over
# the global batch, the gradient all-reduce).
ARGS = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8"]
ARGS += ["--epochs", "2", "--save-every", "2", "--freeze", "stem", "layer1", "layer2", "layer3"]
STEPS = 8
TIMEOUT_S = 240  # one run, start to finish
# A process whose peer died aborts once the coordination service has missed the peer's
# heartbeats this long (JAX's default is 100 s); the test allows it GRACE_S more to exit.
HEARTBEAT_S = 10
GRACE_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JTRANSFER_")}
    # The session's JTRANSFER_ settings stay out, except the convolutions this module runs
    # (XLA_CONVOLUTIONS; they had been left out with the rest), which compile faster.
    env[conv.CONV_ENV] = "xla"
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count", "--x")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"  # the logs are read while the processes run
    env[distributed.ENV_HEARTBEAT_TIMEOUT] = str(HEARTBEAT_S)
    return env


def _start(argv: list, env: dict[str, str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "jtransfer", "finetune", *map(str, argv)]
    with open(log, "w") as f:
        return subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT)


def _start_two(argv: list, logs: list[Path]) -> list[subprocess.Popen]:
    """Processes 0 and 1 of one 2-process run, on a port no earlier run used."""
    port = _free_port()
    procs = []
    for i, log in enumerate(logs):
        dist = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", i]
        procs.append(_start([*argv, *dist], _env(1), log))
    return procs


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _tails(logs: list[Path]) -> str:
    return "\n".join(f"{log}:\n{log.read_text()[-3000:]}" for log in logs)


def _wait_all(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Waits for every process to succeed; on a failure or the timeout, kills them all."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        _kill(procs)
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, _tails([log])


def _wait_for_checkpoint(out: Path, after: int, procs, logs) -> int:
    """Waits (all processes still running) for a complete checkpoint newer than step `after`.

    Complete is Orbax's definition, which `checkpoint.checkpoint_steps` applies: a step is
    written under ``<step>.orbax-checkpoint-tmp`` and renamed to ``<step>`` only after every
    process has written its part.
    """
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        newer = [s for s in checkpoint.checkpoint_steps(out) if s > after]
        if newer:
            return max(newer)
        if any(proc.poll() is not None for proc in procs):
            _kill(procs)
            pytest.fail(f"a process ended before a checkpoint after step {after}:\n{_tails(logs)}")
        time.sleep(0.05)
    _kill(procs)
    pytest.fail(f"no checkpoint after step {after} within {TIMEOUT_S} s:\n{_tails(logs)}")


def _resumed_from(log: Path) -> int:
    found = re.findall(r"^resuming from step (\d+) ", log.read_text(), flags=re.M)
    assert len(found) == 1, log.read_text()[-3000:]
    return int(found[0])


def _params(out: Path) -> list[np.ndarray]:
    _, variables, meta = checkpoint.load_for_inference(out, "latest")
    assert meta["step"] == STEPS
    return [np.asarray(x) for x in jax.tree.leaves(variables)]


def _final_state(out: Path) -> dict:
    """Every array of the final train state: params, batch_stats, momentum, step, PRNG key."""
    import orbax.checkpoint as ocp

    assert checkpoint.checkpoint_steps(out)[-1] == STEPS
    return ocp.StandardCheckpointer().restore(out / str(STEPS) / "state")  # the "state" item


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist") / "data"
    data.make_demo_imagefolder(root / "train", n_per_class=16, size=40, seed=0)
    data.make_demo_imagefolder(root / "test", n_per_class=4, size=40, seed=1)
    return root


@dataclass(frozen=True)
class Reference:
    """Final variables of uninterrupted runs: 1 process with 2 devices, 2 processes."""

    one: list[np.ndarray]  # params and batch_stats
    two: list[np.ndarray]
    two_state: dict  # the 2-process run's whole train state
    logs: list[Path]  # the 1-process run's, then processes 0 and 1's


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Reference:
    tmp = tmp_path_factory.mktemp("reference")
    common = ["--data", dataset, *ARGS]
    logs = [tmp / "one.log", tmp / "p0.log", tmp / "p1.log"]
    # All three at once: the single-process run and the two processes of the other.
    with one_at_a_time():  # three processes at once: never beside another memory-heavy test
        procs = [_start([*common, "--out", tmp / "one"], _env(2), logs[0])]
        procs += _start_two([*common, "--out", tmp / "two"], logs[1:])
        _wait_all(procs, logs)
    return Reference(_params(tmp / "one"), _params(tmp / "two"), _final_state(tmp / "two"), logs)


def test_two_processes_train_exactly_like_one_process_with_two_devices(reference):
    one, two = reference.one, reference.two
    assert len(one) == len(two)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    # The same global batches in the same order on the same devices: bit for bit.
    assert all(np.array_equal(a, b) for a, b in zip(one, two, strict=True))
    assert "epoch 2/2" in reference.logs[1].read_text()
    assert "epoch" not in reference.logs[2].read_text()  # only process 0 prints


def _half_written_copy(out: Path, step: int) -> Path:
    """A later step as a save killed mid-write leaves it: a temporary directory, cut short."""
    tmp = out / f"{step + 1}.orbax-checkpoint-tmp"
    if not tmp.exists():  # else the kill left a real one
        shutil.copytree(out / str(step), tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                os.truncate(path, path.stat().st_size // 2)
    return tmp


def test_a_killed_two_process_run_resumes_where_it_stopped_and_ends_identically(
    dataset, reference, tmp_path
):
    with one_at_a_time():  # missed heartbeats under memory pressure would read as a hang
        _kill_and_resume(dataset, reference, tmp_path)


def _kill_and_resume(dataset, reference, tmp_path) -> None:
    out = tmp_path / "run"
    argv = ["--data", dataset, *ARGS, "--out", out]

    # 1. Both processes SIGKILLed once a checkpoint is complete (as when the job is
    # preempted); the run had not finished. A half-written later step is left beside it.
    logs = [tmp_path / "a0.log", tmp_path / "a1.log"]
    procs = _start_two(argv, logs)
    _wait_for_checkpoint(out, 0, procs, logs)
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
    for proc in procs:
        assert proc.wait() == -signal.SIGKILL, _tails(logs)
    first = max(checkpoint.checkpoint_steps(out))
    assert 0 < first < STEPS
    # One writer lock for the run, held by process 0 and left behind by the kill; each
    # restart's process 0 takes it over (same host, pid gone).
    holder = _lockfile.read_holder(out / checkpoint.WRITER_LOCK)
    assert holder is not None and holder.pid == procs[0].pid and holder.alive() is False
    partial = _half_written_copy(out, first)

    # 2. Restarted with the same commands on a new port: it resumes from that step, not from
    # the half-written one (Orbax deletes it). Then only process 1 is killed: process 0 must
    # not hang in its next collective, but abort within the heartbeat timeout.
    logs = [tmp_path / "b0.log", tmp_path / "b1.log"]
    procs = _start_two(argv, logs)
    _wait_for_checkpoint(out, first, procs, logs)
    assert _resumed_from(logs[0]) == first
    assert not partial.exists()
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    try:
        procs[0].wait(timeout=HEARTBEAT_S + GRACE_S)
    except subprocess.TimeoutExpired:
        _kill(procs)
        pytest.fail(f"process 0 still ran {HEARTBEAT_S + GRACE_S} s after process 1 died")
    finally:
        _kill(procs)
    assert procs[0].returncode != 0, _tails(logs)
    print(f"process 0 exited {time.monotonic() - killed:.1f} s after process 1 was killed")
    assert "resuming" not in logs[1].read_text()  # only process 0 prints
    second = max(checkpoint.checkpoint_steps(out))
    assert first < second < STEPS

    # 3. Restarted again: it resumes from the newest complete step, runs to the end, and ends
    # with the uninterrupted 2-process run's train state, every array bit for bit.
    logs = [tmp_path / "c0.log", tmp_path / "c1.log"]
    _wait_all(_start_two(argv, logs), logs)
    assert _resumed_from(logs[0]) == second
    assert "epoch 2/2" in logs[0].read_text()
    assert "resuming" not in logs[1].read_text() and "epoch" not in logs[1].read_text()
    assert not list(out.glob("*.orbax-checkpoint-tmp"))
    assert not (out / checkpoint.WRITER_LOCK).exists()  # released at the end
    resumed, expected = _final_state(out), reference.two_state
    assert jax.tree.structure(resumed) == jax.tree.structure(expected)
    for (path, want), got in zip(
        jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(resumed), strict=True
    ):
        got, want = np.asarray(got), np.asarray(want)
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), jax.tree_util.keystr(
            path
        )


def test_process_shards_concatenate_to_the_single_process_batches(dataset):
    folder = data.ImageFolder(dataset / "train")
    whole = data.make_loader(folder, batch_size=6, train=True, seed=3)
    parts = []
    for index in range(2):
        shard = grain.sharding.ShardOptions(shard_index=index, shard_count=2, drop_remainder=True)
        parts.append(
            data.make_loader(folder, batch_size=3, train=True, seed=3, shard_options=shard)
        )
    assert [p.steps_per_epoch for p in parts] == [whole.steps_per_epoch] * 2
    order = np.asarray(whole.epoch_order(0)).reshape(-1, 6)
    joined = np.concatenate([np.asarray(p.epoch_order(0)).reshape(-1, 3) for p in parts], axis=1)
    np.testing.assert_array_equal(joined, order)


def test_initialize_without_settings_is_a_no_op(monkeypatch):
    for name in (
        distributed.ENV_COORDINATOR,
        distributed.ENV_NUM_PROCESSES,
        distributed.ENV_PROCESS_ID,
        distributed.ENV_HEARTBEAT_TIMEOUT,
    ):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False
    assert distributed.is_main() and not distributed.is_multiprocess()
    with pytest.raises(ConfigError, match="coordinator"):
        distributed.initialize(num_processes=2)
    with pytest.raises(ConfigError, match="heartbeat timeout must be >= 1"):
        distributed.initialize(heartbeat_timeout_s=0)
    monkeypatch.setenv(distributed.ENV_HEARTBEAT_TIMEOUT, "soon")
    with pytest.raises(ConfigError, match="JTRANSFER_HEARTBEAT_TIMEOUT must be an integer"):
        distributed.initialize()
    monkeypatch.delenv(distributed.ENV_HEARTBEAT_TIMEOUT)
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ConfigError, match="integer"):
        distributed.initialize()
