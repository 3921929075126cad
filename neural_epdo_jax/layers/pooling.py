"""Pooling: invariant pooling over each field's components, and 2x2 spatial max pooling."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from neural_epdo_jax.core import fields
from neural_epdo_jax.layers.layout import check_input
from neural_epdo_jax.layers.ops.primitives import take, tree_sum


def group_pool(
    x: jax.Array,
    ftype: fields.FieldType,
    mode: str = "max",
    channel_major: bool = False,
    *,
    elementwise: bool = False,
) -> jax.Array:
    """Invariant pooling over each field's components: [..., F*d] -> [..., F]
    (``channel_major``: [B, d, F, H, W] -> [B, F, H, W]).

    ``elementwise`` (channel-major max): the same values as an elementwise max of the d
    component planes. For inference: XLA's CPU backend fuses the reduce over the component
    axis with the network's global max pool and head into one slow reduce over non-adjacent
    axes, which elementwise maxima avoid; in the train step the elementwise form costs
    XLA more temporary memory, so training keeps the reduce."""
    if mode not in ("max", "mean"):
        raise ValueError(f"group_pool: mode must be 'max' or 'mean', got {mode!r}.")
    if channel_major:
        check_input(x, ftype, "group_pool", channel_major=True)
        if mode == "max" and elementwise:
            return tree_sum((take(x, c) for c in range(x.shape[1])), jax.lax.max)
        xf, axis = x, 1
    else:
        xf, axis = x.reshape(x.shape[:-1] + (ftype.num_fields, ftype.field_size)), -1
    return jnp.max(xf, axis=axis) if mode == "max" else jnp.mean(xf, axis=axis)


def max_pool_2x2(x: jax.Array, channel_major: bool = False) -> jax.Array:
    """2x2 max pooling, stride 2 (NHWC; ``channel_major``: [B, d, F, H, W], every plane
    pooled). Exactly quarter-turn equivariant only for even H and W: odd sizes give a
    one-time warning (the last row/column is dropped, as in PyTorch).

    Same values and gradient as ``flax.linen.max_pool`` (the gradient goes to the first
    maximum of each window in row-major order; NaN propagates), computed from four strided
    slices: XLA's CPU reduce-window and its select-and-scatter gradient are several times
    slower. Differentiated, it keeps only each window's first-maximum corner (int8) for the
    backward pass.
    """
    if channel_major:  # every (image, component, field) plane as one NHWC image
        pooled = max_pool_2x2(x.reshape((-1,) + x.shape[3:] + (1,)))
        return pooled.reshape(x.shape[:3] + pooled.shape[1:3])
    h, w = x.shape[1], x.shape[2]
    if h % 2 or w % 2:
        warnings.warn(
            f"max_pool_2x2 on a {h}x{w} map: odd sizes drop the last row/column, which breaks "
            "exact quarter-turn equivariance; use inputs whose size is divisible by 4.",
            stacklevel=2,
        )
        x = x[:, : h - h % 2, : w - w % 2]
    return _max_pool_2x2(x)


def _corners(x: jax.Array) -> tuple[jax.Array, ...]:
    return x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]


@jax.custom_vjp
def _max_pool_2x2(x: jax.Array) -> jax.Array:
    a, b, c, d = _corners(x)
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _first_max(p, q):
    """Reducer of (value, corner) pairs: the larger value, the earlier corner among equal
    ones, NaN over numbers (as `jnp.maximum` propagates it)."""
    (vp, ip), (vq, iq) = p, q
    q_nan, p_nan = jnp.isnan(vq), jnp.isnan(vp)
    take_q = (q_nan & ~p_nan) | (vq > vp) | (((vq == vp) | (q_nan & p_nan)) & (iq < ip))
    return jnp.where(take_q, vq, vp), jnp.where(take_q, iq, ip)


def _mp_fwd(x):
    # The pooled values and which corner (0-3, row-major) holds each window's first maximum,
    # as one reduce over the stacked corners. The backward pass needs only that int8 index,
    # not x and y, which lowers the training step's temporary memory. (Computed
    # elementwise, XLA recomputes the index inside the backward fusions: slower steps.)
    corners = jnp.stack(_corners(x))
    index = jax.lax.broadcasted_iota(jnp.int32, corners.shape, 0)
    init = (jnp.array(-jnp.inf, x.dtype), jnp.array(0, jnp.int32))
    y, first = jax.lax.reduce((corners, index), init, _first_max, (0,))
    return y, first.astype(jnp.int8)


def _mp_bwd(first, g):
    # dx[i, r, j, s] = g[i, j] where corner 2 r + s has the window's first maximum: one
    # elementwise loop over dx. (Interleaving four corner arrays, XLA's CPU code wrote one
    # element at a time: the channel-major planes come with a trailing axis of 1.)
    r = jnp.arange(2, dtype=jnp.int8)
    corner = 2 * r[:, None, None, None] + r[:, None]  # [2, 1, 2, 1]: 2 r + s at (r, ., s, .)
    hit = first[:, :, None, :, None] == corner  # [B, H/2, 2, W/2, 2, C]
    dx = jnp.where(hit, g[:, :, None, :, None], jnp.zeros((), g.dtype))
    return (dx.reshape(g.shape[0], 2 * g.shape[1], 2 * g.shape[2], g.shape[3]),)


_max_pool_2x2.defvjp(_mp_fwd, _mp_bwd)
