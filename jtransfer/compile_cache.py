"""JAX's persistent compilation cache, on by default for the command line and the examples.

A jitted ResNet fine-tune step is slow to compile on a CPU; with the cache, a
second process that compiles the same step (the same run restarted, resumed, or
run again) loads it from disk instead, in a fraction of the time (the figures
are in docs/performance.md). The cache is keyed by the computation, the jax/XLA
versions, the flags and the devices, so a hit runs exactly the code a fresh
compile would have produced.

Where: `--compile-cache DIR` on the command line, else `$JTRANSFER_COMPILE_CACHE`,
else `$XDG_CACHE_HOME/jtransfer/xla` (default `~/.cache/jtransfer/xla`).
`off` (or `none`, `0`, empty) turns it off. Library users call `enable()` once,
before the first compilation, or set `jax_compilation_cache_dir` themselves.

Example:
    >>> from jtransfer import compile_cache
    >>> compile_cache.enable("off") is None  # what --compile-cache off does
    True

    Turning it on changes JAX's settings for the whole process:

    >>> compile_cache.enable("/tmp/jtransfer-xla")  # doctest: +SKIP
    PosixPath('/tmp/jtransfer-xla')
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

ENV = "JTRANSFER_COMPILE_CACHE"
OFF = ("off", "none", "0", "")
# Only computations that took at least this long to compile are written: the
# many tiny jitted helpers (casts, metrics) would cost more in file writes.
MIN_COMPILE_SECS = 1.0


def default_dir() -> str:
    """`$JTRANSFER_COMPILE_CACHE`, else `$XDG_CACHE_HOME/jtransfer/xla` (~/.cache/...)."""
    if ENV in os.environ:
        return os.environ[ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jtransfer", "xla")


def enable(directory: str | os.PathLike | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache in `directory`.

    Args:
        directory: the cache folder (created if missing); None for `default_dir()`;
            "off" / "none" / "0" / "" to leave the cache off.

    Returns:
        The folder in use, or None when off. A folder that cannot be created or
        written is reported with a warning and the cache stays off: it only saves
        time, so it never stops a run.
    """
    chosen = default_dir() if directory is None else os.fspath(directory)
    if chosen.strip().lower() in OFF:
        return None
    path = Path(chosen).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        warnings.warn(
            f"compilation cache {path} is not writable ({e.strerror or e}); running without "
            f"it. Pass --compile-cache DIR (or set {ENV}) to a writable folder, or 'off'.",
            stacklevel=2,
        )
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
