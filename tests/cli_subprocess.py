"""Helpers for tests that run `python -m jtransfer` as a real process (and kill it).

Imported by test_cli.py and test_kill_resume.py (pytest puts this folder on sys.path).
Every process gets a time limit and is killed if a test gives up on it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

# Orbax writes a step into "<step>.orbax-checkpoint-tmp" (older Orbax: with a
# "-<timestamp>" suffix) and renames it to "<step>" once complete.
ORBAX_TMP = ".orbax-checkpoint-tmp"


def subprocess_env(cache_dir: Path) -> dict[str, str]:
    """The environment of test runs: they share compiled XLA programs through JAX's disk cache."""
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def command(argv: Sequence[object]) -> list[str]:
    return [sys.executable, "-m", "jtransfer", *map(str, argv)]


def python_m_jtransfer(argv, env, **kwargs) -> subprocess.CompletedProcess:
    """Runs `python -m jtransfer ARGV` to the end (pass timeout=...; it kills on expiry)."""
    return subprocess.run(command(argv), env=env, capture_output=True, text=True, **kwargs)


def complete_steps(out: Path) -> list[int]:
    """Steps of the complete checkpoints in `out` (what a restart can resume from)."""
    if not out.is_dir():
        return []
    return sorted(int(p.name) for p in out.iterdir() if p.name.isdigit())


def partial_saves(out: Path) -> list[str]:
    """Orbax's temporary directories of saves in progress (or of ones killed mid-way)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if ORBAX_TMP in p.name)


def partial_step(name: str) -> int:
    return int(name.split(ORBAX_TMP)[0])


class Killed:
    """What a process killed with SIGKILL left: its output and the state of --out at death."""

    def __init__(self, stdout: str, stderr: str, complete: list[int], partial: list[str]):
        self.stdout, self.stderr = stdout, stderr
        self.complete, self.partial = complete, partial


def run_and_sigkill(
    argv,
    env,
    out: Path,
    when: Callable[[], bool],
    *,
    delay_s: float = 0.0,
    timeout_s: float = 300,
    poll_s: float = 0.002,
) -> Killed:
    """Starts `python -m jtransfer ARGV` and SIGKILLs it `delay_s` after `when()` turns true.

    `when` is polled every `poll_s` seconds (checkpoint directories appear and vanish within
    milliseconds). SIGKILL has no handler: this is a crash, an OOM kill or a lost machine.

    Raises:
        AssertionError: the process ended on its own or `when` never held within `timeout_s`
            (the process is killed then too).
    """
    env = {**env, "PYTHONUNBUFFERED": "1"}  # what it printed before the kill is kept
    proc = subprocess.Popen(
        command(argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not when():
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(poll_s)
        else:
            if delay_s:
                time.sleep(delay_s)
        ended = proc.poll()
        proc.send_signal(signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if ended is not None or proc.returncode != -signal.SIGKILL:
        why = f"it ended with {ended}" if ended is not None else "the moment never came"
        listing = sorted(os.listdir(out)) if out.is_dir() else "nothing"
        raise AssertionError(
            f"the run was to be killed, but {why}; --out holds {listing}\n"
            f"stdout:\n{stdout}\nstderr:\n{stderr}"
        )
    return Killed(stdout, stderr, complete_steps(out), partial_saves(out))


def saved_state(out: Path, step: int) -> dict:
    """Every array of a checkpoint's train state (params, batch_stats, opt_state, step, rng)."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(out / str(step) / "state")


def assert_bit_identical(actual, expected, what: str = "") -> None:
    """Same tree, and every leaf the same dtype, shape and bytes."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected), what
    paths = jax.tree_util.tree_flatten_with_path(expected)[0]
    for (path, want), got in zip(paths, jax.tree.leaves(actual), strict=True):
        got, want = np.asarray(got), np.asarray(want)
        where = f"{what} {jax.tree_util.keystr(path)}"
        assert (got.dtype, got.shape) == (want.dtype, want.shape), where
        assert got.tobytes() == want.tobytes(), where
