"""Array conventions of the layers: NHWC and channel-major layouts, dtypes, input checks.

NHWC ``[B, H, W, F * d]`` is the public layout (channels field-major). The Neural ePDO
layers compute channel-major, ``[B, d, F, H, W]`` (components, fields, pixels), so that
every channel mixing is a plain matrix product with the pixels as its long axis.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from neural_epdo_jax.core import fields

Dtype = Any


def as_dtype(d) -> jnp.dtype:
    try:
        return jnp.dtype(d)
    except TypeError:
        raise ValueError(f"unknown dtype {d!r}; use 'float32' or 'bfloat16'.") from None


def check_input(
    x: jax.Array, ftype: fields.FieldType, where: str, channel_major: bool = False
) -> None:
    """Clear errors for a wrong rank or a channel count that does not match the field type
    (``channel_major``: the layout [batch, components, fields, height, width])."""
    if channel_major:
        want = (ftype.field_size, ftype.num_fields)
        if x.ndim != 5 or tuple(x.shape[1:3]) != want:
            raise ValueError(
                f"{where}: expected a channel-major array [batch, {want[0]} components, "
                f"{want[1]} fields, height, width] for {ftype!r}, got shape {tuple(x.shape)}."
            )
        return
    if x.ndim != 4:
        raise ValueError(
            f"{where}: expected an NHWC array of rank 4 [batch, height, width, channels], got "
            f"shape {tuple(x.shape)}."
        )
    if x.shape[-1] != ftype.size:
        raise ValueError(
            f"{where}: {ftype!r} has {ftype.size} channels ({ftype.num_fields} fields x "
            f"{ftype.field_size} components), but the input has {x.shape[-1]} (shape "
            f"{tuple(x.shape)})."
        )


def to_channel_major(x: jax.Array, ftype: fields.FieldType) -> jax.Array:
    """NHWC [B, H, W, F * d] -> channel-major [B, d, F, H, W] (the layout of the layers'
    ``channel_major`` option)."""
    check_input(x, ftype, "to_channel_major")
    b, h, w, _ = x.shape
    x = x.reshape(b, h, w, ftype.num_fields, ftype.field_size)
    return jnp.transpose(x, (0, 4, 3, 1, 2))


def to_nhwc(x: jax.Array) -> jax.Array:
    """Channel-major [B, d, F, H, W] -> NHWC [B, H, W, F * d]; rank-4 (NHWC) arrays are
    returned as they are (e.g. for activations captured from `models.NeuralEPDONet`)."""
    if x.ndim != 5:
        return x
    b, d, f, h, w = x.shape
    return jnp.transpose(x, (0, 3, 4, 2, 1)).reshape(b, h, w, f * d)
