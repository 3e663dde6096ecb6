"""jtransfer.hostmem: when the entry points re-execute with glibc's hugetlb tunable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from jtransfer import hostmem


@pytest.fixture
def capable(monkeypatch):
    """A Linux machine with glibc 2.36 and transparent huge pages on madvise."""
    monkeypatch.setattr(hostmem.sys, "platform", "linux")
    monkeypatch.setattr(hostmem, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(hostmem, "transparent_hugepages_mode", lambda: "madvise")


def test_adds_the_tunable_to_existing_ones(capable):
    assert hostmem.tunables_with_hugepages({}) == "glibc.malloc.hugetlb=1"
    env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert hostmem.tunables_with_hugepages(env) == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
    "env",
    [
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},  # already re-executed: no loop
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},  # the user's own choice stands
        {"JTRANSFER_HUGEPAGES": "0"},
        {"JTRANSFER_HUGEPAGES": "off"},
    ],
)
def test_leaves_the_process_alone_when_told_or_already_done(capable, env):
    assert hostmem.tunables_with_hugepages(env) is None


@pytest.mark.parametrize(
    ("attr", "value"),
    [
        ("_glibc_version", lambda: (2, 34)),  # no hugetlb tunable yet
        ("_glibc_version", lambda: None),  # musl, macOS
        ("transparent_hugepages_mode", lambda: "never"),
        ("transparent_hugepages_mode", lambda: None),  # no sysfs file
    ],
)
def test_leaves_the_process_alone_where_it_cannot_help(capable, monkeypatch, attr, value):
    monkeypatch.setattr(hostmem, attr, value)
    assert hostmem.tunables_with_hugepages({}) is None


def test_reads_the_kernel_mode(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hostmem.transparent_hugepages_mode(str(f)) == "madvise"
    assert hostmem.transparent_hugepages_mode(str(tmp_path / "missing")) is None


def test_reexec_restarts_the_same_process_once_with_the_tunable():
    code = textwrap.dedent(
        """
        import os
        from jtransfer import hostmem
        print("start", os.getpid(), flush=True)
        hostmem.reexec_with_hugepages()
        print("tunables", os.environ.get("GLIBC_TUNABLES", ""), os.getpid(), flush=True)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    starts = [ln.split()[1] for ln in out if ln.startswith("start")]
    final = [ln.split() for ln in out if ln.startswith("tunables")]
    assert len(final) == 1 and len(set(starts)) == 1  # one process throughout
    if hostmem.tunables_with_hugepages(env) is None:  # this machine cannot use it
        assert len(starts) == 1 and final[0][1:] == [starts[0]]
    else:
        assert len(starts) == 2  # ran once more, then stopped (no loop)
        assert final[0][1:] == ["glibc.malloc.hugetlb=1", starts[0]]


def test_opt_out_keeps_the_environment():
    env = dict(os.environ, JTRANSFER_HUGEPAGES="0")
    env.pop("GLIBC_TUNABLES", None)
    code = (
        "import os; from jtransfer import hostmem; hostmem.reexec_with_hugepages(); "
        "print(repr(os.environ.get('GLIBC_TUNABLES')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "None"
