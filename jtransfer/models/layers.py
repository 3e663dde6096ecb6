"""Layers that compute exactly what their torch counterparts compute.

Flax's stock BatchNorm updates the running variance with the biased batch
variance; torch uses the unbiased one. Flax's pooling helpers take padding in
the same form as torch, but adaptive average pooling has no Flax equivalent.
Both live here so the model files stay about architecture only.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

Array = jax.Array
Dtype = Any

# torch.nn.BatchNorm2d defaults. torch's momentum 0.1 means
# running = 0.9 * running + 0.1 * batch.
BN_EPS = 1e-5
BN_MOMENTUM = 0.1


def param_dtype_for(compute_dtype: Dtype) -> Dtype:
    """dtype of a model's parameters, statistics and logits for a compute dtype.

    float32 for float32 and the half-precision dtypes (the optimizer and the
    statistics need float32's range and precision); float64 for float64.
    """
    return jnp.promote_types(compute_dtype, jnp.float32)


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d over the last (channel) axis.

    Normalises with the biased batch variance and updates `running var` with the
    unbiased one (n / (n - 1)), as torch does. Statistics are computed in float32
    for float32, bfloat16 and float16 inputs and in float64 for float64 inputs
    (with jax x64 enabled), so a float64 model is float64 throughout.

    Attributes:
        use_running_average: True -> eval mode (running statistics, no update).
            A traced boolean scalar selects per call without re-compiling: the
            batch statistics are computed and discarded where it is True, and the
            running statistics are then returned unchanged, bit for bit.
        dtype: output dtype.
        param_dtype: dtype of `scale`, `bias` and the running statistics at init.
    """

    use_running_average: bool | Array = False
    epsilon: float = BN_EPS
    momentum: float = BN_MOMENTUM
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        pdt = self.param_dtype
        scale = self.param("scale", nn.initializers.ones, (features,), pdt)
        bias = self.param("bias", nn.initializers.zeros, (features,), pdt)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), pdt)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), pdt)
        stats_dtype = param_dtype_for(x.dtype)

        static_eval = isinstance(self.use_running_average, bool) and self.use_running_average
        if static_eval or self.is_initializing():
            mean, var = ra_mean.value, ra_var.value
        else:
            xf = x.astype(stats_dtype)
            axes = tuple(range(x.ndim - 1))
            batch_mean = jnp.mean(xf, axis=axes)
            batch_var = jnp.mean(jnp.square(xf - batch_mean), axis=axes)
            n = math.prod(x.shape[:-1])
            unbiased = batch_var * (n / max(n - 1, 1))
            new_mean = (1 - self.momentum) * ra_mean.value + self.momentum * batch_mean
            new_var = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
            if isinstance(self.use_running_average, bool):
                mean, var = batch_mean, batch_var
            else:
                frozen = self.use_running_average
                mean = jnp.where(frozen, ra_mean.value, batch_mean)
                var = jnp.where(frozen, ra_var.value, batch_var)
                new_mean = jnp.where(frozen, ra_mean.value, new_mean)
                new_var = jnp.where(frozen, ra_var.value, new_var)
            if self.is_mutable_collection("batch_stats"):
                ra_mean.value, ra_var.value = new_mean, new_var

        # Same order of operations as torch's CPU kernel: fold the affine into
        # one multiplier and one offset per channel.
        mul = scale * jax.lax.rsqrt(var + self.epsilon)
        add = bias - mean * mul
        y = x.astype(stats_dtype) * mul + add
        return y.astype(self.dtype)


@jax.custom_vjp
def max_pool_3x3_s2(x: Array) -> Array:
    """torch.nn.MaxPool2d(3, stride=2, padding=1): pads with -inf, symmetric.

    The forward is XLA's `reduce_window`. The gradient sends each output's
    gradient to the first maximum of its window in row-major order, as torch's
    max_pool2d backward does, and is computed on the four stride-2 phases of the
    padded input (even/odd rows x even/odd columns): each of the 9 taps reads one
    phase at offset 0 or 1, so no strided copies and no input-sized scatter. It
    replaced XLA:CPU's `select_and_scatter` (iotas + scatter), which made the
    ResNet fine-tune steps slower (docs/performance.md). Overlapping
    windows sum their gradients in another order than torch: rounding only. A
    window holding a NaN passes no gradient (torch's goes to the NaN).
    """
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _keeping_input_and_output(pool):
    """The custom-VJP forward of a max pool: its output, with (input, output) kept."""

    def fwd(x: Array):
        y = pool(x)
        return y, (x, y)

    return fwd


def _first_maximum_grads(taps: list[Array], y: Array, g: Array) -> list[Array]:
    """`g` where each tap (in the order given) is the first to hold its window's maximum."""
    taken = jnp.zeros(y.shape, bool)
    zero = jnp.zeros((), g.dtype)
    grads = []
    for tap in taps:
        first = (tap == y) & ~taken
        taken = taken | first
        grads.append(jnp.where(first, g, zero))
    return grads


def _interleave_phases(phase: dict[tuple[int, int], Array]) -> Array:
    """The four (row parity, column parity) phases, each (n, h, w, c), as (n, 2h, 2w, c)."""
    n, h, w, c = phase[0, 0].shape
    rows = [jnp.stack([phase[a, 0], phase[a, 1]], axis=3) for a in (0, 1)]  # (n, h, w, 2, c)
    return jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, c)


def _max_pool_3x3_s2_bwd(residuals, g: Array):
    x, y = residuals
    n, h, w, c = x.shape
    ho, wo = y.shape[1], y.shape[2]
    # Padded input: rows -1 .. 2*ho (window of output row r: 2r-1 .. 2r+1).
    pad = ((0, 0, 0), (1, 2 * ho + 1 - h, 0), (1, 2 * wo + 1 - w, 0), (0, 0, 0))
    phases = lax.pad(x, jnp.array(-jnp.inf, x.dtype), pad).reshape(n, ho + 1, 2, wo + 1, 2, c)
    offsets = [divmod(i, 2) + divmod(j, 2) for i in range(3) for j in range(3)]  # row-major
    taps = [phases[:, oi : oi + ho, a, oj : oj + wo, b] for oi, a, oj, b in offsets]
    terms: dict[tuple[int, int], list[Array]] = {(a, b): [] for a in (0, 1) for b in (0, 1)}
    zero = jnp.zeros((), g.dtype)
    for (oi, a, oj, b), grad in zip(offsets, _first_maximum_grads(taps, y, g), strict=True):
        shift = ((0, 0, 0), (oi, 1 - oi, 0), (oj, 1 - oj, 0), (0, 0, 0))
        terms[a, b].append(lax.pad(grad, zero, shift))
    dx = _interleave_phases({k: functools.reduce(jnp.add, v) for k, v in terms.items()})
    return (dx[:, 1 : 1 + h, 1 : 1 + w],)


max_pool_3x3_s2.defvjp(_keeping_input_and_output(max_pool_3x3_s2), _max_pool_3x3_s2_bwd)


@jax.custom_vjp
def max_pool_2x2(x: Array) -> Array:
    """torch.nn.MaxPool2d(2, 2) as used by VGG (floor mode, no padding).

    The windows do not overlap, so the pooling is a reshape and a max, and its
    gradient one elementwise pass: each output's gradient goes to the first
    maximum of its window in row-major order, as torch's max_pool2d backward
    sends it (ties are common after a ReLU). XLA:CPU's own gradient of
    `reduce_window` (`select_and_scatter`, rewritten with iotas and a scatter)
    made the VGG-16-BN fine-tune step slower (docs/performance.md). A window
    holding a NaN passes no gradient (torch's goes to the NaN).
    """
    return _windows_2x2(x).max(axis=(2, 4))


def _windows_2x2(x: Array) -> Array:
    n, h, w, c = x.shape
    ho, wo = h // 2, w // 2
    return x[:, : 2 * ho, : 2 * wo].reshape(n, ho, 2, wo, 2, c)


def _max_pool_2x2_bwd(residuals, g: Array):
    x, y = residuals
    n, h, w, c = x.shape
    windows = _windows_2x2(x)
    order = ((0, 0), (0, 1), (1, 0), (1, 1))  # row-major: the first maximum wins
    grads = _first_maximum_grads([windows[:, :, i, :, j] for i, j in order], y, g)
    dx = _interleave_phases(dict(zip(order, grads, strict=True)))
    if dx.shape != x.shape:  # floor mode: the last odd row/column gets none
        dx = jnp.pad(dx, ((0, 0), (0, h - dx.shape[1]), (0, w - dx.shape[2]), (0, 0)))
    return (dx,)


max_pool_2x2.defvjp(_keeping_input_and_output(max_pool_2x2), _max_pool_2x2_bwd)


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Averaging weights (out, in) with torch's bin edges, in float64.

    torch's adaptive pooling bin i covers [floor(i*in/out), ceil((i+1)*in/out)).
    """
    # float64, so that a float64 model averages as torch float64 does; the caller's
    # cast to float32 rounds to the very values a float32 fill would hold.
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool2d(x: Array, output_size: tuple[int, int]) -> Array:
    """torch.nn.AdaptiveAvgPool2d on an NHWC array, for any input size."""
    n, h, w, c = x.shape
    oh, ow = output_size
    if (h, w) == (oh, ow):
        return x
    if h % oh == 0 and w % ow == 0:
        # Equal, non-overlapping bins: a plain mean, as torch computes it.
        return x.reshape(n, oh, h // oh, ow, w // ow, c).mean(axis=(2, 4))
    ph = jnp.asarray(_adaptive_pool_matrix(h, oh), x.dtype)
    pw = jnp.asarray(_adaptive_pool_matrix(w, ow), x.dtype)
    return jnp.einsum("ih,nhwc,jw->nijc", ph, x, pw, precision=jax.lax.Precision.HIGHEST)


def global_avg_pool(x: Array) -> Array:
    """torch's AdaptiveAvgPool2d((1, 1)) followed by flatten."""
    return jnp.mean(x, axis=(1, 2))


# torchvision's initialisers, so that a model trained from scratch starts where
# torchvision's would (kaiming_normal_ fan_out for convs).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
head_init = nn.initializers.xavier_uniform()
