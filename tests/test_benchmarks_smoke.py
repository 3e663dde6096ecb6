"""benchmarks/bench.py keeps working: every step kind, the data+train epoch included, on a
tiny config (no timing checks)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("jt_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["jt_bench"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("jt_bench", None)


@pytest.fixture
def torch_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_tiny_run_writes_the_table(bench, tmp_path, torch_threads):
    out = tmp_path / "RESULTS.md"
    argv = ["--archs", "resnet18", "--batch", "2", "--size", "32", "--reps", "1"]
    # --xla-flags "": XLA flags cannot change once this pytest process has used jax.
    # One torch thread: OpenMP barriers crawl on a loaded 2-core machine.
    argv += ["--xla-flags", "", "--torch-threads", "1", "--out", str(out)]
    results = bench.main(argv)

    assert [(r.arch, r.batch, r.mode) for r in results] == [
        ("resnet18", 2, mode) for mode in bench.MODES
    ]
    for r in results:
        assert len(r.torch_s) == len(r.jax_s) == 1
        assert r.torch_ips > 0 and r.jax_ips > 0 and math.isfinite(r.ratio)
        assert r.compile_s >= 0 and r.torch_mem >= 0 and r.jax_mem >= 0
    # Both sides computed the same thing (ported weights, same batch).
    eval_err = float(results[0].check.rsplit(" ", 1)[1])
    assert eval_err < 1e-4, results[0].check
    frozen_err = float(results[2].check.rsplit(" ", 1)[1])
    assert frozen_err < 1e-4, results[2].check

    epoch = results[bench.MODES.index("epoch")]
    assert epoch.images == 2 * bench.EPOCH_BATCHES_PER_EPOCH  # a whole epoch per timed call

    text = out.read_text()
    assert "| resnet18 | 2 | finetune |" in text
    # The machine line (cores, load average) that says how to read the ratios.
    assert "nproc" in text and "load average" in text
