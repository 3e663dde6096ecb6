"""3x3 stride-1 convolutions by Winograd's minimal filtering, F(2x2, 3x3).

Every 2x2 block of outputs of a 3x3 convolution is computed from the 4x4 block
of inputs around it with 16 products per channel pair instead of 36 (Lavin &
Gray, "Fast Algorithms for Convolutional Neural Networks", 2015):

    Y = A^T [ (G K G^T) * (B^T D B) ] A          (per tile and channel pair)

with the tile transforms B^T (4x4), G (4x3) and A^T (2x4) made of 0, +-1 and
1/2. Over channels the elementwise product becomes 16 matrix products
(tiles x Cin) @ (Cin x Cout), one per point of the 4x4 transform domain, which
XLA runs on its fast matrix-multiply path. The 3x3 stride-1 layers hold most of
ResNet's and all of VGG's work, and on XLA:CPU this form runs them faster than
XLA's convolution, input gradient included (docs/performance.md has the
figures).

The backward pass stays in the transform domain:

* input gradient: the 3x3 "same" convolution of dY with the flipped,
  transposed kernel; flipping a kernel permutes its transform's 16 points
  (G flip(k) = P G k with P = (3, 1, 2, 0)), so it reuses the same products
  with the right-hand side transposed, and no kernel copy is made;
* kernel gradient: dU = V^T @ dM for each of the 16 points, with V the input
  transform and dM = A dY A^T, then dK = G^T dU G.

Sums are reordered, not approximated: results differ from a direct
convolution by float32 rounding only (the transforms' coefficients are exact
in binary; docs/parity.md has the measured differences). Half-precision inputs
are left to the direct convolution by `conv.py` (the transforms would add
bfloat16 rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# Point (a, b) of a flipped kernel's transform is point (P[a], P[b]) of the kernel's.
_FLIP = (3, 1, 2, 0)
_FLIPPED_POINT = tuple(4 * _FLIP[a] + _FLIP[b] for a in range(4) for b in range(4))


def _tiles(x: Array, axis: int, n: int) -> list[Array]:
    """The four rows of every 4-wide input tile along `axis`: x[2t + a] for a = 0..3."""
    out = []
    for a in range(4):
        start = [0] * x.ndim
        limit = list(x.shape)
        step = [1] * x.ndim
        start[axis], limit[axis], step[axis] = a, a + 2 * (n - 1) + 1, 2
        out.append(lax.slice(x, start, limit, step))
    return out


def _input_transform_1d(d: list[Array]) -> list[Array]:
    """B^T d for the four rows of a tile."""
    d0, d1, d2, d3 = d
    return [d0 - d2, d1 + d2, d2 - d1, d1 - d3]


def _output_transform_1d(m: list[Array]) -> list[Array]:
    """A^T m: four transform-domain rows to the two outputs of a tile."""
    m0, m1, m2, m3 = m
    return [m0 + m1 + m2, m1 - m2 - m3]


def _kernel_transform_1d(k: list[Array]) -> list[Array]:
    """G k: three kernel rows to four transform-domain rows."""
    k0, k1, k2 = k
    return [k0, (k0 + k1 + k2) * 0.5, (k0 - k1 + k2) * 0.5, k2]


def _output_grad_transform_1d(e: Array, o: Array) -> list[Array]:
    """A g for the even and odd output rows of a tile (the transpose of A^T)."""
    return [e, e + o, e - o, -o]


def _kernel_grad_transform_1d(u: list[Array]) -> list[Array]:
    """G^T u: four transform-domain rows back to the three kernel rows."""
    u0, u1, u2, u3 = u
    half_sum, half_diff = (u1 + u2) * 0.5, (u1 - u2) * 0.5
    return [u0 + half_sum, half_diff, half_sum + u3]


def n_tiles(size: int) -> int:
    """Tiles along one side: ceil(size / 2) (an odd size computes one output too many)."""
    return -(-size // 2)


def kernel_transform(kernel: Array) -> Array:
    """(3, 3, Cin, Cout) HWIO kernel -> (16, Cin, Cout), G K G^T for each channel pair."""
    rows = _kernel_transform_1d([kernel[i] for i in range(3)])
    return jnp.stack([t for r in rows for t in _kernel_transform_1d([r[j] for j in range(3)])])


def input_transform(x: Array) -> Array:
    """(N, H, W, C) -> (16, N * th * tw, C): B^T D B of every 4x4 tile of the
    input zero-padded by one (and to a whole number of tiles)."""
    n, h, w, c = x.shape
    th, tw = n_tiles(h), n_tiles(w)
    xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
    rows = _input_transform_1d(_tiles(xp, 1, th))
    points = [p for r in rows for p in _input_transform_1d(_tiles(r, 2, tw))]
    return jnp.stack(points).reshape(16, n * th * tw, c)


def _products(v: Array, u: Array, transpose_u: bool, precision) -> list[Array]:
    # 16 separate products: one batched dot_general ran the forward of the
    # 512-channel layers much slower on XLA:CPU, though a little faster on
    # 64-channel ones (docs/performance.md).
    if transpose_u:
        dims = (((1,), (1,)), ((), ()))
        return [
            lax.dot_general(v[k], u[_FLIPPED_POINT[k]], dims, precision=precision)
            for k in range(16)
        ]
    dims = (((1,), (0,)), ((), ()))
    return [lax.dot_general(v[k], u[k], dims, precision=precision) for k in range(16)]


def _conv_from_transforms(x: Array, u: Array, transpose_u: bool, precision) -> Array:
    n, h, w, _ = x.shape
    th, tw = n_tiles(h), n_tiles(w)
    m = _products(input_transform(x), u, transpose_u, precision)
    m = [p.reshape(n, th, tw, p.shape[-1]) for p in m]
    # Point k = 4 * i + j; A^T along i, then along j.
    cols = [_output_transform_1d([m[4 * i + j] for i in range(4)]) for j in range(4)]
    out = [_output_transform_1d([cols[j][a] for j in range(4)]) for a in range(2)]
    # out[a][b]: output (2t + a, 2s + b) of every tile (t, s).
    y = jnp.stack([jnp.stack(row, axis=3) for row in out], axis=2)
    return y.reshape(n, 2 * th, 2 * tw, -1)[:, :h, :w]


def conv3x3(x: Array, kernel: Array, precision=None) -> Array:
    """NHWC x HWIO 3x3 convolution, stride 1, padding 1 (torch's `padding=1`).

    Args:
        x: (N, H, W, Cin).
        kernel: (3, 3, Cin, Cout).
        precision: passed to the matrix products.

    Returns:
        (N, H, W, Cout), `lax.conv_general_dilated`'s result up to rounding.
    """
    return _conv_from_transforms(x, kernel_transform(kernel), False, precision)


def conv3x3_from_transform(x: Array, u: Array | Sequence[Array], precision=None) -> Array:
    """`conv3x3` from the kernel's transform `u = kernel_transform(kernel)`: (16, Cin, Cout),
    or its 16 (Cin, Cout) points as separate arrays."""
    return _conv_from_transforms(x, u, False, precision)


def conv3x3_input_grad(g: Array, kernel: Array, precision=None) -> Array:
    """d(loss)/dx of `conv3x3` given g = d(loss)/dy: g convolved with the flipped,
    transposed kernel, read from the kernel's own transform."""
    return _conv_from_transforms(g, kernel_transform(kernel), True, precision)


def conv3x3_kernel_grad(x: Array, g: Array, precision=None) -> Array:
    """d(loss)/dkernel of `conv3x3` at input x given g = d(loss)/dy, (3, 3, Cin, Cout)."""
    n, h, w, cin = x.shape
    cout = g.shape[-1]
    th, tw = n_tiles(h), n_tiles(w)
    v = input_transform(x)
    gp = jnp.pad(g, ((0, 0), (0, 2 * th - h), (0, 2 * tw - w), (0, 0)))
    even_odd = lambda t, axis: (  # noqa: E731
        lax.slice_in_dim(t, 0, None, 2, axis),
        lax.slice_in_dim(t, 1, None, 2, axis),
    )
    rows = _output_grad_transform_1d(*even_odd(gp, 1))
    dm = [p for r in rows for p in _output_grad_transform_1d(*even_odd(r, 2))]
    dm = jnp.stack(dm).reshape(16, n * th * tw, cout)
    acc = jnp.promote_types(jnp.promote_types(x.dtype, g.dtype), jnp.float32)
    du = lax.dot_general(
        v, dm, (((1,), (1,)), ((0,), (0,))), precision=precision, preferred_element_type=acc
    )
    du = du.reshape(4, 4, cin, cout)
    rows = _kernel_grad_transform_1d([du[i] for i in range(4)])
    return jnp.stack([jnp.stack(_kernel_grad_transform_1d([r[j] for j in range(4)])) for r in rows])
