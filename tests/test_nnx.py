"""jtransfer.nnx: the Linen models, weights and recipes as NNX modules, ending where Linen ends.

Every comparison with the Linen path is bit for bit: the NNX module applies the same Linen
module to the same arrays, and its step reuses `jtransfer.train`'s loss and BatchNorm policy.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jtransfer as jt
import jtransfer.nnx as jnnx
from jtransfer import checkpoint, data, partition, train
from jtransfer.errors import ConfigError, PortingError

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
parity = pytest.importorskip("porting.parity")
import porting  # noqa: E402  (needs torch)

ARCH = "resnet18"
SIZE = 32
N = 4
CLASSES = 3
OPTIONS = dict(learning_rate=0.05, momentum=0.9, weight_decay=1e-3)

# The wrapper's plumbing, not convolution numerics (tests/test_parity.py has those):
# XLA's own convolutions, which compile much faster (tests/conftest.py).
XLA_CONVOLUTIONS = True


@pytest.fixture(scope="module")
def variables():
    return jt.models.random_variables(jt.models.create(ARCH, num_classes=CLASSES), SIZE, seed=1)


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [
        {
            "image": jnp.asarray(rng.standard_normal((N, SIZE, SIZE, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, CLASSES, N), jnp.int32),
        }
        for _ in range(3)
    ]


def leaves_equal(a, b) -> bool:
    """Same tree, and every leaf the same bits."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def stage_stats(batch_stats, stage: str):
    """The BatchNorm statistics of one stage ("stem", "layer1".."layer4")."""
    if stage == "stem":
        return {"bn1": batch_stats["bn1"]}
    return {k: v for k, v in batch_stats.items() if k.startswith(f"{stage}_")}


RECIPES = {
    # name: (rules, frozen_stages as the Linen step takes them)
    "full": lambda: (partition.finetune(ARCH), 0),
    "frozen_backbone": lambda: (
        partition.preset(ARCH, "head"),
        partition.frozen_prefix(ARCH, partition.preset(ARCH, "head")),
    ),
    "gradual_unfreeze": lambda: (
        partition.gradual_unfreeze(ARCH, 2),
        partition.frozen_prefix_schedule(ARCH, partition.gradual_unfreeze(ARCH, 2)),
    ),
}


# Each recipe through one of the two NNX entry points (each compile costs seconds).
VIA = {"full": "train_step", "frozen_backbone": "make_train_step", "gradual_unfreeze": "both"}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_three_sgd_momentum_steps_end_where_linen_ends(recipe, variables, batches):
    rules, frozen = RECIPES[recipe]()
    model = jt.models.create(ARCH, num_classes=CLASSES)
    tx = partition.make_optimizer(variables["params"], rules, **OPTIONS)
    state = train.create_train_state(model, variables, tx)
    step = train.make_train_step(model, tx, frozen_stages=frozen)
    module = jnnx.from_variables(ARCH, variables)
    optimizer = jnnx.make_optimizer(module, rules, **OPTIONS)
    bound = jnnx.make_train_step(module, optimizer, frozen_stages=frozen)
    during = []
    for i, batch in enumerate(batches):
        state, linen_metrics = step(state, batch)
        if VIA[recipe] == "make_train_step" or (VIA[recipe] == "both" and i % 2):
            metrics = bound(batch)
        else:
            metrics = jnnx.train_step(module, optimizer, batch, frozen_stages=frozen)
        assert leaves_equal(metrics, linen_metrics)
        during.append(jnnx.to_variables(module)["batch_stats"])

    assert int(optimizer.step[...]) == int(state.step) == 3
    got = jnnx.to_variables(module)
    assert leaves_equal(got["params"], state.params)  # bit-identical, not merely close
    assert leaves_equal(got["batch_stats"], state.batch_stats)
    # The optimizer states hold the same arrays (frozen labels: none at all).
    assert leaves_equal(jax.tree.leaves(nnx.as_pure(optimizer.opt_state)),
                        jax.tree.leaves(state.opt_state))  # fmt: skip

    initial = variables["batch_stats"]
    if recipe == "frozen_backbone":
        # Every BatchNorm is in the frozen prefix: statistics untouched, bit for bit.
        assert leaves_equal(got["batch_stats"], initial)
        backbone = [k for k in variables["params"] if k != "fc"]
        assert leaves_equal([got["params"][k] for k in backbone],
                            [variables["params"][k] for k in backbone])  # fmt: skip
    if recipe == "gradual_unfreeze":
        # Frozen for steps 0 and 1, every stage trains from step 2.
        for stage in ("stem", "layer1", "layer4"):
            assert leaves_equal(stage_stats(during[1], stage), stage_stats(initial, stage))
            assert not leaves_equal(stage_stats(during[2], stage), stage_stats(initial, stage))


def test_a_frozen_stage_keeps_its_statistics_while_the_rest_train(variables, batches):
    rules = partition.rules(ARCH, default=1.0, stem="frozen", layer1="frozen")
    frozen = partition.frozen_prefix(ARCH, rules)
    module = jnnx.from_variables(ARCH, variables)
    optimizer = jnnx.make_optimizer(module, rules, **OPTIONS)
    jnnx.train_step(module, optimizer, batches[0], frozen_stages=frozen)
    got = jnnx.to_variables(module)["batch_stats"]
    assert frozen == 2
    for stage in ("stem", "layer1"):
        assert leaves_equal(stage_stats(got, stage), stage_stats(variables["batch_stats"], stage))
    assert not leaves_equal(stage_stats(got, "layer2"),
                            stage_stats(variables["batch_stats"], "layer2"))  # fmt: skip


def test_eval_logits_and_stage_features_equal_torchvision_as_linen_does():
    net = parity.torch_model(ARCH)  # random weights, randomised BatchNorm, eval mode
    module = jnnx.from_torchvision(net.state_dict(), ARCH)
    module.eval()
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    want = parity.torch_stage_outputs(net, ARCH, torch.from_numpy(x).permute(0, 3, 1, 2))
    logits, maps = module(jnp.asarray(x)), module.feature_maps(jnp.asarray(x))
    assert parity.rel_err(logits, want["fc"]) <= 1e-5
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        assert parity.rel_err(maps[stage], want[stage]) <= 1e-5, stage

    linen, variables = module.linen, jnnx.to_variables(module)
    assert np.array_equal(logits, linen.apply(variables, x))
    assert np.array_equal(module.features(x), linen.apply(variables, x, method=linen.features))


def test_train_and_eval_switch_batchnorm_as_nnx_modules_do(variables, batches):
    module = jnnx.from_variables(ARCH, variables)
    x = batches[0]["image"]
    linen = module.linen
    assert not module.use_running_average  # new modules train, as torch's and NNX's do

    module.eval()
    assert module.use_running_average
    assert np.array_equal(module(x), linen.apply(variables, x))
    assert leaves_equal(jnnx.to_variables(module), variables)

    module.train()
    want, updates = linen.apply(variables, x, train=True, mutable=["batch_stats"])
    assert np.array_equal(module(x), want)
    assert leaves_equal(jnnx.to_variables(module)["batch_stats"], updates["batch_stats"])


def test_eval_step_is_the_linen_eval_step(variables, batches):
    module = jnnx.from_variables(ARCH, variables)  # in training mode: eval_step ignores it
    got = jnnx.eval_step(module, batches[0])
    assert leaves_equal(got, train.make_eval_step(module.linen)(variables, batches[0]))
    assert leaves_equal(jnnx.to_variables(module), variables)


def test_checkpoint_resumes_bit_identical_and_exports_to_torchvision(tmp_path, variables, batches):
    rules = partition.gradual_unfreeze(ARCH, 1)  # the resume crosses the phase change
    frozen = partition.frozen_prefix_schedule(ARCH, rules)

    def fresh():
        module = jnnx.from_variables(ARCH, variables)
        return module, jnnx.make_optimizer(module, rules, **OPTIONS)

    module, optimizer = fresh()
    meta = {"arch": ARCH, "num_classes": CLASSES}
    with checkpoint.Checkpointer(tmp_path / "run", metadata=meta) as ckpt:
        for batch in batches[:2]:
            jnnx.train_step(module, optimizer, batch, frozen_stages=frozen)
        ckpt.save(jnnx.training_state(module, optimizer), epoch=1, force=True)
        ckpt.wait_until_finished()
        jnnx.train_step(module, optimizer, batches[2], frozen_stages=frozen)  # uninterrupted

        resumed, resumed_opt = fresh()
        target = checkpoint.abstract_state(jnnx.training_state(resumed, resumed_opt))
        restored = ckpt.restore_latest(target)
    assert restored.step == 2
    jnnx.load_training_state(resumed, resumed_opt, restored.state)
    jnnx.train_step(resumed, resumed_opt, batches[2], frozen_stages=frozen)
    assert leaves_equal(jnnx.training_state(resumed, resumed_opt),
                        jnnx.training_state(module, optimizer))  # fmt: skip

    # The checkpoint alone exports: torchvision loads it strictly.
    _, saved, _ = checkpoint.load_for_inference(tmp_path / "run")
    net = torchvision.models.resnet18(num_classes=CLASSES)
    net.load_state_dict(porting.to_torchvision(saved, ARCH), strict=True)
    fc = net.fc.weight.detach().numpy()
    assert np.array_equal(fc, np.asarray(saved["params"]["fc"]["kernel"]).T)


def test_a_state_from_other_rules_is_refused(variables):
    module = jnnx.from_variables(ARCH, variables)
    saved = jnnx.training_state(module, jnnx.make_optimizer(module, partition.finetune(ARCH),
                                                            **OPTIONS))  # fmt: skip
    other = jnnx.make_optimizer(module, partition.preset(ARCH, "head"), **OPTIONS)
    with pytest.raises(ConfigError, match="same rules and options"):
        jnnx.load_training_state(module, other, saved)


def test_import_leaves_torch_out():
    code = "import sys, jtransfer.nnx; print(json.dumps('torch' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", f"import json; {code}"], capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert json.loads(out.stdout) is False
    assert jt.nnx is jnnx  # also reachable as a lazy submodule of jtransfer


def test_mistakes_get_errors_that_say_what_to_do(variables):
    with pytest.raises(ConfigError, match="unknown architecture 'resnet19'"):
        jnnx.create("resnet19", num_classes=2)
    with pytest.raises(ConfigError, match="do not fit the model"):
        jnnx.from_variables("resnet34", variables)
    with pytest.raises(ConfigError, match="from_variables needs"):
        jnnx.from_variables(ARCH, variables["params"])
    with pytest.raises(PortingError, match="missing"):
        jnnx.from_torchvision({}, ARCH)
    module = jnnx.from_variables(ARCH, variables)
    with pytest.raises(ConfigError, match="jtransfer.nnx.Model"):
        jnnx.make_optimizer(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), partition.finetune(ARCH),
                            learning_rate=0.1)  # fmt: skip
    optimizer = jnnx.make_optimizer(module, partition.finetune(ARCH), learning_rate=0.1)
    batch = {"image": jnp.zeros((2, SIZE, SIZE, 3)), "label": jnp.zeros(2, jnp.int32)}
    with pytest.raises(ConfigError, match="bn_policy"):
        jnnx.train_step(module, optimizer, batch, bn_policy="eval")
    with pytest.raises(ConfigError, match="frozen_stages=6"):
        jnnx.train_step(module, optimizer, batch, frozen_stages=6)
    with pytest.raises(ConfigError, match="nnx.Optimizer"):
        jnnx.train_step(module, optimizer.tx, batch)


def test_example_fine_tunes_prints_each_epoch_and_exports(tmp_path, capsys):
    root = tmp_path / "data"
    data.make_demo_imagefolder(root / "train", ("cat", "dog"), 4, size=48, seed=0)
    data.make_demo_imagefolder(root / "test", ("cat", "dog"), 2, size=48, seed=1)
    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    path = Path(__file__).resolve().parent.parent / "examples" / "nnx_finetune.py"
    spec = importlib.util.spec_from_file_location("nnx_finetune", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    exported = tmp_path / "out.pth"
    argv = ["--data", str(root), "--weights", str(weights), "--epochs", "2",
            "--image-size", "32", "--batch-size", "4", "--freeze-backbone",
            "--export", str(exported)]  # fmt: skip
    assert example.main(argv) == 0
    out = capsys.readouterr().out
    assert "frozen prefix: 5 stages" in out
    assert "epoch 1: train loss" in out and "epoch 2: train loss" in out and "test loss" in out
    net = torchvision.models.resnet18(num_classes=2)
    net.load_state_dict(torch.load(exported, weights_only=True), strict=True)
    # Only fc trained: the backbone is the checkpoint's, bit for bit.
    original = torch.load(weights, weights_only=True)
    assert torch.equal(net.layer1[0].conv1.weight, original["layer1.0.conv1.weight"])
    assert torch.equal(net.bn1.running_mean, original["bn1.running_mean"])


def test_benchmark_script_runs_and_compares_the_same_steps(capsys):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "nnx_vs_linen.py"
    spec = importlib.util.spec_from_file_location("nnx_vs_linen", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--batch", "2", "--size", "32", "--reps", "1", "--modes", "frozen", "eval"]
    results = bench.main(argv)
    assert sorted(results) == ["eval", "frozen"]
    for r in results.values():
        assert len(r["linen"]["steps"]) == len(r["nnx"]["steps"]) == 1
    assert "nnx/linen" in capsys.readouterr().out
