"""The plain dense layer of the networks' head, initialised as PyTorch does."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class TorchDense(nn.Module):
    """Dense layer with PyTorch's default init: weights and bias U(+-1/sqrt(fan_in)), so that
    the head's training dynamics match the reference."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        bound = 1.0 / np.sqrt(fan_in)
        init = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)
        kernel = self.param("kernel", init, (fan_in, self.features))
        bias = self.param("bias", init, (self.features,))
        return jnp.dot(x.astype(jnp.float32), kernel) + bias
