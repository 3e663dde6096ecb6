"""Tests that need many GiB at once take turns across the xdist workers.

The float64 VGG-BN training run (about 9 GiB) and the three processes of the distributed
tests (several GiB together) fit a 24 GiB, 2-core machine one at a time, not together with
both pytest workers' own memory: when they overlapped, the kernel's out-of-memory killer
ended the float64 run and the distributed processes missed their heartbeats. `one_at_a_time`
holds an exclusive lock (`fcntl.flock`) on a file in a folder the controlling process
creates for the session (tests/conftest.py), so such blocks never run at the same time.

`give_back` returns a process's freed heap to the kernel: tests/conftest.py calls it after
every module, and module-parametrized fixtures that hold one large model at a time call it
before they build the next.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import functools
import gc
import os
from collections.abc import Iterator

ENV = "_JTRANSFER_TEST_LOCKS"


@contextlib.contextmanager
def one_at_a_time(name: str = "memory") -> Iterator[None]:
    """Runs the block while no other block of the same `name` runs in the session."""
    folder = os.environ.get(ENV)
    if folder is None or not os.path.isdir(folder):  # not under tests/conftest.py
        yield
        return
    with open(os.path.join(folder, f"{name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)  # glibc only


def give_back() -> None:
    """Frees unreachable objects and hands the free heap back to the kernel (glibc)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
