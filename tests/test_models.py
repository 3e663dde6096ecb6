"""jtransfer.models.random_variables: the tree model.init gives, without compiling it."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

import jtransfer as jt

# Initialisation trees and values, not convolution numerics: XLA's own convolutions, which
# compile much faster (tests/conftest.py).
XLA_CONVOLUTIONS = True


@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn"])
def test_random_variables_have_init_tree_and_torchvision_like_values(arch):
    model = jt.models.create(arch, num_classes=3)
    variables = jt.models.random_variables(model, image_size=32, seed=1)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
    assert jax.tree.structure(variables) == jax.tree.structure(shapes)
    for leaf, ref in zip(jax.tree.leaves(variables), jax.tree.leaves(shapes), strict=True):
        assert leaf.shape == ref.shape and leaf.dtype == ref.dtype

    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(variables)}
    kernels = [v for k, v in flat.items() if k.endswith("['kernel']") and v.size > 10_000]
    for k in kernels:  # He normal over the fan-in
        assert np.std(k) == pytest.approx(math.sqrt(2 / math.prod(k.shape[:-1])), rel=0.1)
    scales = np.concatenate([v for k, v in flat.items() if k.endswith("['scale']")])
    variances = np.concatenate([v for k, v in flat.items() if k.endswith("['var']")])
    assert 0.5 <= scales.min() and scales.max() <= 1.5 and np.ptp(scales) > 0.5
    assert 0.5 <= variances.min() and variances.max() <= 2.0  # never the identity BN

    again = jt.models.random_variables(model, image_size=32, seed=1)
    other = jt.models.random_variables(model, image_size=32, seed=2)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(again), strict=True)
    )
    assert not np.array_equal(jax.tree.leaves(variables)[0], jax.tree.leaves(other)[0])
    # The variables run: finite logits of the right shape.
    apply = jax.jit(model.apply, static_argnames="train")  # op by op, VGG takes ~10 s
    logits = apply(variables, np.ones((2, 32, 32, 3), np.float32), train=False)
    assert logits.shape == (2, 3) and np.isfinite(logits).all()


def test_grouped_and_wide_variants_need_bottlenecks_as_in_torchvision():
    # torchvision's BasicBlock raises for groups != 1 or width_per_group != 64; so do we.
    model = jt.models.create("resnet18", groups=32, width_per_group=4)
    with pytest.raises(jt.ConfigError, match="BasicBlock only supports groups=1"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
    # Same stages and keys, different widths: the registry tells them apart (fit.infer_arch).
    rx, r50 = (jt.models.create(a) for a in ("resnext50_32x4d", "resnet50"))
    assert (rx.stage_sizes, rx.block_cls) == (r50.stage_sizes, r50.block_cls)
    assert (rx.groups, rx.width_per_group, r50.groups, r50.width_per_group) == (32, 4, 1, 64)
