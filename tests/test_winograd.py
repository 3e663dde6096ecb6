"""jtransfer.models.winograd: F(2x2, 3x3) against XLA's direct convolution.

The forward, the input gradient and the kernel gradient are checked on odd and
even, square and non-square inputs (an odd side computes one output too many
and must crop it), few and many channels, in float32 (rounding-level error) and
float64 (exact to float64 rounding, so a wrong coefficient cannot hide behind
float32 noise); `conv2d` is checked to take this path exactly where it should.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jtransfer.models import conv, winograd

NHWC = ("NHWC", "HWIO", "NHWC")

# (n, h, w, cin, cout)
SHAPES = [
    (2, 7, 5, 3, 4),  # odd and non-square, the RGB input of VGG's first layer
    (3, 8, 8, 16, 8),  # even: no cropping
    (2, 1, 1, 8, 8),  # one pixel: a single tile, mostly padding
    (2, 4, 4, 64, 32),  # ResNet-18 layer4 at 112 px (Cin != Cout)
    (1, 15, 9, 24, 40),
]


def _direct(x, w):
    return lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC, precision="highest"
    )


def _data(shape, dtype, seed=0):
    n, h, w, cin, cout = shape
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, cin)), dtype)
    k = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin), dtype)
    g = jnp.asarray(rng.standard_normal((n, h, w, cout)), dtype)
    return x, k, g


def _rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def _check(shape, dtype, tol):
    x, k, g = _data(shape, dtype)
    y_ref, vjp = jax.vjp(_direct, x, k)
    dx_ref, dk_ref = vjp(g)
    y = jax.jit(winograd.conv3x3)(x, k)
    dx = jax.jit(winograd.conv3x3_input_grad)(g, k)
    dk = jax.jit(winograd.conv3x3_kernel_grad)(x, g)
    for ours, ref in ((y, y_ref), (dx, dx_ref), (dk, dk_ref)):
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        assert _rel(ours, ref) < tol, _rel(ours, ref)


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_matches_direct_convolution(shape):
    _check(shape, jnp.float32, 4e-6)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_float64_matches_to_float64_rounding(shape):
    with jax.enable_x64(True):
        _check(shape, jnp.float64, 1e-13)


def test_conv2d_uses_winograd_for_3x3_stride_1_only():
    x, k, g = _data((2, 9, 9, 8, 8), jnp.float32)

    # The Winograd graph multiplies 16 transform points; a direct one convolves.
    def dots(fn, *args):
        return str(jax.make_jaxpr(fn)(*args)).count("dot_general")

    same = lambda a, b: conv.conv2d(a, b, (1, 1), ((1, 1), (1, 1)))  # noqa: E731
    strided = lambda a, b: conv.conv2d(a, b, (2, 2), ((1, 1), (1, 1)))  # noqa: E731
    assert dots(same, x, k) == 16
    assert dots(strided, x, k) == 0
    assert dots(lambda a, b: same(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)), x, k) == 0
    # Its gradient goes through the custom VJP's Winograd products too.
    grad = jax.grad(lambda a, b: jnp.sum(same(a, b) * g), argnums=(0, 1))
    dx, dk = grad(x, k)
    _, vjp = jax.vjp(_direct, x, k)
    dx_ref, dk_ref = vjp(g)
    assert _rel(dx, dx_ref) < 4e-6 and _rel(dk, dk_ref) < 4e-6


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_a_1x1_map_is_one_product_with_the_centre_tap_both_ways(dtype):
    # Every other tap reads padding: one product each way instead of Winograd's 16.
    same = lambda a, b: conv.conv2d(a, b, (1, 1), ((1, 1), (1, 1)))  # noqa: E731
    with jax.enable_x64(dtype == jnp.float64):
        x, k, g = _data((3, 1, 1, 16, 8), dtype)
        assert str(jax.make_jaxpr(same)(x, k)).count("dot_general") == 1
        loss = lambda a, b: jnp.sum(same(a, b) * g)  # noqa: E731
        assert str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, k)).count("dot_general") == 3
        y, (dx, dk) = same(x, k), jax.grad(loss, argnums=(0, 1))(x, k)
        y_ref, vjp = jax.vjp(_direct, x, k)
        dx_ref, dk_ref = vjp(g)
        tol = 1e-6 if dtype == jnp.float32 else 1e-14
        assert _rel(y, y_ref) < tol and _rel(dx, dx_ref) < tol and _rel(dk, dk_ref) < tol
        assert y.dtype == dx.dtype == dk.dtype == dtype
        assert not dk[0].any() and not dk[2].any() and not dk[:, 0].any() and not dk[:, 2].any()


def test_kernel_transform_of_a_flipped_kernel_permutes_its_points():
    # The input gradient relies on G flip(K) G^T being a permutation of G K G^T.
    _, k, _ = _data((1, 1, 1, 2, 3), jnp.float32)
    u = winograd.kernel_transform(k)
    u_flipped = winograd.kernel_transform(k[::-1, ::-1])
    # (k0 + k1 + k2) and (k2 + k1 + k0) may round differently: 1 ulp.
    np.testing.assert_allclose(u_flipped, u[np.array(winograd._FLIPPED_POINT)], rtol=0, atol=1e-6)
    assert not np.allclose(u_flipped, u, atol=1e-3)  # the permutation is not the identity
