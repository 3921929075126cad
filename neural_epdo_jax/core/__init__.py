"""The mathematical core, pure numpy: groups and their representations, field types,
derivative stencils, the group-Fourier transform, and the equivariant bases solved from
them. Nothing here is traced or trained; the layers read these arrays as constants."""
