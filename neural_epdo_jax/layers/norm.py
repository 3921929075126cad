"""Per-field normalisation: batch norm and group norm with one statistic per field."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from neural_epdo_jax.core import fields
from neural_epdo_jax.layers.layout import check_input

# The reference's epsilons (PyTorch's defaults), one per norm; the export folds them too.
BATCH_NORM_EPS = 1e-5
GROUP_NORM_EPS = 1e-5


def _field_moments(xf: jax.Array, axes=None) -> tuple[jax.Array, jax.Array, int]:
    """Per-example, per-field mean and centred sum of squares of xf [B, ..., F, d] over
    its pixels and components (float32, two passes): (mean [B, F], m2 [B, F], count), count
    = elements per example and field."""
    if axes is None:
        axes = tuple(range(1, xf.ndim - 2)) + (xf.ndim - 1,)
    count = int(np.prod([xf.shape[a] for a in axes]))
    mean = jnp.sum(xf, axis=axes, keepdims=True) / count
    m2 = jnp.sum(jnp.square(xf - mean), axis=axes)
    return jnp.squeeze(mean, axes), m2, count


class FieldBatchNorm(nn.Module):
    """Batch norm with one statistic per field (over batch, the field's components, pixels).

    PyTorch semantics: momentum 0.1 (``running = 0.9 running + 0.1 batch``), unbiased running
    variance, eps 1e-5, one affine (scale, bias) per field. Works on [B, H, W, C] and [B, C].
    Normalises in float32 whatever the input dtype.

    ``mask`` [B] (training only; 1 for real examples, 0 for padding) weights the examples
    in the batch statistics: a padded batch is normalised, and updates the running
    statistics, exactly as its real examples alone would be (the padded last batch of an
    epoch behaves like the reference's smaller last batch).

    The batch statistics are merged from per-example moments (mean and centred sum of
    squares; Chan et al.'s exact pairwise formula) and applied as one ``x * scale + shift``
    per field, so the backward pass keeps only the input, not a normalised copy of it
    (a third less temporary memory in the training step than normalising ``x - mean``).

    ``axis_name``: when the batch is split over the devices of this axis (data parallelism,
    `parallel`), the per-example moments of all devices are gathered (one collective) and
    merged as on one device: the statistics of the whole batch.

    ``channel_major``: x is [B, d, F, H, W] (components, fields, pixels; the layout
    `NeuralEPDO` works in) instead of [B, H, W, F * d]; the same statistics and output. It
    also takes each field read as r consecutive fields of d / r components, [B, d / r, F * r,
    H, W] (the D_N fields after `restrict_dihedral`), as the NHWC layout does implicitly.
    """

    ftype: fields.FieldType
    momentum: float = 0.1
    epsilon: float = BATCH_NORM_EPS
    axis_name: str | None = None
    channel_major: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        f, d = self.ftype.num_fields, self.ftype.field_size
        parts = 1  # channel-major: each field read as `parts` consecutive fields
        if self.channel_major:
            if x.ndim == 5 and x.shape[2] % f == 0 and x.shape[1] * (x.shape[2] // f) == d:
                parts = x.shape[2] // f
            else:
                check_input(x, self.ftype, "FieldBatchNorm", channel_major=True)  # raises
        elif x.shape[-1] != f * d:
            raise ValueError(
                f"FieldBatchNorm: {self.ftype!r} has {f * d} channels, input has {x.shape[-1]}."
            )
        if mask is not None and tuple(mask.shape) != x.shape[:1]:
            raise ValueError(
                f"FieldBatchNorm: mask must have shape [batch] = {x.shape[:1]}, got "
                f"{tuple(mask.shape)}."
            )
        if self.channel_major:
            b, dp, _, h, w = x.shape
            xf = x.astype(jnp.float32).reshape(b, dp, f, parts, h, w)
            m_axes = (1, 3, 4, 5)
        else:
            xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (f, d))
            m_axes = None
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((f,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((f,), jnp.float32))
        gamma = self.param("scale", nn.initializers.ones, (f,))
        beta = self.param("bias", nn.initializers.zeros, (f,))
        if train:
            mean_e, m2_e, per_ex = _field_moments(xf, m_axes)
            n = xf.shape[0]
            wts = jnp.ones((n,), jnp.float32) if mask is None else mask.astype(jnp.float32)
            if self.axis_name is not None:
                # The whole batch's per-example moments, in one collective: the statistics
                # are then summed exactly as on one device.
                packed = jnp.concatenate([wts[:, None], mean_e, m2_e], axis=1)  # [n, 1 + 2F]
                packed = jax.lax.all_gather(packed, self.axis_name, axis=0, tiled=True)
                wts, mean_e, m2_e = packed[:, 0], packed[:, 1 : 1 + f], packed[:, 1 + f :]
            count = jnp.maximum(jnp.sum(wts) * per_ex, 1.0)
            mean = jnp.sum(wts[:, None] * mean_e, axis=0) * per_ex / count
            spread = m2_e + per_ex * jnp.square(mean_e - mean)
            var = jnp.sum(wts[:, None] * spread, axis=0) / count
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * count / jnp.maximum(count - 1, 1)
        else:
            mean, var = ra_mean.value, ra_var.value
        scale = gamma * jax.lax.rsqrt(var + self.epsilon)
        shift = beta - mean * scale
        if self.channel_major:
            bshape = (f, 1, 1, 1)
            y = xf * scale.reshape(bshape) + shift.reshape(bshape)
            return y.reshape(x.shape).astype(x.dtype)
        y = xf * scale[:, None] + shift[:, None]
        return y.reshape(x.shape).astype(x.dtype)


class FieldGroupNorm(nn.Module):
    """GroupNorm with one group per field (statistics per sample over the field's components
    and all pixels), eps 1e-5, followed -- as in the reference -- by two per-field affines in
    a row (GroupNorm's own and an extra one; redundant, but counted in its parameters)."""

    ftype: fields.FieldType
    epsilon: float = GROUP_NORM_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f, d = self.ftype.num_fields, self.ftype.field_size
        xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (f, d))
        axes = tuple(range(1, xf.ndim - 2)) + (xf.ndim - 1,)
        mean = jnp.mean(xf, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        for name in ("norm", "affine"):
            y = y * self.param(f"{name}_scale", nn.initializers.ones, (f,))[:, None]
            y = y + self.param(f"{name}_bias", nn.initializers.zeros, (f,))[:, None]
        return y.reshape(x.shape).astype(x.dtype)


def group_norm_relu_cm(h: jax.Array, params: tuple, eps: float = GROUP_NORM_EPS) -> jax.Array:
    """`FieldGroupNorm` then ReLU on CM arrays [d, F, n, H*W] (statistics per field and
    image over components and pixels), float32 statistics."""
    ns, nb, as_, ab = (p[:, None, None] for p in params)
    hf = h.astype(jnp.float32)
    cnt = h.shape[0] * h.shape[3]
    mean = jnp.sum(jnp.sum(hf, axis=3), axis=0) / cnt  # [F, n]
    cen = hf - mean[None, :, :, None]
    var = jnp.sum(jnp.sum(jnp.square(cen), axis=3), axis=0) / cnt
    y = cen * jax.lax.rsqrt(var + eps)[None, :, :, None]
    y = (y * ns + nb) * as_ + ab
    return nn.relu(y).astype(h.dtype)
