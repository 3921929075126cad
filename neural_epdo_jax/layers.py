"""Flax (linen) layers: thin shells around the pure bases (NHWC, field types static).

Every equivariant layer stores coefficients only; kernels are expanded from the constant
bases on every call (no cached kernels, so evaluation always uses the current parameters).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from neural_epdo_jax import bases, fields, groups, kernels, parallel

Dtype = Any


def _dtype(d) -> jnp.dtype:
    try:
        return jnp.dtype(d)
    except TypeError:
        raise ValueError(f"unknown dtype {d!r}; use 'float32' or 'bfloat16'.") from None


IMPLS = ("fourier", "dense")


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; use one of {IMPLS}.")
    return impl


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
        input's patches rather than a convolution and a transpose (CPU, R-gauss block 1:
        XLA's transpose of the conv's output took 5% of an inference step). Meant for
        inputs with few channels (the patches are kernel_size^2 times the input).
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
        dt = _dtype(self.dtype)
        if self.channel_major_out:
            return _conv_channel_major(x.astype(dt), kernel.astype(dt), f_out, d_out)
        return jax.lax.conv_general_dilated(
            x.astype(dt),
            kernel.astype(dt),
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


def _conv_channel_major(x: jax.Array, kernel: jax.Array, f_out: int, d_out: int) -> jax.Array:
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
        w = _grouped_weight(self, basis_np, self.in_type, self.out_type.num_fields, self.groups)
        dt = _dtype(self.dtype)
        if _check_impl(self.impl) == "dense":
            kernel = expand_linear_kernel(w, basis_np, self.groups).astype(dt)
            return apply_linear_kernel(x.astype(dt), kernel)
        return apply_linear_fourier(x.astype(dt), w, group, u_in, u_out, self.groups)


def _weight_spec(basis_np: np.ndarray, in_type: fields.FieldType, f_out: int, s: int):
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


def _grouped_weight(
    mod: nn.Module, basis_np: np.ndarray, in_type: fields.FieldType, f_out: int, s: int
) -> jax.Array:
    """Declares the 1x1 layers' weights (see `_weight_spec`)."""
    return mod.param(*_weight_spec(basis_np, in_type, f_out, s))


class _Params(nn.Module):
    """Declares parameters exactly as a layer does (same names, order, inits), without
    computing anything: the fast path reads the weights of its sub-layers through it."""

    specs: tuple

    @nn.compact
    def __call__(self) -> tuple[jax.Array, ...]:
        return tuple(self.param(name, init, shape) for name, init, shape in self.specs)


def _group_mask(f_out: int, s: int, mi: int) -> np.ndarray:
    """[F_out, s * mi] 0/1: output field o sees the input block of its group (o // (F_out/s))."""
    fo = f_out // s
    mask = np.zeros((f_out, s, mi))
    for o in range(f_out):
        mask[o, o // fo] = 1.0
    return mask.reshape(f_out, s * mi)


# ----------------------------------------------------------------------------------------
# The fast path: group-Fourier coordinates, channel-major ("CM") arrays [d, F, N]
# (component, field, pixels), so that every channel mixing is one plain matrix product with
# the pixels as its long axis and no transposes in between.


def linear_blocks(
    weight: jax.Array, group: groups.Group, in_unit: fields.Unit, out_unit: fields.Unit, s: int = 1
) -> jax.Array:
    """Fourier blocks [K, Y * F_out, X * F_in] (rows (y, o), columns (x, i)) of the grouped
    equivariant map with coefficients ``weight`` [F_in / s, F_out, n] (`bases.linear_basis`).
    Groups are block-diagonal zeros (cheap: the blocks are small)."""
    fb = jnp.asarray(bases.linear_basis_fourier(group, in_unit, out_unit), jnp.float32)
    fi, f_out, _ = weight.shape
    k, yw, xw = fb.shape[1:]
    blocks = jnp.einsum("ion,nkyx->kyoxi", weight, fb)  # [K, Y, F_out, X, F_in / s]
    if s > 1:
        mask = jnp.asarray(_group_mask(f_out, s, fi), jnp.float32)  # [F_out, F_in]
        blocks = jnp.einsum("kyoxi,oji->kyoxji", blocks, mask.reshape(f_out, s, fi))
    return blocks.reshape(k, yw * f_out, xw * fi * s)


def _bmm(a: jax.Array, b: jax.Array) -> jax.Array:
    """Batched matrix product over b's leading axes; a [..., P, Q] has the same or fewer
    (trailing) batch axes and is broadcast, so that the product is one batched dot whose
    output needs no transpose (jnp.matmul makes a's missing batch axes free axes of b and
    transposes the result)."""
    lead = b.shape[:-2]
    a = jax.lax.broadcast_in_dim(a, lead + a.shape[-2:], tuple(range(b.ndim - a.ndim, b.ndim)))
    dims = tuple(range(len(lead)))
    return jax.lax.dot_general(a, b, (((b.ndim - 1,), (b.ndim - 2,)), (dims, dims)))


@jax.custom_vjp
def _bmm_pair(a: jax.Array, a_t: jax.Array, b: jax.Array) -> jax.Array:
    return _bmm(a, b)


def _bmm_pair_fwd(a, a_t, b):
    return _bmm(a, b), (a_t, b)


def _bmm_pair_bwd(res, g):
    a_t, b = res
    extra = tuple(range(b.ndim - a_t.ndim))  # the axes over which a was broadcast: summed
    lead = tuple(range(len(extra), b.ndim - 2))
    contract = extra + (b.ndim - 1,)
    ga = jax.lax.dot_general(g, b, ((contract, contract), (lead, lead)))
    return ga, jnp.zeros_like(a_t), _bmm(a_t, g)


_bmm_pair.defvjp(_bmm_pair_fwd, _bmm_pair_bwd)


def with_transpose(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(blocks, their transpose over the last two axes, materialised): `block_matmul`'s
    operand. Made once, outside a layer's loop over chunks, it reaches the loop's backward
    pass as a stored array rather than as a transposed view of the blocks."""
    return blocks, jnp.swapaxes(blocks, -1, -2)


def block_matmul(blocks, b: jax.Array) -> jax.Array:
    """`_bmm` of weight blocks [..., P, Q] (or `with_transpose`'s pair) and b [..., Q, N]. With
    a pair, the backward pass multiplies by the stored transpose: a plain product, which
    XLA's CPU backend runs in its fast matmul library (autodiff's product with a transposed
    operand runs in a slower generic one)."""
    a, a_t = blocks if isinstance(blocks, tuple) else with_transpose(blocks)
    return _bmm_pair(a.astype(b.dtype), a_t.astype(b.dtype), b)


def const_matmul(a: np.ndarray, b: jax.Array) -> jax.Array:
    """`block_matmul` of a constant matrix (a transform) [..., P, Q] and b, in b's dtype (the
    constant's transpose stored too)."""
    a_t = np.ascontiguousarray(np.swapaxes(a, -1, -2))
    return block_matmul((jnp.asarray(a, b.dtype), jnp.asarray(a_t, b.dtype)), b)


def apply_linear_cm(x: jax.Array, blocks, phi_in: np.ndarray, phi_out: np.ndarray) -> jax.Array:
    """[d_in, F_in, N] -> [d_out, F_out, N]: transform, one block product per slot, inverse.

    ``A = sum_k Phi_out[k]^T B_k Phi_in[k]`` (see `bases.fourier_matrix`); ``blocks``: the
    blocks B [K, Y * F_out, X * F_in] of `linear_blocks`, or their `with_transpose` pair."""
    d_in, f_in, n = x.shape
    k, xw, _ = phi_in.shape
    yw, d_out = phi_out.shape[1:]
    fwd = phi_in.reshape(k * xw, d_in)
    xh = const_matmul(fwd, x.reshape(d_in, f_in * n)).reshape(k, xw * f_in, n)  # [K, (x, i), N]
    yh = block_matmul(blocks, xh)  # [K, (y, o), N]
    inv = phi_out.reshape(k * yw, d_out).T
    return const_matmul(inv, yh.reshape(k * yw, -1)).reshape(d_out, -1, n)


def to_cm(x: jax.Array, d: int) -> jax.Array:
    """[..., F * d] (field-major) -> [d, F, P] with P the flattened leading axes."""
    return jnp.transpose(x.reshape(-1, x.shape[-1] // d, d), (2, 1, 0))


def from_cm(y: jax.Array, lead: tuple[int, ...]) -> jax.Array:
    """[d, F, P] -> [*lead, F * d]."""
    return jnp.transpose(y, (2, 1, 0)).reshape(lead + (-1,))


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
    slots of `bases.fourier_slots` (rotation frequencies; D_N: and mirror eigenvalues), so
    with the orthonormal transforms ``Phi`` of `bases.fourier_matrix`,
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
    phi_in = bases.fourier_matrix(group, in_unit)
    phi_out = bases.fourier_matrix(group, out_unit)
    blocks = linear_blocks(weight, group, in_unit, out_unit, s)
    y = apply_linear_cm(to_cm(x, phi_in.shape[2]), blocks, phi_in, phi_out)
    return from_cm(y, x.shape[:-1])


@dataclasses.dataclass(frozen=True)
class _GeneratorPlan:
    group: groups.Group
    unit: fields.Unit
    discretisation: str
    max_order: int
    kernel_size: int
    s: int


def group_major(h: jax.Array, s: int) -> jax.Array:
    """Hidden fields CM [|G|, M, P] -> [s, |G|, M / s, P]: the generator's input, one slice per
    group of the grouped map (`generator_taps_cm`)."""
    order, m = h.shape[:2]
    return jnp.swapaxes(h.reshape(order, s, m // s, -1), 0, 1)


def generator_blocks(
    weight: jax.Array, plan: _GeneratorPlan
) -> tuple[jax.Array | None, jax.Array | None]:
    """From the generator's weights [M / s, g, n] (`bases.generator_basis`) to the factors of
    its ``s`` independent groups (group j maps hidden fields j M / s ... to operators
    j g / s ...; other pairs are zero, so they are not computed):
    (Fourier blocks [s, K, (y, r, a, o), (x, m)] of the untwisted group convolution, or None;
    dense kernels [s, (c, tap, o), (h, m)] of the non-regular blocks, or None),
    with o and m counted within the group."""
    gf = bases.generator_fourier(
        plan.group, plan.unit, plan.discretisation, plan.max_order, plan.kernel_size
    )
    mi, g, n = weight.shape
    s = plan.s
    order, a = plan.group.order, gf.untwist.shape[1]
    wg = weight.reshape(mi, s, g // s, n)  # [m, j, o, n]
    fourier = dense = None
    if gf.regular_blocks:
        w = jnp.stack(
            [
                wg[..., st : st + order * a].reshape(mi, s, g // s, order, a)
                for _, st in gf.regular_blocks
            ],
            axis=4,
        )  # [mi, s, g / s, |G|, R, A]
        w = jnp.einsum("ijolrx,lxa->ijolra", w, jnp.asarray(gf.untwist, jnp.float32))
        shifts = jnp.asarray(gf.shifts, jnp.float32)  # [|G|, K, b, b]
        blk = jnp.einsum("ijolra,lkyx->jkyraoxi", w, shifts)
        k, b = shifts.shape[1:3]
        fourier = blk.reshape(s, k, -1, b * mi)
    if gf.dense_offsets:
        rows = jnp.asarray(gf.dense, jnp.float32)  # [n, d_rest * taps, |G|]
        dense = jnp.einsum("ijon,nqh->jqohi", wg, rows)
        dense = dense.reshape(s, rows.shape[1] * (g // s), order * mi)
    return fourier, dense


def generator_taps_cm(h: jax.Array, fourier, dense, plan: _GeneratorPlan) -> tuple[jax.Array, ...]:
    """The generator's taps [s, d_unit, taps, g / s, N] (operator j g / s + o at (j, o)), as
    parts [s, d_i, taps, g / s, N] that split the component axis in order (one per regular
    block of the unit and per run of other blocks; `normalised_apply` takes them as they
    are, so they are never concatenated), from
    hidden regular fields h [s, |G|, M / s, N] (CM, grouped: `group_major`): Fourier block
    products into the untwisted coefficients, one inverse transform, one small matrix per
    component to taps (`bases.GeneratorFourier`); other blocks dense. Each group is one
    batch entry of every product. ``fourier`` and ``dense``: `generator_blocks`' factors,
    each (when not None) an array or its `with_transpose` pair."""
    gf = bases.generator_fourier(
        plan.group, plan.unit, plan.discretisation, plan.max_order, plan.kernel_size
    )
    s, order, m, n = h.shape
    taps = plan.kernel_size**2
    parts = []
    if fourier is not None:
        phi = bases.fourier_matrix(plan.group, (("regular", 1),))
        k, b, _ = phi.shape
        fwd = phi.reshape(k * b, order)
        hh = const_matmul(fwd, h.reshape(s, order, m * n)).reshape(s, k, b * m, n)
        zh = block_matmul(fourier, hh)  # [s, K, (y, r, a, o), N]
        z = const_matmul(fwd.T, zh.reshape(s, k * b, -1))  # [s, |G|, (r, a, o, N)]
        r, a = len(gf.regular_blocks), gf.untwist.shape[1]
        z = z.reshape(s, order, r, a, -1)
        for j, (off, _) in enumerate(gf.regular_blocks):  # gf.taps: [|G|, taps, A]
            parts.append((off, const_matmul(gf.taps, z[:, :, j]).reshape(s, order, taps, -1, n)))
    if dense is not None:
        d_rest = sum(dim for _, dim in gf.dense_offsets)
        rest = block_matmul(dense, h.reshape(s, order * m, n))  # [s, (c, tap, o), N]
        rest = rest.reshape(s, d_rest, taps, -1, n)
        start = 0
        for off, dim in gf.dense_offsets:
            parts.append((off, rest[:, start : start + dim]))
            start += dim
    parts.sort(key=lambda item: item[0])
    return tuple(p for _, p in parts)


class GeneratorLinear(nn.Module):
    """The generator's last layer: M regular fields -> g fields of spatially varying operator
    taps (coefficients transform with ``rho (x) (D_0 + ... + D_K)^-T``, mapped to taps),
    grouped by ``groups`` (the reference's ``s``).

    Returns [..., g * field_size * kernel_size^2] (field, component, tap). ``impl='fourier'``
    computes it in the factored form of `bases.generator_fourier` (same outputs up to
    round-off); ``'dense'`` expands the kernel.
    """

    hidden_type: fields.FieldType
    unit_type: fields.FieldType
    num_out: int
    groups: int = 1
    discretisation: str = "fd"
    max_order: int = 4
    kernel_size: int = 5
    dtype: Dtype = "float32"
    impl: str = "fourier"

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        basis_np = bases.generator_basis(
            self.unit_type.group,
            self.unit_type.unit,
            self.discretisation,
            self.max_order,
            self.kernel_size,
        )
        w = _grouped_weight(self, basis_np, self.hidden_type, self.num_out, self.groups)
        dt = _dtype(self.dtype)
        if _check_impl(self.impl) == "dense":
            kernel = expand_linear_kernel(w, basis_np, self.groups).astype(dt)
            return apply_linear_kernel(h.astype(dt), kernel)
        plan = _GeneratorPlan(
            self.unit_type.group,
            self.unit_type.unit,
            self.discretisation,
            self.max_order,
            self.kernel_size,
            self.groups,
        )
        fourier, dense = generator_blocks(w, plan)
        order = self.hidden_type.group.order
        hg = group_major(to_cm(h.astype(dt), order), self.groups)
        taps = jnp.concatenate(generator_taps_cm(hg, fourier, dense, plan), axis=1)
        # [s, d, taps, g / s, P] -> [P, g, d, taps]
        out = jnp.transpose(taps, (4, 0, 3, 1, 2))
        return out.reshape(h.shape[:-1] + (-1,))


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
    per field, so the backward pass keeps only the input (measured: the R-gauss training
    step's temporary buffer 948 -> 707 MiB at batch 64, against normalising ``x - mean``).

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
    epsilon: float = 1e-5
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
    epsilon: float = 1e-5

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


def apply_spatially_varying(x: jax.Array, w: jax.Array, g: int, kernel_size: int) -> jax.Array:
    """``out[p, f, c] = sum_tap w[p, f mod g, c, tap] x[p + tap, f, c]`` with zero padding.

    Shift-and-accumulate over the taps: no unfolded (kernel_size^2 x) copy of x is made.

    Args:
      x: [B, H, W, F, d] input fields.
      w: [B, H, W, g, d, kernel_size^2] operators; the F fields form F/g partitions of g
        fields, all sharing the same g operators.
    Returns:
      [B, H, W, F, d].
    """
    b, h, wd, f, d = x.shape
    k = kernel_size
    c = k // 2
    xp = jnp.pad(
        x.reshape(b, h, wd, f // g, g, d), ((0, 0), (c, c), (c, c), (0, 0), (0, 0), (0, 0))
    )
    wr = w[:, :, :, None]  # [B, H, W, 1, g, d, taps]
    out = jnp.zeros(xp.shape[:1] + (h, wd) + xp.shape[3:], jnp.result_type(x, w))
    for row in range(k):
        for col in range(k):
            out = out + wr[..., row * k + col] * xp[:, row : row + h, col : col + wd]
    return out.reshape(b, h, wd, f, d)


def _tree_sum(terms, op=jax.lax.add) -> jax.Array:
    """Sum (or another associative ``op``) of a sequence of arrays as a balanced tree (one
    fused loop in XLA; XLA's CPU reductions over leading axes are many times slower)."""
    terms = list(terms)
    while len(terms) > 1:
        pairs = [op(terms[i], terms[i + 1]) for i in range(0, len(terms) - 1, 2)]
        terms = pairs + terms[len(pairs) * 2 :]
    return terms[0]


# The tap loops below trace hundreds of slices and products per layer; as lax ops they skip
# jnp's per-call dispatch (R-gauss train step: tracing 5.2 -> 3.9 s; bitwise the same loss
# and the same step time).


def _take(a: jax.Array, i: int, axis: int = 1) -> jax.Array:
    """``a[:, i]`` (index ``i`` of ``axis``, dropped)."""
    return jax.lax.index_in_dim(a, i, axis, keepdims=False)


def _window(a: jax.Array, i: int, j: int, h: int, w: int) -> jax.Array:
    """``a[..., i:i+h, j:j+w]``."""
    return jax.lax.slice(a, (0,) * (a.ndim - 2) + (i, j), a.shape[:-2] + (i + h, j + w))


def _mul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a * b`` for arrays of one rank and dtype, broadcasting their size-1 axes."""
    shape = tuple(max(p, q) for p, q in zip(a.shape, b.shape))
    dims = tuple(range(len(shape)))
    a, b = (v if v.shape == shape else jax.lax.broadcast_in_dim(v, shape, dims) for v in (a, b))
    return jax.lax.mul(a, b)


def _f32(a: jax.Array) -> jax.Array:
    return jax.lax.convert_element_type(a, jnp.float32)


def _pad_hw(x: jax.Array, c: int) -> jax.Array:
    return jnp.pad(x, ((0, 0),) * (x.ndim - 2) + ((c, c), (c, c)))


def _taps_l1(w: jax.Array) -> jax.Array:
    """sum |w| over the component and tap axes: [d, T, ...] -> [...] (float32)."""
    per_c = _tree_sum(jax.lax.abs(_f32(_take(w, t))) for t in range(w.shape[1]))
    return jnp.sum(per_c, axis=0)  # a reduce: see `_na_bwd`


def _raw_apply(x: jax.Array, w: jax.Array, k: int) -> jax.Array:
    h, wd, c = x.shape[-2], x.shape[-1], k // 2
    xp = _pad_hw(x, c)
    return _tree_sum(
        _mul(jax.lax.expand_dims(_take(w, t), (1,)), _window(xp, t // k, t % k, h, wd))
        for t in range(k * k)
    )


def _taps_by_operator(w: jax.Array) -> jax.Array:
    """Taps [S, d, T, g / S, ...] -> [d, T, g, ...] (operator j * g / S + l from (j, l))."""
    s, d, t, gl = w.shape[:4]
    return jnp.moveaxis(w, 0, 2).reshape((d, t, s * gl) + w.shape[4:])


def _taps_by_group(w: jax.Array, s: int) -> jax.Array:
    """The inverse of `_taps_by_operator`."""
    d, t, g = w.shape[:3]
    return jnp.moveaxis(w.reshape((d, t, s, g // s) + w.shape[3:]), 2, 0)


def _join_taps(w) -> jax.Array:
    """Taps given as parts of the component axis (a tuple, see `normalised_apply`) as one
    array."""
    return jnp.concatenate(w, axis=1) if isinstance(w, tuple) else w


def _split_taps(gw: jax.Array, w):
    """The inverse of `_join_taps` (for the taps' gradient): parts shaped like ``w``'s."""
    if not isinstance(w, tuple):
        return gw
    return tuple(jnp.split(gw, np.cumsum([p.shape[1] for p in w])[:-1].tolist(), axis=1))


def _normalised_apply_fwd_impl(x, w, k):
    w = _taps_by_operator(_join_taps(w))
    scale = 0.2 / (0.2 * _taps_l1(w) + 0.01)  # [g, ...]
    return _raw_apply(x, w, k) * scale[None, None].astype(x.dtype), scale


def normalised_apply(x: jax.Array, w: jax.Array, kernel_size: int) -> jax.Array:
    """Steps 3-4 of the Neural ePDO layer, channel-major and fused.

    ``out = sum_t wn[t] x[p + t]`` with ``wn = (w / 5) / (sum_{c,t} |w / 5| + 0.01)``,
    computed as the raw taps applied, then scaled by ``0.2 / (0.2 sum |w| + 0.01)`` (one factor
    per pixel and operator), so that no normalised copy of the taps is made.

    Args:
      x: [d, Q, g, ..., H, W]: d components of Q partitions of g fields.
      w: [S, d, kernel_size^2, g / S, ..., H, W] the raw taps (tap = row * size + col) of the
        g operators, operator ``j * g / S + l`` at ``(j, l)``: the layout in which the grouped
        generator (S groups, `generator_taps_cm`) produces them; S = 1 is plain
        ``w[None]`` for taps [d, T, g, ...]. Or a tuple of parts [S, d_i, ...] that split
        the component axis in order (d = d_0 + d_1 + ...: the generator's output for mixed
        field types); the kernel reads them in place and the gradient comes as parts too
        (the XLA formulation concatenates them).
    Returns:
      [d, Q, g, ..., H, W].

    The backward pass is written by hand: each of its passes is one fused loop over the taps
    (differentiating the unrolled slices makes XLA build a padded full-size array per tap).
    On CPU, float32, both passes call the fused C++ kernels of `kernels` when they are
    available (same formulas; the XLA formulation below otherwise).
    """
    k = kernel_size
    if isinstance(w, (tuple, list)):
        if not w:
            raise ValueError("normalised_apply: the taps are an empty sequence of parts.")
        w = tuple(w) if len(w) > 1 else w[0]
    parts = w if isinstance(w, tuple) else (w,)
    w0 = parts[0]
    if (
        x.ndim < 5
        or any(p.ndim != x.ndim + 1 for p in parts)
        or any(p.shape[:1] + p.shape[2:] != w0.shape[:1] + w0.shape[2:] for p in parts)
        or sum(p.shape[1] for p in parts) != x.shape[0]
        or w0.shape[2] != k * k
        or w0.shape[0] * w0.shape[3] != x.shape[2]
        or w0.shape[4:] != x.shape[3:]
    ):
        raise ValueError(
            f"normalised_apply: x {tuple(x.shape)} must be [d, Q, g, ..., H, W] and the taps "
            f"{[tuple(p.shape) for p in parts]} [S, d, {k * k}, g / S, ..., H, W] (or parts "
            "[S, d_i, ...] with d_0 + d_1 + ... = d) with the same d, g and trailing axes."
        )
    return _normalised_apply(x, w, k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _normalised_apply(x: jax.Array, w: jax.Array, kernel_size: int) -> jax.Array:
    return _na_fwd(x, w, kernel_size)[0]


def _na_fwd(x, w, k):
    if kernels.use_for(x, w, k):
        out, scale = kernels.normalised_apply_fwd(x, w, k)
        return out, (x, w, scale, out)
    out, scale = _normalised_apply_fwd_impl(x, w, k)
    return out, (x, w, scale, None)


def _na_bwd(k, res, g):
    x, w, scale, out = res
    if out is not None:  # the forward pass ran the kernel
        return kernels.normalised_apply_bwd(x, w, scale, out, g.astype(out.dtype), k)
    return _na_bwd_xla(k, x, w, scale, g)


def _na_bwd_xla(k, x, w_in, scale, g):
    w = _join_taps(w_in)
    groups = w.shape[0]
    w = _taps_by_operator(w)
    h, wd, c = x.shape[-2], x.shape[-1], k // 2
    q = x.shape[1]
    gs = g * scale[None, None].astype(g.dtype)
    # x[p] reaches out[p - t'] through w_t[p - t'] (t' the tap's offset): windows of the
    # padded w and g (padding w once is cheaper than padding 25 products).
    wp, gp, xp = _pad_hw(w, c), _pad_hw(gs, c), _pad_hw(x, c)

    def back(a: jax.Array, t: int) -> jax.Array:
        return _window(a, 2 * c - t // k, 2 * c - t % k, h, wd)

    gx = _tree_sum(
        _mul(back(jax.lax.expand_dims(_take(wp, t), (1,)), t), back(gp, t)) for t in range(k * k)
    )
    gw_scaled = jnp.stack(
        [
            _tree_sum(
                _mul(_take(gs, r), _window(_take(xp, r), t // k, t % k, h, wd)) for r in range(q)
            )
            for t in range(k * k)
        ],
        axis=1,
    )  # scale * d raw / d w: [d, T, g, ...]
    # d out / d scale = raw, so d scale = sum w * gw_scaled / scale; d scale / d l1 = -scale^2.
    # The last sum (over components) is a reduce, not adds: XLA duplicates a tree of adds
    # into every element of gw below (a d * taps-fold recomputation: 13x slower steps for
    # the default C8 model).
    dot = _tree_sum(_f32(_mul(_take(w, t), _take(gw_scaled, t))) for t in range(k * k))
    dl1 = -scale * jnp.sum(dot, axis=0)
    gw = gw_scaled + jnp.sign(w) * dl1[None, None].astype(w.dtype)
    return gx.astype(x.dtype), _split_taps(_taps_by_group(gw.astype(w.dtype), groups), w_in)


_normalised_apply.defvjp(_na_fwd, _na_bwd)


def _group_norm_relu_cm(h: jax.Array, params: tuple, eps: float = 1e-5) -> jax.Array:
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


def default_chunk(train: bool = True) -> int:
    """Images per `NeuralEPDO` chunk when its ``chunk`` is None: on CPU a few images at a time
    keep each layer's large intermediates (the taps) in cache and the peak memory low.
    Inference: 1 (the channel-major R-gauss model, 2 devices at batch 256: 121-123 img/s
    against 104-105 for 2; D-gauss, NHWC: the same speed, faster compile). Training: 2 on one
    CPU device; 1 when the host is split into several (`parallel.use_cpu_cores`, one core
    each: the same speed as 2, and the R-gauss train step compiles faster). Accelerators want
    the whole batch (0)."""
    if jax.default_backend() != "cpu":
        return 0
    if not train:
        return 1
    return 1 if jax.local_device_count() > 1 else 2


def default_eval_chunk() -> int:
    """Images per step of `models.NeuralEPDONet`'s inference loop when its ``eval_chunk`` is
    None: on CPU a few (the activations of the whole network then stay in cache); elsewhere
    0 (the whole batch at once)."""
    return 8 if jax.default_backend() == "cpu" else 0


class NeuralEPDO(nn.Module):
    """The Neural ePDO layer (He et al. 2023, SPEC section 5): a spatially adaptive PDO whose
    coefficients are generated per pixel by an equivariant MLP of the input.

    1. h = ReLU(FieldGroupNorm(Linear(x: in_type -> M regular))),
       M = floor(F_in * dim(T) / (reduction * |G|)).
    2. W = GeneratorLinear(h; groups=s) / 5: g operators per pixel, one 5x5 stencil per
       component, in the span of the equivariant PDOs (coefficients ~ rho (x) D^-T).
    3. W <- W / (sum |W| over the field's dim(T) * 25 entries + 0.01).
    4. out = the g operators applied to each partition of g input fields (component-wise).
    5. Linear(out: in_type -> out_type).
    Equivariance: every step commutes with the group action, exactly for grid elements.

    Attributes (besides the hyper-parameters above):
      impl: 'fourier' (default) or 'dense'; same parameters, same outputs up to round-off.
        'dense' is the straightforward computation (expanded kernels, normalised taps).
        'fourier' works on channel-major arrays [d, F, pixels] in group-Fourier
        coordinates: the 1x1 maps are block diagonal (`apply_linear_cm`), the generator
        produces the untwisted coefficients by a group convolution and maps them to taps
        with one small matrix per component (`generator_taps_cm`), and steps 3-4 are one
        fused op with a hand-written backward pass (`normalised_apply`).
      chunk: 'fourier' only: images processed at a time (``jax.lax.map`` over the batch,
        rematerialised in the backward pass, so that the large per-pixel intermediates stay
        small); 0 = all at once; None = `default_chunk()` (1-2 on CPU, all at once elsewhere;
        `models.NeuralEPDONet` passes the inference default in eval mode).
      channel_major: 'fourier' only: input and output are [B, d, F, H, W] (components,
        fields, pixels) instead of NHWC [B, H, W, F * d]. With one image per chunk the layer
        then needs no transposes at all; `models.NeuralEPDONet` keeps its activations in
        this layout between blocks.
    """

    in_type: fields.FieldType
    out_type: fields.FieldType
    max_order: int = 4
    reduction: int = 1
    g: int = 4
    s: int = 4
    discretisation: str = "fd"
    kernel_size: int = 5
    dtype: Dtype = "float32"
    impl: str = "fourier"
    chunk: int | None = None
    channel_major: bool = False

    def hidden_fields(self) -> int:
        return int(self.in_type.size // (self.reduction * self.in_type.group.order))

    def __post_init__(self):
        super().__post_init__()
        validate_nlpdo(self.in_type, self.reduction, self.g, self.s)
        _check_impl(self.impl)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_input(x, self.in_type, "NeuralEPDO", self.channel_major)
        if self.channel_major and self.impl == "dense":
            raise ValueError("NeuralEPDO: channel_major needs impl='fourier'.")
        if self.impl == "dense":
            return self._dense(x)
        return self._fourier(x)

    def _dense(self, x: jax.Array) -> jax.Array:
        group, dt = self.in_type.group, _dtype(self.dtype)
        hidden = fields.FieldType(group, "regular", self.hidden_fields())
        unit = self.in_type.with_fields(1)
        h = EquivariantLinear(self.in_type, hidden, dtype=self.dtype, impl="dense", name="hidden")(
            x
        )
        h = nn.relu(FieldGroupNorm(hidden, name="norm")(h))
        w = GeneratorLinear(
            hidden,
            unit,
            self.g,
            self.s,
            self.discretisation,
            self.max_order,
            self.kernel_size,
            dtype=self.dtype,
            impl="dense",
            name="generator",
        )(h)
        taps = self.kernel_size**2
        d = unit.field_size
        w = w.astype(jnp.float32).reshape(w.shape[:-1] + (self.g, d * taps)) / 5.0
        w = w / (jnp.sum(jnp.abs(w), axis=-1, keepdims=True) + 0.01)
        w = w.reshape(w.shape[:-1] + (d, taps)).astype(dt)
        b, hh, ww, _ = x.shape
        xs = x.astype(dt).reshape(b, hh, ww, self.in_type.num_fields, d)
        out = apply_spatially_varying(xs, w, self.g, self.kernel_size)
        out = out.reshape(b, hh, ww, self.in_type.size)
        return EquivariantLinear(
            self.in_type, self.out_type, dtype=self.dtype, impl="dense", name="output"
        )(out)

    def _fourier(self, x: jax.Array) -> jax.Array:
        group, dt = self.in_type.group, _dtype(self.dtype)
        m = self.hidden_fields()
        hidden = fields.FieldType(group, "regular", m)
        u_in, u_out, u_h = self.in_type.unit, self.out_type.unit, hidden.unit
        f_in, f_out = self.in_type.num_fields, self.out_type.num_fields
        plan = _GeneratorPlan(
            group, u_in, self.discretisation, self.max_order, self.kernel_size, self.s
        )
        # The same parameters (names, shapes, initialisers) as the dense sub-layers.
        (w_h,) = _Params(
            (_weight_spec(bases.linear_basis(group, u_in, u_h), self.in_type, m, 1),),
            name="hidden",
        )()
        ones, zeros = nn.initializers.ones, nn.initializers.zeros
        norm = _Params(
            tuple(
                (f"{p}_{q}", ones if q == "scale" else zeros, (m,))
                for p in ("norm", "affine")
                for q in ("scale", "bias")
            ),
            name="norm",
        )()
        gen_basis = bases.generator_basis(
            group, u_in, self.discretisation, self.max_order, self.kernel_size
        )
        (w_g,) = _Params((_weight_spec(gen_basis, hidden, self.g, self.s),), name="generator")()
        (w_o,) = _Params(
            (_weight_spec(bases.linear_basis(group, u_in, u_out), self.in_type, f_out, 1),),
            name="output",
        )()
        # Blocks with their transposes, made once for all chunks (`block_matmul`).
        blocks_h = with_transpose(linear_blocks(w_h, group, u_in, u_h))
        blocks_o = with_transpose(linear_blocks(w_o, group, u_in, u_out))
        gen = generator_blocks(w_g, plan)
        gen_fourier, gen_dense = (None if b is None else with_transpose(b) for b in gen)
        phi_in = bases.fourier_matrix(group, u_in)
        phi_h = bases.fourier_matrix(group, u_h)
        phi_out = bases.fourier_matrix(group, u_out)
        d_in, d_out, order = phi_in.shape[2], phi_out.shape[2], group.order
        if self.channel_major:
            b, _, _, hh, ww = x.shape
        else:
            b, hh, ww, _ = x.shape
        q, k = f_in // self.g, self.kernel_size

        chunk = default_chunk() if self.chunk is None else self.chunk
        n = max(c for c in range(1, (chunk or b) + 1) if b % c == 0)

        def block(xc: jax.Array) -> jax.Array:  # [d_in, F_in, n, H, W] -> [n, d_out, F_out, H, W]
            h = apply_linear_cm(xc.reshape(d_in, f_in, -1), blocks_h, phi_in, phi_h)
            h = _group_norm_relu_cm(h.reshape(order, m, n, hh * ww), norm)
            hg = group_major(h.reshape(order, m, -1), self.s)
            taps = tuple(
                p.reshape(self.s, p.shape[1], k * k, self.g // self.s, n, hh, ww)
                for p in generator_taps_cm(hg, gen_fourier, gen_dense, plan)
            )
            out = normalised_apply(xc.reshape(d_in, q, self.g, n, hh, ww), taps, k)
            y = apply_linear_cm(out.reshape(d_in, f_in, -1), blocks_o, phi_in, phi_out)
            return jnp.transpose(y.reshape(d_out, f_out, n, hh, ww), (2, 0, 1, 3, 4))

        # [B, H, W, F, d] -> [B / n, d, F, n, H, W]: each chunk channel-major, contiguous.
        if self.channel_major and n == 1:  # a reshape: XLA turned the (trivial) transpose
            xs = x.astype(dt).reshape(b, d_in, f_in, 1, hh, ww)  # into a slow layout copy
        elif self.channel_major:
            xs = x.astype(dt).reshape(b // n, n, d_in, f_in, hh, ww)
            xs = jnp.transpose(xs, (0, 2, 3, 1, 4, 5))
        else:
            xs = x.astype(dt).reshape(b // n, n, hh, ww, f_in, d_in)
            xs = jnp.transpose(xs, (0, 5, 4, 1, 2, 3))
        if n == b:
            ys = block(xs[0])[None]
        else:
            # [B / n, n, d_out, F_out, H, W]: the chunk's images first, so the loop's output
            # has another shape than the backward loop's input gradient (the chunks' layout
            # of xs). XLA otherwise merges the two loops' zero initialisations into one
            # buffer that stays live from the forward to the backward pass (measured: XLA's
            # temporaries per device R-gauss 208.7 -> 191.8 MiB, D-gauss 255.9 -> 237.5,
            # Q-gauss 165.3 -> 150.4; peak RSS 921-925 -> 889-893 MiB, the same speed).
            ys = jax.lax.map(jax.checkpoint(block), xs)
        if self.channel_major:
            return ys.reshape(b, d_out, f_out, hh, ww)
        return jnp.transpose(ys, (0, 1, 4, 5, 3, 2)).reshape(b, hh, ww, f_out * d_out)


def validate_nlpdo(in_type: fields.FieldType, reduction: int, g: int, s: int) -> None:
    """Clear errors for hyper-parameter combinations the Neural ePDO layer cannot build."""
    if reduction < 1:
        raise ValueError(f"NeuralEPDO: reduction must be >= 1, got {reduction}.")
    if g < 1 or s < 1:
        raise ValueError(f"NeuralEPDO: g and s must be >= 1, got g={g}, s={s}.")
    if g % s:
        raise ValueError(f"NeuralEPDO: g={g} must be divisible by s={s}.")
    if in_type.num_fields % g:
        raise ValueError(
            f"NeuralEPDO: the input's {in_type.num_fields} fields must be divisible by g={g} "
            "(they are split into partitions of g fields)."
        )
    m = int(in_type.size // (reduction * in_type.group.order))
    if m < 1 or m % s:
        raise ValueError(
            f"NeuralEPDO: the generator's hidden fields M = floor({in_type.num_fields} * "
            f"{in_type.field_size} / ({reduction} * {in_type.group.order})) = {m} must be >= 1 and "
            f"divisible by s={s}; lower the reduction or s, or use more input fields."
        )


def group_pool(
    x: jax.Array,
    ftype: fields.FieldType,
    mode: str = "max",
    channel_major: bool = False,
    *,
    elementwise: bool = False,
) -> jax.Array:
    """Invariant pooling over each field's components: [..., F*d] -> [..., F]
    (``channel_major``: [B, d, F, H, W] -> [B, F, H, W]).

    ``elementwise`` (channel-major max): the same values as an elementwise max of the d
    component planes. For inference: XLA's CPU backend fuses the reduce over the component
    axis with the network's global max pool and head into one reduce over non-adjacent axes
    (R-gauss, one core, batch 128: 63.6 ms, as elementwise maxima 2.8 ms, of a 1.6 s step);
    in the train step the elementwise form raised XLA's temporaries by 55 MiB per device."""
    if mode not in ("max", "mean"):
        raise ValueError(f"group_pool: mode must be 'max' or 'mean', got {mode!r}.")
    if channel_major:
        check_input(x, ftype, "group_pool", channel_major=True)
        if mode == "max" and elementwise:
            return _tree_sum((_take(x, c) for c in range(x.shape[1])), jax.lax.max)
        xf, axis = x, 1
    else:
        xf, axis = x.reshape(x.shape[:-1] + (ftype.num_fields, ftype.field_size)), -1
    return jnp.max(xf, axis=axis) if mode == "max" else jnp.mean(xf, axis=axis)


def restrict_dihedral(
    x: jax.Array, ftype: fields.FieldType, channel_major: bool = False
) -> tuple[jax.Array, fields.FieldType]:
    """Re-read each D_N regular field (2N components) as two C_N regular fields.

    The reference's fixed permutation: the first block of N is kept, the second reversed (on
    it r acts as a backward shift; reversed, as a forward one). Returns the array and its new
    field type (2F regular fields of C_N). ``channel_major``: x is [B, 2N, F, H, W] and the
    result [B, N, 2F, H, W] (whole planes moved).
    """
    group = ftype.group
    if not group.flip or ftype.unit != (("regular", 1),):
        raise ValueError(f"restrict_dihedral needs regular fields of a D_N group, got {ftype!r}.")
    check_input(x, ftype, "restrict_dihedral", channel_major=channel_major)
    n = group.n
    perm = jnp.asarray(np.concatenate([np.arange(n), 2 * n - 1 - np.arange(n)]))
    restricted = fields.FieldType(groups.Group(n, False), "regular", 2 * ftype.num_fields)
    if channel_major:
        b, _, f, h, w = x.shape
        xp = jnp.take(x, perm, axis=1).reshape(b, 2, n, f, h, w)  # [B, half, N, F, H, W]
        return jnp.transpose(xp, (0, 2, 3, 1, 4, 5)).reshape(b, n, 2 * f, h, w), restricted
    xf = x.reshape(x.shape[:-1] + (ftype.num_fields, 2 * n))
    return jnp.take(xf, perm, axis=-1).reshape(x.shape), restricted


def max_pool_2x2(x: jax.Array, channel_major: bool = False) -> jax.Array:
    """2x2 max pooling, stride 2 (NHWC; ``channel_major``: [B, d, F, H, W], every plane
    pooled). Exactly quarter-turn equivariant only for even H and W: odd sizes give a
    one-time warning (the last row/column is dropped, as in PyTorch).

    Same values and gradient as ``flax.linen.max_pool`` (the gradient goes to the first
    maximum of each window in row-major order; NaN propagates), computed from four strided
    slices: XLA's CPU reduce-window and its select-and-scatter gradient are several times
    slower. Differentiated, it keeps only each window's first-maximum corner (int8) for the
    backward pass.
    """
    if channel_major:  # every (image, component, field) plane as one NHWC image
        pooled = max_pool_2x2(x.reshape((-1,) + x.shape[3:] + (1,)))
        return pooled.reshape(x.shape[:3] + pooled.shape[1:3])
    h, w = x.shape[1], x.shape[2]
    if h % 2 or w % 2:
        warnings.warn(
            f"max_pool_2x2 on a {h}x{w} map: odd sizes drop the last row/column, which breaks "
            "exact quarter-turn equivariance; use inputs whose size is divisible by 4.",
            stacklevel=2,
        )
        x = x[:, : h - h % 2, : w - w % 2]
    return _max_pool_2x2(x)


def _corners(x: jax.Array) -> tuple[jax.Array, ...]:
    return x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]


@jax.custom_vjp
def _max_pool_2x2(x: jax.Array) -> jax.Array:
    a, b, c, d = _corners(x)
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _first_max(p, q):
    """Reducer of (value, corner) pairs: the larger value, the earlier corner among equal
    ones, NaN over numbers (as `jnp.maximum` propagates it)."""
    (vp, ip), (vq, iq) = p, q
    q_nan, p_nan = jnp.isnan(vq), jnp.isnan(vp)
    take_q = (q_nan & ~p_nan) | (vq > vp) | (((vq == vp) | (q_nan & p_nan)) & (iq < ip))
    return jnp.where(take_q, vq, vp), jnp.where(take_q, iq, ip)


def _mp_fwd(x):
    # The pooled values and which corner (0-3, row-major) holds each window's first maximum,
    # as one reduce over the stacked corners. The backward pass needs only that int8 index
    # (not x and y: R-gauss train step, XLA's temporaries 190.3 -> 153.6 MiB per device).
    # Computed elementwise, XLA recomputed the index from the block's pre-normalisation
    # activations inside two full-resolution backward fusions (5-10% slower steps); the
    # reduce is kept as it is.
    corners = jnp.stack(_corners(x))
    index = jax.lax.broadcasted_iota(jnp.int32, corners.shape, 0)
    init = (jnp.array(-jnp.inf, x.dtype), jnp.array(0, jnp.int32))
    y, first = jax.lax.reduce((corners, index), init, _first_max, (0,))
    return y, first.astype(jnp.int8)


def _mp_bwd(first, g):
    # dx[i, r, j, s] = g[i, j] where corner 2 r + s has the window's first maximum: one
    # elementwise loop over dx. (Interleaving four corner arrays, XLA's CPU code wrote one
    # element at a time: the channel-major planes come with a trailing axis of 1.)
    r = jnp.arange(2, dtype=jnp.int8)
    corner = 2 * r[:, None, None, None] + r[:, None]  # [2, 1, 2, 1]: 2 r + s at (r, ., s, .)
    hit = first[:, :, None, :, None] == corner  # [B, H/2, 2, W/2, 2, C]
    dx = jnp.where(hit, g[:, :, None, :, None], jnp.zeros((), g.dtype))
    return (dx.reshape(g.shape[0], 2 * g.shape[1], 2 * g.shape[2], g.shape[3]),)


_max_pool_2x2.defvjp(_mp_fwd, _mp_bwd)


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
