"""Multi-process fine-tuning (jax.distributed, gloo on CPU) matches a single-process run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import numpy as np
import pytest

from jtransfer import checkpoint, data, distributed
from jtransfer.errors import ConfigError

ARGS = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8"]
ARGS += ["--epochs", "1", "--freeze", "stem", "layer1", "layer2", "layer3"]
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JTRANSFER_")}
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count", "--x")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "jtransfer", "finetune", *map(str, argv)]
    with open(log, "w") as f:
        return subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT)


def _wait_all(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Waits for every process; on a failure or the timeout, kills them all."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, f"{log}:\n{log.read_text()[-3000:]}"


def _params(out: Path) -> list[np.ndarray]:
    _, variables, _ = checkpoint.load_for_inference(out, "latest")
    return [np.asarray(x) for x in jax.tree.leaves(variables)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist") / "data"
    data.make_demo_imagefolder(root / "train", n_per_class=16, size=40, seed=0)
    data.make_demo_imagefolder(root / "test", n_per_class=4, size=40, seed=1)
    return root


def test_two_processes_train_exactly_like_one_process_with_two_devices(dataset, tmp_path):
    # The first three ResNet stages are frozen to keep compilation short; layer4 and fc still
    # train, with BatchNorm statistics over the global batch and the gradient all-reduce.
    common = ["--data", dataset, *ARGS]
    one_out, two_out = tmp_path / "one", tmp_path / "two"
    logs = [tmp_path / "one.log", tmp_path / "p0.log", tmp_path / "p1.log"]
    port = _free_port()
    # All three at once: the single-process reference and the two processes of the other run.
    procs = [_start([*common, "--out", one_out], _env(2), logs[0])]
    for i in range(2):
        dist = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", i]
        procs.append(_start([*common, "--out", two_out, *dist], _env(1), logs[i + 1]))
    _wait_all(procs, logs)

    one, two = _params(one_out), _params(two_out)
    assert len(one) == len(two)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    # The same global batches in the same order on the same devices: bit for bit.
    assert all(np.array_equal(a, b) for a, b in zip(one, two, strict=True))
    assert "epoch 1/1" in logs[1].read_text()
    assert "epoch 1/1" not in logs[2].read_text()  # only process 0 prints


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
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(distributed.ENV_PROCESS_ID, raising=False)
    assert distributed.initialize() is False
    assert distributed.is_main() and not distributed.is_multiprocess()
    with pytest.raises(ConfigError, match="coordinator"):
        distributed.initialize(num_processes=2)
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ConfigError, match="integer"):
        distributed.initialize()
