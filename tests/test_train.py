"""jtransfer.train: the train step, its BatchNorm policy, freezing that skips work, sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jtransfer as jt
from jtransfer import partition, train
from jtransfer.errors import ConfigError, NonFiniteLossError
from jtransfer.models import conv

ARCH = "resnet18"
SIZE = 32
N = 4

# The train step's semantics, not convolution numerics: XLA's own convolutions,
# which compile much faster (tests/conftest.py). The two tests that count
# jtransfer's own convolution products turn them back on (`_jtransfer_convolutions`).
XLA_CONVOLUTIONS = True


@pytest.fixture
def _jtransfer_convolutions(monkeypatch):
    monkeypatch.delenv(conv.CONV_ENV, raising=False)


def randomized_variables(model, seed: int = 0):
    """Random weights, BatchNorm affine and statistics; no zeros (defaults hide bugs).

    Filled with numpy from the model's shapes, so no init has to compile.
    """
    rng = np.random.default_rng(seed)
    x = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)

    def fill(path, sds):
        name, shape = path[-1].key, sds.shape
        if name == "kernel":  # He-normal over the fan-in, as torchvision's convs
            std = np.sqrt(2 / np.prod(shape[:-1]))
            return rng.standard_normal(shape, np.float32) * np.float32(std)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 2.0, shape).astype(np.float32)
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(fill, dict(shapes))


@pytest.fixture(scope="module")
def model():
    return jt.models.create(ARCH, num_classes=3)


@pytest.fixture(scope="module")
def variables(model):
    return randomized_variables(model)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {
        "image": jnp.asarray(rng.standard_normal((N, SIZE, SIZE, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 3, N), jnp.int32),
    }


def stage_of(path: str) -> str:
    top = path.split("/")[0]
    return top.split("_")[0] if top.startswith("layer") else ("fc" if top == "fc" else "stem")


def by_stage(tree) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out.setdefault(stage_of("/".join(k.key for k in path)), []).append(np.asarray(leaf))
    return out


def identical(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def rel_err(a, b) -> float:
    """max|a - b| / max|b|, in float64; `b` is the reference."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def worst_rel_err(a, b) -> float:
    """The worst `rel_err` over the leaves of two pytrees of the same structure."""
    return max(rel_err(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_train_step_updates_state_and_reports_summable_metrics(model, variables, batch):
    tx = optax.sgd(1e-3)
    state0 = train.create_train_state(model, variables, tx)
    step = train.make_train_step(model, tx)  # summed loss, BN in training mode
    state, metrics = step(state0, batch)

    assert int(state.step) == 1
    assert int(metrics["count"]) == N and 0 <= int(metrics["correct"]) <= N
    # "sum" is d2l's l.sum(): the loss that was differentiated is the per-example sum.
    np.testing.assert_allclose(metrics["loss"], metrics["loss_sum"], rtol=1e-6)
    # Every stage trains: all running statistics moved.
    before, after = by_stage(variables["batch_stats"]), by_stage(state.batch_stats)
    assert all(not identical(before[s], after[s]) for s in before)
    # The state was donated; the caller's variables were copied, so they still work.
    assert state0.params["fc"]["kernel"].is_deleted()
    assert np.isfinite(np.asarray(variables["params"]["fc"]["kernel"])).all()
    summary = train.summarize([metrics, metrics])
    assert summary["count"] == 2 * N
    assert summary["loss"] == pytest.approx(float(metrics["loss_sum"]) / N, rel=1e-6)


def test_static_frozen_stages_keep_statistics_and_weights_and_zero_grads(model, variables, batch):
    tx = optax.sgd(1e-2)  # no weight decay: a zero gradient leaves a weight unchanged
    state = train.create_train_state(model, variables, tx)
    step = train.make_train_step(
        model, tx, loss_reduction="mean", frozen_stages=2, return_grads=True
    )
    state, metrics = step(state, batch)

    np.testing.assert_allclose(metrics["loss"], metrics["loss_sum"] / metrics["count"], rtol=1e-6)
    stats0, stats1 = by_stage(variables["batch_stats"]), by_stage(state.batch_stats)
    params0, params1 = by_stage(variables["params"]), by_stage(state.params)
    grads = by_stage(metrics["grads"])
    for s in ("stem", "layer1"):  # frozen: running statistics, no backward pass
        assert identical(stats0[s], stats1[s])
        assert identical(params0[s], params1[s])
        assert all(not g.any() for g in grads[s])
    for s in ("layer2", "layer3", "layer4"):
        assert not identical(stats0[s], stats1[s])
        assert all(g.any() for g in grads[s])


def test_bn_policy_frozen_uses_running_statistics_everywhere(model, variables, batch):
    tx = optax.sgd(1e-2)
    state = train.create_train_state(model, variables, tx)
    step = train.make_train_step(model, tx, bn_policy="frozen", return_grads=True)
    state, metrics = step(state, batch)

    assert identical(jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(state.batch_stats))
    # ResNet has no dropout, so the training forward is exactly the eval forward.
    logits = model.apply(variables, batch["image"], train=False)
    eval_loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).sum()
    np.testing.assert_allclose(metrics["loss"], eval_loss, rtol=1e-5)
    # ... and every parameter still trains (torch: BN modules in eval(), all requires_grad).
    assert all(g.any() for g in jax.tree.leaves(metrics["grads"]))


def heavy_ops(hlo: str) -> int:
    """Convolutions and matrix products: the 7x7 and stride-2 convs are XLA's
    convolutions, the 3x3 stride-1 ones 16 Winograd products each, 1x1 ones one
    product; backward passes are products (jtransfer.models.conv, .winograd); the
    head is a product."""
    return hlo.count("stablehlo.convolution") + hlo.count("stablehlo.dot_general")


@pytest.mark.usefixtures("_jtransfer_convolutions")
def test_static_freezing_removes_the_backward_convolutions(model, variables, batch):
    tx = optax.sgd(1e-3)
    state = train.create_train_state(model, variables, tx)
    forward_hlo = (
        jax.jit(lambda v, x: model.apply(v, x, train=False))
        .lower(variables, batch["image"])
        .as_text()
    )
    # conv1 + the 3 stride-2 block convolutions (each as `batch_parts` part-batch
    # ones on a multi-core CPU); of the 13 stride-1 3x3 ones, 10 are 16 Winograd
    # products each and layer4's 3 run on 1x1 maps at 32 px, one centre-tap product
    # each; the 3 downsample 1x1 convolutions one product each.
    assert SIZE == 32
    convs = 4 * conv.batch_parts(batch["image"].shape[0])
    assert forward_hlo.count("stablehlo.convolution") == convs
    assert heavy_ops(forward_hlo) == convs + 10 * 16 + 3 + 3 + 1  # ... plus the head
    counts = {
        k: heavy_ops(
            train.make_train_step(model, tx, frozen_stages=k).lower(state, batch).as_text()
        )
        for k in (0, 3, 5)
    }
    # Whole backbone frozen: the forward's convolutions and head product, plus one
    # product for the head's kernel gradient; no backward work in the backbone.
    assert counts[5] <= heavy_ops(forward_hlo) + 1
    assert counts[0] > counts[3] > counts[5]


def test_gradual_unfreeze_is_one_compilation(model, variables, batch):
    rules = partition.gradual_unfreeze(ARCH, frozen_steps=2, head_lr_mult=10.0)
    tx = partition.make_optimizer(variables["params"], rules, learning_rate=1e-2, momentum=0.9)
    step = train.make_train_step(
        model, tx, frozen_stages=partition.frozen_prefix_schedule(ARCH, rules)
    )
    state = train.create_train_state(model, variables, tx)
    stats0, params0 = by_stage(variables["batch_stats"]), by_stage(variables["params"])
    history = []
    for _ in range(3):
        state, _ = step(state, batch)
        history.append((by_stage(state.batch_stats), by_stage(state.params)))

    assert step._cache_size() == 1
    backbone = ("stem", "layer1", "layer2", "layer3", "layer4")
    for stats, params in history[:2]:  # steps 0 and 1: head only, BN on running statistics
        assert all(identical(stats0[s], stats[s]) for s in backbone)
        assert all(identical(params0[s], params[s]) for s in backbone)
        assert not identical(params0["fc"], params["fc"])
    stats, params = history[2]  # step 2: everything trains
    assert all(not identical(stats0[s], stats[s]) for s in backbone)
    assert all(not identical(params0[s], params[s]) for s in backbone)


def test_bfloat16_compute_keeps_float32_state(model, variables, batch):
    tx = optax.sgd(1e-3)
    step = train.make_train_step(model, tx, compute_dtype=jnp.bfloat16)
    state, metrics = step(train.create_train_state(model, variables, tx), batch)

    logits, _ = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
    loss32 = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).sum()
    np.testing.assert_allclose(metrics["loss"], loss32, rtol=5e-2)
    leaves = jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
    assert all(x.dtype == jnp.float32 for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))


def test_vgg_dropout_draws_from_the_state_rng():
    vgg = jt.models.create("vgg11", num_classes=2)  # dropout 0.5 in the classifier
    variables = randomized_variables(vgg)
    tx = optax.set_to_zero()
    step = train.make_train_step(vgg, tx, donate=False)
    x = {"image": jnp.ones((2, SIZE, SIZE, 3)), "label": jnp.array([0, 1], jnp.int32)}
    s0 = train.create_train_state(vgg, variables, tx, seed=0)
    s1 = train.create_train_state(vgg, variables, tx, seed=1)
    loss = {name: float(step(s, x)[1]["loss"]) for name, s in (("a", s0), ("b", s1))}
    assert float(step(s0, x)[1]["loss"]) == loss["a"]  # same rng and step: same mask
    assert loss["a"] != loss["b"]
    # The mask changes with the step too (fold_in(rng, step)).
    assert float(step(s0.replace(step=s0.step + 1), x)[1]["loss"]) != loss["a"]


def test_eval_step_matches_the_model(model, variables, batch):
    state = train.create_train_state(model, variables, optax.sgd(0.1))
    metrics = train.make_eval_step(model)(state, batch)
    logits = model.apply(variables, batch["image"])
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    np.testing.assert_allclose(metrics["loss"], per_example.mean(), rtol=1e-5)
    assert int(metrics["correct"]) == int((logits.argmax(-1) == batch["label"]).sum())
    # The eval step does not donate: the state is still usable.
    assert not state.params["fc"]["kernel"].is_deleted()


def test_check_finite_names_the_step_and_the_fix():
    train.check_finite({"loss": jnp.float32(1.5)}, 3)
    with pytest.raises(NonFiniteLossError, match=r"step 7.*learning rate"):
        train.check_finite({"loss": jnp.float32(np.nan)}, 7)
    with pytest.raises(FloatingPointError):
        train.check_finite({"loss": np.inf}, jnp.int32(0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"loss_reduction": "none"},
        {"bn_policy": "eval"},
        {"frozen_stages": True},
        {"frozen_stages": 6},  # the last stage holds the head
        {"frozen_stages": -1},
        {"frozen_stages": 2.0},
    ],
)
def test_bad_options_are_config_errors(model, kwargs):
    with pytest.raises(ConfigError):
        train.make_train_step(model, optax.sgd(0.1), **kwargs)


def test_variables_of_another_model_are_refused(variables):
    other = jt.models.create(ARCH, num_classes=10)
    with pytest.raises(ConfigError, match="fc/kernel"):
        train.create_train_state(other, variables, optax.sgd(0.1))


_DATA_PARALLEL = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    import jtransfer as jt
    from jtransfer import train
    from jtransfer.errors import ConfigError
    from tests.test_train import randomized_variables
    from tests.test_train import rel_err as rel, worst_rel_err as worst

    assert jax.device_count() == 2, jax.devices()
    model = jt.models.create("resnet18", num_classes=3)
    variables = randomized_variables(model)
    tx = optax.sgd(1e-3, momentum=0.9)
    mesh = train.data_parallel_mesh()
    opts = dict(loss_reduction="mean", return_grads=True)
    one = train.make_train_step(model, tx, **opts)
    two = train.make_train_step(model, tx, mesh=mesh, **opts)
    s1 = train.create_train_state(model, variables, tx)
    s2 = train.create_train_state(model, variables, tx, mesh=mesh)
    rng = np.random.default_rng(0)
    err = {}
    for i in range(3):
        batch = {"image": rng.standard_normal((8, 64, 64, 3)).astype(np.float32),
                 "label": rng.integers(0, 3, 8).astype(np.int32)}
        s1, m1 = one(s1, jax.tree.map(jnp.asarray, batch))
        sharded = train.shard_batch(batch, mesh)
        s2, m2 = two(s2, sharded)
        if i == 0:
            err["loss@1"] = rel(m2["loss"], m1["loss"])
            err["batch_stats@1"] = worst(s2.batch_stats, s1.batch_stats)
            err["head_grads@1"] = worst(m2["grads"]["fc"], m1["grads"]["fc"])
            err["head_params@1"] = worst(s2.params["fc"], s1.params["fc"])
    err["loss@3"] = rel(m2["loss"], m1["loss"])
    err["batch_stats@3"] = worst(s2.batch_stats, s1.batch_stats)
    delta = lambda s: jax.tree.map(lambda p, p0: np.asarray(p) - p0, s.params, variables["params"])
    err["updates@3"] = worst(delta(s2), delta(s1))
    kernel = s2.params["fc"]["kernel"]
    try:
        train.shard_batch({"image": np.zeros((3, 64, 64, 3)), "label": np.zeros(3)}, mesh)
        refused = False
    except ConfigError:
        refused = True
    print(json.dumps({
        "err": err,
        "batch_devices": len(sharded["image"].sharding.device_set),
        "batch_shard_rows": sharded["image"].addressable_shards[0].data.shape[0],
        "params_replicated": kernel.sharding.is_fully_replicated,
        "params_devices": len(kernel.sharding.device_set),
        "refused_odd_batch": refused,
    }))
    """
)


def run_on_two_cpu_devices(script: str, *, x64: bool = False) -> dict:
    """Runs `script` in a fresh process with 2 host devices; the JSON its last line prints.

    The host device count and x64 are fixed when jax initialises, hence the process.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_ENABLE_X64"] = "1" if x64 else "0"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_data_parallel_on_two_devices_matches_one_device():
    result = run_on_two_cpu_devices(_DATA_PARALLEL)
    err = result["err"]
    print("2 devices vs 1 device, relative errors:", err)
    assert result["batch_devices"] == 2 and result["batch_shard_rows"] == 4
    assert result["params_replicated"] and result["params_devices"] == 2
    assert result["refused_odd_batch"]
    # Only the order of the BatchNorm and gradient reductions differs (measured here:
    # ~1e-6 for the loss and statistics after 18 train-mode BatchNorms in float32).
    # Global BatchNorm statistics and an all-reduced gradient show in these:
    for key in ("loss@1", "batch_stats@1", "head_grads@1", "head_params@1"):
        assert err[key] <= 1e-5, (key, err)
    # Below the head, a ReLU input within rounding of 0 may switch sides between the
    # two runs and move some gradients by a few % (test_training_parity explains);
    # a sharding bug (per-device statistics, an unscaled gradient sum) moves the
    # updates by 100%.
    assert err["loss@3"] <= 1e-3 and err["batch_stats@3"] <= 1e-3, err
    assert err["updates@3"] <= 0.25, err


_DATA_PARALLEL_FLOAT64 = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    import jtransfer as jt
    from jtransfer import partition, train
    from tests.test_train import randomized_variables, worst_rel_err

    assert jax.device_count() == 2 and jax.config.jax_enable_x64
    model = jt.models.create("resnet18", num_classes=3, dtype=jnp.float64)
    to64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
    variables = to64(randomized_variables(model))
    # d2l's full fine-tune: BatchNorm in train mode everywhere, every parameter
    # trains (fc at 10x), coupled weight decay, summed loss; plus momentum.
    tx = partition.make_optimizer(
        variables["params"], partition.finetune("resnet18", head_lr_mult=10.0),
        learning_rate=1e-3, momentum=0.9, weight_decay=1e-3)
    mesh = train.data_parallel_mesh()
    opts = dict(loss_reduction="sum", bn_policy="train", return_grads=True)
    one = train.make_train_step(model, tx, **opts)
    two = train.make_train_step(model, tx, mesh=mesh, **opts)
    s1 = train.create_train_state(model, variables, tx)
    s2 = train.create_train_state(model, variables, tx, mesh=mesh)
    update = lambda s: jax.tree.map(lambda p, p0: np.asarray(p) - p0, s.params, variables["params"])
    rng = np.random.default_rng(0)
    steps = []
    for i in range(3):
        batch = {"image": rng.standard_normal((8, 64, 64, 3)),
                 "label": rng.integers(0, 3, 8).astype(np.int32)}
        s1, m1 = one(s1, jax.tree.map(jnp.asarray, batch))
        s2, m2 = two(s2, train.shard_batch(batch, mesh))
        steps.append({
            "loss": worst_rel_err(m2["loss"], m1["loss"]),
            "grads": worst_rel_err(m2["grads"], m1["grads"]),
            "params": worst_rel_err(s2.params, s1.params),
            "updates": worst_rel_err(update(s2), update(s1)),
            "batch_stats": worst_rel_err(s2.batch_stats, s1.batch_stats),
        })
    leaves = jax.tree.leaves((s2.params, s2.batch_stats, s2.opt_state, m2["grads"]))
    floating = {str(x.dtype) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}
    print(json.dumps({
        "steps": steps,
        "state_dtypes": sorted(floating),
        "loss_dtype": str(m2["loss"].dtype),
    }))
    """
)


def test_data_parallel_matches_one_device_exactly_in_float64():
    """In float64 no ReLU input lands within rounding of 0, so every quantity must agree.

    The float32 test above can hold the deep layers only to 0.25 (a pre-activation
    within rounding of 0 switches sides); here the loss, every gradient, every
    updated parameter (and its update) and every running statistic of a full
    fine-tune with train-mode BatchNorm agree within 1e-6 over 3 steps (issue #4),
    and all but the loss within 1e-10: the only difference left is the order of
    the cross-device reductions (measured ~1e-14).

    The loss: `train` computes it from float32 logits whatever the model's dtype,
    so its cross-device mean rounds in float32 (measured ~1e-7). Its gradient is
    per example and so comes out the same on both sides.
    """
    result = run_on_two_cpu_devices(_DATA_PARALLEL_FLOAT64, x64=True)
    steps = result["steps"]
    print("\nfloat64, 2 devices vs 1 device, relative errors per step:", steps, result)
    assert result["state_dtypes"] == ["float64"], result
    loss_bound = 1e-10 if result["loss_dtype"] == "float64" else 1e-6
    for i, step in enumerate(steps):
        for quantity, err in step.items():
            assert err <= 1e-6, (i + 1, quantity, steps)
            assert err <= (loss_bound if quantity == "loss" else 1e-10), (i + 1, quantity, steps)


@pytest.mark.usefixtures("_jtransfer_convolutions")
def test_frozen_params_drop_the_frozen_layers_gradient_work_and_change_nothing(
    model, variables, batch
):
    """A stage frozen by a rule, not a prefix (layer2 here), in a step that reads
    every gradient (return_grads; skip_nonfinite's check does too): frozen_params
    makes its gradient a constant zero, so its kernel-gradient products disappear,
    and the step's results are bit for bit those of the step without it."""
    rules = partition.rules(ARCH, default=1.0, layer2="frozen", fc=10.0)
    tx = partition.make_optimizer(variables["params"], rules, learning_rate=1e-2, momentum=0.9)
    mask = partition.frozen_params(variables["params"], rules)
    assert mask["layer2_0"]["conv1"]["kernel"] and not mask["layer3_0"]["conv1"]["kernel"]

    plain = train.make_train_step(model, tx, donate=False, return_grads=True)
    pruned = train.make_train_step(model, tx, donate=False, return_grads=True, frozen_params=mask)
    state = train.create_train_state(model, variables, tx)
    # layer2's kernel gradients: the stride-2 3x3 conv's 9 per-tap products, one
    # batched Winograd product for each of its 3 stride-1 3x3 convs, the 1x1 downsample's.
    assert (
        heavy_ops(plain.lower(state, batch).as_text())
        - heavy_ops(pruned.lower(state, batch).as_text())
        == 9 + 3 + 1
    )

    (s1, m1), (s2, m2) = plain(state, batch), pruned(state, batch)
    assert identical(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params))
    assert identical(jax.tree.leaves(s1.batch_stats), jax.tree.leaves(s2.batch_stats))
    assert identical(jax.tree.leaves(s1.opt_state), jax.tree.leaves(s2.opt_state))
    assert m1["loss"] == m2["loss"]
    frozen_grads = jax.tree.leaves(m2["grads"]["layer2_0"])
    assert all(not g.any() for g in frozen_grads)
    assert all(g.any() for g in jax.tree.leaves(m2["grads"]["layer1_0"]))  # gradient flows through
