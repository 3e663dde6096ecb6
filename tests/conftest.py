"""One JAX compilation cache for the whole test session.

Many tests compile the same ResNet-18 steps: in-process (test_fit, test_train, ...)
and in `python -m jtransfer` subprocesses (test_cli, test_kill_resume, ...), on
both xdist workers. They share one persistent cache, created by the controlling
process and removed at the end, so each distinct step compiles once per session.
A cache hit runs the code a fresh compile would produce (the cache is keyed by
the computation, versions, flags and devices). JTRANSFER_COMPILE_CACHE set
before pytest starts is used (and kept) instead; set it to "off" to compile
everything afresh.

Convolutions: modules that test training machinery rather than convolution
numerics (checkpoints, resuming, the command line, several processes, the train
step's semantics, the benchmark scripts, ...) set `XLA_CONVOLUTIONS = True` and
run with `JTRANSFER_CONV=xla`: XLA's own convolutions, which compile 10-25x
faster than jtransfer's CPU forms (`jtransfer.models.conv`). Every other module
runs the default forms (the variable is removed for it): the parity,
training-parity, float64 recipe (not its wrong-recipe checks), model, convolution,
Winograd and hot-dog end-to-end tests. With this, the order below and
test_parity's two sizes the suite runs in well under CI's time on 2 cores.

Memory: glibc keeps the heap of a long-lived worker at its high-water mark (6-8 GiB
after the parity modules) unless told to give freed memory back. The controller sets
glibc's thresholds in the environment, which the workers and every subprocess they start
inherit (`_MALLOC_ENV`), and each module ends with a `malloc_trim`. See docs/reliability.md
("The test suite's memory").

Order: the longest files are collected first, so that `-n 2 --dist loadfile`
hands them out first and the short ones fill in around them (`_FIRST`).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import memory_lock
import pytest

from jtransfer import compile_cache
from jtransfer.models import conv

_CREATED = "_JTRANSFER_TEST_CACHE_CREATED"

# The slowest files on the 2-core machine (worker seconds, longest first);
# the rest keep pytest's order after them.
_FIRST = (
    "test_parity.py",
    "test_float64_parity.py",
    "test_train.py",
    "test_distributed.py",
    "test_training_parity.py",
    "test_hotdog.py",
)

# Blocks of 256 KiB and more are mmap'ed (returned to the kernel when freed) instead of
# the default threshold that grows to 32 MiB; a free heap top over 256 KiB is trimmed.
# setdefault: a value the user set before pytest starts wins.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "262144", "MALLOC_TRIM_THRESHOLD_": "262144"}


def pytest_configure(config):
    if not hasattr(config, "workerinput"):
        # Read by glibc when a process starts: the workers and their subprocesses.
        for key, value in _MALLOC_ENV.items():
            os.environ.setdefault(key, value)
    if not hasattr(config, "workerinput") and compile_cache.ENV not in os.environ:
        # The controller (or a run without xdist): workers inherit the environment.
        os.environ[compile_cache.ENV] = tempfile.mkdtemp(prefix="jtransfer-test-xla-")
        os.environ[_CREATED] = "1"
    if not hasattr(config, "workerinput"):
        # The lock files of memory_lock.one_at_a_time, shared by the workers.
        os.environ[memory_lock.ENV] = tempfile.mkdtemp(prefix="jtransfer-test-locks-")
    compile_cache.enable()


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_FIRST)}
    # sorted() is stable: tests keep their order within a file.
    items[:] = sorted(items, key=lambda item: rank.get(item.path.name, len(_FIRST)))


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput") and os.environ.pop(_CREATED, None):
        shutil.rmtree(os.environ.pop(compile_cache.ENV), ignore_errors=True)
    if not hasattr(config, "workerinput") and memory_lock.ENV in os.environ:
        shutil.rmtree(os.environ.pop(memory_lock.ENV), ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _give_back_memory():
    # After each module (its module-scoped models and compiled steps are gone by then):
    # return the freed heap to the kernel, so the next module and the subprocesses that
    # other worker starts have it.
    yield
    memory_lock.give_back()


@pytest.fixture(autouse=True, scope="module")
def _convolutions(request):
    # Module scope and autouse: set before the module's own fixtures train anything.
    with pytest.MonkeyPatch.context() as mp:
        if getattr(request.module, "XLA_CONVOLUTIONS", False):
            mp.setenv(conv.CONV_ENV, "xla")
        else:
            mp.delenv(conv.CONV_ENV, raising=False)
        yield
