"""Neural ePDOs (He et al., ICLR 2023) in JAX/Flax.

The package is a one-way stack, each part importing only from the ones before it:

* `neural_epdo_jax.core`: groups, field types, stencils, the group-Fourier transform and
  the equivariant bases (pure numpy);
* `neural_epdo_jax.runtime`: host setup, CPU devices and data parallelism;
* `neural_epdo_jax.layers`: Flax layers built on those bases (`layers.ops`: their numerical
  kernels);
* `models` / `variants`: the paper's networks;
* `data` (sources, pipeline, augmentation), `train` (state, steps, loop, metrics,
  checkpointing) and `tools` (the ``python -m`` command lines: evaluate, report, export,
  convert, study).

The main public names are importable from the package itself (``from neural_epdo_jax import
NeuralEPDO``). They are loaded on first use, so ``import neural_epdo_jax.variants`` or
``neural_epdo_jax.runtime.hostmem`` does not import JAX.
"""

import importlib

__version__ = "0.1.0"

# name -> module that defines it (relative to this package).
_EXPORTS = {
    "Group": "core.groups",
    "FieldType": "core.fields",
    "register_discretisation": "core.stencils",
    "linear_basis": "core.bases",
    "pdo_basis": "core.bases",
    "generator_basis": "core.bases",
    "PDOConv": "layers",
    "EquivariantLinear": "layers",
    "NeuralEPDO": "layers",
    "FieldBatchNorm": "layers",
    "FieldGroupNorm": "layers",
    "ChannelDropout": "layers",
    "group_pool": "layers",
    "max_pool_2x2": "layers",
    "restrict_dihedral": "layers",
    "NeuralEPDONet": "models",
    "init_variables": "models",
    "count_params": "models",
    "PAPER_VARIANTS": "variants",
    "assert_equivariant": "testing",
    "equivariance_errors": "testing",
    "equivariance_error_at_angle": "testing",
    "train_and_evaluate": "train.loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
