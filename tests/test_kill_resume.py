"""SIGKILL `python -m jtransfer finetune` at bad moments; the same command then ends bit-identical.

Each test runs the real CLI in a subprocess on a tiny ImageFolder tree (resnet18 from random
init, 32 px, 32 training images = 4 steps of 8 per epoch, 2 epochs, a checkpoint every few
steps), kills it with SIGKILL (no handler runs: a crash, an OOM kill, a lost machine) at a
chosen moment, restarts the same command, and compares every array of the final checkpoints
(params, batch_stats, optimizer state, step, PRNG key) bit for bit with an uninterrupted run
of the same command (one per configuration, shared by the tests: module-scoped fixtures).
Runs share compiled XLA programs through a JAX disk cache, so only the first of each
configuration compiles.

The moments: before any checkpoint exists, mid-step after one exists, while Orbax is writing a
checkpoint (its "<step>.orbax-checkpoint-tmp" directory exists), and on both sides of the
--unfreeze-after phase change.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from cli_subprocess import (
    assert_bit_identical,
    complete_steps,
    partial_saves,
    partial_step,
    python_m_jtransfer,
    run_and_sigkill,
    saved_state,
    subprocess_env,
)

from jtransfer import checkpoint, data

# Training machinery, not convolution numerics: XLA's own convolutions, which
# compile much faster (tests/conftest.py).
XLA_CONVOLUTIONS = True

# tensorstore may leave an asyncio callback behind when reading a checkpoint.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

STEPS_PER_EPOCH, EPOCHS = 4, 2
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
COMMON = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8"]
PLAIN = [*COMMON, "--epochs", str(EPOCHS), "--save-every", "2"]
# The backbone is frozen for epoch 1 (steps 0..3) and trains from step 4 on; checkpoints at
# 3 (frozen phase), 4 (end of epoch 1: unfrozen from here), 6 and 8.
UNFREEZE_STEP = STEPS_PER_EPOCH
UNFREEZE = [*COMMON, "--epochs", str(EPOCHS), "--save-every", "3"]
UNFREEZE += ["--freeze", "backbone", "--unfreeze-after", "1"]
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kill_resume")


@pytest.fixture(scope="module")
def env(workdir) -> dict[str, str]:
    return subprocess_env(workdir / "xla-cache")


@pytest.fixture(scope="module")
def dataset(workdir) -> Path:
    root = workdir / "data"
    data.make_demo_imagefolder(root / "train", n_per_class=16, size=40, seed=0)
    data.make_demo_imagefolder(root / "test", n_per_class=4, size=40, seed=1)
    return root


def finetune(dataset: Path, out: Path, config: list[str]) -> list:
    return ["finetune", "--data", dataset, *config, "--out", out]


def run_to_the_end(argv, env):
    run = python_m_jtransfer(argv, env, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    return run


@pytest.fixture(scope="module")
def reference(dataset, workdir, env) -> Path:
    """The --out directory of one uninterrupted run of PLAIN."""
    out = workdir / "reference"
    run_to_the_end(finetune(dataset, out, PLAIN), env)
    return out


@pytest.fixture(scope="module")
def reference_unfreeze(dataset, workdir, env) -> Path:
    """The --out directory of one uninterrupted run of UNFREEZE."""
    out = workdir / "reference-unfreeze"
    run_to_the_end(finetune(dataset, out, UNFREEZE), env)
    return out


def assert_same_end(out: Path, reference: Path) -> None:
    """The same checkpoints kept (latest and best), each bit-identical, with the same record."""
    steps = complete_steps(reference)
    assert steps[-1] == TOTAL_STEPS
    assert complete_steps(out) == steps
    assert partial_saves(out) == []
    for step in steps:
        assert_bit_identical(saved_state(out, step), saved_state(reference, step), f"step {step}")
        got, want = checkpoint.read_progress(out, step), checkpoint.read_progress(reference, step)
        for key in ("epoch", "phase", "loader"):
            assert got[key] == want[key], (step, key)
        # (train_loss / train_acc of an epoch resumed mid-way cover only its resumed part.)
        for key in ("test_acc", "test_loss"):
            assert got["metrics"][key] == want["metrics"][key], (step, key)


def test_killed_before_any_checkpoint_then_mid_step_ends_bit_identical(
    dataset, workdir, env, reference
):
    out = workdir / "mid-step"
    argv = finetune(dataset, out, PLAIN)

    # Killed while its first checkpoint is being written: no complete checkpoint exists.
    first = run_and_sigkill(argv, env, out, when=lambda: partial_saves(out))
    assert first.complete == [] and first.partial

    # The same command starts from scratch and says so. Killed mid-step, at a random moment
    # after its first checkpoint is complete.
    delay_s = random.uniform(0.0, 0.5)
    second = run_and_sigkill(argv, env, out, when=lambda: complete_steps(out), delay_s=delay_s)
    assert f"no complete checkpoint in {out} yet: starting from scratch" in second.stdout
    assert "resuming" not in second.stdout
    assert second.complete and second.complete[-1] < TOTAL_STEPS, delay_s

    # Resumed from the latest complete checkpoint, it ends where an uninterrupted run does.
    third = run_to_the_end(argv, env)
    assert f"resuming from step {second.complete[-1]} (" in third.stdout, delay_s
    assert_same_end(out, reference)


def test_killed_mid_save_falls_back_to_the_last_complete_checkpoint(
    dataset, workdir, env, reference
):
    out = workdir / "mid-save"
    argv = finetune(dataset, out, PLAIN)

    def writing_a_later_checkpoint() -> bool:
        done = complete_steps(out)
        return bool(done) and any(partial_step(p) > done[-1] for p in partial_saves(out))

    killed = run_and_sigkill(argv, env, out, when=writing_a_later_checkpoint)
    assert killed.partial, "the save finished in the milliseconds before SIGKILL landed"
    unfinished = max(partial_step(p) for p in killed.partial)
    last = killed.complete[-1]
    assert last < unfinished and unfinished not in checkpoint.checkpoint_steps(out)

    rerun = run_to_the_end(argv, env)
    assert f"resuming from step {last} (" in rerun.stdout
    # The killed run's lock was left behind; the rerun took it over (one writer per --out).
    assert "is no longer running (killed?); this one takes over its lock" in rerun.stderr
    assert not (out / checkpoint.WRITER_LOCK).exists()
    assert partial_saves(out) == []  # the temporary directory was cleaned up
    assert_same_end(out, reference)


def _parts(state: dict) -> dict[str, dict]:
    params = state["params"]
    return {
        "backbone": {k: v for k, v in params.items() if k != "fc"},
        "head": params["fc"],
        "batch_stats": state["batch_stats"],
    }


def _same(a, b) -> bool:
    import jax

    return all(
        np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_killed_on_both_sides_of_the_unfreeze_phase_change(
    dataset, workdir, env, reference_unfreeze
):
    out = workdir / "unfreeze"
    argv = finetune(dataset, out, UNFREEZE)

    # 1. Just before the phase change: killed right after the last frozen-phase checkpoint.
    first = run_and_sigkill(argv, env, out, when=lambda: 3 in complete_steps(out))
    assert first.complete == [3]
    assert checkpoint.read_progress(out, 3)["phase"] == "frozen"
    frozen = _parts(saved_state(out, 3))

    # 2. Resumed in the frozen phase; killed right after the first unfrozen-phase checkpoint,
    #    the one at the phase change (its next step trains the backbone).
    second = run_and_sigkill(argv, env, out, when=lambda: UNFREEZE_STEP in complete_steps(out))
    assert "resuming from step 3 (step 3 of epoch 1; frozen phase until step 4;" in second.stdout
    assert "unfreezing: from step 4 every layer trains" in second.stdout
    assert checkpoint.read_progress(out, UNFREEZE_STEP)["phase"] == "unfrozen"
    at_change = _parts(saved_state(out, UNFREEZE_STEP))
    # Step 3 was still frozen: the backbone and its BatchNorm statistics did not move.
    assert _same(at_change["backbone"], frozen["backbone"])
    assert _same(at_change["batch_stats"], frozen["batch_stats"])
    assert not _same(at_change["head"], frozen["head"])

    # 3. Resumed exactly at the phase change (the first unfrozen step runs in this process);
    #    killed right after a checkpoint inside the unfrozen phase.
    third = run_and_sigkill(argv, env, out, when=lambda: 6 in complete_steps(out))
    assert "resuming from step 4 (end of epoch 1; unfrozen phase since step 4;" in third.stdout
    assert checkpoint.read_progress(out, 6)["phase"] == "unfrozen"

    # 4. Resumed mid unfrozen phase, with the backbone's momentum restored.
    last = run_to_the_end(argv, env)
    assert "resuming from step 6 (step 2 of epoch 2; unfrozen phase since step 4;" in last.stdout
    assert_same_end(out, reference_unfreeze)
    final = _parts(saved_state(out, TOTAL_STEPS))
    assert not _same(final["backbone"], at_change["backbone"])  # it did unfreeze
    assert not _same(final["batch_stats"], at_change["batch_stats"])
