"""Block matrix products in group-Fourier coordinates, on channel-major ("CM") arrays
[d, F, N] (component, field, pixels): every channel mixing is one plain matrix product with
the pixels as its long axis and no transposes in between."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from neural_epdo_jax.core import bases, fields, groups


def _group_mask(f_out: int, s: int, mi: int) -> np.ndarray:
    """[F_out, s * mi] 0/1: output field o sees the input block of its group (o // (F_out/s))."""
    fo = f_out // s
    mask = np.zeros((f_out, s, mi))
    for o in range(f_out):
        mask[o, o // fo] = 1.0
    return mask.reshape(f_out, s * mi)


def linear_blocks(
    weight: jax.Array, group: groups.Group, in_unit: fields.Unit, out_unit: fields.Unit, s: int = 1
) -> jax.Array:
    """Fourier blocks [K, Y * F_out, X * F_in] (rows (y, o), columns (x, i)) of the grouped
    equivariant map with coefficients ``weight`` [F_in / s, F_out, n] (`bases.linear_basis`).
    Groups are block-diagonal zeros (cheap: the blocks are small)."""
    fb = jnp.asarray(bases.linear_basis_fourier(group, in_unit, out_unit), jnp.float32)
    fi, f_out, _ = weight.shape
    k, yw, xw = fb.shape[1:]
    blocks = jnp.einsum("ion,nkyx->kyoxi", weight, fb)  # [K, Y, F_out, X, F_in / s]
    if s > 1:
        mask = jnp.asarray(_group_mask(f_out, s, fi), jnp.float32)  # [F_out, F_in]
        blocks = jnp.einsum("kyoxi,oji->kyoxji", blocks, mask.reshape(f_out, s, fi))
    return blocks.reshape(k, yw * f_out, xw * fi * s)


def _bmm(a: jax.Array, b: jax.Array) -> jax.Array:
    """Batched matrix product over b's leading axes; a [..., P, Q] has the same or fewer
    (trailing) batch axes and is broadcast, so that the product is one batched dot whose
    output needs no transpose (jnp.matmul makes a's missing batch axes free axes of b and
    transposes the result)."""
    lead = b.shape[:-2]
    a = jax.lax.broadcast_in_dim(a, lead + a.shape[-2:], tuple(range(b.ndim - a.ndim, b.ndim)))
    dims = tuple(range(len(lead)))
    return jax.lax.dot_general(a, b, (((b.ndim - 1,), (b.ndim - 2,)), (dims, dims)))


@jax.custom_vjp
def _bmm_pair(a: jax.Array, a_t: jax.Array, b: jax.Array) -> jax.Array:
    return _bmm(a, b)


def _bmm_pair_fwd(a, a_t, b):
    return _bmm(a, b), (a_t, b)


def _bmm_pair_bwd(res, g):
    a_t, b = res
    extra = tuple(range(b.ndim - a_t.ndim))  # the axes over which a was broadcast: summed
    lead = tuple(range(len(extra), b.ndim - 2))
    contract = extra + (b.ndim - 1,)
    ga = jax.lax.dot_general(g, b, ((contract, contract), (lead, lead)))
    return ga, jnp.zeros_like(a_t), _bmm(a_t, g)


_bmm_pair.defvjp(_bmm_pair_fwd, _bmm_pair_bwd)


def with_transpose(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(blocks, their transpose over the last two axes, materialised): `block_matmul`'s
    operand. Made once, outside a layer's loop over chunks, it reaches the loop's backward
    pass as a stored array rather than as a transposed view of the blocks."""
    return blocks, jnp.swapaxes(blocks, -1, -2)


def block_matmul(blocks, b: jax.Array) -> jax.Array:
    """`_bmm` of weight blocks [..., P, Q] (or `with_transpose`'s pair) and b [..., Q, N]. With
    a pair, the backward pass multiplies by the stored transpose: a plain product, which
    XLA's CPU backend runs in its fast matmul library (autodiff's product with a transposed
    operand runs in a slower generic one)."""
    a, a_t = blocks if isinstance(blocks, tuple) else with_transpose(blocks)
    return _bmm_pair(a.astype(b.dtype), a_t.astype(b.dtype), b)


def const_matmul(a: np.ndarray, b: jax.Array) -> jax.Array:
    """`block_matmul` of a constant matrix (a transform) [..., P, Q] and b, in b's dtype (the
    constant's transpose stored too)."""
    a_t = np.ascontiguousarray(np.swapaxes(a, -1, -2))
    return block_matmul((jnp.asarray(a, b.dtype), jnp.asarray(a_t, b.dtype)), b)


def apply_linear_cm(x: jax.Array, blocks, phi_in: np.ndarray, phi_out: np.ndarray) -> jax.Array:
    """[d_in, F_in, N] -> [d_out, F_out, N]: transform, one block product per slot, inverse.

    ``A = sum_k Phi_out[k]^T B_k Phi_in[k]`` (see `fourier.fourier_matrix`); ``blocks``: the
    blocks B [K, Y * F_out, X * F_in] of `linear_blocks`, or their `with_transpose` pair."""
    d_in, f_in, n = x.shape
    k, xw, _ = phi_in.shape
    yw, d_out = phi_out.shape[1:]
    fwd = phi_in.reshape(k * xw, d_in)
    xh = const_matmul(fwd, x.reshape(d_in, f_in * n)).reshape(k, xw * f_in, n)  # [K, (x, i), N]
    yh = block_matmul(blocks, xh)  # [K, (y, o), N]
    inv = phi_out.reshape(k * yw, d_out).T
    return const_matmul(inv, yh.reshape(k * yw, -1)).reshape(d_out, -1, n)


def to_cm(x: jax.Array, d: int) -> jax.Array:
    """[..., F * d] (field-major) -> [d, F, P] with P the flattened leading axes."""
    return jnp.transpose(x.reshape(-1, x.shape[-1] // d, d), (2, 1, 0))


def from_cm(y: jax.Array, lead: tuple[int, ...]) -> jax.Array:
    """[d, F, P] -> [*lead, F * d]."""
    return jnp.transpose(y, (2, 1, 0)).reshape(lead + (-1,))
