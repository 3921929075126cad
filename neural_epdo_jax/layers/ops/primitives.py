"""Small lax helpers for the layers' unrolled tap loops.

The tap loops trace hundreds of slices and products per layer; as lax ops they skip jnp's
per-call dispatch, so a layer traces faster (the program is the same).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tree_sum(terms, op=jax.lax.add) -> jax.Array:
    """Sum (or another associative ``op``) of a sequence of arrays as a balanced tree (one
    fused loop in XLA; XLA's CPU reductions over leading axes are many times slower)."""
    terms = list(terms)
    while len(terms) > 1:
        pairs = [op(terms[i], terms[i + 1]) for i in range(0, len(terms) - 1, 2)]
        terms = pairs + terms[len(pairs) * 2 :]
    return terms[0]


def take(a: jax.Array, i: int, axis: int = 1) -> jax.Array:
    """``a[:, i]`` (index ``i`` of ``axis``, dropped)."""
    return jax.lax.index_in_dim(a, i, axis, keepdims=False)


def window(a: jax.Array, i: int, j: int, h: int, w: int) -> jax.Array:
    """``a[..., i:i+h, j:j+w]``."""
    return jax.lax.slice(a, (0,) * (a.ndim - 2) + (i, j), a.shape[:-2] + (i + h, j + w))


def mul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a * b`` for arrays of one rank and dtype, broadcasting their size-1 axes."""
    shape = tuple(max(p, q) for p, q in zip(a.shape, b.shape))
    dims = tuple(range(len(shape)))
    a, b = (v if v.shape == shape else jax.lax.broadcast_in_dim(v, shape, dims) for v in (a, b))
    return jax.lax.mul(a, b)


def f32(a: jax.Array) -> jax.Array:
    return jax.lax.convert_element_type(a, jnp.float32)


def pad_hw(x: jax.Array, c: int) -> jax.Array:
    return jnp.pad(x, ((0, 0),) * (x.ndim - 2) + ((c, c), (c, c)))
