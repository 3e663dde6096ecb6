"""jtransfer.models.conv against XLA's own convolution and its gradients; VGG's
and ResNet's max-pool gradients against torch's.

Every code path of `conv2d` is hit: the 1x1 matrix-product forward (stride 1 and
2, odd sizes), the per-tap kernel gradient over all positions and the per-image
one (few channels, many positions), strides 1 and 2, the 7x7 stem.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jtransfer.models import conv

NHWC = ("NHWC", "HWIO", "NHWC")

# (size, cin, cout, k, stride, pad); the comment says which paths it takes.
CASES = [
    (9, 16, 24, 1, 1, 0),  # 1x1 forward as a product
    (7, 16, 24, 1, 2, 0),  # 1x1, stride 2 over an odd size (ResNet-50 layer4 at 112 px)
    (28, 8, 16, 3, 1, 1),  # per-image kernel gradient (8*16 channels, 28*28 positions)
    (28, 96, 96, 3, 1, 1),  # one product per tap (96*96 > 64*128)
    (13, 8, 16, 3, 2, 1),  # stride 2, odd size: the last row/column is never read
    (58, 3, 8, 7, 2, 3),  # the stem: 7x7, stride 2, padding 3, per image
]


def _reference(x, w, stride, pad):
    return lax.conv_general_dilated(x, w, (stride,) * 2, ((pad, pad),) * 2, dimension_numbers=NHWC)


def _ours(x, w, stride, pad):
    return conv.conv_general_dilated(x, w, (stride,) * 2, ((pad, pad),) * 2, dimension_numbers=NHWC)


@pytest.mark.parametrize(("size", "cin", "cout", "k", "stride", "pad"), CASES)
def test_forward_and_gradients_match_xla(size, cin, cout, k, stride, pad):
    rng = np.random.RandomState(size * 1000 + cin)
    x = jnp.asarray(rng.randn(3, size, size, cin), jnp.float32)
    w = jnp.asarray(rng.randn(k, k, cin, cout) / np.sqrt(k * k * cin), jnp.float32)

    ref_y, ref_vjp = jax.vjp(lambda a, b: _reference(a, b, stride, pad), x, w)
    y, vjp = jax.jit(lambda a, b: jax.vjp(lambda c, d: _ours(c, d, stride, pad), a, b))(x, w)
    assert y.shape == ref_y.shape
    np.testing.assert_allclose(y, ref_y, rtol=0, atol=1e-5 * float(jnp.abs(ref_y).max()))

    g = jnp.asarray(rng.randn(*ref_y.shape), jnp.float32)
    ref_dx, ref_dw = ref_vjp(g)
    dx, dw = vjp(g)
    for ours, ref in ((dx, ref_dx), (dw, ref_dw)):
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        err = float(jnp.abs(ours - ref).max() / jnp.abs(ref).max())
        assert err < 2e-6, err


def test_unsupported_configurations_fall_back_to_xla():
    x = jnp.ones((2, 8, 8, 4))
    w = jnp.ones((3, 3, 4, 4))
    # SAME padding as a string and rhs dilation are not handled by conv2d.
    for kwargs in ({"padding": "SAME"}, {"padding": ((2, 2), (2, 2)), "rhs_dilation": (2, 2)}):
        ours = conv.conv_general_dilated(x, w, (1, 1), dimension_numbers=NHWC, **kwargs)
        ref = lax.conv_general_dilated(x, w, (1, 1), dimension_numbers=NHWC, **kwargs)
        np.testing.assert_array_equal(ours, ref)


# name: (jtransfer function, torch.nn.MaxPool2d arguments, gradient atol)
POOLS = {
    "2x2": ("max_pool_2x2", (2, 2), 0.0),
    # Overlapping windows sum gradients in another order than torch: rounding.
    "3x3/2 pad 1": ("max_pool_3x3_s2", (3, 2, 1), 1e-6),
}


@pytest.mark.parametrize("pool", list(POOLS))
@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 9, 11, 4), (2, 56, 56, 5)])
def test_max_pools_match_torch_including_ties(pool, shape):
    """The pools' forward is bit-identical to torch's, the gradient goes to the first maximum."""
    import torch

    from jtransfer.models import layers

    name, torch_args, atol = POOLS[pool]
    rng = np.random.RandomState(shape[1])
    # Rounded, ReLU'd values: many windows hold two or more equal maxima (zeros too).
    x = np.maximum(np.round(rng.randn(*shape), 1), 0).astype(np.float32)
    x[0, 0, :2, 0] = 0.7  # a tie in the first window's top row
    y, vjp = jax.vjp(getattr(layers, name), jnp.asarray(x))
    g = rng.randn(*y.shape).astype(np.float32)
    (dx,) = vjp(jnp.asarray(g))

    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    yt = torch.nn.MaxPool2d(*torch_args)(xt)
    yt.backward(torch.tensor(g.transpose(0, 3, 1, 2)))
    np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(
        np.asarray(dx), xt.grad.numpy().transpose(0, 2, 3, 1), rtol=0, atol=atol
    )
