"""Restriction of D_N regular fields to C_N (the dihedral model's last block)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from neural_epdo_jax.core import fields, groups
from neural_epdo_jax.layers.layout import check_input


def restrict_dihedral(
    x: jax.Array, ftype: fields.FieldType, channel_major: bool = False
) -> tuple[jax.Array, fields.FieldType]:
    """Re-read each D_N regular field (2N components) as two C_N regular fields.

    The reference's fixed permutation: the first block of N is kept, the second reversed (on
    it r acts as a backward shift; reversed, as a forward one). Returns the array and its new
    field type (2F regular fields of C_N). ``channel_major``: x is [B, 2N, F, H, W] and the
    result [B, N, 2F, H, W] (whole planes moved).
    """
    group = ftype.group
    if not group.flip or ftype.unit != (("regular", 1),):
        raise ValueError(f"restrict_dihedral needs regular fields of a D_N group, got {ftype!r}.")
    check_input(x, ftype, "restrict_dihedral", channel_major=channel_major)
    n = group.n
    perm = jnp.asarray(np.concatenate([np.arange(n), 2 * n - 1 - np.arange(n)]))
    restricted = fields.FieldType(groups.Group(n, False), "regular", 2 * ftype.num_fields)
    if channel_major:
        b, _, f, h, w = x.shape
        xp = jnp.take(x, perm, axis=1).reshape(b, 2, n, f, h, w)  # [B, half, N, F, H, W]
        return jnp.transpose(xp, (0, 2, 3, 1, 4, 5)).reshape(b, n, 2 * f, h, w), restricted
    xf = x.reshape(x.shape[:-1] + (ftype.num_fields, 2 * n))
    return jnp.take(xf, perm, axis=-1).reshape(x.shape), restricted
