"""Flax (linen) layers: thin shells around the pure bases of `neural_epdo_jax.core`.

Every equivariant layer stores coefficients only; kernels are expanded from the constant
bases on every call (no cached kernels, so evaluation always uses the current parameters).
One concept per module; the public names are re-exported here (``layers.PDOConv``).
"""

from neural_epdo_jax.layers.backend import IMPLS, check_impl, default_chunk, default_eval_chunk
from neural_epdo_jax.layers.conv import (
    EquivariantLinear,
    PDOConv,
    apply_linear_fourier,
    apply_linear_kernel,
    expand_linear_kernel,
    expand_pdo_kernel,
    reference_init,
)
from neural_epdo_jax.layers.dense import TorchDense
from neural_epdo_jax.layers.dropout import ChannelDropout
from neural_epdo_jax.layers.layout import as_dtype, check_input, to_channel_major, to_nhwc
from neural_epdo_jax.layers.neural_epdo import (
    GeneratorLinear,
    NeuralEPDO,
    apply_spatially_varying,
    validate_nlpdo,
)
from neural_epdo_jax.layers.norm import FieldBatchNorm, FieldGroupNorm
from neural_epdo_jax.layers.ops.normalised_apply import normalised_apply
from neural_epdo_jax.layers.pooling import group_pool, max_pool_2x2
from neural_epdo_jax.layers.restriction import restrict_dihedral

__all__ = [
    "IMPLS",
    "ChannelDropout",
    "EquivariantLinear",
    "FieldBatchNorm",
    "FieldGroupNorm",
    "GeneratorLinear",
    "NeuralEPDO",
    "PDOConv",
    "TorchDense",
    "apply_linear_fourier",
    "apply_linear_kernel",
    "apply_spatially_varying",
    "as_dtype",
    "check_impl",
    "check_input",
    "default_chunk",
    "default_eval_chunk",
    "expand_linear_kernel",
    "expand_pdo_kernel",
    "group_pool",
    "max_pool_2x2",
    "normalised_apply",
    "reference_init",
    "restrict_dihedral",
    "to_channel_major",
    "to_nhwc",
    "validate_nlpdo",
]
