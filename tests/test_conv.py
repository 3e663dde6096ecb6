"""jtransfer.models.conv against XLA's own convolution and its gradients; VGG's
and ResNet's max-pool gradients against torch's.

Every code path of `conv_general_dilated` is hit: the 1x1 matrix-product forward
(stride 1 and 2, odd sizes), Winograd (3x3 stride 1, see also test_winograd.py) and
its 1x1-map case (the centre tap's product),
the per-tap kernel gradient over all positions and the per-image one (few
channels, many positions), strides 1 and 2, and the 7x7 RGB stem, which is left
to XLA both ways (fewer than 8 input channels), and grouped convolutions
(an elementwise sum over taps for narrow groups, one XLA convolution per group for
wide ones; im2col or per-group gradients).
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
    (28, 8, 16, 3, 1, 1),  # Winograd F(2x2, 3x3)
    (1, 64, 32, 3, 1, 1),  # 3x3 on a 1x1 map: the centre tap's product (layer4 at 32 px)
    (57, 8, 16, 3, 2, 1),  # per-image kernel gradient (8*16 channels, 29*29 positions)
    (15, 96, 96, 3, 2, 1),  # one product per tap (96*96 > 64*128)
    (13, 8, 16, 3, 2, 1),  # stride 2, odd size: the last row/column is never read
    (58, 3, 8, 7, 2, 3),  # the RGB stem: 7x7, stride 2, padding 3; XLA's own both ways
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


# (size, channels, groups, stride, padding): ResNeXt's grouped 3x3 layers, stride 1 and 2
# over odd sizes. Up to 8 input channels per group run as an elementwise sum over taps
# (forward, and the input gradient at stride 1); their kernel gradient is XLA's of one dense
# convolution per block of whole groups, their input gradient at stride 2 dense products
# over the same blocks (3 or 6 groups: blocks of 1, 3 and 6). Wider groups run one XLA
# convolution per group (forward, and both gradients at stride 1 on larger maps); their
# input gradient at stride 2 and on small maps is one product batched over groups summed
# per phase of the stride (the last two rows: asymmetric padding).
GROUPED = [
    (12, 24, 6, 2, ((0, 1), (1, 0))),
    (8, 12, 6, 1, ((1, 1), (1, 1))),
    (9, 32, 8, 1, ((1, 1), (1, 1))),
    (11, 64, 32, 2, ((1, 1), (1, 1))),
    (57, 16, 4, 2, ((1, 1), (1, 1))),
    (10, 24, 3, 1, ((2, 0), (0, 1))),
    (6, 48, 4, 1, ((1, 1), (1, 1))),
    (30, 64, 4, 1, ((1, 1), (1, 1))),
    (10, 48, 3, 1, ((2, 0), (0, 1))),
    (13, 64, 4, 2, ((1, 1), (1, 1))),
    (12, 48, 3, 2, ((0, 1), (1, 0))),
    (6, 48, 3, 1, ((2, 0), (0, 1))),
]


# Not ResNeXt's: more output than input channels per group (4 -> 16 and 8 -> 16), whose
# input gradient at stride 1 too is by blocks.
GROUPED_WIDENING = [
    (9, 32, 128, 8, 1, ((1, 1), (1, 1))),
    (11, 24, 48, 3, 2, ((1, 1), (1, 1))),
    (11, 48, 96, 3, 2, ((1, 1), (1, 1))),
]


@pytest.mark.parametrize(("size", "channels", "groups", "stride", "pad"), GROUPED)
def test_grouped_convolution_matches_xlas_both_ways(size, channels, groups, stride, pad):
    _check_grouped(size, channels, channels, groups, stride, pad)


@pytest.mark.parametrize(("size", "cin", "cout", "groups", "stride", "pad"), GROUPED_WIDENING)
def test_widening_grouped_convolution_matches_xlas_both_ways(size, cin, cout, groups, stride, pad):
    _check_grouped(size, cin, cout, groups, stride, pad)


def _check_grouped(size, cin, cout, groups, stride, pad):
    rng = np.random.RandomState(size * 100 + groups)
    x = jnp.asarray(rng.randn(2, size, size, cin), jnp.float32)
    w = jnp.asarray(rng.randn(3, 3, cin // groups, cout), jnp.float32)
    kw = dict(dimension_numbers=NHWC, feature_group_count=groups)

    def ref(a, b):
        return lax.conv_general_dilated(a, b, (stride,) * 2, pad, **kw)

    def ours(a, b):
        return conv.conv_general_dilated(a, b, (stride,) * 2, pad, **kw)

    assert "custom_vjp_call" in str(jax.make_jaxpr(ours)(x, w))  # not XLA's autodiff
    ref_y, ref_vjp = jax.vjp(ref, x, w)
    y, vjp = jax.jit(lambda a, b: jax.vjp(ours, a, b))(x, w)
    assert y.shape == ref_y.shape and y.dtype == ref_y.dtype
    err = float(jnp.abs(y - ref_y).max() / jnp.abs(ref_y).max())
    assert err < 2e-6, err
    g = jnp.asarray(rng.randn(*ref_y.shape), jnp.float32)
    for mine, theirs in zip(vjp(g), ref_vjp(g), strict=True):
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype
        err = float(jnp.abs(mine - theirs).max() / jnp.abs(theirs).max())
        assert err < 2e-6, err


@pytest.mark.parametrize(("dtype", "tol"), [(jnp.float64, 1e-12), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("stride", [1, 2])
def test_grouped_gradients_keep_the_dtype_and_sum_in_float32_or_wider(dtype, tol, stride):
    # 4 channels per group (the narrow forms) against XLA's autodiff in float64.
    rng = np.random.RandomState(stride)
    x = rng.randn(2, 9, 9, 32)
    w = rng.randn(3, 3, 4, 32)
    g = rng.randn(2, 9 // stride + (stride - 1), 9 // stride + (stride - 1), 32)
    kw = dict(dimension_numbers=NHWC, feature_group_count=8)
    pad = ((1, 1), (1, 1))
    with jax.enable_x64():
        _, ref_vjp = jax.vjp(
            lambda a, b: lax.conv_general_dilated(a, b, (stride,) * 2, pad, **kw),
            jnp.asarray(x, jnp.float64),
            jnp.asarray(w, jnp.float64),
        )
        refs = ref_vjp(jnp.asarray(g, jnp.float64))
        _, vjp = jax.vjp(
            lambda a, b: conv.conv_general_dilated(a, b, (stride,) * 2, pad, **kw),
            jnp.asarray(x, dtype),
            jnp.asarray(w, dtype),
        )
        for mine, ref in zip(vjp(jnp.asarray(g, dtype)), refs, strict=True):
            assert mine.dtype == dtype
            err = float(jnp.abs(mine.astype(jnp.float64) - ref).max() / jnp.abs(ref).max())
            assert err < tol, err


def test_unsupported_configurations_fall_back_to_xla():
    x = jnp.ones((2, 8, 8, 4))
    w = jnp.ones((3, 3, 4, 4))
    # SAME padding as a string and rhs dilation are not handled by conv2d.
    for kwargs in ({"padding": "SAME"}, {"padding": ((2, 2), (2, 2)), "rhs_dilation": (2, 2)}):
        ours = conv.conv_general_dilated(x, w, (1, 1), dimension_numbers=NHWC, **kwargs)
        ref = lax.conv_general_dilated(x, w, (1, 1), dimension_numbers=NHWC, **kwargs)
        np.testing.assert_array_equal(ours, ref)


def _custom_vjp_calls(cin: int, k: int, stride: int) -> int:
    x = jnp.ones((2, 16, 16, cin))
    w = jnp.ones((k, k, cin, 8))
    pad = ((k // 2, k // 2),) * 2
    jaxpr = jax.make_jaxpr(
        lambda a, b: conv.conv_general_dilated(a, b, (stride,) * 2, pad, dimension_numbers=NHWC)
    )(x, w)
    return str(jaxpr).count("custom_vjp_call")


def test_rgb_input_layers_are_left_to_xla_and_wider_ones_are_not():
    # ResNet's 7x7/2 stem and VGG's first 3x3 read 3 channels: XLA's own
    # convolution and autodiff (no custom VJP); from 8 channels on, conv2d's.
    assert _custom_vjp_calls(3, 7, 2) == 0
    assert _custom_vjp_calls(3, 3, 1) == 0
    assert _custom_vjp_calls(7, 3, 1) == 0
    assert _custom_vjp_calls(8, 3, 1) == 1
    assert _custom_vjp_calls(8, 7, 2) == 1


@pytest.mark.parametrize("batch", [1, 2, 3, 5])
def test_xla_convolutions_split_the_batch_on_a_multi_core_cpu(monkeypatch, batch):
    monkeypatch.setattr(conv.os, "cpu_count", lambda: 2)
    assert conv.batch_parts(batch) == min(batch, 2)
    rng = np.random.RandomState(batch)
    for cin, stride in ((3, 2), (8, 2)):  # the RGB stem (no custom VJP), a stride-2 layer
        x = jnp.asarray(rng.randn(batch, 15, 15, cin), jnp.float32)
        w = jnp.asarray(rng.randn(3, 3, cin, 8), jnp.float32)
        hlo = jax.jit(lambda a, b, s=stride: _ours(a, b, s, 1)).lower(x, w).as_text()
        assert hlo.count("stablehlo.convolution") == min(batch, 2)
        # Each image's output is the same computation as in one batched call.
        np.testing.assert_array_equal(_ours(x, w, stride, 1), _reference(x, w, stride, 1))
    monkeypatch.setattr(conv.os, "cpu_count", lambda: 1)
    assert conv.batch_parts(batch) == 1


@pytest.mark.parametrize(("backend", "mode"), [("gpu", None), ("tpu", None), ("cpu", "xla")])
def test_gpu_tpu_and_jtransfer_conv_xla_get_xla_convolutions(monkeypatch, backend, mode):
    """Off the CPU, or with JTRANSFER_CONV=xla, every layer is one
    `lax.conv_general_dilated`, differentiated by XLA."""
    monkeypatch.setattr(conv.jax, "default_backend", lambda: backend)
    if mode is None:
        monkeypatch.delenv(conv.CONV_ENV, raising=False)
    else:
        monkeypatch.setenv(conv.CONV_ENV, mode)
    assert conv.batch_parts(4) == 1
    rng = np.random.RandomState(0)
    for size, cin, cout, k, stride, pad in CASES:
        x = jnp.asarray(rng.randn(2, size, size, cin), jnp.float32)
        w = jnp.asarray(rng.randn(k, k, cin, cout), jnp.float32)

        def loss(a, b, f, s=stride, p=pad):
            return jnp.sum(f(a, b, s, p) ** 2)

        jaxpr = str(jax.make_jaxpr(jax.grad(lambda a, b: loss(a, b, _ours), (0, 1)))(x, w))
        assert "custom_vjp" not in jaxpr and "dot_general" not in jaxpr, (size, cin, k)
        assert jaxpr.count("conv_general_dilated") == 3, (size, cin, k)  # fwd, dX, dK
        np.testing.assert_array_equal(_ours(x, w, stride, pad), _reference(x, w, stride, pad))
        ours = jax.grad(lambda a, b: loss(a, b, _ours), (0, 1))(x, w)
        ref = jax.grad(lambda a, b: loss(a, b, _reference), (0, 1))(x, w)
        for a, b in zip(ours, ref, strict=True):
            np.testing.assert_array_equal(a, b)


def test_an_unknown_jtransfer_conv_value_says_which_are_known(monkeypatch):
    from jtransfer.errors import ConfigError

    monkeypatch.setenv(conv.CONV_ENV, "winograd")
    x, w = jnp.zeros((1, 8, 8, 8)), jnp.zeros((3, 3, 8, 8))
    with pytest.raises(ConfigError, match=r"JTRANSFER_CONV='winograd'.*auto.*xla"):
        _ours(x, w, 1, 1)
    monkeypatch.setenv(conv.CONV_ENV, " AUTO ")  # case and spaces do not matter
    assert _custom_vjp_calls(8, 3, 1) == 1


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
