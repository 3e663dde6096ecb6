"""jtransfer.heads: a new head (Xavier weight, zero bias), source rows, the whole VGG classifier."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jtransfer as jt
from jtransfer.errors import ConfigError
from jtransfer.heads import head_name, replace_head
from jtransfer.models.layers import head_init

HOTDOG = 934  # torchvision's ImageNet class order (MXNet Gluon's is 713)


@functools.cache
def abstract_variables(arch: str, num_classes: int):
    model = jt.models.create(arch, num_classes=num_classes)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def resnet_head_variables(seed: int = 0):
    """A resnet18-shaped head with random source weights, plus a stand-in body."""
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "conv1": {"kernel": jnp.ones((7, 7, 3, 64))},
            "fc": {
                "kernel": jnp.asarray(rng.normal(size=(512, 1000)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=(1000,)), jnp.float32),
            },
        },
        "batch_stats": {"bn1": {"mean": jnp.zeros(64), "var": jnp.ones(64)}},
    }


def vgg_classifier_variables(seed: int = 0):
    """VGG-named classifier layers, narrow (the real classifier_0 is 25088 x 4096)."""
    rng = np.random.default_rng(seed)

    def dense(n_in, n_out):
        return {
            "kernel": jnp.asarray(rng.normal(size=(n_in, n_out)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(n_out,)), jnp.float32),
        }

    return {
        "params": {
            "features_0": {"kernel": jnp.ones((3, 3, 3, 8)), "bias": jnp.zeros(8)},
            "classifier_0": dense(72, 16),
            "classifier_3": dense(16, 16),
            "classifier_6": dense(16, 1000),
        }
    }


@pytest.mark.parametrize("arch", jt.models.ARCHS)
def test_new_head_fits_the_model_for_num_classes(arch):
    """Shapes only (eval_shape): the result is the variables of create(arch, num_classes=2)."""
    source = abstract_variables(arch, 1000)
    for whole in (False, True):
        got = jax.eval_shape(
            lambda v, w=whole: replace_head(v, arch, 2, whole_classifier=w), source
        )
        assert got == abstract_variables(arch, 2)
    model = jt.models.create(arch, num_classes=2)
    logits = jax.eval_shape(model.apply, got, jnp.zeros((1, 32, 32, 3)))
    assert logits.shape == (1, 2)


def test_head_name():
    assert {a: head_name(a) for a in ("resnet18", "resnet152", "vgg11", "vgg19_bn")} == {
        "resnet18": "fc",
        "resnet152": "fc",
        "vgg11": "classifier_6",
        "vgg19_bn": "classifier_6",
    }
    with pytest.raises(ConfigError, match="unknown architecture"):
        head_name("alexnet")


def test_xavier_uniform_weight_and_zero_bias():
    new = replace_head(resnet_head_variables(), "resnet18", 2, seed=3)
    fc = new["params"]["fc"]
    bound = math.sqrt(6 / (512 + 2))
    kernel = np.asarray(fc["kernel"])
    assert kernel.shape == (512, 2) and kernel.dtype == np.float32
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
    assert abs(kernel.std() - bound / math.sqrt(3)) < 0.1 * bound  # uniform, not normal
    np.testing.assert_array_equal(np.asarray(fc["bias"]), np.zeros(2, np.float32))
    # The same draw as porting.from_torchvision(..., num_classes=2, seed=3).
    np.testing.assert_array_equal(kernel, head_init(jax.random.PRNGKey(3), (512, 2), jnp.float32))
    other = replace_head(resnet_head_variables(), "resnet18", 2, seed=4)["params"]["fc"]["kernel"]
    assert not np.array_equal(kernel, other)


def test_init_rows_copy_the_hotdog_row_exactly():
    source = resnet_head_variables()
    new = replace_head(source, "resnet18", 2, init_rows=[np.int64(HOTDOG), None])["params"]["fc"]
    old = source["params"]["fc"]
    np.testing.assert_array_equal(new["kernel"][:, 0], old["kernel"][:, HOTDOG])
    assert new["bias"][0] == old["bias"][HOTDOG]
    fresh = replace_head(source, "resnet18", 2)["params"]["fc"]
    np.testing.assert_array_equal(new["kernel"][:, 1], fresh["kernel"][:, 1])
    assert new["bias"][1] == 0


def test_init_rows_are_checked():
    source = resnet_head_variables()
    for rows in ([HOTDOG], [HOTDOG, None, 1], [1000, None], [-1, None], [True, None], "ab"):
        with pytest.raises(ConfigError, match="init_rows"):
            replace_head(source, "resnet18", 2, init_rows=rows)


def test_replace_head_is_pure():
    source = resnet_head_variables()
    old_fc = source["params"]["fc"]
    new = replace_head(source, "resnet18", 2)
    assert source["params"]["fc"] is old_fc and old_fc["kernel"].shape == (512, 1000)
    assert new["params"]["conv1"] is source["params"]["conv1"]  # untouched arrays are shared
    assert new["batch_stats"] is source["batch_stats"]


def test_whole_classifier_reinitialises_vgg_classifier_0_and_3():
    source = vgg_classifier_variables()
    head_only = replace_head(source, "vgg11", 2)["params"]
    whole = replace_head(source, "vgg11", 2, whole_classifier=True)["params"]
    for name in ("features_0", "classifier_0", "classifier_3"):
        assert head_only[name] is source["params"][name]
    assert whole["features_0"] is source["params"]["features_0"]
    for name, fan_in in (("classifier_0", 72), ("classifier_3", 16)):
        bound = 1 / math.sqrt(fan_in)  # a fresh torch.nn.Linear
        for leaf in ("kernel", "bias"):
            value = np.asarray(whole[name][leaf])
            assert value.shape == source["params"][name][leaf].shape
            assert np.abs(value).max() <= bound and np.abs(value).max() > 0.5 * bound
    assert not np.array_equal(whole["classifier_0"]["kernel"][:16], whole["classifier_3"]["kernel"])
    for leaf in ("kernel", "bias"):  # the head itself is the same either way
        np.testing.assert_array_equal(whole["classifier_6"][leaf], head_only["classifier_6"][leaf])


def test_whole_classifier_of_a_resnet_is_the_head():
    source = resnet_head_variables()
    a = replace_head(source, "resnet18", 2, whole_classifier=True)["params"]
    b = replace_head(source, "resnet18", 2)["params"]
    np.testing.assert_array_equal(a["fc"]["kernel"], b["fc"]["kernel"])
    assert a.keys() == b.keys()


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="no params/fc"):
        replace_head(vgg_classifier_variables(), "resnet18", 2)
    for n in (0, 2.0, True):
        with pytest.raises(ConfigError, match="num_classes"):
            replace_head(resnet_head_variables(), "resnet18", n)
