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

# The scripts' machinery (cells, ratios, tables), not the numbers: XLA's own
# convolutions, which compile much faster (tests/conftest.py).
XLA_CONVOLUTIONS = True


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
    by_mode = {r.mode: r for r in results}
    for mode in ("eval", "apply", "frozen"):  # eval: prepared variables, apply: plain ones
        err = float(by_mode[mode].check.rsplit(" ", 1)[1])
        assert err < 1e-4, (mode, by_mode[mode].check)

    epoch = by_mode["epoch"]
    assert epoch.images == 2 * bench.EPOCH_BATCHES_PER_EPOCH  # a whole epoch per timed call

    text = out.read_text()
    assert "| resnet18 | 2 | finetune |" in text
    # The machine line (cores, load average) that says how to read the ratios.
    assert "nproc" in text and "load average" in text


def _cell(bench, mode, torch_s, jax_s, check=""):
    return bench.Result(
        "resnet50", 16, 112, mode, torch_s, jax_s, 2.0, 9.0, 10, 20, check, torch_threads=2
    )


def test_cells_from_several_processes_pool_their_reps(bench):
    first = [
        _cell(bench, "eval", [1.0, 1.2], [0.5, 0.6], "logits rel err 1.0e-07"),
        _cell(bench, "finetune", [4.0], [4.0]),
    ]
    second = [
        _cell(bench, "eval", [1.1], [1.1], "logits rel err 3.0e-06"),
        _cell(bench, "finetune", [4.0], [5.0]),
    ]
    second[0].torch_mem, second[1].jax_first_s = 99, 11.0
    eval_cell, finetune = bench.merge_processes([first, second])

    assert eval_cell.torch_s == [1.0, 1.2, 1.1] and eval_cell.jax_s == [0.5, 0.6, 1.1]
    assert eval_cell.ratio == pytest.approx(1.1 / 0.6)  # medians over all the reps
    assert eval_cell.process_ratios == pytest.approx([1.1 / 0.55, 1.0])
    assert eval_cell.check == "logits rel err 3.0e-06"  # the worse agreement
    assert eval_cell.torch_mem == 99 and eval_cell.jax_mem == 20
    assert finetune.process_ratios == pytest.approx([1.0, 0.8])
    assert finetune.jax_first_s == 10.0 and finetune.check == ""

    text = bench.markdown(
        [eval_cell, finetune],
        {"nproc": "2"},
        {"command": "c", "size": 112, "reps": 1, "wall_s": 1.0, "processes": 2},
    )
    assert "| paired | processes |" in text
    assert "| 0.80-1.00 (median 0.90) |" in text
    assert "in 2 fresh processes" in text
    single = bench.markdown([first[0]], {}, {"command": "c", "size": 112, "reps": 1, "wall_s": 1})
    assert "processes |" not in single  # one process: the table keeps its columns

    with pytest.raises(ValueError, match="different cells"):
        bench.merge_processes([first, second[:1]])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--processes", "0"], "at least 1"),
        (["--processes", "2", "--in-process"], "drop --in-process"),
    ],
)
def test_processes_option_errors(bench, argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_quick_defaults_yield_to_explicit_options(bench):
    """`--quick --reps 5` times 5 reps (it once silently timed 2), and a quick run never
    overwrites the checked-in RESULTS.md unless --out names it."""
    quick = bench.parse_args(["--quick"])
    assert (quick.archs, quick.batch, quick.reps) == (["resnet18"], [16], 2)
    assert quick.out == BENCH.with_name("RESULTS-quick.md")
    named = bench.parse_args(["--quick", "--reps", "5", "--batch", "8", "32"])
    assert (named.batch, named.reps) == ([8, 32], 5)
    full = bench.parse_args([])
    assert (full.batch, full.reps) == (list(bench.DEFAULT_BATCHES), bench.DEFAULT_REPS)
    assert full.out == BENCH.with_name("RESULTS.md")
    assert bench.parse_args(["--quick", "--out", "x.md"]).out == Path("x.md")


def test_processes_run_each_case_in_fresh_processes(bench, tmp_path):
    out = tmp_path / "RESULTS.md"
    argv = ["--archs", "resnet18", "--batch", "2", "--size", "32", "--reps", "1"]
    argv += ["--modes", "eval", "--processes", "2", "--xla-flags", ""]
    argv += ["--torch-threads", "1", "--out", str(out)]
    (cell,) = bench.main(argv)

    assert (cell.arch, cell.batch, cell.mode) == ("resnet18", 2, "eval")
    assert len(cell.torch_s) == len(cell.jax_s) == len(cell.process_ratios) == 2
    assert all(r > 0 for r in cell.process_ratios)
    assert float(cell.check.rsplit(" ", 1)[1]) < 1e-4
    assert "| resnet18 | 2 | eval |" in out.read_text()


GPU = BENCH.with_name("gpu.py")


@pytest.fixture
def gpu(bench, monkeypatch):
    # gpu.py sets these with setdefault; keep them out of this pytest process.
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    spec = importlib.util.spec_from_file_location("jt_gpu_bench", GPU)
    module = importlib.util.module_from_spec(spec)
    sys.modules["jt_gpu_bench"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("jt_gpu_bench", None)


def test_gpu_script_counts_torchvisions_flops_and_knows_the_peaks(gpu):
    import torch
    import torchvision

    for arch, weights in (("resnet18", "ResNet18_Weights"), ("resnet50", "ResNet50_Weights")):
        net = getattr(torchvision.models, arch)()
        gmacs = getattr(torchvision.models, weights).IMAGENET1K_V1.meta["_ops"]
        flops = gpu.forward_flops(net, torch.zeros(1, 3, 224, 224))
        assert flops / 2e9 == pytest.approx(gmacs, abs=1e-3), arch  # torchvision counts MACs
        assert net.training  # the count leaves the mode as it was
    assert gpu.bf16_peak("NVIDIA H200") == gpu.bf16_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.bf16_peak("NVIDIA H100 PCIe") == 756.0
    assert gpu.bf16_peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.bf16_peak("Some Future GPU") is None


def test_gpu_script_runs_its_cells_on_the_cpu(gpu, tmp_path, torch_threads):
    """`--device cpu`, float32 (torch.compile is not exercised here: minutes on 2 cores)."""
    out = tmp_path / "RESULTS-gpu.md"
    argv = ["--device", "cpu", "--archs", "resnet18", "--batch", "2", "--size", "32"]
    argv += ["--reps", "1", "--steps", "2", "--modes", "eval", "finetune", "frozen"]
    argv += ["--precisions", "fp32", "--out", str(out)]
    cells = gpu.main(argv)

    modes = [(c.mode, c.precision) for c in cells]
    assert modes == [("eval", "fp32"), ("finetune", "fp32"), ("frozen", "fp32")]
    eval_cell, finetune, frozen = cells
    assert finetune.flops == 3 * eval_cell.flops > 0  # forward, input and weight gradients
    assert frozen.flops == eval_cell.flops  # the backbone's backward is not run
    for c in cells:
        assert len(c.torch_s) == len(c.jax_s) == 1
        assert c.torch_ips > 0 and c.jax_ips > 0 and c.tflops("jax") > 0
    # The same computation on both sides (a 32 px, batch-2 fine-tune step's first
    # loss is looser, 1.9e-4 measured: train-mode BatchNorm over 2 images at 1x1 in
    # layer4 amplifies rounding).
    for c, bound in zip(cells, (1e-4, 1e-3, 1e-4), strict=True):
        assert float(c.check.rsplit(" ", 1)[1]) < bound, c.check
    text = out.read_text()
    assert "| resnet18 | 2 | frozen | fp32 |" in text
    assert "not a measurement" in text  # a CPU run says it is only a check


CHECK = BENCH.with_name("gpu_check.py")


def test_gpu_check_runs_every_stage_on_the_cpu(tmp_path):
    """The one-shot GPU check, `--device cpu --quick`, as a fresh process (as on a GPU)."""
    import json
    import subprocess

    out = tmp_path / "check.md"
    argv = [sys.executable, str(CHECK), "--device", "cpu", "--quick", "--out", str(out)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    record = json.loads(out.with_suffix(".json").read_text())
    stages = {s["name"]: s for s in record["stages"]}
    assert list(stages) == ["devices", "parity", "cells", "loader"]
    for s in stages.values():
        assert s["status"] == "ok" and s["summary"] and s["seconds"] > 0, s
    parity = stages["parity"]["data"]
    assert [r["arch"] for r in parity["full_float32"]] == ["resnet50", "vgg16_bn"]
    assert all(r["eval_logits"] <= 1e-5 for r in parity["full_float32"])
    assert set(parity["default_precision_eval_logits"]) == {"resnet50", "vgg16_bn"}
    (cell,) = stages["cells"]["data"]["cells"]  # bf16 is left out on the CPU
    assert (cell["arch"], cell["mode"], cell["precision"]) == ("resnet50", "finetune", "fp32")
    assert cell["jax_ips"] > 0 and cell["torch_ips"] > 0 and cell["jax_tflops"] > 0
    loader = stages["loader"]["data"]
    assert loader["jtransfer"]["images_per_s"] > 0 and loader["torchvision"]["images_per_s"] > 0

    text = out.read_text()
    assert "not a measurement" in text and "finished" in text
    assert "host: " in text and "flax " in text and "torch " in text
    for i, name in enumerate(stages, 1):
        assert f"| {i} | {name} | ok |" in text and f"## {i}. {name}:" in text


@pytest.fixture
def gpu_check(monkeypatch, torch_threads):
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    spec = importlib.util.spec_from_file_location("jt_gpu_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["jt_gpu_check"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("jt_gpu_check", None)


def test_gpu_check_reports_a_failing_stage_and_runs_the_next(gpu_check, tmp_path, monkeypatch):
    out = tmp_path / "check.md"
    seen = []

    def broken(check):
        # The report on disk already says which stage is running: a run killed here keeps it.
        seen.append(out.read_text())
        raise RuntimeError("planted failure")

    def fine(check):
        return gpu_check.Outcome("ran after the failure", "details", {"x": 1})

    def missed(check):
        return gpu_check.Outcome("over the target", status="fail")

    def never(check):
        raise AssertionError("a stage over the budget must not run")

    stages = (
        gpu_check.Stage("broken", "raises", broken, (0, 0)),
        gpu_check.Stage("fine", "runs anyway", fine, (0, 0)),
        gpu_check.Stage("missed", "misses its target", missed, (0, 0)),
        gpu_check.Stage("huge", "needs more than the budget", never, (1e9, 1e9)),
    )
    monkeypatch.setattr(gpu_check, "STAGES", stages)
    results = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)])

    assert [r.status for r in results] == ["error", "ok", "fail", "skipped"]
    assert results[0].summary == "RuntimeError: planted failure"
    assert "planted failure" in results[0].details  # the traceback
    assert results[1].data == {"x": 1}
    assert "budget" in results[3].summary
    assert "| 1 | broken | running |" in seen[0] and "cut short during `broken`" in seen[0]

    text = out.read_text()
    assert "| 1 | broken | error |" in text and "| 2 | fine | ok |" in text
    assert "| 4 | huge | skipped |" in text and "finished" in text
    import json

    record = json.loads(out.with_suffix(".json").read_text())
    assert [s["status"] for s in record["stages"]] == ["error", "ok", "fail", "skipped"]


def test_loader_bench_tiny_run_writes_the_table(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "jt_loader_bench", BENCH.parent / "loader_bench.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["jt_loader_bench"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop("jt_loader_bench", None)
    out = tmp_path / "LOADER.md"
    argv = ["--images", "8", "--batch", "4", "--workers", "0", "1", "--reps", "1", "--big", "2"]
    cells, draft_rows = module.main([*argv, "--out", str(out)])
    assert {(c.mode, c.workers, c.variant) for c in cells} == {
        (m, w, v)
        for m in ("train", "eval")
        for w in (0, 1)
        for v in ("torch", "float32", "uint8", "uint8+cache")
    }
    assert all(c.ips[0] > 0 and c.rss[0] > 0 for c in cells)
    assert [r["mode"] for r in draft_rows] == ["train", "eval"]
    assert "| train | 1 |" in out.read_text() and "draft img/s" in out.read_text()


def test_grouped_layers_times_each_form_and_they_agree(capsys):
    spec = importlib.util.spec_from_file_location(
        "jt_grouped_layers", BENCH.parent / "grouped_layers.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--batch", "1", "--reps", "1", "--groups", "8", "--widths", "4", "--sizes", "9"]
    rows = module.main(argv)
    assert [(r["stride"], r["width"]) for r in rows] == [(1, 4), (2, 4)]
    times = ("taps_ms", "per_group_ms", "xla_ms", "torch_ms")
    assert all(r[t] > 0 for r in rows for t in times)
    assert all(r["rel_err"] < 2e-6 for r in rows)  # the forms are one convolution
    assert "| 8 | 9 | 32 (4) | 2 |" in capsys.readouterr().out


def test_grouped_backward_times_a_layer_and_its_reference_form_agrees():
    spec = importlib.util.spec_from_file_location(
        "jt_grouped_backward", BENCH.parent / "grouped_backward.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert all(ms > 0 for ms in module.time_layer(5, 128, 2, 1, 1))
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jtransfer.models import conv

    # The A/B's "before" form computes the same gradients as the current one, where the two
    # differ: narrow layers at stride 1 and 2, a wide layer at stride 2.
    rng = np.random.default_rng(0)
    cases = ((1, (2, 7, 7, 128)), (2, (2, 9, 9, 256)), (2, (2, 9, 9, 512)))
    for stride, shape in cases:
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        k = jnp.asarray(rng.standard_normal((3, 3, shape[3] // 32, shape[3])), jnp.float32)
        g = jnp.asarray(
            rng.standard_normal((2, *((7, 7) if stride == 1 else (5, 5)), shape[3])), jnp.float32
        )
        static = ((stride, stride), module.PAD, 32, None)
        # Jitted: one compile each instead of op-by-op dispatch of every small operation.
        ours_fn = jax.jit(functools.partial(conv._grouped_bwd, *static))
        before_fn = jax.jit(functools.partial(module.before_backward, *static))
        for ours, before in zip(ours_fn((x, k), g), before_fn((x, k), g), strict=True):
            err = float(jnp.abs(ours - before).max() / jnp.abs(before).max())
            assert err < 2e-6, err
