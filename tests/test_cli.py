"""`python -m jtransfer finetune | predict | export`, end to end on tiny generated data."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_subprocess import assert_bit_identical, python_m_jtransfer, saved_state, subprocess_env

from jtransfer import checkpoint, cli, data, train

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from porting.parity import randomize_batchnorm  # noqa: E402

# Training machinery, not convolution numerics: XLA's own convolutions, which
# compile much faster (tests/conftest.py).
XLA_CONVOLUTIONS = True

# Tiny but real: 16 training images in 4 steps of 4, 8 test images, 32x32 crops.
TRAIN_ARGS = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--epochs", "3"]
TOTAL_STEPS = 12


def run_cli(*argv: str) -> tuple[int, str, str]:
    """cli.main in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def dataset(workdir) -> Path:
    root = workdir / "data"
    data.make_demo_imagefolder(root / "train", n_per_class=8, size=40, seed=0)
    data.make_demo_imagefolder(root / "test", n_per_class=4, size=40, seed=1)
    return root


@pytest.fixture(scope="module")
def weights(workdir) -> Path:
    """A torchvision resnet18 with random weights and randomised BatchNorm statistics."""
    torch.manual_seed(0)
    path = workdir / "resnet18-random.pth"
    torch.save(randomize_batchnorm(torchvision.models.resnet18()).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weights_safetensors(weights) -> Path:
    """The same tensors as safetensors: loading them needs no torch import (faster runs)."""
    from safetensors.torch import save_file

    path = weights.with_suffix(".safetensors")
    save_file(torch.load(weights, weights_only=True), path)
    return path


def finetune_argv(dataset: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--data", dataset, "--weights", weights, *TRAIN_ARGS, "--out", out, *extra]


@pytest.fixture(scope="module")
def finetuned(dataset, weights, workdir) -> tuple[Path, str]:
    """One uninterrupted `python -m jtransfer finetune` run: its --out directory and stdout."""
    out = workdir / "run"
    env = subprocess_env(workdir / "xla-cache")
    run = python_m_jtransfer(finetune_argv(dataset, weights, out), env, timeout=600)
    assert run.returncode == 0, run.stderr
    return out, run.stdout


def test_finetune_trains_and_leaves_a_self_contained_checkpoint(finetuned, dataset):
    out, stdout = finetuned
    assert "resnet18, 2 classes (hotdog, not-hotdog)" in stdout
    assert "fc` was re-initialised" in stdout  # the 1000-class head was replaced
    for epoch in (1, 2, 3):
        assert f"epoch {epoch}/3:" in stdout
    assert "done:" in stdout and "python -m jtransfer predict --checkpoint" in stdout
    assert checkpoint.checkpoint_steps(out)[-1] == TOTAL_STEPS
    meta = checkpoint.read_metadata(out)
    assert meta["arch"] == "resnet18" and meta["classes"] == ["hotdog", "not-hotdog"]
    assert meta["image_size"] == 32


def test_predict_prints_path_class_and_probability(finetuned, dataset):
    out, _ = finetuned
    images = sorted((dataset / "test" / "hotdog").iterdir())[:2]
    code, stdout, stderr = run_cli("predict", "--checkpoint", out, *images)
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 2
    for line, image in zip(lines, images, strict=True):
        path, label, prob = line.split("\t")
        assert path == str(image)
        assert label in ("hotdog", "not-hotdog")
        assert 0.5 <= float(prob) <= 1.0


def test_predict_reports_an_unreadable_image_and_classifies_the_rest(finetuned, dataset, tmp_path):
    out, _ = finetuned
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    good = next((dataset / "test" / "hotdog").iterdir())
    code, stdout, stderr = run_cli("predict", "--checkpoint", out, bad, good)
    assert code == 1
    assert len(stdout.strip().splitlines()) == 1 and str(good) in stdout
    reading, error = stderr.strip().splitlines()
    assert re.fullmatch(rf"reading step \d+ of {re.escape(str(out))} \(the best .*\)", reading)
    assert "broken.jpg" in error and "it was left out" in error
    assert "skip_bad_images" not in error and "--skip-bad-images" not in error


def test_export_loads_strictly_into_torchvision_with_the_same_logits(finetuned, dataset, tmp_path):
    out, _ = finetuned
    pth = tmp_path / "model.pth"
    code, stdout, stderr = run_cli("export", "--checkpoint", out, "--which", "latest", "--out", pth)
    assert code == 0, stderr
    assert "hotdog, not-hotdog" in stdout
    assert json.loads(pth.with_suffix(".json").read_text())["classes"] == ["hotdog", "not-hotdog"]

    net = torchvision.models.resnet18(num_classes=2)
    net.load_state_dict(torch.load(pth, weights_only=True), strict=True)
    net.eval()
    model, variables, meta = checkpoint.load_for_inference(out, "latest")
    image = data.load_image(next((dataset / "test" / "not-hotdog").iterdir()))
    x = data.eval_transform(image, resize_size=tuple(meta["resize_size"]), crop_size=32)[None]
    jax_logits = np.asarray(model.apply(variables, x, train=False))
    with torch.no_grad():
        torch_logits = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(jax_logits, torch_logits, atol=1e-4, rtol=0)


def test_rerunning_a_finished_run_resumes_and_has_nothing_to_do(finetuned, dataset, weights):
    out, _ = finetuned
    code, stdout, _ = run_cli(*finetune_argv(dataset, weights, out))
    assert code == 0
    assert f"resuming from step {TOTAL_STEPS}" in stdout and "nothing to do" in stdout


def test_resuming_with_other_options_is_refused(finetuned, dataset, weights):
    out, _ = finetuned
    code, stdout, stderr = run_cli(*finetune_argv(dataset, weights, out, "--lr", "0.5"))
    assert code == 1
    assert stderr.count("\n") == 1
    assert "different run" in stderr and "lr: saved 0.001, now 0.5" in stderr
    assert "epoch" not in stdout


def test_help_speaks_pytorch():
    code, stdout, _ = run_cli("finetune", "--help")
    assert code == 0
    stdout = " ".join(stdout.split())
    for text in (
        "requires_grad = False",
        "--freeze backbone",
        "param groups",
        "--head-lr-mult",
        "torch.optim.SGD",
        "resuming from step",
        "130",
        "--unfreeze-after",
        "fine_tune(epochs, freeze_epochs=2)",
        "--skip-nonfinite",
        "GradScaler",
    ):
        assert text in stdout
    code, stdout, _ = run_cli("--help")
    assert code == 0 and "Exit codes" in stdout


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["finetune"],  # --data is required
        ["finetune", "--data", "x", "--arch", "resnet19"],
        ["finetune", "--data", "x", "--epochs", "two"],
        ["predict", "--checkpoint", "x"],  # no images
        ["export", "--checkpoint", "x"],  # no --out
        ["train"],
    ],
)
def test_usage_errors_exit_2(argv):
    code, _, stderr = run_cli(*argv)
    assert code == 2
    assert "usage:" in stderr


def _one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_missing_data_dir_exits_1_with_one_line(tmp_path):
    code, stdout, stderr = run_cli("finetune", "--data", tmp_path / "nope", "--out", tmp_path)
    assert code == 1
    line = _one_line_error(stderr)
    assert "nope does not exist" in line and "train/ and test/" in line


def test_data_without_test_split_exits_1(tmp_path):
    data.make_demo_imagefolder(tmp_path / "d" / "train", n_per_class=1, size=16)
    code, _, stderr = run_cli("finetune", "--data", tmp_path / "d", "--out", tmp_path / "o")
    assert code == 1
    assert "must hold train/ and test/ (or val/)" in _one_line_error(stderr)


def test_mismatched_classes_exit_1_naming_them(tmp_path):
    data.make_demo_imagefolder(tmp_path / "d" / "train", ["cat", "dog"], n_per_class=1, size=16)
    data.make_demo_imagefolder(tmp_path / "d" / "val", ["cat", "emu"], n_per_class=1, size=16)
    code, _, stderr = run_cli("finetune", "--data", tmp_path / "d", "--out", tmp_path / "o")
    assert code == 1
    line = _one_line_error(stderr)
    assert "['dog']" in line and "['emu']" in line


def test_unwritable_out_exits_1_before_training(dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, stdout, stderr = run_cli(
        "finetune", "--data", dataset, "--weights", "none", *TRAIN_ARGS, "--out", blocker / "out"
    )
    assert code == 1
    assert "cannot write checkpoints" in _one_line_error(stderr)
    assert "epoch" not in stdout


def test_bad_freeze_and_missing_checkpoint_exit_1(dataset, tmp_path):
    code, _, stderr = run_cli(
        "finetune", "--data", dataset, "--freeze", "layer2", "--out", tmp_path / "o"
    )
    assert code == 1 and "must be the first ones" in _one_line_error(stderr)
    code, _, stderr = run_cli("predict", "--checkpoint", tmp_path / "none", "x.jpg")
    assert code == 1 and "does not exist" in _one_line_error(stderr)


@pytest.mark.parametrize(
    ("freeze", "labels"),
    [
        (["none"], {"backbone": False, "head": False}),
        (["backbone"], {"backbone": True, "head": False}),
        (["stem", "layer1"], {"frozen": True, "backbone": False, "head": False}),
    ],
)
def test_freeze_options_become_rules(freeze, labels):
    from jtransfer import partition

    rules = cli.freeze_rules("resnet18", freeze, 10.0)
    groups = {g.name: g for _, g in rules}
    assert {name: g.is_frozen for name, g in groups.items()} == labels
    assert groups["head"].lr_mult == 10.0
    partition.label_params(partition._abstract_params("resnet18"), rules)  # covers all once
    expected_prefix = {"none": 0, "backbone": 5, "layer1": 2}[freeze[-1]]
    assert partition.frozen_prefix("resnet18", rules) == expected_prefix


@pytest.mark.parametrize(
    ("freeze", "label", "prefix"), [(["backbone"], "backbone", 5), (["stem"], "frozen", 1)]
)
def test_unfreeze_after_puts_the_frozen_label_on_a_schedule(freeze, label, prefix):
    from jtransfer import fit

    rules = cli.freeze_rules("resnet18", freeze, 10.0, unfreeze_step=8)
    groups = {g.name: g for _, g in rules}
    # The same labels as the frozen run, but one optimizer state for both phases.
    assert list(groups) == [g.name for _, g in cli.freeze_rules("resnet18", freeze, 10.0)]
    assert not any(g.is_frozen for g in groups.values())
    assert [float(groups[label].mult_at(s)) for s in (0, 7, 8, 50)] == [0, 0, 1, 1]
    assert groups["head"].lr_mult == 10.0
    # One compilation: the frozen prefix is a function of the step.
    frozen_stages = fit.frozen_stages_for("resnet18", rules)
    assert [int(frozen_stages(s)) for s in (0, 7, 8, 50)] == [prefix, prefix, 0, 0]


@pytest.mark.parametrize(
    ("freeze", "unfreeze_step", "phases"),
    [
        (["backbone"], 4, ["frozen", "frozen", "unfrozen", "unfrozen"]),
        (["backbone"], None, ["frozen"] * 4),
        (["none"], None, ["unfrozen"] * 4),
    ],
)
def test_each_checkpoint_records_the_phase_of_the_next_step(freeze, unfreeze_step, phases):
    hooks = cli._CheckpointHooks(
        None, cli._SignalStop(), frozen=freeze != ["none"], unfreeze_step=unfreeze_step
    )
    assert [hooks.phase(step) for step in (0, 3, 4, 9)] == phases


def test_divergence_stops_keeping_the_last_good_checkpoint_then_skip_nonfinite_resumes(
    dataset, weights_safetensors, tmp_path
):
    """A non-finite state is never saved; rerun with --skip-nonfinite, such steps change nothing."""
    out = tmp_path / "out"
    argv = finetune_argv(dataset, weights_safetensors, out, "--freeze", "backbone")
    argv += ["--lr", "1e30", "--save-every", "1", "--epochs", "1"]  # the head overflows
    code, _, stderr = run_cli(*argv)
    assert code == 1
    line = _one_line_error(stderr)
    found = re.search(r"(training loss is nan at step|the update of step) (\d+)", line)
    assert found and "lower it" in line, line
    bad_step = int(found.group(2))
    # Checkpoint N holds the state after N steps: the last one is from before the bad step.
    assert checkpoint.checkpoint_steps(out) == [bad_step]
    good = saved_state(out, bad_step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(good))

    code, stdout, stderr = run_cli(*argv, "--skip-nonfinite", "2")
    assert f"resuming from step {bad_step} " in stdout
    assert code == 1
    line = _one_line_error(stderr).lower()
    assert f"2 steps in a row had a non-finite loss, gradient or update (steps {bad_step}.." in line
    assert f"the state is the one before step {bad_step}" in line
    # The skipped steps were saved (--save-every 1) and left the model as it was.
    latest = checkpoint.checkpoint_steps(out)[-1]
    assert latest > bad_step
    assert_bit_identical(saved_state(out, latest)["params"], good["params"])


def test_max_skips_default_is_the_library_default():
    from jtransfer import fit

    assert cli.DEFAULT_MAX_SKIPS == fit.MAX_CONSECUTIVE_SKIPS


def test_a_signal_during_training_saves_then_stops(tmp_path):
    """The first SIGTERM is a flag; the next step end saves a checkpoint and stops training."""
    ckpt = checkpoint.Checkpointer(tmp_path, best_metric=None)
    with cli._SignalStop() as stopper:
        hooks = cli._CheckpointHooks(ckpt, stopper)
        hooks.steps_per_epoch = 10

        class Info:
            epoch, index, step = 0, 2, 3
            metrics = {"loss": jnp.float32(0.5)}

            @staticmethod
            def loader_state():
                return b'{"next_batch": 3}'

        state = train.TrainState(
            step=jnp.asarray(3, jnp.int32),
            params={"fc": {"kernel": jnp.ones((4, 2))}},
            batch_stats={},
            opt_state=(),
            rng=jax.random.PRNGKey(0),
        )
        hooks.on_step_end(state, Info)  # no signal yet: nothing saved (no interval)
        assert ckpt.all_steps() == []
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert stopper.signum == signal.SIGTERM
        with pytest.raises(cli._Stopped):
            hooks.on_step_end(state, Info)
    assert signal.getsignal(signal.SIGTERM) is not stopper._handle
    restored = ckpt.restore_latest(checkpoint.abstract_state(state))
    assert restored.step == 3 and restored.loader_state == b'{"next_batch": 3}'
    ckpt.close()


# ---------------------------------------------------------------------------
# Library errors told in the command line's terms


def _args(command: str, tmp_path: Path, **kw):
    import argparse

    base = {"command": command, "arch": "resnet18", "out": str(tmp_path / "out")}
    if command == "finetune":
        base.update(data=str(tmp_path / "data"), skip_bad_images=False)
    return argparse.Namespace(**{**base, **kw})


def _raised(call) -> Exception:
    try:
        call()
    except Exception as e:  # noqa: BLE001 - what the library raises is the input here
        return e
    raise AssertionError("no error")


def _bad_image(tmp_path: Path) -> Exception:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    return _raised(lambda: data.load_image(bad))


def _one_image_folder(tmp_path: Path) -> Exception:
    root = tmp_path / "tiny"
    data.make_demo_imagefolder(root, n_per_class=1, size=16, seed=0)
    return _raised(lambda: data.make_loader(data.ImageFolder(root), batch_size=8, train=True))


def _full_disk(tmp_path: Path, monkeypatch) -> Exception:
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=1, keep_best=1)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: usage._replace(free=1000))
    try:
        return _raised(lambda: ckpt.check_space({"w": np.zeros(1000, np.float32)}))
    finally:
        monkeypatch.undo()
        ckpt.close()


def _training_checkpoint(tmp_path: Path) -> Exception:
    import porting

    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"fc.bias": torch.zeros(2)}}, path)
    return _raised(lambda: porting.from_torchvision(path, "resnet18"))


def _weights_missing(tmp_path: Path) -> Exception:
    import porting

    return _raised(lambda: porting.load_pretrained("resnet18", str(tmp_path / "missing.pth")))


def _server_down(tmp_path: Path, monkeypatch) -> Exception:
    import porting

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("JTRANSFER_WEIGHTS_BASE_URL", (tmp_path / "down").as_uri())
    return _raised(lambda: porting.load_pretrained("resnet18", "IMAGENET1K_V1", progress=False))


@pytest.mark.parametrize(
    ("make", "command", "says", "not_says"),
    [
        (_bad_image, "finetune", ["add --skip-bad-images"], ["skip_bad_images"]),
        (_bad_image, "predict", ["broken.jpg", "it was left out"], ["skip"]),
        (_one_image_folder, "finetune", ["has 2 training images", "--batch-size 2 or less"],
         ["drop_remainder", "batch_size"]),
        (_full_disk, "finetune", ["--keep-best 1", "choose another --out"],
         ["max_to_keep", "keep_best"]),
        (_training_checkpoint, "finetune", ["pass --weights weights.pth"], ["Pass checkpoint"]),
        (_server_down, "finetune", ["pass --weights /path/to/resnet18-f37072fd.pth",
                                    "local copy with --weights PATH"], ["weights='"]),
        (_weights_missing, "finetune", ["Check the --weights path"], ["pass a state_dict"]),
    ],
    ids=["bad-image-finetune", "bad-image-predict", "smaller-than-a-batch", "disk-full",
         "training-checkpoint", "weights-server-down", "weights-missing"],
)  # fmt: skip
def test_library_fixes_are_told_as_flags(make, command, says, not_says, tmp_path, monkeypatch):
    import inspect

    from jtransfer import _cliutil

    params = inspect.signature(make).parameters
    error = make(tmp_path, monkeypatch) if len(params) == 2 else make(tmp_path)
    text = _cliutil.user_message(error, _args(command, tmp_path))
    assert text is not None, str(error)
    for needle in says:
        assert needle in text, (needle, text)
    for needle in not_says:
        assert needle not in text, (needle, text)


def test_bfloat16_and_precision_flags_train_and_are_part_of_the_run(dataset, weights, workdir):
    out = workdir / "bf16"
    argv = finetune_argv(dataset, weights, out, "--compute-dtype", "bfloat16")
    argv += ["--precision", "highest"]
    argv[argv.index("--epochs") + 1] = "1"
    code, stdout, stderr = run_cli(*argv)
    assert code == 0, stderr
    assert "epoch 1/1:" in stdout
    config = checkpoint.read_metadata(out)["config"]
    assert config["compute_dtype"] == "bfloat16" and config["precision"] == "highest"
    # Resuming at another compute dtype would not continue the same run: refused.
    argv[argv.index("bfloat16")] = "float32"
    code, _, stderr = run_cli(*argv)
    assert code != 0 and "compute_dtype: saved 'bfloat16', now None" in stderr, stderr


def test_default_dtype_and_precision_leave_the_config_as_before(finetuned):
    # Runs written before these flags existed (no such keys) still resume.
    out, _ = finetuned
    config = checkpoint.read_metadata(out)["config"]
    assert "compute_dtype" not in config and "precision" not in config


def test_the_nonfinite_advice_names_the_compute_dtype_flag():
    import argparse

    from jtransfer import _cliutil, train
    from jtransfer.errors import NonFiniteLossError

    e = NonFiniteLossError(f"the training loss is nan at step 3. {train.NONFINITE_ADVICE}")
    text = _cliutil.user_message(e, argparse.Namespace(command="finetune"))
    assert "--compute-dtype float32" in text and "compute_dtype=None" not in text
