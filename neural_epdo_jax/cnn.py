"""A plain CNN with the Neural ePDO network's macro-architecture: the non-equivariant baseline."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from neural_epdo_jax import layers
from neural_epdo_jax.core import fields, groups


def _plain(channels: int) -> fields.FieldType:
    """``channels`` scalar channels: a `layers.FieldBatchNorm` of this type is a plain
    BatchNorm (one statistic per channel)."""
    return fields.FieldType(groups.Group(1), "trivial", channels)


class CNN(nn.Module):
    """Six ordinary convolutions in `models.NeuralEPDONet`'s layout: the baseline that the
    equivariant networks are compared with.

    Block i: ``kernel_size`` x ``kernel_size`` "SAME" convolution to ``channels[i]`` channels
    (no bias: a BatchNorm follows), BatchNorm (PyTorch semantics, padding rows masked out),
    ReLU; 2x2 max pool after blocks 2 and 4; channel dropout after blocks 3-6; then a global
    max pool over the pixels and the same head (dense 64, BatchNorm, ReLU, dense
    ``num_classes``). Nothing is equivariant beyond translations: no group pooling, and
    the network is not rotation invariant (a control for the equivariance tests).
    Convolutions use PyTorch's default initialisation, as the head (`layers.TorchDense`).

    ``axis_name``: the data-parallel axis when the batch is split over devices (BatchNorm
    statistics and dropout masks of the whole batch; see `train.steps.jit_data_parallel`).
    """

    channels: Sequence[int] = (20, 28, 36, 36, 56, 76)
    kernel_size: int = 5
    dropout: float = 0.1
    num_classes: int = 10
    dtype: str = "float32"
    axis_name: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if len(self.channels) != 6 or any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be 6 positive channel counts, got {self.channels}.")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {self.kernel_size}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        layers.as_dtype(self.dtype)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        """[B, H, W, 1] images -> [B, num_classes] float32 logits.

        ``mask`` [B] (training): 0 marks padding rows, kept out of the batch statistics.
        """
        if x.ndim != 4 or x.shape[-1] != 1:
            raise ValueError(
                f"CNN expects images of shape [batch, height, width, 1], got {tuple(x.shape)}."
            )
        dt = layers.as_dtype(self.dtype)
        k = self.kernel_size
        # PyTorch's Conv2d default: U(+-1/sqrt(fan_in)).
        init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
        x = x.astype(dt)
        for i, c in enumerate(self.channels):
            x = nn.Conv(c, (k, k), padding="SAME", use_bias=False, dtype=dt, kernel_init=init)(x)
            bn = layers.FieldBatchNorm(_plain(c), axis_name=self.axis_name)
            x = nn.relu(bn(x, train=train, mask=mask))
            if i >= 2:
                x = layers.ChannelDropout(self.dropout, axis_name=self.axis_name)(x, train=train)
            if i in (1, 3):
                x = layers.max_pool_2x2(x)
        x = jnp.max(x, axis=(1, 2)).astype(jnp.float32)  # [B, channels[5]]
        x = layers.TorchDense(64)(x)
        x = layers.FieldBatchNorm(_plain(64), axis_name=self.axis_name)(x, train=train, mask=mask)
        x = nn.relu(x)
        return layers.TorchDense(self.num_classes)(x)
