"""jtransfer.partition: rules as data, checked coverage, torch-exact optimizers, one compile."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jtransfer as jt
from jtransfer import partition as P
from jtransfer.errors import ConfigError


@functools.cache
def abstract_params(arch: str, num_classes: int = 1000):
    model = jt.models.create(arch, num_classes=num_classes)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]


def paths_and_labels(params, rules):
    labels = P.label_params(params, rules)
    flat = jax.tree_util.tree_flatten_with_path(labels)[0]
    return {"/".join(k.key for k in path): lab for path, lab in flat}


def toy_params(seed: int = 0):
    """ResNet-named parameters small enough to compare against torch step by step."""
    rng = np.random.default_rng(seed)
    shapes = {
        "conv1": {"kernel": (3, 3, 2, 4)},
        "bn1": {"scale": (4,), "bias": (4,)},
        "layer1_0": {"conv1": {"kernel": (3, 3, 4, 4)}, "bn1": {"scale": (4,), "bias": (4,)}},
        "layer4_1": {"conv2": {"kernel": (1, 1, 4, 5)}},
        "fc": {"kernel": (5, 3), "bias": (3,)},
    }
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s), jnp.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def grad_fn(params):
    """A gradient that depends on the parameters, so any drift between the runs shows."""
    return jax.tree.map(lambda p: np.cos(3 * np.asarray(p)).astype(np.float32), params)


def flat(tree) -> dict[str, np.ndarray]:
    return {
        "/".join(k.key for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def run_optax(tx, params, steps):
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
    return params


# ---------------------------------------------------------------------------
# Groups and coverage, for every registered architecture.


@pytest.mark.parametrize("arch", jt.models.ARCHS)
def test_groups_are_the_family_stages_and_cover_every_param_once(arch):
    params = abstract_params(arch)
    named = P.groups(arch)
    assert tuple(named) == jt.models.family(arch).stages
    labels = paths_and_labels(params, P.rules(arch, default=1.0))
    # Every stage owns something; the stage of a path is the one its module says.
    assert set(labels.values()) == set(named)
    for path, stage in labels.items():
        module = path.split("/")[0]
        if module.startswith(("layer", "fc", "classifier")):
            assert module.split("_")[0] == stage
    for rules in (
        P.finetune(arch),
        P.preset(arch, "head"),
        P.preset(arch, "backbone"),
        P.preset(arch, "full"),
        P.layerwise(arch, 0.65),
        P.gradual_unfreeze(arch, 10),
    ):
        P.label_params(params, rules)  # raises unless every path matches exactly one rule


@pytest.mark.parametrize("arch", [a for a in jt.models.ARCHS if a.startswith("vgg")])
def test_vgg_blocks_end_at_torchvision_max_pools(arch):
    tv_vgg = pytest.importorskip("torchvision.models.vgg")
    # The `features` Sequential of torchvision's VGG, without building the classifier.
    cfg = {"11": "A", "13": "B", "16": "D", "19": "E"}[arch[3:5]]
    features = tv_vgg.make_layers(tv_vgg.cfgs[cfg], batch_norm=arch.endswith("_bn"))
    expected, block = {}, 1
    for idx, layer in enumerate(features):
        if layer.__class__.__name__ == "MaxPool2d":
            block += 1
        elif any(True for _ in layer.parameters()):
            expected[f"features_{idx}"] = f"block{block}"
    labels = paths_and_labels(abstract_params(arch), P.rules(arch, default=1.0))
    got = {p.split("/")[0]: lab for p, lab in labels.items() if p.startswith("features_")}
    assert got == expected


def test_resnet_stem_is_conv1_and_bn1():
    labels = paths_and_labels(abstract_params("resnet18"), P.rules("resnet18", default=1.0))
    assert sorted(p for p, lab in labels.items() if lab == "stem") == [
        "bn1/bias",
        "bn1/scale",
        "conv1/kernel",
    ]


def test_finetune_labels_only_the_head_as_head():
    for arch, head in (("resnet50", "fc"), ("vgg16_bn", "classifier_6")):
        labels = paths_and_labels(abstract_params(arch), P.finetune(arch))
        assert {p for p, lab in labels.items() if lab == "head"} == {
            f"{head}/kernel",
            f"{head}/bias",
        }


def test_uncovered_paths_are_listed_with_a_count_and_the_fix():
    with pytest.raises(ConfigError) as e:
        P.label_params(abstract_params("resnet18"), [("fc/.*", 10.0)])
    msg = str(e.value)
    assert "60 parameter(s) match no rule" in msg
    assert "conv1/kernel" in msg and "layer1_0/conv1/kernel" in msg
    assert "... and 40 more" in msg
    assert "Fix:" in msg and "partition.rules(arch" in msg


def test_overlapping_rules_are_an_error_not_first_match_wins():
    with pytest.raises(ConfigError) as e:
        P.label_params(abstract_params("resnet18"), [(".*", 1.0), ("fc/.*", 10.0)])
    msg = str(e.value)
    assert "2 parameter(s) match several rules" in msg
    assert "fc/kernel: rule 0 '.*', rule 1 'fc/.*'" in msg
    assert "no rule" not in msg


def test_regexes_fullmatch_the_path():
    # With re.search, "conv1/kernel" would also match "layer1_0/conv1/kernel".
    params = {"conv1": {"kernel": 0.0}, "layer1_0": {"conv1": {"kernel": 0.0}}}
    with pytest.raises(ConfigError, match="layer1_0/conv1/kernel"):
        P.label_params(params, [("conv1/kernel", 1.0)])


def test_bad_rules_and_specs_are_config_errors():
    params = abstract_params("resnet18")
    bad = [
        [("(", 1.0)],  # invalid regex
        [("fc/.*", "frozn"), ("(?!fc/).*", 1.0)],  # unknown shorthand
        [("fc/.*", P.Group("a", 1.0)), ("(?!fc/).*", P.Group("a", 2.0))],  # one label, two specs
        "fc/.*",  # not a list
    ]
    for rules in bad:
        with pytest.raises(ConfigError):
            P.label_params(params, rules)
    with pytest.raises(ConfigError, match='pass variables\\["params"\\]'):
        P.label_params({"params": params, "batch_stats": {}}, P.finetune("resnet18"))
    with pytest.raises(ConfigError, match="choose from"):
        P.rules("resnet18", layer9=1.0)
    with pytest.raises(ConfigError, match="unknown preset"):
        P.preset("resnet18", "everything")
    with pytest.raises(ConfigError):
        P.Group("x", lr_mult=-1.0)
    with pytest.raises(ConfigError):
        P.layerwise("resnet18", 1.5)


def test_shorthand_specs():
    assert P.as_group("frozen").is_frozen
    assert P.as_group(10.0) == P.Group("x10", 10.0)
    assert P.as_group(0.0).is_frozen  # a constant 0 multiplier is frozen
    assert not P.as_group(P.unfreeze_at(5)).is_frozen  # a schedule is not, statically
    r = P.rules("resnet18", default="frozen", layer4=1.0, fc=P.Group("head", 10.0))
    assert [g.name for _, g in r] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


def test_groups_given_the_same_group_share_a_label():
    body = P.Group("body", 1.0)
    r = P.rules("resnet18", default=body, fc=10.0)
    labels = paths_and_labels(abstract_params("resnet18"), r)
    assert set(labels.values()) == {"body", "fc"}


# ---------------------------------------------------------------------------
# Presets, layer decay, the table.


def test_layerwise_decay_values():
    r = P.layerwise("resnet18", 0.5)
    assert [(g.name, g.lr_mult) for _, g in r] == [
        ("stem", 0.5**5),
        ("layer1", 0.5**4),
        ("layer2", 0.5**3),
        ("layer3", 0.5**2),
        ("layer4", 0.5),
        ("fc", 1.0),
    ]
    vgg = {g.name: g.lr_mult for _, g in P.layerwise("vgg11", 0.8)}
    assert vgg == pytest.approx(
        {f"block{i}": 0.8 ** (6 - i) for i in range(1, 6)} | {"classifier": 1.0}
    )


def test_rules_table_for_the_d2l_recipe():
    table = P.rules_table(abstract_params("resnet18", 2), P.finetune("resnet18"))
    assert table == (
        "label     #tensors     #params  lr mult  frozen\n"
        "backbone        60  11,176,512        1  no\n"
        "head             2       1,026       10  no\n"
        "total           62  11,177,538"
    )


def test_rules_table_shows_frozen_and_schedules():
    params = abstract_params("resnet18", 2)
    lines = P.rules_table(params, P.preset("resnet18", "head")).splitlines()
    assert lines[1].split() == ["backbone", "60", "11,176,512", "-", "yes"]
    assert lines[2].split() == ["head", "2", "1,026", "1", "no"]
    lines = P.rules_table(params, P.gradual_unfreeze("resnet18", 100)).splitlines()
    assert lines[1].split() == ["backbone", "60", "11,176,512", "0", "(sched)", "at", "step", "0"]


# ---------------------------------------------------------------------------
# The optimizer: freezing, weight decay, multipliers.


def test_frozen_params_get_zero_updates_and_no_optimizer_state():
    params = toy_params()
    for optimizer, kw in (("sgd", dict(momentum=0.9)), ("adam", {}), ("adamw", {})):
        tx = P.make_optimizer(
            params, P.preset("resnet18", "head"), learning_rate=0.1, optimizer=optimizer, **kw
        )
        state = tx.init(params)
        shapes = sorted(x.shape for x in jax.tree.leaves(state) if x.ndim)
        per_head = [(3,), (5, 3)]
        assert shapes == sorted(per_head * (1 if optimizer == "sgd" else 2)), optimizer
        assert len(state.inner_states["backbone"].inner_state) == 0  # EmptyState
        updates, _ = tx.update(grad_fn(params), state, params)
        for path, u in flat(updates).items():
            assert (u == 0).all() == (not path.startswith("fc/")), path


def test_weight_decay_never_touches_frozen_leaves():
    params = toy_params()
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    for rules in (P.preset("resnet18", "head"), P.gradual_unfreeze("resnet18", 3)):
        for optimizer in ("sgd", "adam", "adamw"):
            tx = P.make_optimizer(
                params, rules, learning_rate=0.1, optimizer=optimizer, weight_decay=0.5
            )
            updates, _ = tx.update(zero_grads, tx.init(params), params)
            for path, u in flat(updates).items():
                assert (u == 0).all() == (not path.startswith("fc/")), (optimizer, path)


def test_group_weight_decay_overrides_the_default():
    params = toy_params()
    rules = [("(?!fc/).*", P.Group("body")), ("fc/.*", P.Group("head", weight_decay=0.0))]
    tx = P.make_optimizer(params, rules, learning_rate=0.1, weight_decay=0.5)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    u, p = flat(updates), flat(params)
    assert (u["fc/kernel"] == 0).all()
    np.testing.assert_allclose(u["conv1/kernel"], -0.1 * 0.5 * p["conv1/kernel"], rtol=1e-6)


def test_head_update_is_exactly_ten_times_the_body_update():
    params = {"conv1": {"kernel": jnp.ones((4,))}, "fc": {"kernel": jnp.ones((4,))}}
    g = jnp.asarray([0.5, -1.0, 2.0, 3e-3])
    tx = P.make_optimizer(params, P.finetune("resnet18"), learning_rate=0.01)
    updates, _ = tx.update({"conv1": {"kernel": g}, "fc": {"kernel": g}}, tx.init(params), params)
    body, head = updates["conv1"]["kernel"], updates["fc"]["kernel"]
    np.testing.assert_array_equal(body, np.float32(-0.01) * g)
    np.testing.assert_allclose(head, 10 * body, rtol=1e-7)


def test_optimizer_argument_errors():
    params = toy_params()
    rules = P.finetune("resnet18")
    for kw in (
        dict(optimizer="rmsprop"),
        dict(optimizer="adam", momentum=0.9),
        dict(nesterov=True),
        dict(b1=0.9),
        dict(weight_decay=-1.0),
    ):
        with pytest.raises(ConfigError):
            P.make_optimizer(params, rules, learning_rate=0.1, **kw)


# ---------------------------------------------------------------------------
# torch.optim parity.


def torch_run(params, labels, lr_mult, steps, *, lr, make, frozen_steps=0, body="backbone"):
    """The same run with a torch optimizer, one param group per label."""
    torch = pytest.importorskip("torch")
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in flat(params).items()}
    by_label = {}
    for k, lab in flat(labels).items():
        by_label.setdefault(str(lab), []).append(tensors[k])
    opt = make([{"params": ps, "lr": lr * lr_mult[lab]} for lab, ps in by_label.items()])
    body_keys = {k for k, lab in flat(labels).items() if str(lab) == body}
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        for k, t in tensors.items():
            if step >= frozen_steps or k not in body_keys:  # requires_grad=False: grad stays None
                t.grad = torch.from_numpy(np.cos(3 * t.detach().numpy()).astype(np.float32))
        opt.step()
    return {k: t.detach().numpy() for k, t in tensors.items()}


def assert_close(jax_params, torch_params, atol=1e-6):
    got = flat(jax_params)
    assert got.keys() == torch_params.keys()
    for k in got:
        np.testing.assert_allclose(got[k], torch_params[k], rtol=0, atol=atol, err_msg=k)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("steps", [1, 5])
def test_sgd_matches_torch_with_param_groups(steps, nesterov):
    torch = pytest.importorskip("torch")
    params = toy_params()
    rules = P.layerwise("resnet18", 0.5)
    mults = {g.name: g.lr_mult for _, g in rules}
    tx = P.make_optimizer(
        params, rules, learning_rate=0.05, momentum=0.9, nesterov=nesterov, weight_decay=1e-4
    )
    expected = torch_run(
        params,
        P.label_params(params, rules),
        mults,
        steps,
        lr=0.05,
        make=lambda g: torch.optim.SGD(
            g, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=1e-4
        ),
    )
    assert_close(run_optax(tx, params, steps), expected)


def test_d2l_recipe_matches_torch_sgd():
    torch = pytest.importorskip("torch")
    params = toy_params(1)
    rules = P.finetune("resnet18")
    tx = P.make_optimizer(params, rules, learning_rate=5e-2, weight_decay=1e-3)
    expected = torch_run(
        params,
        P.label_params(params, rules),
        {"backbone": 1.0, "head": 10.0},
        4,
        lr=5e-2,
        make=lambda g: torch.optim.SGD(g, lr=5e-2, weight_decay=1e-3),
    )
    assert_close(run_optax(tx, params, 4), expected)


# optax computes Adam's bias corrections in float32, torch in float64: 1 - 0.999 differs
# by 1.3e-5 relative, so steps differ by ~6e-6 relative. A small lr keeps that below 1e-6.
ADAM_LR = 1e-3


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_and_adamw_match_torch(optimizer):
    torch = pytest.importorskip("torch")
    params = toy_params(2)
    rules = P.finetune("resnet18")
    wd = 1e-2
    tx = P.make_optimizer(
        params, rules, learning_rate=ADAM_LR, optimizer=optimizer, weight_decay=wd
    )
    cls = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
    expected = torch_run(
        params,
        P.label_params(params, rules),
        {"backbone": 1.0, "head": 10.0},
        5,
        lr=ADAM_LR,
        make=lambda g: cls(g, lr=ADAM_LR, weight_decay=wd),
    )
    assert_close(run_optax(tx, params, 5), expected)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_gradual_unfreeze_matches_torch_requires_grad_phases(optimizer):
    """Frozen steps leave the body's state untouched: unfreezing = torch's first step."""
    torch = pytest.importorskip("torch")
    params = toy_params(3)
    rules = P.gradual_unfreeze("resnet18", frozen_steps=3, head_lr_mult=10.0, body_lr_mult=0.5)
    if optimizer == "sgd":
        lr, kw = 0.05, dict(momentum=0.9, weight_decay=1e-4)
        make = lambda g: torch.optim.SGD(g, lr=lr, **kw)  # noqa: E731
    else:
        lr, kw = ADAM_LR, dict(optimizer="adam", weight_decay=1e-4)
        make = lambda g: torch.optim.Adam(g, lr=lr, weight_decay=1e-4)  # noqa: E731
    tx = P.make_optimizer(params, rules, learning_rate=lr, **kw)
    expected = torch_run(
        params,
        P.label_params(params, rules),
        {"backbone": 0.5, "head": 10.0},
        7,
        lr=lr,
        make=make,
        frozen_steps=3,
    )
    assert_close(run_optax(tx, params, 7), expected)


# ---------------------------------------------------------------------------
# Schedules: one compile across freeze -> unfreeze.


def test_schedule_multipliers_compile_once_across_the_phase_change():
    params = toy_params()
    rules = P.gradual_unfreeze("resnet18", frozen_steps=3)
    tx = P.make_optimizer(params, rules, learning_rate=0.1, momentum=0.9, weight_decay=1e-4)
    prefix = P.frozen_prefix_schedule("resnet18", rules)
    traces = []

    @jax.jit
    def step(params, state, grads, n):
        traces.append(1)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates, prefix(n)

    state = tx.init(params)
    structure = jax.tree.structure(state)
    for n in range(6):
        params, state, updates, frozen_stages = step(params, state, grad_fn(params), n)
        assert jax.tree.structure(state) == structure
        u = flat(updates)
        body_moved = any((v != 0).any() for k, v in u.items() if not k.startswith("fc/"))
        assert body_moved == (n >= 3), n
        assert (u["fc/kernel"] != 0).all()
        assert int(frozen_stages) == (5 if n < 3 else 0)
    assert len(traces) == 1
    assert step._cache_size() == 1


def test_any_learning_rate_schedule_and_callable_optimizer():
    params = toy_params()
    base = optax.cosine_decay_schedule(0.1, 10)
    head_mult = optax.linear_schedule(1.0, 10.0, 4)
    rules = [("(?!fc/).*", 1.0), ("fc/.*", P.Group("head", head_mult))]
    g = grad_fn(params)
    for optimizer in ("sgd", "adam", "adamw", lambda lr: optax.sgd(lr, momentum=0.5)):
        tx = P.make_optimizer(params, rules, learning_rate=base, optimizer=optimizer)
        state = tx.init(params)
        for _ in range(3):
            updates, state = tx.update(g, state, params)
        assert all(np.isfinite(v).all() and (v != 0).any() for v in flat(updates).values())
    # Plain SGD: the head's step-n lr is base(n) * head_mult(n), the body's base(n).
    tx = P.make_optimizer(params, rules, learning_rate=base)
    state = tx.init(params)
    for n in range(3):
        updates, state = tx.update(g, state, params)
        u = flat(updates)
        np.testing.assert_allclose(u["fc/bias"], -base(n) * head_mult(n) * g["fc"]["bias"], 1e-6)
        np.testing.assert_allclose(u["bn1/bias"], -base(n) * g["bn1"]["bias"], 1e-6)


# ---------------------------------------------------------------------------
# Rules -> the model's frozen_stages.


@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn"])
def test_frozen_prefix(arch):
    assert P.frozen_prefix(arch, P.preset(arch, "head")) == 5
    assert P.frozen_prefix(arch, P.preset(arch, "full")) == 0
    assert P.frozen_prefix(arch, P.preset(arch, "backbone")) == 0
    assert P.frozen_prefix(arch, P.finetune(arch)) == 0
    assert P.frozen_prefix(arch, P.gradual_unfreeze(arch, 10)) == 0  # not statically frozen
    stages = list(P.groups(arch))
    frozen_two = P.rules(arch, default=1.0, **{stages[0]: "frozen", stages[1]: 0.0})
    assert P.frozen_prefix(arch, frozen_two) == 2
    hole = P.rules(arch, default=1.0, **{stages[1]: "frozen"})  # only a leading run counts
    assert P.frozen_prefix(arch, hole) == 0


def test_frozen_prefix_schedule_follows_staggered_unfreezing():
    r = P.rules(
        "resnet18",
        default=P.Group("body", P.unfreeze_at(30)),
        layer3=P.unfreeze_at(20),
        layer4=P.unfreeze_at(10),
        fc=10.0,
    )
    f = jax.jit(P.frozen_prefix_schedule("resnet18", r))
    assert [int(f(s)) for s in (0, 9, 10, 19, 20, 29, 30)] == [5, 5, 4, 4, 3, 3, 0]
    assert P.frozen_prefix("resnet18", r) == 0
