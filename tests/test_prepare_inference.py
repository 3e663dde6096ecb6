"""jtransfer.models.prepare_inference: Winograd kernel transforms computed once for inference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jtransfer as jt
from jtransfer.errors import ConfigError
from jtransfer.models import conv, winograd

PREPARED = conv.PREPARED


def _winograd_kernels(arch: str, params) -> dict[str, np.ndarray]:
    """The 3x3 kernels of the layers that convolve by Winograd (stride 1, >= 8 inputs)."""
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path[:-1]): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if path[-1].key == "kernel" and leaf.ndim == 4
    }
    stride2 = {"layer2_0/conv1", "layer3_0/conv1", "layer4_0/conv1"}  # ResNet-18's 3x3/2 layers
    return {
        name: k
        for name, k in flat.items()
        if k.shape[:2] == (3, 3) and k.shape[2] >= 8 and name not in stride2
    }


def _prepared_kernels(prepared) -> dict[str, np.ndarray]:
    out = {}
    for path, points in jax.tree_util.tree_flatten_with_path(
        prepared[PREPARED], is_leaf=lambda t: isinstance(t, tuple)
    )[0]:
        assert len(points) == 16
        out["/".join(str(k.key) for k in path[:-2])] = np.stack(points)
    return out


@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn"])
def test_prepared_variables_give_the_same_bits_in_eval_mode(arch):
    model = jt.models.create(arch, num_classes=5)
    variables = jt.models.random_variables(model, image_size=32, seed=3)
    prepared = jt.models.prepare_inference(model, variables)

    # One transform per Winograd layer, G K G^T of that layer's kernel; nothing else added.
    assert set(prepared) == {"params", "batch_stats", PREPARED}
    expected = _winograd_kernels(arch, variables["params"])
    got = _prepared_kernels(prepared)
    assert set(got) == set(expected) and len(got) == {"resnet18": 13, "vgg11_bn": 7}[arch]
    for name, u in got.items():
        np.testing.assert_array_equal(u, winograd.kernel_transform(jnp.asarray(expected[name])))
    assert prepared["params"] is variables["params"]

    x = np.random.default_rng(0).standard_normal((3, 40, 40, 3)).astype(np.float32)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False, method="feature_maps"))
    plain, fast = apply(variables, x), apply(prepared, x)
    for name in plain:
        np.testing.assert_array_equal(np.asarray(fast[name]), np.asarray(plain[name]), err_msg=name)


def test_init_variables_hold_no_prepared_kernels():
    model = jt.models.create("resnet18", num_classes=2)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    assert set(shapes) == {"params", "batch_stats"}


def test_gradients_through_prepared_variables_are_refused():
    model = jt.models.create("resnet18", num_classes=2)
    variables = jt.models.random_variables(model, image_size=32)
    prepared = jt.models.prepare_inference(model, variables)
    x = np.ones((2, 32, 32, 3), np.float32)

    def loss(v):
        return model.apply(v, x, train=False).sum()

    # The refusal comes while tracing: tracing alone shows it, and that the parameters
    # themselves still differentiate (their gradients' values are the training tests').
    with pytest.raises(ConfigError, match="for inference only.*before prepare_inference"):
        jax.eval_shape(jax.grad(loss), prepared)
    grads = jax.eval_shape(jax.grad(loss), variables)
    assert jax.tree.structure(grads) == jax.tree.structure(variables)
    kernel = grads["params"]["layer1_0"]["conv1"]["kernel"]
    assert kernel.shape == variables["params"]["layer1_0"]["conv1"]["kernel"].shape


def test_preparing_again_follows_new_parameters():
    model = jt.models.create("resnet18", num_classes=2)
    old = jt.models.random_variables(model, image_size=32, seed=0)
    new = jt.models.random_variables(model, image_size=32, seed=1)
    stale = jt.models.prepare_inference(model, old)
    fresh = jt.models.prepare_inference(model, {**stale, "params": new["params"]})
    x = np.ones((2, 32, 32, 3), np.float32)
    np.testing.assert_array_equal(
        model.apply(fresh, x, train=False),
        model.apply({**old, "params": new["params"]}, x, train=False),
    )


def test_no_preparation_where_no_layer_runs_winograd(monkeypatch):
    variables = jt.models.random_variables(jt.models.create("resnet18"), image_size=32)
    half = jt.models.create("resnet18", dtype=jnp.bfloat16)  # Winograd is float32/64 only
    assert set(jt.models.prepare_inference(half, variables)) == {"params", "batch_stats"}
    model = jt.models.create("resnet18")
    assert PREPARED in jt.models.prepare_inference(model, variables)
    monkeypatch.setenv(conv.CONV_ENV, "xla")  # read when traced: not a stale cached trace
    assert set(jt.models.prepare_inference(model, variables)) == {"params", "batch_stats"}


def test_prepared_kernels_that_do_not_fit_say_what_to_do(monkeypatch):
    model = jt.models.create("resnet18", num_classes=2)
    variables = jt.models.random_variables(model, image_size=32)
    prepared = jt.models.prepare_inference(model, variables)
    x = np.ones((1, 32, 32, 3), np.float32)

    wrong = jax.tree.map(lambda u: u[:, :-1], prepared[PREPARED])
    with pytest.raises(ConfigError, match=r"layer1_0/conv1.*\(64, 63\).*16 points.*prepare_"):
        model.apply({**prepared, PREPARED: wrong}, x, train=False)

    monkeypatch.setenv(conv.CONV_ENV, "xla")  # prepared under auto, used under xla
    with pytest.raises(ConfigError, match="does not run by Winograd here.*prepare the variables"):
        model.apply(prepared, x, train=False)


def test_something_other_than_variables_is_refused_with_the_fix():
    model = jt.models.create("resnet18", num_classes=2)
    variables = jt.models.random_variables(model, image_size=32)
    with pytest.raises(ConfigError, match=r"needs the model's variables.*keys \['bn1', 'conv1'"):
        jt.models.prepare_inference(model, variables["params"])  # params alone
    with pytest.raises(ConfigError, match=r"got a list.*state.params"):
        jt.models.prepare_inference(model, [variables])


def test_features_and_predict_match_plain_apply():
    model = jt.models.create("resnet18", num_classes=3)
    variables = jt.models.random_variables(model, image_size=32, seed=2)
    x = np.random.default_rng(1).standard_normal((4, 32, 32, 3)).astype(np.float32)
    maps = jax.jit(lambda v, x: model.apply(v, x, train=False, method="feature_maps"))
    plain = maps(variables, x)
    feats = jt.features.extract(model, variables, x, stages=("layer4", "prelogits"))
    np.testing.assert_array_equal(feats["layer4"], np.asarray(plain["layer4"]))
    logits = jt.fit.predict(model, variables, x)
    np.testing.assert_allclose(logits, np.asarray(plain["fc"]), rtol=0, atol=0)


def test_eval_step_takes_prepared_variables():
    import optax

    model = jt.models.create("resnet18", num_classes=3)
    variables = jt.models.random_variables(model, image_size=32, seed=4)
    state = jt.train.create_train_state(model, variables, optax.sgd(0.1))
    rng = np.random.default_rng(2)
    batch = {
        "image": rng.standard_normal((4, 32, 32, 3)).astype(np.float32),
        "label": np.array([0, 2, 1, 2], np.int32),
    }
    step = jt.train.make_eval_step(model)
    on_state = step(state, batch)
    prepared = jt.models.prepare_inference(model, variables)
    on_prepared = step(prepared, batch)
    for name in ("loss", "loss_sum", "correct", "count"):
        np.testing.assert_array_equal(np.asarray(on_prepared[name]), np.asarray(on_state[name]))
    # The prepared call read the points: wrong ones change the loss.
    broken = jax.tree.map(lambda u: u * 2.0, prepared[PREPARED])
    off = step({**prepared, PREPARED: broken}, batch)
    assert float(off["loss"]) != float(on_state["loss"])
    with pytest.raises(ConfigError, match=r"got \[.*'conv1'.*'params': params"):
        step(variables["params"], batch)
