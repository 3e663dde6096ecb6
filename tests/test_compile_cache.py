"""The persistent compilation cache: where it goes, how it is turned off, and that a second
process finds what the first wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from jtransfer import compile_cache

SCRIPT = textwrap.dedent(
    """
    import sys, time, jax, jax.numpy as jnp
    from jtransfer import compile_cache
    compile_cache.MIN_COMPILE_SECS = 0.0
    print("DIR", compile_cache.enable(sys.argv[1]))
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    f(jnp.ones((64, 64))).block_until_ready()
    """
)


def _run(arg: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, arg],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


def test_a_second_process_reuses_what_the_first_compiled(tmp_path):
    cache = tmp_path / "xla"
    assert f"DIR {cache}" in _run(str(cache))
    written = sorted(p.name for p in cache.iterdir())
    assert written, "the first process wrote no cache entry"
    _run(str(cache))
    assert sorted(p.name for p in cache.iterdir()) == written  # a hit adds nothing new


@pytest.mark.parametrize("off", ["off", "none", "0", "OFF"])
def test_off_writes_nothing(tmp_path, off):
    assert "DIR None" in _run(off, env={"XDG_CACHE_HOME": str(tmp_path)})
    assert not any(tmp_path.iterdir())


def test_default_dir_follows_env_then_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == str(tmp_path / "jtransfer" / "xla")
    monkeypatch.setenv(compile_cache.ENV, "/somewhere/else")
    assert compile_cache.default_dir() == "/somewhere/else"


def test_an_unwritable_folder_warns_and_leaves_the_cache_off(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match=r"not writable.*--compile-cache DIR"):
        assert compile_cache.enable(blocker / "xla") is None
