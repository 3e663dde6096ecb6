"""One JAX compilation cache for the whole test session.

Many tests compile the same ResNet-18 steps: in-process (test_fit, test_train, ...)
and in `python -m jtransfer` subprocesses (test_cli, test_kill_resume, ...), on
both xdist workers. They share one persistent cache, created by the controlling
process and removed at the end, so each distinct step compiles once per session.
A cache hit runs the code a fresh compile would produce (the cache is keyed by
the computation, versions, flags and devices). JTRANSFER_COMPILE_CACHE set
before pytest starts is used (and kept) instead; set it to "off" to compile
everything afresh.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from jtransfer import compile_cache

_CREATED = "_JTRANSFER_TEST_CACHE_CREATED"


def pytest_configure(config):
    if not hasattr(config, "workerinput") and compile_cache.ENV not in os.environ:
        # The controller (or a run without xdist): workers inherit the environment.
        os.environ[compile_cache.ENV] = tempfile.mkdtemp(prefix="jtransfer-test-xla-")
        os.environ[_CREATED] = "1"
    compile_cache.enable()


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput") and os.environ.pop(_CREATED, None):
        shutil.rmtree(os.environ.pop(compile_cache.ENV), ignore_errors=True)
