"""Dropout of whole channels or whole fields."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from neural_epdo_jax.core import fields
from neural_epdo_jax.runtime import parallel


class ChannelDropout(nn.Module):
    """Dropout of whole channels (PyTorch Dropout2d: the reference's), or of whole fields
    (``per_field=True``: every component of a field dropped together, which keeps the
    training-time map equivariant).

    ``axis_name``: when the batch is split over the devices of this axis, the masks are drawn
    for the whole batch and each device takes its rows (`parallel.batch_rows`): the same
    masks as on one device.

    ``channel_major``: x is [B, d, F, H, W] instead of [B, H, W, F * d]; the same masks."""

    rate: float
    ftype: fields.FieldType | None = None
    per_field: bool = False
    axis_name: str | None = None
    channel_major: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        b, c = x.shape[0], (x.shape[1] * x.shape[2] if self.channel_major else x.shape[-1])
        key = self.make_rng("dropout")
        f = self.ftype.num_fields if self.per_field else c
        keep = parallel.batch_rows(
            lambda n: jax.random.bernoulli(key, 1.0 - self.rate, (n, 1, 1, f, 1)), b, self.axis_name
        )  # [b, 1, 1, f, 1]: one draw per channel, or per field
        keep = jnp.broadcast_to(keep, (b, 1, 1, f, c // f)).reshape(b, 1, 1, c)
        if self.channel_major:
            fd = x.shape[2]
            keep = jnp.transpose(keep.reshape(b, fd, c // fd), (0, 2, 1))[:, :, :, None, None]
        return jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)
