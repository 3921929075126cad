"""Steps 3-4 of the Neural ePDO layer as one op: the per-pixel taps, their L1
normalisation and their application, with a hand-written backward pass (and, on CPU, the
fused C++ kernel of `cpu_kernel`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from neural_epdo_jax.layers.ops import cpu_kernel
from neural_epdo_jax.layers.ops.primitives import f32, mul, pad_hw, take, tree_sum, window


def _taps_l1(w: jax.Array) -> jax.Array:
    """sum |w| over the component and tap axes: [d, T, ...] -> [...] (float32)."""
    per_c = tree_sum(jax.lax.abs(f32(take(w, t))) for t in range(w.shape[1]))
    return jnp.sum(per_c, axis=0)  # a reduce: see `_na_bwd`


def _raw_apply(x: jax.Array, w: jax.Array, k: int) -> jax.Array:
    h, wd, c = x.shape[-2], x.shape[-1], k // 2
    xp = pad_hw(x, c)
    return tree_sum(
        mul(jax.lax.expand_dims(take(w, t), (1,)), window(xp, t // k, t % k, h, wd))
        for t in range(k * k)
    )


def _taps_by_operator(w: jax.Array) -> jax.Array:
    """Taps [S, d, T, g / S, ...] -> [d, T, g, ...] (operator j * g / S + l from (j, l))."""
    s, d, t, gl = w.shape[:4]
    return jnp.moveaxis(w, 0, 2).reshape((d, t, s * gl) + w.shape[4:])


def _taps_by_group(w: jax.Array, s: int) -> jax.Array:
    """The inverse of `_taps_by_operator`."""
    d, t, g = w.shape[:3]
    return jnp.moveaxis(w.reshape((d, t, s, g // s) + w.shape[3:]), 2, 0)


def _join_taps(w) -> jax.Array:
    """Taps given as parts of the component axis (a tuple, see `normalised_apply`) as one
    array."""
    return jnp.concatenate(w, axis=1) if isinstance(w, tuple) else w


def _split_taps(gw: jax.Array, w):
    """The inverse of `_join_taps` (for the taps' gradient): parts shaped like ``w``'s."""
    if not isinstance(w, tuple):
        return gw
    return tuple(jnp.split(gw, np.cumsum([p.shape[1] for p in w])[:-1].tolist(), axis=1))


def normalised_apply_fwd_xla(x, w, k):
    w = _taps_by_operator(_join_taps(w))
    scale = 0.2 / (0.2 * _taps_l1(w) + 0.01)  # [g, ...]
    return _raw_apply(x, w, k) * scale[None, None].astype(x.dtype), scale


def normalised_apply(x: jax.Array, w: jax.Array, kernel_size: int) -> jax.Array:
    """Steps 3-4 of the Neural ePDO layer, channel-major and fused.

    ``out = sum_t wn[t] x[p + t]`` with ``wn = (w / 5) / (sum_{c,t} |w / 5| + 0.01)``,
    computed as the raw taps applied, then scaled by ``0.2 / (0.2 sum |w| + 0.01)`` (one factor
    per pixel and operator), so that no normalised copy of the taps is made.

    Args:
      x: [d, Q, g, ..., H, W]: d components of Q partitions of g fields.
      w: [S, d, kernel_size^2, g / S, ..., H, W] the raw taps (tap = row * size + col) of the
        g operators, operator ``j * g / S + l`` at ``(j, l)``: the layout in which the grouped
        generator (S groups, `generator_taps_cm`) produces them; S = 1 is plain
        ``w[None]`` for taps [d, T, g, ...]. Or a tuple of parts [S, d_i, ...] that split
        the component axis in order (d = d_0 + d_1 + ...: the generator's output for mixed
        field types); the kernel reads them in place and the gradient comes as parts too
        (the XLA formulation concatenates them).
    Returns:
      [d, Q, g, ..., H, W].

    The backward pass is written by hand: each of its passes is one fused loop over the taps
    (differentiating the unrolled slices makes XLA build a padded full-size array per tap).
    On CPU, float32, both passes call the fused C++ kernels of `kernels` when they are
    available (same formulas; the XLA formulation below otherwise).
    """
    k = kernel_size
    if isinstance(w, (tuple, list)):
        if not w:
            raise ValueError("normalised_apply: the taps are an empty sequence of parts.")
        w = tuple(w) if len(w) > 1 else w[0]
    parts = w if isinstance(w, tuple) else (w,)
    w0 = parts[0]
    if (
        x.ndim < 5
        or any(p.ndim != x.ndim + 1 for p in parts)
        or any(p.shape[:1] + p.shape[2:] != w0.shape[:1] + w0.shape[2:] for p in parts)
        or sum(p.shape[1] for p in parts) != x.shape[0]
        or w0.shape[2] != k * k
        or w0.shape[0] * w0.shape[3] != x.shape[2]
        or w0.shape[4:] != x.shape[3:]
    ):
        raise ValueError(
            f"normalised_apply: x {tuple(x.shape)} must be [d, Q, g, ..., H, W] and the taps "
            f"{[tuple(p.shape) for p in parts]} [S, d, {k * k}, g / S, ..., H, W] (or parts "
            "[S, d_i, ...] with d_0 + d_1 + ... = d) with the same d, g and trailing axes."
        )
    return _normalised_apply(x, w, k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _normalised_apply(x: jax.Array, w: jax.Array, kernel_size: int) -> jax.Array:
    return _na_fwd(x, w, kernel_size)[0]


def _na_fwd(x, w, k):
    if cpu_kernel.use_for(x, w, k):
        out, scale = cpu_kernel.normalised_apply_fwd(x, w, k)
        return out, (x, w, scale, out)
    out, scale = normalised_apply_fwd_xla(x, w, k)
    return out, (x, w, scale, None)


def _na_bwd(k, res, g):
    x, w, scale, out = res
    if out is not None:  # the forward pass ran the kernel
        return cpu_kernel.normalised_apply_bwd(x, w, scale, out, g.astype(out.dtype), k)
    return normalised_apply_bwd_xla(k, x, w, scale, g)


def normalised_apply_bwd_xla(k, x, w_in, scale, g):
    w = _join_taps(w_in)
    groups = w.shape[0]
    w = _taps_by_operator(w)
    h, wd, c = x.shape[-2], x.shape[-1], k // 2
    q = x.shape[1]
    gs = g * scale[None, None].astype(g.dtype)
    # x[p] reaches out[p - t'] through w_t[p - t'] (t' the tap's offset): windows of the
    # padded w and g (padding w once is cheaper than padding 25 products).
    wp, gp, xp = pad_hw(w, c), pad_hw(gs, c), pad_hw(x, c)

    def back(a: jax.Array, t: int) -> jax.Array:
        return window(a, 2 * c - t // k, 2 * c - t % k, h, wd)

    gx = tree_sum(
        mul(back(jax.lax.expand_dims(take(wp, t), (1,)), t), back(gp, t)) for t in range(k * k)
    )
    gw_scaled = jnp.stack(
        [
            tree_sum(mul(take(gs, r), window(take(xp, r), t // k, t % k, h, wd)) for r in range(q))
            for t in range(k * k)
        ],
        axis=1,
    )  # scale * d raw / d w: [d, T, g, ...]
    # d out / d scale = raw, so d scale = sum w * gw_scaled / scale; d scale / d l1 = -scale^2.
    # The last sum (over components) is a reduce, not adds: XLA duplicates a tree of adds
    # into every element of gw below (a d * taps-fold recomputation).
    dot = tree_sum(f32(mul(take(w, t), take(gw_scaled, t))) for t in range(k * k))
    dl1 = -scale * jnp.sum(dot, axis=0)
    gw = gw_scaled + jnp.sign(w) * dl1[None, None].astype(w.dtype)
    return gx.astype(x.dtype), _split_taps(_taps_by_group(gw.astype(w.dtype), groups), w_in)


_normalised_apply.defvjp(_na_fwd, _na_bwd)
