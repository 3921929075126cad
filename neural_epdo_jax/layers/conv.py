"""The linear equivariant layers: the PDO convolution (PDO-eConv) and the 1x1 map.

Each stores coefficients only; the kernel is expanded from the constant basis on every
call (so evaluation always uses the current parameters).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from neural_epdo_jax.core import bases, fields, fourier, groups
from neural_epdo_jax.layers.backend import check_impl
from neural_epdo_jax.layers.layout import Dtype, as_dtype, check_input
from neural_epdo_jax.layers.ops.blocks import (
    apply_linear_cm,
    block_matmul,
    from_cm,
    linear_blocks,
    to_cm,
)


def reference_init(basis_sq_sum: float, fan_in_fields: int, dim_out: int):
    """The reference's init: normal with std sqrt(1/f), f = sum(basis^2) * F_in / dim_out."""
    std = float(np.sqrt(dim_out / (basis_sq_sum * fan_in_fields)))
    return nn.initializers.normal(stddev=std)


class PDOConv(nn.Module):
    """Linear equivariant PDO convolution (PDO-eConv): ``sum_k sum_alpha A_k,alpha d^alpha``.

    The kernel is ``sum_b w[i, o, b] basis[b]`` with ``basis`` from `bases.pdo_basis`, which
    satisfies ``A_k (rho_in (x) D_k)(g) = rho_out(g) A_k`` for every g (He et al. 2023, the
    PDO-eConv constraint), so ``conv(g.x) = g.conv(x)`` exactly for grid elements.

    Attributes:
      in_type, out_type: field types of input and output.
      discretisation: stencil name ('fd', 'gauss', 'rbf-fd' or a registered one).
      max_order: highest derivative order.
      kernel_size: stencil size.
      dtype: computation dtype of the convolution (kernels are expanded in float32).
      channel_major_out: return channel-major [B, d_out, F_out, H, W] (the Neural ePDO
        layers' layout) instead of NHWC, computed as one product of the kernel with the
        input's patches rather than a convolution and a transpose (XLA's CPU transpose of
        the conv's output is a noticeable part of an inference step). Meant for inputs
        with few channels (the patches are kernel_size^2 times the input).
    """

    in_type: fields.FieldType
    out_type: fields.FieldType
    discretisation: str = "fd"
    max_order: int = 4
    kernel_size: int = 5
    dtype: Dtype = "float32"
    channel_major_out: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, in_type.size] -> [B, H, W, out_type.size] (or channel-major)."""
        check_input(x, self.in_type, "PDOConv")
        group = self.in_type.group
        basis_np = bases.pdo_basis(
            group,
            self.in_type.unit,
            self.out_type.unit,
            self.discretisation,
            self.max_order,
            self.kernel_size,
        )
        n, d_out, d_in, s, _ = basis_np.shape
        f_in, f_out = self.in_type.num_fields, self.out_type.num_fields
        w = self.param(
            "weight", reference_init(float(np.sum(basis_np**2)), f_in, d_out), (f_in, f_out, n)
        )
        kernel = expand_pdo_kernel(w, basis_np)
        dt = as_dtype(self.dtype)
        if self.channel_major_out:
            return conv_channel_major(x.astype(dt), kernel.astype(dt), f_out, d_out)
        return jax.lax.conv_general_dilated(
            x.astype(dt),
            kernel.astype(dt),
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


def conv_channel_major(x: jax.Array, kernel: jax.Array, f_out: int, d_out: int) -> jax.Array:
    """The "SAME" convolution of NHWC x [B, H, W, C] with kernel [S, S, C, F_out * d_out],
    returned channel-major [B, d_out, F_out, H, W]: the kernel (components first) times
    the patches [B, S * S * C, H * W]."""
    b, h, w, c = x.shape
    size = kernel.shape[0]
    pad = size // 2
    xp = jnp.pad(x, ((0, 0), (pad, size - 1 - pad), (pad, size - 1 - pad), (0, 0)))
    windows = [xp[:, i : i + h, j : j + w, :] for i in range(size) for j in range(size)]
    patches = jnp.stack(windows, axis=1)  # [B, taps, H, W, C]
    if c > 1:
        patches = jnp.moveaxis(patches, -1, 2)
    patches = patches.reshape(b, size * size * c, h * w)
    k = kernel.reshape(size * size * c, f_out, d_out)
    k = jnp.transpose(k, (2, 1, 0)).reshape(d_out * f_out, size * size * c)
    return block_matmul(k, patches).reshape(b, d_out, f_out, h, w)


def expand_pdo_kernel(weight: jax.Array, basis: np.ndarray) -> jax.Array:
    """Plain conv kernel from ePDO coefficients.

    Args:
      weight: [F_in, F_out, n] coefficients.
      basis: [n, d_out, d_in, S, S] from `bases.pdo_basis`.
    Returns:
      [S, S, F_in * d_in, F_out * d_out] (HWIO, field-major channels), float32.
    """
    f_in, f_out, _ = weight.shape
    _, d_out, d_in, s, _ = basis.shape
    b = jnp.asarray(basis, jnp.float32)
    kernel = jnp.einsum("iob,bpqhw->hwiqop", weight, b)  # [S, S, F_in, d_in, F_out, d_out]
    return kernel.reshape(s, s, f_in * d_in, f_out * d_out)


def expand_linear_kernel(weight: jax.Array, basis: np.ndarray, groups: int = 1) -> jax.Array:
    """Plain (grouped) 1x1 kernel from equivariant coefficients.

    Args:
      weight: [F_in / groups, F_out, n] coefficients.
      basis: [n, d_out, d_in] from `bases.linear_basis` (or `bases.generator_basis`).
      groups: number of groups s.
    Returns:
      [s, F_in / s * d_in, F_out / s * d_out]: group j maps input block j to output block j.
    """
    fi, f_out, _ = weight.shape
    _, d_out, d_in = basis.shape
    b = jnp.asarray(basis, jnp.float32)
    kernel = jnp.einsum("iob,bqp->ipoq", weight, b)  # [F_in/s, d_in, F_out, d_out]
    kernel = kernel.reshape(fi * d_in, groups, (f_out // groups) * d_out)  # [I, s, O]
    return jnp.transpose(kernel, (1, 0, 2))


def apply_linear_kernel(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Apply a grouped 1x1 kernel [s, I, O] to [..., s * I] -> [..., s * O]."""
    s, i, o = kernel.shape
    if s == 1:
        return jnp.dot(x, kernel[0])
    xs = x.reshape(x.shape[:-1] + (s, i))
    return jnp.einsum("...si,sio->...so", xs, kernel).reshape(x.shape[:-1] + (s * o,))


class EquivariantLinear(nn.Module):
    """Equivariant 1x1 map between field types, optionally grouped.

    ``rho_out(g) A = A rho_in(g)`` for every g (basis from `bases.linear_basis`). With
    ``groups = s``, input and output fields are split into s contiguous blocks and block j of
    the output only sees block j of the input (the generator's ``s``).

    Attributes:
      in_type, out_type: field types.
      groups: number of groups (divides both field counts).
      dtype: computation dtype.
      impl: 'fourier' (default: block diagonal in group-Fourier coordinates, see
        `apply_linear_fourier`) or 'dense' (the expanded kernel, `expand_linear_kernel`).
        Same parameters and, up to round-off, the same outputs.
    """

    in_type: fields.FieldType
    out_type: fields.FieldType
    groups: int = 1
    dtype: Dtype = "float32"
    impl: str = "fourier"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., in_type.size] -> [..., out_type.size]."""
        if x.shape[-1] != self.in_type.size:
            raise ValueError(
                f"EquivariantLinear: {self.in_type!r} has {self.in_type.size} channels, input has "
                f"{x.shape[-1]} (shape {tuple(x.shape)})."
            )
        group, u_in, u_out = self.in_type.group, self.in_type.unit, self.out_type.unit
        basis_np = bases.linear_basis(group, u_in, u_out)
        w = grouped_weight(self, basis_np, self.in_type, self.out_type.num_fields, self.groups)
        dt = as_dtype(self.dtype)
        if check_impl(self.impl) == "dense":
            kernel = expand_linear_kernel(w, basis_np, self.groups).astype(dt)
            return apply_linear_kernel(x.astype(dt), kernel)
        return apply_linear_fourier(x.astype(dt), w, group, u_in, u_out, self.groups)


def weight_spec(basis_np: np.ndarray, in_type: fields.FieldType, f_out: int, s: int):
    """(name, init, shape) of the 1x1 layers' weights [F_in/s, F_out, n] (coefficients of
    ``basis_np`` [n, d_out, d_in])."""
    n, d_out, _ = basis_np.shape
    f_in = in_type.num_fields
    if f_in % s or f_out % s:
        raise ValueError(
            f"grouped linear map: {s} groups must divide the input fields ({f_in}) and the "
            f"output fields ({f_out})."
        )
    fi = f_in // s
    return ("weight", reference_init(float(np.sum(basis_np**2)), fi, d_out), (fi, f_out, n))


def grouped_weight(
    mod: nn.Module, basis_np: np.ndarray, in_type: fields.FieldType, f_out: int, s: int
) -> jax.Array:
    """Declares the 1x1 layers' weights (see `weight_spec`)."""
    return mod.param(*weight_spec(basis_np, in_type, f_out, s))


class Params(nn.Module):
    """Declares parameters exactly as a layer does (same names, order, inits), without
    computing anything: the fast path reads the weights of its sub-layers through it."""

    specs: tuple

    @nn.compact
    def __call__(self) -> tuple[jax.Array, ...]:
        return tuple(self.param(name, init, shape) for name, init, shape in self.specs)


def apply_linear_fourier(
    x: jax.Array,
    weight: jax.Array,
    group: groups.Group,
    in_unit: fields.Unit,
    out_unit: fields.Unit,
    s: int = 1,
) -> jax.Array:
    """``apply_linear_kernel(x, expand_linear_kernel(weight, linear_basis(...), s))``,
    computed in group-Fourier coordinates.

    An equivariant map between permutation representations of C_N / D_N does not mix the
    slots of `fourier.fourier_slots` (rotation frequencies; D_N: and mirror eigenvalues), so
    with the orthonormal transforms ``Phi`` of `fourier.fourier_matrix`,
    ``A = sum_k Phi_out[k]^T B_k Phi_in[k]``: one small
    dense block per slot and field pair (C16 regular: 8 blocks of 2 x 2, 32 multiply-adds
    instead of 256; D16: 16 blocks of 2 x 2, 64 instead of 1024), plus one transform per field
    each side.

    Args:
      x: [..., F_in * d_in] (the compute dtype).
      weight: [F_in / s, F_out, n] coefficients of `bases.linear_basis`.
    Returns:
      [..., F_out * d_out].
    """
    phi_in = fourier.fourier_matrix(group, in_unit)
    phi_out = fourier.fourier_matrix(group, out_unit)
    blocks = linear_blocks(weight, group, in_unit, out_unit, s)
    y = apply_linear_cm(to_cm(x, phi_in.shape[2]), blocks, phi_in, phi_out)
    return from_cm(y, x.shape[:-1])
