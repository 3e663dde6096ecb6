"""A 2-D convolution whose backward pass is made of matrix products.

XLA's CPU backend differentiates a convolution into two more convolutions. The
kernel gradient's (batch and feature dimensions swapped) misses its fast path
and runs several times slower than the forward pass of the same layer. The
input gradient's needs every kernel flipped and transposed first, a slow copy
for the large 3x3 kernels of the last stages. Together they
were most of the gap between a jitted ResNet fine-tune step and torch's (the
figures are in docs/performance.md).

`conv_general_dilated` here is a drop-in for `lax.conv_general_dilated` that
Flax's `nn.Conv` accepts (`nn.Conv(..., conv_general_dilated=...)`).

3x3 stride-1 convolutions with padding 1 in float32 or float64 (most of ResNet's
and all of VGG's work) run forward and backward by Winograd's F(2x2, 3x3)
(`jtransfer.models.winograd`): 2.25x fewer multiplications, differing from a
direct convolution by rounding only. On a 1x1 map (small inputs) such a layer is
one matrix product with its centre tap, the only one that reads no padding.

Layers with fewer than 8 input channels (the RGB input layer: ResNet's 7x7/2
stem, VGG's first 3x3) are left to XLA's own convolution and autodiff, faster
there both ways (see `_NATIVE_BELOW_CHANNELS`). On a multi-core CPU, XLA's own
convolutions run as two half-batch ones, which XLA can overlap with each other
and with neighbouring work (see `_xla_conv`).

Every other forward pass is XLA's own convolution, except that a 1x1
convolution is the matrix product it stands for (faster on XLA:CPU, and the
same bits, ResNet-50 eval logits included; see docs/performance.md). Their
backward pass is, for each tap (i, j) of the k x k window,

    dK[i, j] = (the inputs tap (i, j) read)^T @ dY
    dX      += dY @ K[i, j]^T, placed where tap (i, j) read,

k*k matrix products over batch and positions, which XLA runs on its fast
matrix-multiply path. They are the same sums in another order, so gradients
differ from XLA's by rounding only (docs/parity.md measures it; sums are
float32 or wider whatever the compute dtype).

Grouped convolutions (ResNeXt's 3x3 layers: 32 or 64 groups of 4 to 64
channels) with at most 8 input channels per group run forward as one elementwise
sum over taps and in-group channels (`_grouped_taps`); XLA:CPU's grouped
convolution is several times slower there. Wider groups run as one ordinary
XLA convolution per group (`_per_group`), which XLA:CPU runs several times faster
than its grouped convolution. XLA:CPU's autodiff of a grouped convolution is
unusable: its kernel and input gradients ran 30-100x slower than torch's on
ResNeXt-50's layers (docs/performance.md). The backward pass (`grouped_conv2d`)
computes a narrow layer's kernel gradient block by block of whole groups (16 input
channels), each block differentiated by XLA as one ordinary convolution with a dense
kernel, of which the groups' own diagonal parts are kept (`_grouped_kernel_grad`); its
input gradient is the flipped convolution run by `_grouped_taps` at stride 1, else
dense products through block-diagonal kernels (`_grouped_input_grad`). A wide layer's
kernel gradient is XLA's gradient of `_per_group`; its input gradient too on larger
maps at stride 1, and otherwise one matrix product batched over groups for all taps,
summed per phase of the stride (`_grouped_input_grad_phases`). Sums reordered,
rounding only. Grouped layers never use Winograd (the per-group products are too
thin).

Configurations other than 2-D NHWC / HWIO without dilation fall back to
`lax.conv_general_dilated`.

Every model's `nn.Conv` calls this through `PreparedConv`, which can instead
read a layer's Winograd kernel transform computed once by
`jtransfer.models.prepare_inference`, for inference with fixed parameters.

All of this is for XLA's CPU backend. On a GPU or TPU every convolution is
`lax.conv_general_dilated` with XLA's own autodiff (cuDNN's kernels, and its
bfloat16 tensor-core paths, beat matrix-product rewrites there); the backend is
`jax.default_backend()` when the function is traced.

`JTRANSFER_CONV=xla` in the environment (read when a function is traced) makes
every convolution XLA's own on the CPU too. The Winograd and per-tap forms are
many small operations that XLA compiles one by one, so a jitted forward compiles
many times slower with them than without (docs/performance.md); for short runs
and debugging the compile saved can outweigh the slower steps.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from jtransfer.errors import ConfigError
from jtransfer.models import winograd

Array = jax.Array
_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(
    lhs: Array,
    rhs: Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> Array:
    """`lax.conv_general_dilated` with the matrix-product kernel gradient where it applies."""
    options = dict(
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        preferred_element_type=preferred_element_type,
    )
    if feature_group_count > 1 and _plain(
        lhs, rhs, padding, **{**options, "feature_group_count": 1}
    ):
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        if all(p >= 0 for pair in pads for p in pair):
            strides = tuple(int(s) for s in window_strides)
            return grouped_conv2d(lhs, rhs, strides, pads, feature_group_count, precision)
    plain = _plain(lhs, rhs, padding, **options)
    if plain and _few_input_channels(rhs):
        return _xla_conv(lhs, rhs, window_strides, padding, precision)
    if not plain:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, precision=precision, **options
        )
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if any(p < 0 for pair in pads for p in pair):
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            dimension_numbers=dimension_numbers,
            precision=precision,
        )
    return conv2d(lhs, rhs, tuple(int(s) for s in window_strides), pads, precision)


def _plain(
    lhs,
    rhs,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    preferred_element_type=None,
) -> bool:
    """A 2-D NHWC x HWIO convolution without dilation or groups, on the CPU forms."""
    return (
        lhs.ndim == 4
        and not isinstance(padding, str)
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
        and _is_nhwc(dimension_numbers, lhs.shape, rhs.shape)
        and _cpu_forms()
    )


CONV_ENV = "JTRANSFER_CONV"
_CONV_MODES = ("auto", "xla")


def _cpu_forms() -> bool:
    """This module's CPU forms apply: XLA's CPU backend, and `JTRANSFER_CONV` is not "xla"."""
    mode = os.environ.get(CONV_ENV, "auto").strip().lower() or "auto"
    if mode not in _CONV_MODES:
        raise ConfigError(
            f"{CONV_ENV}={os.environ[CONV_ENV]!r} is not one of {', '.join(_CONV_MODES)}: "
            "unset it (auto: the fastest steps) or set it to xla (XLA's own convolutions: "
            "faster compiles, slower steps on the CPU)"
        )
    return mode == "auto" and jax.default_backend() == "cpu"


def _is_nhwc(dimension_numbers: Any, lhs_shape, rhs_shape) -> bool:
    if dimension_numbers is None:
        return False
    dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
    expected = lax.conv_dimension_numbers(lhs_shape, rhs_shape, _NHWC)
    return dn == expected


# Below this many input channels (the RGB input layer: ResNet's 7x7/2 stem,
# VGG's first 3x3) XLA's own convolution and its autodiff win both ways: with 3
# input channels the per-tap products and Winograd's transform-domain matrices
# are too thin to pay for themselves (the per-layer timings are in
# docs/performance.md).
_NATIVE_BELOW_CHANNELS = 8


def _few_input_channels(rhs: Array) -> bool:
    return rhs.ndim == 4 and rhs.shape[2] < _NATIVE_BELOW_CHANNELS


def _is_winograd(x: Array, kernel: Array, strides, padding) -> bool:
    """3x3, stride 1, padding 1, in float32 or float64: Winograd F(2x2, 3x3)."""
    return (
        kernel.shape[:2] == (3, 3)
        and tuple(strides) == (1, 1)
        and tuple(padding) == ((1, 1), (1, 1))
        and jnp.dtype(x.dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
        and x.dtype == kernel.dtype
    )


def _centre_tap_only(x: Array, kernel: Array, strides, padding) -> bool:
    """A Winograd layer's shape on a 1x1 map: every tap but the centre reads padding.

    Small inputs make these (ResNet's layer4 at 32 px, the hot-dog demo's size). The
    layer is then one matrix product with the centre tap, where Winograd's tile would
    compute 16 products for the one output (docs/performance.md)."""
    return x.shape[1:3] == (1, 1) and _is_winograd(x, kernel, strides, padding)


def _centre_tap(x: Array, kernel: Array, precision) -> Array:
    n, _, _, cin = x.shape
    dims = (((1,), (0,)), ((), ()))
    y = lax.dot_general(x.reshape(n, cin), kernel[1, 1], dims, precision=precision)
    return y.reshape(n, 1, 1, kernel.shape[3])


def _centre_tap_grads(x: Array, kernel: Array, g: Array, precision) -> tuple[Array, Array]:
    n, _, _, cin = x.shape
    cout = kernel.shape[3]
    g2, x2 = g.reshape(n, cout), x.reshape(n, cin)
    dx = lax.dot_general(g2, kernel[1, 1], (((1,), (1,)), ((), ())), precision=precision)
    acc = jnp.promote_types(jnp.promote_types(x.dtype, g.dtype), jnp.float32)
    centre = lax.dot_general(
        x2, g2, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=acc
    )
    dk = jnp.zeros((3, 3, cin, cout), acc).at[1, 1].set(centre)
    return dx.reshape(n, 1, 1, cin), dk


def _forward(x: Array, kernel: Array, strides, padding, precision) -> Array:
    kh, kw, cin, cout = kernel.shape
    if _centre_tap_only(x, kernel, strides, padding):
        return _centre_tap(x, kernel, precision)
    if _is_winograd(x, kernel, strides, padding):
        return winograd.conv3x3(x, kernel, precision)
    if (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
        # A 1x1 convolution is one matrix product over the (strided) positions.
        # XLA's CPU convolution runs ResNet-50's 1x1 layers several times slower
        # than the same product, which gives the same bits (docs/performance.md).
        sh, sw = strides
        if (sh, sw) != (1, 1):
            x = x[:, ::sh, ::sw, :]
        n, h, w, _ = x.shape
        dims = (((1,), (0,)), ((), ()))
        y = lax.dot_general(
            x.reshape(n * h * w, cin), kernel.reshape(cin, cout), dims, precision=precision
        )
        return y.reshape(n, h, w, cout)
    return _xla_conv(x, kernel, strides, padding, precision)


# XLA:CPU runs some convolutions on one thread (YNNPACK): the stem's forward and
# kernel gradient of a ResNet step ran with the other cores idle. As two
# half-batch convolutions XLA can overlap them with each other and with
# neighbouring work; the kernel gradient splits with them. How much they overlap
# depends on the program around them (in a trace of ResNet-18 eval partly; jitted
# alone, not at all), so the gain on whole networks is small but measurable
# (alternating A/B runs in docs/performance.md). Each image's output is computed
# as before (eval logits bit-identical); the kernel gradient is summed in two
# parts (rounding only).
_CPU_SPLIT = 2


def batch_parts(n: int) -> int:
    """Parts an XLA convolution over a batch of `n` is split into (see `_xla_conv`)."""
    multi_core = _cpu_forms() and (os.cpu_count() or 1) > 1
    return max(min(_CPU_SPLIT if multi_core else 1, n), 1)


def _xla_conv(x: Array, kernel: Array, strides, padding, precision) -> Array:
    """XLA's own NHWC x HWIO convolution, as `batch_parts` convolutions over parts of the batch."""

    def conv(part: Array) -> Array:
        return lax.conv_general_dilated(
            part, kernel, strides, padding, dimension_numbers=_NHWC, precision=precision
        )

    n = x.shape[0]
    parts = batch_parts(n)
    if parts < 2:
        return conv(x)
    bounds = [n * i // parts for i in range(parts + 1)]
    return jnp.concatenate([conv(x[a:b]) for a, b in itertools.pairwise(bounds)], axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x: Array, kernel: Array, strides, padding, precision=None) -> Array:
    """NHWC x HWIO convolution (no dilation, one group); see the module docstring.

    Args:
        x: (N, H, W, Cin).
        kernel: (KH, KW, Cin, Cout).
        strides: (sh, sw).
        padding: ((top, bottom), (left, right)).
        precision: passed to `lax.conv_general_dilated` and the matrix products.

    Returns:
        (N, Ho, Wo, Cout): `lax.conv_general_dilated`'s result, up to float
        rounding where Winograd's form is used (see the module docstring).
    """
    return _forward(x, kernel, strides, padding, precision)


def _conv2d_fwd(x, kernel, strides, padding, precision):
    return _forward(x, kernel, strides, padding, precision), (x, kernel)


def _conv2d_bwd(strides, padding, precision, residuals, g):
    x, kernel = residuals
    if _centre_tap_only(x, kernel, strides, padding):
        dx, dk = _centre_tap_grads(x, kernel, g, precision)
        return dx.astype(x.dtype), dk.astype(kernel.dtype)
    if _is_winograd(x, kernel, strides, padding):
        dx = winograd.conv3x3_input_grad(g, kernel, precision)
        dk = winograd.conv3x3_kernel_grad(x, g, precision)
        return dx.astype(x.dtype), dk.astype(kernel.dtype)
    dx = _input_grad(g, kernel, x.shape, strides, padding, precision)
    dk = _kernel_grad(x, g, kernel.shape, strides, padding, precision)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


def _matmul(a: Array, b: Array, contract: tuple[int, int], precision, batched=False) -> Array:
    """a @ b contracting a's axis contract[0] with b's contract[1]; float32 or wider sums.

    `batched`: axis 0 of both is a batch axis (one product per index).
    """
    acc = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
    batch = ((0,), (0,)) if batched else ((), ())
    dims = (((contract[0],), (contract[1],)), batch)
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=acc)


# When the kernel gradient sums per image first (see `_kernel_grad`); chosen from
# alternating A/B runs of the ResNet-18/-50 and VGG-16-BN fine-tune steps
# (docs/performance.md).
_PER_IMAGE_MAX_CHANNEL_PRODUCT = 64 * 128
_PER_IMAGE_MIN_POSITIONS = 28 * 28


def _kernel_grad(x, g, kernel_shape, strides, padding, precision) -> Array:
    """dK[i, j] = (the inputs tap (i, j) saw)^T @ dY, one matrix product per tap."""
    kh, kw, cin, cout = kernel_shape
    sh, sw = strides
    (pt, pb), (pl, pr) = padding
    n, ho, wo, _ = g.shape
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    # Few channels over many positions (the stem, ResNet's first stage): a single
    # (positions x Cin)^T (positions x Cout) product per tap is a long reduction
    # into a tiny output, slow on XLA:CPU. One product per image, summed after,
    # splits the reduction and speeds up the ResNet-18 step; with wide layers the
    # per-image partial sums cost more than they save (VGG's 256-channel layers
    # got slower). The timings are in docs/performance.md.
    per_image = cin * cout <= _PER_IMAGE_MAX_CHANNEL_PRODUCT and ho * wo >= _PER_IMAGE_MIN_POSITIONS
    g2 = g.reshape(n, ho * wo, cout) if per_image else g.reshape(n * ho * wo, cout)
    taps = []
    for i in range(kh):
        for j in range(kw):
            seen = lax.slice(
                xp,
                (0, i, j, 0),
                (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin),
                (1, sh, sw, 1),
            )
            if per_image:
                per_tap = _matmul(seen.reshape(n, ho * wo, cin), g2, (1, 1), precision, True)
                taps.append(per_tap.sum(0))
            else:
                taps.append(_matmul(seen.reshape(n * ho * wo, cin), g2, (0, 0), precision))
    return jnp.stack(taps).reshape(kernel_shape)


def _input_grad(g, kernel, x_shape, strides, padding, precision) -> Array:
    """dX = sum over taps of dY @ K[i, j]^T, each placed where tap (i, j) read.

    XLA's own input gradient needs every kernel flipped and transposed first, a
    slow copy for the large 3x3 kernels of the last stages; matrix products
    read K[i, j] as it is. Strides become interior padding of each tap's term.
    """
    kh, kw, cin, _ = kernel.shape
    sh, sw = strides
    (pt, pb), (pl, pr) = padding
    n, ho, wo, cout = g.shape
    hp, wp = x_shape[1] + pt + pb, x_shape[2] + pl + pr
    g2 = g.reshape(n * ho * wo, cout)
    total = None
    for i in range(kh):
        for j in range(kw):
            term = _matmul(g2, kernel[i, j], (1, 1), precision).reshape(n, ho, wo, cin)
            term = lax.pad(
                term,
                jnp.zeros((), term.dtype),
                (
                    (0, 0, 0),
                    (i, hp - (i + sh * (ho - 1) + 1), sh - 1),
                    (j, wp - (j + sw * (wo - 1) + 1), sw - 1),
                    (0, 0, 0),
                ),
            )
            total = term if total is None else total + term
    return lax.slice(total, (0, pt, pl, 0), (n, pt + x_shape[1], pl + x_shape[2], cin))


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def grouped_conv2d(x: Array, kernel: Array, strides, padding, groups: int, precision=None) -> Array:
    """NHWC x HWIO convolution with `groups` feature groups (no dilation).

    Forward: `_grouped_taps` for at most `_TAPS_MAX_GROUP_CHANNELS` input channels
    per group, else one XLA convolution per group (`_per_group`). Backward: narrow
    layers' kernel gradient is XLA's of one dense convolution per block of whole groups
    (`_grouped_kernel_grad`), their input gradient `_grouped_taps` of the flipped kernel
    at stride 1, else dense products per block (`_grouped_input_grad`); wide layers'
    kernel gradient is XLA's of `_per_group`, their input gradient XLA's of `_per_group`
    on larger maps at stride 1, else `_grouped_input_grad_phases`. XLA:CPU's own
    autodiff of a grouped convolution is many times slower (see the module docstring).

    Args:
        x: (N, H, W, Cin).
        kernel: (KH, KW, Cin / groups, Cout).
        strides: (sh, sw).
        padding: ((top, bottom), (left, right)).
        groups: feature groups; divides Cin and Cout.
        precision: passed to the convolution and the matrix products.

    Returns:
        (N, Ho, Wo, Cout): `lax.conv_general_dilated(..., feature_group_count=groups)`
        up to rounding.
    """

    if kernel.shape[2] <= _TAPS_MAX_GROUP_CHANNELS:
        return _grouped_taps(x, kernel, strides, padding, groups)
    return _per_group(x, kernel, strides, padding, groups, precision)


def _per_group(x: Array, kernel: Array, strides, padding, groups: int, precision) -> Array:
    """The grouped convolution as `groups` ordinary convolutions, one per group, concatenated.

    For wide groups (16 and more channels each) XLA:CPU runs these dense convolutions
    2-9x faster than its own grouped convolution, forward and (stride 1) backward
    (docs/performance.md, "Grouped convolutions").
    """
    cin_g, cout_g = kernel.shape[2], kernel.shape[3] // groups
    return jnp.concatenate(
        [
            lax.conv_general_dilated(
                x[..., g * cin_g : (g + 1) * cin_g],
                kernel[..., g * cout_g : (g + 1) * cout_g],
                strides,
                padding,
                dimension_numbers=_NHWC,
                precision=precision,
            )
            for g in range(groups)
        ],
        axis=-1,
    )


# Grouped layers with at most this many input channels per group run by
# `_grouped_taps`, 1.5-10x faster than XLA:CPU's grouped convolution at every map size
# measured; with wider groups the elementwise sum grows long and XLA's is faster
# (docs/performance.md, "Grouped convolutions").
_TAPS_MAX_GROUP_CHANNELS = 8


def _grouped_taps(x: Array, kernel: Array, strides, padding, groups: int) -> Array:
    """A grouped convolution as one elementwise sum over taps and in-group channels.

    For in-group input channel ``i``, ``x_i`` holds input channel ``(g, i)`` in every
    output channel of group ``g`` (a copy of the input broadcast within groups, made
    once); then ``y = sum over (i, tap) of shift(x_i, tap) * kernel[tap, i, :]``, each
    term a contiguous multiply-add along the channels. XLA fuses the sum into one
    loop; the copies are kept apart (`lax.optimization_barrier`) because a broadcast
    fused into that loop gathers channel by channel and vectorises badly.
    """
    kh, kw, cin_g, cout = kernel.shape
    sh, sw = strides
    (pt, pb), (pl, pr) = padding
    n = x.shape[0]
    acc_dtype = jnp.promote_types(jnp.promote_types(x.dtype, kernel.dtype), jnp.float32)
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    hp, wp = xp.shape[1], xp.shape[2]
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    grouped = xp.reshape(n, hp, wp, groups, 1, cin_g).astype(acc_dtype)
    k = kernel.astype(acc_dtype)
    total = None
    for i in range(cin_g):
        x_i = jnp.broadcast_to(grouped[..., i], (n, hp, wp, groups, cout // groups)).reshape(
            n, hp, wp, cout
        )
        x_i = lax.optimization_barrier(x_i)
        for a in range(kh):
            for b in range(kw):
                tap = lax.slice(
                    x_i,
                    (0, a, b, 0),
                    (n, a + sh * (ho - 1) + 1, b + sw * (wo - 1) + 1, cout),
                    (1, sh, sw, 1),
                )
                term = tap * k[a, b, i]
                total = term if total is None else total + term
    return total.astype(x.dtype)


def _grouped_fwd(x, kernel, strides, padding, groups, precision):
    return grouped_conv2d(x, kernel, strides, padding, groups, precision), (x, kernel)


def _grouped_bwd(strides, padding, groups, precision, residuals, g):
    x, kernel = residuals
    g = g.astype(x.dtype)
    kh, kw, cin_g, cout = kernel.shape
    if cin_g > _TAPS_MAX_GROUP_CHANNELS:
        return _wide_grouped_grads(x, kernel, g, strides, padding, groups, precision)
    dk = _grouped_kernel_grad(x, g, kernel.shape, strides, padding, groups, precision)
    if strides != (1, 1) or cout // groups > _TAPS_MAX_GROUP_CHANNELS:
        dx = _grouped_input_grad(g, kernel, x.shape, strides, padding, groups, precision)
        return dx.astype(x.dtype), dk.astype(kernel.dtype)
    # Stride 1: the input gradient is the grouped convolution of dY with each group's
    # kernel flipped and transposed, run by `_grouped_taps` like the forward.
    (pt, pb), (pl, pr) = padding
    cout_g = cout // groups
    flipped = kernel.reshape(kh, kw, cin_g, groups, cout_g)[::-1, ::-1]
    flipped = flipped.transpose(0, 1, 4, 3, 2).reshape(kh, kw, cout_g, groups * cin_g)
    pads = ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr))
    dx = _grouped_taps(g, flipped, (1, 1), pads, groups)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


# A wide stride-1 layer's input gradient is `_grouped_input_grad_phases` (else XLA's
# gradient of `_per_group`) while output positions x channels per group are at most
# this (4x4 maps with 32 channels per group: ResNeXt-50's layer4 at 112 px). There the
# 32 small convolutions cost more than their work; at 7x7 with 16 channels the two were
# even, and on larger maps the convolutions win (docs/performance.md, "Kernel gradients
# by XLA per block; wide input gradients by phases").
_PHASES_MAX_POSITIONS_X_CHANNELS = 4 * 4 * 32


def _wide_grouped_grads(x, kernel, g, strides, padding, groups: int, precision):
    """(dX, dK) of a grouped layer with more than `_TAPS_MAX_GROUP_CHANNELS` input
    channels per group.

    dK: XLA's gradient of `_per_group`. dX: `_grouped_input_grad_phases` at stride 2, and
    at stride 1 on small maps; else XLA's gradient of `_per_group`.
    """
    n, ho, wo, _ = g.shape
    cin_g = kernel.shape[2]
    phases = tuple(strides) != (1, 1) or ho * wo * cin_g <= _PHASES_MAX_POSITIONS_X_CHANNELS

    def layer(x, k):
        return _per_group(x, k, strides, padding, groups, precision)

    if phases:
        _, vjp = jax.vjp(lambda k: layer(x, k), kernel)
        (dk,) = vjp(g)
        dx = _grouped_input_grad_phases(g, kernel, x.shape, strides, padding, groups, precision)
    else:
        _, vjp = jax.vjp(layer, x, kernel)
        dx, dk = vjp(g)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


def _grouped_input_grad_phases(g, kernel, x_shape, strides, padding, groups: int, precision):
    """dX of a grouped convolution from one matrix product batched over groups.

    dY @ K[i, j]^T for every tap at once, (groups, positions, k*k*Cin/G); each tap's term
    then lands on one phase of the stride (the input rows and columns it reads, modulo the
    stride), shifted by whole output steps: a plain pad and sum per phase, no interior
    padding (the scatter im2col's autodiff makes). The phases are interleaved once at the
    end, which also brings the groups back beside the channels. Sums float32 or wider.
    """
    n, ho, wo, cout = g.shape
    kh, kw, cin_g, _ = kernel.shape
    cout_g = cout // groups
    sh, sw = strides
    (pt, pb), (pl, pr) = padding
    hp, wp = x_shape[1] + pt + pb, x_shape[2] + pl + pr
    hq, wq = -(-hp // sh), -(-wp // sw)  # each phase's rows and columns
    acc = jnp.promote_types(jnp.promote_types(g.dtype, kernel.dtype), jnp.float32)
    g3 = g.reshape(n * ho * wo, groups, cout_g)
    # (kh, kw, Cin/G, (G, Cout/G)) -> (G, Cout/G, (kh, kw, Cin/G))
    k = kernel.reshape(kh * kw * cin_g, groups, cout_g).transpose(1, 2, 0)
    dims = (((2,), (1,)), ((1,), (0,)))
    terms = lax.dot_general(g3, k, dims, precision=precision, preferred_element_type=acc)
    terms = terms.reshape(groups, n, ho, wo, kh, kw, cin_g)
    phase_sums: dict[tuple[int, int], Array] = {}
    for a in range(kh):
        for b in range(kw):
            # Padded input row s*h + a: phase a % s, phase row h + a // s.
            oa, ob = a // sh, b // sw
            term = lax.pad(
                terms[:, :, :, :, a, b, :],
                jnp.zeros((), acc),
                ((0, 0, 0), (0, 0, 0), (oa, hq - ho - oa, 0), (ob, wq - wo - ob, 0), (0, 0, 0)),
            )
            key = (a % sh, b % sw)
            phase_sums[key] = term + phase_sums[key] if key in phase_sums else term
    zeros = jnp.zeros((groups, n, hq, wq, cin_g), acc)
    stacked = jnp.stack(
        [jnp.stack([phase_sums.get((p, q), zeros) for q in range(sw)]) for p in range(sh)]
    )
    # (sh, sw, G, N, hq, wq, Cin/G) -> (N, hq, sh, wq, sw, G, Cin/G): padded input rows.
    full = stacked.transpose(3, 4, 0, 5, 1, 2, 6).reshape(n, hq * sh, wq * sw, groups * cin_g)
    return full[:, pt : pt + x_shape[1], pl : pl + x_shape[2], :]


# A narrow grouped layer's gradients work on blocks of this many input channels (several
# whole groups) as if the block were one ordinary convolution with a dense kernel, and keep
# (kernel gradient) or use (input gradient, through a block-diagonal kernel) only the
# groups' own diagonal parts. That multiplies more than it needs, yet XLA:CPU runs these
# plain convolutions and products several times faster than im2col's products batched
# over groups; wider blocks measured slower (docs/performance.md, "Grouped convolutions").
_BLOCK_CHANNELS = 16


def _groups_per_block(groups: int, cin_g: int) -> int:
    """The most whole groups that fit in `_BLOCK_CHANNELS` input channels (at least 1)."""
    fits = max(_BLOCK_CHANNELS, cin_g)
    return max(d for d in range(1, groups + 1) if groups % d == 0 and d * cin_g <= fits)


def _grouped_kernel_grad(x, g, kernel_shape, strides, padding, groups: int, precision) -> Array:
    """dK of a narrow grouped convolution, block by block of `per_block` whole groups.

    Each block is differentiated as one ordinary convolution with a dense kernel: XLA's
    kernel gradient of it also pairs the inputs of one group with the outputs of another,
    and only the groups' own (diagonal) parts are kept. Sums are float32 or wider.
    """
    kh, kw, cin_g, cout = kernel_shape
    cout_g = cout // groups
    per_block = _groups_per_block(groups, cin_g)
    blocks, bin_, bout = groups // per_block, per_block * cin_g, per_block * cout_g
    acc = jnp.promote_types(jnp.promote_types(x.dtype, g.dtype), jnp.float32)
    dense = []
    for b in range(blocks):
        x_b = x[..., b * bin_ : (b + 1) * bin_].astype(acc)
        g_b = g[..., b * bout : (b + 1) * bout].astype(acc)

        def block(k, x_b=x_b):
            return lax.conv_general_dilated(
                x_b, k, strides, padding, dimension_numbers=_NHWC, precision=precision
            )

        # The forward of this vjp is unused and traced away; only its transpose runs.
        _, vjp = jax.vjp(block, jnp.zeros((kh, kw, bin_, bout), acc))
        dense.append(vjp(g_b)[0])
    d = jnp.stack(dense).reshape(blocks, kh, kw, per_block, cin_g, per_block, cout_g)
    # The diagonal: group (b, k)'s inputs against its own outputs.
    return jnp.einsum("bhwkiko->hwibko", d).reshape(kernel_shape)


def _grouped_input_grad(g, kernel, x_shape, strides, padding, groups: int, precision) -> Array:
    """dX of a grouped convolution: `_input_grad` of each block of `per_block` groups, with
    the block's kernel made dense (zero between different groups), concatenated. (Batched
    over blocks, the same products ran slower: docs/performance.md.)"""
    kh, kw, cin_g, cout = kernel.shape
    cout_g = cout // groups
    per_block = _groups_per_block(groups, cin_g)
    blocks, bin_, bout = groups // per_block, per_block * cin_g, per_block * cout_g
    # dense[b, :, :, (k, i), (l, o)] = kernel[:, :, i, (b, k, o)] where k == l, else 0.
    eye = jnp.eye(per_block, dtype=kernel.dtype)
    dense = jnp.einsum(
        "hwibko,kl->bhwkilo", kernel.reshape(kh, kw, cin_g, blocks, per_block, cout_g), eye
    ).reshape(blocks, kh, kw, bin_, bout)
    block_shape = (*x_shape[:3], bin_)
    return jnp.concatenate(
        [
            _input_grad(
                g[..., b * bout : (b + 1) * bout],
                dense[b],
                block_shape,
                strides,
                padding,
                precision,
            )
            for b in range(blocks)
        ],
        axis=-1,
    )


grouped_conv2d.defvjp(_grouped_fwd, _grouped_bwd)


# Inference with the Winograd kernel transforms computed once.
#
# A jitted forward recomputes G K G^T of every Winograd layer on every call, a
# noticeable share of a small-batch eval (docs/performance.md), as each of the 16
# transform points is its own pass over the kernel (a 512-channel layer writes
# 16 MB from 9 MB, re-reading taps). While the parameters stay the
# same, `prepare_inference` computes them once into the PREPARED collection, and
# `PreparedConv` (the convolution function every model's `nn.Conv` instantiates)
# uses them instead of the kernel.

PREPARED = "winograd"


class PreparedConv(nn.Module):
    """`conv_general_dilated` as the Flax module `nn.Conv(conv_general_dilated_cls=...)`
    instantiates: reads the layer's transformed kernel from the PREPARED collection
    when `prepare_inference` put one there, and writes it when that collection is
    mutable. Holds no parameters; the variables tree is the same as without it."""

    @nn.nowrap
    def _winograd_layer(self, lhs, rhs, window_strides, padding, **kwargs) -> bool:
        return (
            _plain(lhs, rhs, padding, **{k: v for k, v in kwargs.items() if k != "precision"})
            and not _few_input_channels(rhs)
            and _is_winograd(
                lhs, rhs, tuple(window_strides), tuple((int(a), int(b)) for a, b in padding)
            )
        )

    def __call__(self, lhs, rhs, window_strides, padding, **kwargs) -> Array:
        winograd_layer = self._winograd_layer(lhs, rhs, window_strides, padding, **kwargs)
        if self.has_variable(PREPARED, "kernel"):
            points = tuple(self.get_variable(PREPARED, "kernel"))
            if not winograd_layer:
                raise ConfigError(
                    f"{'/'.join(self.scope.path)}: prepared variables hold a Winograd kernel "
                    "for a layer that does not run by Winograd here (another backend, "
                    f"dtype or {CONV_ENV} setting than at prepare_inference); prepare the "
                    "variables again where they are used"
                )
            got = [(tuple(p.shape), jnp.dtype(p.dtype)) for p in points]
            if got != [(tuple(rhs.shape[2:]), jnp.dtype(rhs.dtype))] * 16:
                found = sorted(set(got), key=str)
                raise ConfigError(
                    f"{'/'.join(self.scope.path)}: prepared kernel of {len(points)} points "
                    f"{', '.join(f'{s} {d}' for s, d in found)} does not fit the layer's 16 "
                    f"points {tuple(rhs.shape[2:])} {rhs.dtype}; prepare_inference again from "
                    "these parameters"
                )
            if lhs.shape[1:3] == (1, 1):
                # One product with the centre tap (`_centre_tap_only`) needs no transform.
                return conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
            return _prepared_conv3x3(lhs, points, kwargs.get("precision"))
        # init makes every collection mutable; the transforms are not variables to keep.
        if winograd_layer and self.is_mutable_collection(PREPARED) and not self.is_initializing():
            # 16 separate arrays: slices of one stacked array would be copied out on every
            # call before the matrix products could read them.
            u = winograd.kernel_transform(rhs)
            self.put_variable(PREPARED, "kernel", tuple(u[k] for k in range(16)))
        return conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _prepared_conv3x3(x: Array, u: tuple[Array, ...], precision) -> Array:
    return winograd.conv3x3_from_transform(x, u, precision)


def _prepared_fwd(x, u, precision):
    return _prepared_conv3x3(x, u, precision), None


def _prepared_bwd(precision, residuals, g):
    # The parameters' kernel is not an input of this path: a gradient would be
    # silently zero for it, so differentiating is refused when it is traced.
    raise ConfigError(
        "variables from prepare_inference are for inference only: their convolutions read "
        "precomputed Winograd kernels, so no gradient reaches the parameters. Differentiate "
        "with the variables as they were before prepare_inference"
    )


_prepared_conv3x3.defvjp(_prepared_fwd, _prepared_bwd)
