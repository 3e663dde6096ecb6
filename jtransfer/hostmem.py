"""Transparent huge pages for XLA:CPU's per-step buffers (Linux, glibc >= 2.35).

XLA:CPU allocates the temporary buffer of every execution with malloc: for a
ResNet fine-tune step, hundreds of megabytes, which glibc serves from a fresh
mmap and unmaps again when the step ends. The next step faults every page in
anew, and those page faults are a sizeable share of the step's time. With
glibc's tunable `glibc.malloc.hugetlb=1`, malloc advises the kernel to back
such mappings with transparent huge pages (2 MiB instead of 4 KiB): one fault
where there were hundreds, and a shorter step. `python benchmarks/bench.py`
measures it (it applies to torch alike); the figures are in docs/performance.md.

glibc reads tunables once, when the process starts, so the command line
(`python -m jtransfer`), the examples and the benchmarks re-execute themselves
once with the tunable added to `GLIBC_TUNABLES` (`reexec_with_hugepages`). In
research code, start Python with it instead:

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python train.py

Nothing changes where it cannot help: not Linux, not glibc or glibc older than
2.35, transparent huge pages set to `never`, the tunable already set, or
`JTRANSFER_HUGEPAGES=0` in the environment (the opt-out).

Example:
    >>> from jtransfer import hostmem
    >>> hostmem.tunables_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "JTRANSFER_HUGEPAGES"  # "0" keeps the process as it is
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # the first glibc with the hugetlb tunable


def _glibc_version() -> tuple[int, ...] | None:
    lib, version = platform.libc_ver()
    if lib != "glibc" or not version:
        return None
    try:
        return tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return None


def transparent_hugepages_mode(path: str = _THP_MODE) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def tunables_with_hugepages(environ: Mapping[str, str] | None = None) -> str | None:
    """The `GLIBC_TUNABLES` value to run with, or None when the process should stay as it is.

    Args:
        environ: the environment to judge (default `os.environ`).

    Returns:
        The existing tunables with `glibc.malloc.hugetlb=1` appended, or None: not
        Linux with glibc >= 2.35, transparent huge pages off, the tunable already
        set, or `JTRANSFER_HUGEPAGES=0`.
    """
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "1").strip().lower() in ("0", "off", "false", "no"):
        return None
    have = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in have:
        return None
    if sys.platform != "linux" or (_glibc_version() or (0,)) < _MIN_GLIBC:
        return None
    if transparent_hugepages_mode() in (None, "never"):
        return None
    return f"{have}:{TUNABLE}" if have else TUNABLE


def reexec_with_hugepages(argv: Sequence[str] | None = None) -> None:
    """Re-executes this Python process with `glibc.malloc.hugetlb=1`; returns if it need not.

    Call it first thing in a program's `if __name__ == "__main__":` block, before
    jax allocates anything: the process is replaced (same PID, same arguments,
    same stdin/stdout), so work done before the call is done twice. Never call it
    from library code or a test process.

    Args:
        argv: the command line to run again (default `sys.orig_argv`, which keeps
            `-m module`).
    """
    tunables = tunables_with_hugepages()
    if tunables is None:
        return
    if argv is None:
        argv = getattr(sys, "orig_argv", [sys.executable, *sys.argv])
    args = list(argv)
    env = dict(os.environ, GLIBC_TUNABLES=tunables)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *args[1:]], env)
    except OSError:
        return  # keep running as we are: slower, not wrong
