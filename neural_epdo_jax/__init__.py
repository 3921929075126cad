"""Neural ePDOs (He et al., ICLR 2023) in JAX/Flax.

Layers of the library, each importing only from the ones above it:
groups / fields -> stencils -> bases (pure numpy) -> layers (flax.linen) -> models ->
datasets / input_pipeline / augment -> training / evaluate.
"""

__version__ = "0.1.0"
