"""Loader worker processes leave nothing behind and never hang (each case a subprocess).

A script without ``if __name__ == "__main__":`` works; a normal end, an exception, ``close()``
and Ctrl-C leave no shared memory and no live worker; a killed worker is named in an error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jtransfer import data

REPO = Path(__file__).resolve().parents[1]

# Printed by every script: the worker pids and the pool's shared-memory block.
PROLOGUE = """
import os, sys, numpy as np
from jtransfer import data
folder = data.ImageFolder(sys.argv[1])
loader = data.make_loader(folder, batch_size=4, train=True, worker_count=2, num_epochs=None,
                          image_size=32, decode_cache_mb=0)
it = iter(loader)
first = next(it)
pool = it._source
print("PIDS", *[p.pid for p in pool._procs], flush=True)
print("SHM", pool._shm.name, flush=True)
"""

CASES = {
    "unguarded_end": "for _ in range(5):\n    next(it)\nit.close()\nprint('DONE', flush=True)\n",
    "exception": "next(it)\nraise RuntimeError('boom in the training loop')\n",
    "close": "it.close()\nprint('DONE', flush=True)\n",
    "sigint": (
        "import time\nprint('READY', flush=True)\nwhile True:\n    next(it)\n    time.sleep(0.05)\n"
    ),
    "end_without_close": "next(it)\nprint('DONE', flush=True)\n",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("workers") / "train"
    data.make_demo_imagefolder(root, n_per_class=6, size=40)
    return str(root)


def _start(tmp_path: Path, folder: str, body: str, **kwargs) -> subprocess.Popen:
    script = tmp_path / "script.py"  # no __main__ guard on purpose
    script.write_text(textwrap.dedent(PROLOGUE) + body)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, str(script), folder],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        **kwargs,
    )


def _read_until(proc: subprocess.Popen, word: str, lines: list[str]) -> None:
    while True:
        line = proc.stdout.readline()
        assert line, f"script ended before {word!r}: {proc.communicate(timeout=30)}"
        lines.append(line)
        if line.startswith(word):
            return


def _assert_nothing_left(lines: list[str], stderr: str) -> None:
    pids = [int(p) for p in next(x for x in lines if x.startswith("PIDS")).split()[1:]]
    shm = next(x for x in lines if x.startswith("SHM")).split()[1]
    assert "leaked" not in stderr and "resource_tracker" not in stderr, stderr
    assert not Path("/dev/shm", shm).exists()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids), pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie is dead but unreaped
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("case", ["unguarded_end", "close", "end_without_close", "exception"])
def test_scripts_leave_no_workers_and_no_shared_memory(tmp_path, folder, case):
    proc = _start(tmp_path, folder, CASES[case])
    stdout, stderr = proc.communicate(timeout=120)
    lines = stdout.splitlines()
    if case == "exception":
        assert proc.returncode == 1 and "boom in the training loop" in stderr
        assert stderr.count("Traceback") == 1, stderr  # the user's error only
    else:
        assert proc.returncode == 0, stderr
        assert "DONE" in stdout and "Traceback" not in stderr, stderr
    _assert_nothing_left(lines, stderr)


def test_ctrl_c_stops_workers_and_frees_shared_memory(tmp_path, folder):
    proc = _start(tmp_path, folder, CASES["sigint"], start_new_session=True)
    lines: list[str] = []
    try:
        _read_until(proc, "READY", lines)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole process group
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "KeyboardInterrupt" in stderr and stderr.count("Traceback") == 1, stderr
    _assert_nothing_left(lines + stdout.splitlines(), stderr)


def test_a_killed_worker_is_named_never_waited_for(tmp_path, folder):
    body = textwrap.dedent("""
        import signal
        os.kill(pool._procs[1].pid, signal.SIGKILL)
        try:
            for _ in range(20):
                next(it)
        except data.LoaderWorkerError as e:
            print("ERROR", e.worker, e.pid, e.exitcode, str(e).replace(chr(10), " "), flush=True)
        """)
    proc = _start(tmp_path, folder, body)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    lines = stdout.splitlines()
    pids = next(x for x in lines if x.startswith("PIDS")).split()[1:]
    error = next(x for x in lines if x.startswith("ERROR")).split(maxsplit=4)
    assert error[1:4] == ["1", pids[1], str(-signal.SIGKILL)]
    assert f"Loader worker 1 (pid {pids[1]}) was killed by SIGKILL" in error[4]
    _assert_nothing_left(lines, stderr)


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(): v.decode() for k, v in pairs}


def test_workers_keep_freed_memory_unless_the_user_tuned_malloc(folder, monkeypatch):
    for key in data._WORKER_MALLOC_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "12345")  # the user's own setting wins
    loader = data.make_loader(
        data.ImageFolder(folder), batch_size=4, train=True, worker_count=2, image_size=32
    )
    it = iter(loader)
    try:
        next(it)
        for proc in it._source._procs:
            env = _environ(proc.pid)
            assert env["MALLOC_TOP_PAD_"] == "12345"
            assert (
                env["MALLOC_MMAP_THRESHOLD_"] == data._WORKER_MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]
            )
            assert (
                env["MALLOC_TRIM_THRESHOLD_"] == data._WORKER_MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]
            )
    finally:
        it.close()
    # Only the workers got them: this process's environment is as it was.
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ
    assert "MALLOC_TRIM_THRESHOLD_" not in os.environ
    assert os.environ["MALLOC_TOP_PAD_"] == "12345"


def test_a_worker_killed_after_its_last_reply_is_named_in_batch_order(folder):
    loader = data.make_loader(
        data.ImageFolder(folder),
        batch_size=4,
        train=True,
        worker_count=2,
        image_size=32,
        num_epochs=None,
        decode_cache_mb=0,
    )
    it = iter(loader)
    try:
        next(it)  # batch 0, from worker 0
        pool = it._source
        assert pool._conns[1].poll(60)  # worker 1's batch 1 waits in the pipe...
        victim = pool._procs[1]
        os.kill(victim.pid, signal.SIGKILL)  # ...and then it dies
        victim.join(10)
        # Batch 1 is served; handing the dead worker its next task must not raise
        # BrokenPipeError (it did, in CI): the worker is named when its turn comes.
        next(it)
        with pytest.raises(data.LoaderWorkerError, match=r"Loader worker 1 .*SIGKILL") as e:
            for _ in range(4):
                next(it)
        assert e.value.worker == 1 and e.value.pid == victim.pid
    finally:
        it.close()
