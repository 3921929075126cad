"""Flax (linen) layers: thin shells around the pure bases (NHWC, field types static).

Every equivariant layer stores coefficients only; kernels are expanded from the constant
bases on every call (no cached kernels, so evaluation always uses the current parameters).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from neural_epdo_jax import bases, fields, groups

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


def check_input(x: jax.Array, ftype: fields.FieldType, where: str) -> None:
    """Clear errors for a wrong rank or a channel count that does not match the field type."""
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
    """

    in_type: fields.FieldType
    out_type: fields.FieldType
    discretisation: str = "fd"
    max_order: int = 4
    kernel_size: int = 5
    dtype: Dtype = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, in_type.size] -> [B, H, W, out_type.size]."""
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
        return jax.lax.conv_general_dilated(
            x.astype(dt),
            kernel.astype(dt),
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


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


def _grouped_weight(
    mod: nn.Module, basis_np: np.ndarray, in_type: fields.FieldType, f_out: int, s: int
) -> jax.Array:
    """Declares the 1x1 layers' weights [F_in/s, F_out, n] (coefficients of ``basis_np``
    [n, d_out, d_in])."""
    n, d_out, _ = basis_np.shape
    f_in = in_type.num_fields
    if f_in % s or f_out % s:
        raise ValueError(
            f"grouped linear map: {s} groups must divide the input fields ({f_in}) and the "
            f"output fields ({f_out})."
        )
    fi = f_in // s
    init = reference_init(float(np.sum(basis_np**2)), fi, d_out)
    return mod.param("weight", init, (fi, f_out, n))


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
    rotation-frequency slots (`bases.fourier_slots`), so with the orthonormal transforms
    ``Phi`` of `bases.fourier_matrix`, ``A = sum_k Phi_out[k]^T B_k Phi_in[k]``: one small
    dense block per slot and field pair (C16 regular: 8 blocks of 2 x 2, 32 multiply-adds
    instead of 256; D16: 8 x 4 x 4 instead of 1024), plus one transform per field on each side.

    Args:
      x: [..., F_in * d_in] (the compute dtype).
      weight: [F_in / s, F_out, n] coefficients of `bases.linear_basis`.
    Returns:
      [..., F_out * d_out].
    """
    phi_in = bases.fourier_matrix(group, in_unit)  # [K, X, d_in]
    phi_out = bases.fourier_matrix(group, out_unit)  # [K, Y, d_out]
    fb = bases.linear_basis_fourier(group, in_unit, out_unit)  # [n, K, Y, X]
    fi, f_out, _ = weight.shape
    k, xw, d_in = phi_in.shape
    yw, d_out = phi_out.shape[1:]
    fo, dt, lead = f_out // s, x.dtype, x.shape[:-1]
    blocks = jnp.einsum("ion,nkyx->kixoy", weight, jnp.asarray(fb, jnp.float32))
    blocks = blocks.reshape(k, fi * xw, s, fo * yw).transpose(0, 2, 1, 3)  # [K, s, I, O]
    xh = jnp.einsum("psid,kxd->kspix", x.reshape(-1, s, fi, d_in), jnp.asarray(phi_in, dt))
    xh = xh.reshape(k, s, -1, fi * xw)  # [K, s, P, fi * X]
    yh = jnp.einsum("kspi,ksio->kspo", xh, blocks.astype(dt))  # [K, s, P, fo * Y]
    yh = yh.reshape(k, s, -1, fo, yw)
    y = jnp.einsum("kspoy,kye->psoe", yh, jnp.asarray(phi_out, dt))  # [P, s, fo, d_out]
    return y.reshape(lead + (f_out * d_out,))


def generator_taps_fourier(
    h: jax.Array,
    weight: jax.Array,
    unit_type: fields.FieldType,
    discretisation: str,
    max_order: int,
    kernel_size: int,
    s: int,
) -> jax.Array:
    """The generator's taps from its weights, in the factored form of
    `bases.generator_fourier`: group-Fourier block products into the untwisted coefficients
    (a group convolution), one inverse transform, one small matrix per component to taps.
    Equals the dense ``GeneratorLinear`` output (rearranged) up to round-off.

    Args:
      h: [P, M * |G|] hidden regular fields (the compute dtype).
      weight: [M / s, g, n] coefficients of `bases.generator_basis`.
    Returns:
      [kernel_size^2, P, g, field_size] (tap-major).
    """
    group, unit = unit_type.group, unit_type.unit
    gf = bases.generator_fourier(group, unit, discretisation, max_order, kernel_size)
    phi = bases.fourier_matrix(group, (("regular", 1),))  # [K, b, |G|]
    mi, g, _ = weight.shape
    go, order, (k, b, _) = g // s, group.order, phi.shape
    a, taps = gf.untwist.shape[1], kernel_size**2
    dt, p = h.dtype, h.shape[0]
    parts = []
    if gf.regular_blocks:
        r = len(gf.regular_blocks)
        w = jnp.stack(
            [
                weight[..., st : st + order * a].reshape(mi, g, order, a)
                for _, st in gf.regular_blocks
            ],
            axis=3,
        )  # [mi, g, |G|, R, A]
        w = jnp.einsum("iolrx,lxa->iolra", w, jnp.asarray(gf.untwist, jnp.float32))
        blocks = jnp.einsum("iolra,lkyx->kixoray", w, jnp.asarray(gf.shifts, jnp.float32))
        blocks = blocks.reshape(k, mi * b, s, go * r * a * b).transpose(0, 2, 1, 3).astype(dt)
        hh = jnp.einsum("psih,kxh->kspix", h.reshape(p, s, mi, order), jnp.asarray(phi, dt))
        zh = jnp.einsum("kspi,ksio->kspo", hh.reshape(k, s, p, mi * b), blocks)
        zh = zh.reshape(k, s, p, go, r, a, b)
        z = jnp.einsum("ksporay,kyc->cpsora", zh, jnp.asarray(phi, dt))  # untwisted, [|G|, ...]
        t = jnp.einsum("cpsora,cta->tpsorc", z, jnp.asarray(gf.taps, dt))
        t = t.reshape(taps, p, g, r, order)
        parts += [(off, t[:, :, :, j]) for j, (off, _) in enumerate(gf.regular_blocks)]
    if gf.dense_offsets:
        kernel = expand_linear_kernel(weight, gf.dense, s).astype(dt)
        rest = apply_linear_kernel(h, kernel).reshape(p, g, -1, taps)
        rest = jnp.transpose(rest, (3, 0, 1, 2))  # [T, P, g, d_rest]
        start = 0
        for off, dim in gf.dense_offsets:
            parts.append((off, rest[..., start : start + dim]))
            start += dim
    parts.sort(key=lambda item: item[0])
    return jnp.concatenate([part for _, part in parts], axis=-1)


class GeneratorLinear(nn.Module):
    """The generator's last layer: M regular fields -> g fields of spatially varying operator
    taps (coefficients transform with ``rho (x) (D_0 + ... + D_K)^-T``, mapped to taps),
    grouped by ``groups`` (the reference's ``s``).

    Returns [..., g * field_size * kernel_size^2] (field, component, tap), or with
    ``tap_major`` [kernel_size^2, ..., g, field_size].
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
    tap_major: bool = False

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
        lead, taps, d = h.shape[:-1], self.kernel_size**2, self.unit_type.field_size
        if _check_impl(self.impl) == "dense":
            kernel = expand_linear_kernel(w, basis_np, self.groups).astype(dt)
            out = apply_linear_kernel(h.astype(dt), kernel)
            if not self.tap_major:
                return out
            out = out.reshape(lead + (self.num_out, d, taps))
            return jnp.moveaxis(out, -1, 0)
        h2 = h.astype(dt).reshape(-1, h.shape[-1])
        out = generator_taps_fourier(
            h2,
            w,
            self.unit_type,
            self.discretisation,
            self.max_order,
            self.kernel_size,
            self.groups,
        )  # [T, P, g, d]
        out = out.reshape((taps,) + lead + (self.num_out, d))
        if self.tap_major:
            return out
        return jnp.moveaxis(out, 0, -1).reshape(lead + (self.num_out * d * taps,))


class FieldBatchNorm(nn.Module):
    """Batch norm with one statistic per field (over batch, the field's components, pixels).

    PyTorch semantics: momentum 0.1 (``running = 0.9 running + 0.1 batch``), unbiased running
    variance, eps 1e-5, one affine (scale, bias) per field. Works on [B, H, W, C] and [B, C].
    Normalises in float32 whatever the input dtype.
    """

    ftype: fields.FieldType
    momentum: float = 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        f, d = self.ftype.num_fields, self.ftype.field_size
        if x.shape[-1] != f * d:
            raise ValueError(
                f"FieldBatchNorm: {self.ftype!r} has {f * d} channels, input has {x.shape[-1]}."
            )
        xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (f, d))
        axes = tuple(range(xf.ndim - 2)) + (xf.ndim - 1,)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((f,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((f,), jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (f,))
        bias = self.param("bias", nn.initializers.zeros, (f,))
        if train:
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean[:, None]), axis=axes)
            count = xf.size // f
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * count / max(count - 1, 1)
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (xf - mean[:, None]) * jax.lax.rsqrt(var[:, None] + self.epsilon)
        y = y * scale[:, None] + bias[:, None]
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


def _shift_accumulate(x: jax.Array, w: jax.Array, k: int) -> jax.Array:
    """``sum_t w[t][:, :, :, None] * x[p + t]`` (x [B, H, W, Q, g, d], w [T, B, H, W, g, d])."""
    c, h, wd = k // 2, x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (c, c), (c, c), (0, 0), (0, 0), (0, 0)))
    out = None
    for t in range(k * k):
        i, j = divmod(t, k)
        term = w[t][:, :, :, None] * xp[:, i : i + h, j : j + wd]
        out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def apply_spatially_varying_tap_major(x: jax.Array, w: jax.Array, kernel_size: int) -> jax.Array:
    """`apply_spatially_varying` with tap-major operators and a hand-written backward pass.

    Args:
      x: [B, H, W, Q, g, d]: Q partitions of g fields.
      w: [kernel_size^2, B, H, W, g, d].
    Returns:
      [B, H, W, Q, g, d]: ``out[p, q, f, c] = sum_t w[t, p, f, c] x[p + t, q, f, c]``.

    Each pass (forward, input gradient, operator gradient) is one fused loop over the taps;
    differentiating the unrolled slices instead makes XLA build one padded full-size
    gradient per tap.
    """
    return _shift_accumulate(x, w, kernel_size)


def _sv_fwd(x, w, kernel_size):
    return _shift_accumulate(x, w, kernel_size), (x, w)


def _sv_bwd(kernel_size, res, g):
    x, w = res
    k, (h, wd) = kernel_size, x.shape[1:3]
    c = k // 2
    pad = ((0, 0), (c, c), (c, c), (0, 0), (0, 0))
    # d/dx: out[p] reads x[p + t - c], so x[q] receives w[t][q - t + c] g[q - t + c].
    wp = jnp.pad(w, ((0, 0),) + pad)
    gp = jnp.pad(g, pad + ((0, 0),))
    gx = None
    for t in range(k * k):
        i, j = 2 * c - t // k, 2 * c - t % k
        term = wp[t, :, i : i + h, j : j + wd][:, :, :, None] * gp[:, i : i + h, j : j + wd]
        gx = term if gx is None else gx + term
    xp = jnp.pad(x, pad + ((0, 0),))
    gw = jnp.stack(
        [jnp.sum(g * xp[:, t // k : t // k + h, t % k : t % k + wd], axis=3) for t in range(k * k)]
    )
    return gx.astype(x.dtype), gw.astype(w.dtype)


apply_spatially_varying_tap_major.defvjp(_sv_fwd, _sv_bwd)


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

    ``impl='fourier'`` (default) computes the 1x1 maps in group-Fourier coordinates, the
    generator in its factored form, and applies the raw taps before scaling by the
    normalisation (it is one factor per pixel and generated field); ``impl='dense'`` is the
    straightforward computation. Same parameters; same outputs up to round-off.
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

    def hidden_fields(self) -> int:
        return int(self.in_type.size // (self.reduction * self.in_type.group.order))

    def __post_init__(self):
        super().__post_init__()
        validate_nlpdo(self.in_type, self.reduction, self.g, self.s)
        _check_impl(self.impl)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_input(x, self.in_type, "NeuralEPDO")
        group, dt, impl = self.in_type.group, _dtype(self.dtype), self.impl
        hidden = fields.FieldType(group, "regular", self.hidden_fields())
        unit = self.in_type.with_fields(1)
        h = EquivariantLinear(self.in_type, hidden, dtype=self.dtype, impl=impl, name="hidden")(x)
        h = nn.relu(FieldGroupNorm(hidden, name="norm")(h))
        generator = GeneratorLinear(
            hidden,
            unit,
            self.g,
            self.s,
            self.discretisation,
            self.max_order,
            self.kernel_size,
            dtype=self.dtype,
            impl=impl,
            tap_major=impl == "fourier",
            name="generator",
        )
        taps = self.kernel_size**2
        d = unit.field_size
        b, hh, ww, _ = x.shape
        out_linear = EquivariantLinear(
            self.in_type, self.out_type, dtype=self.dtype, impl=impl, name="output"
        )
        if impl == "dense":
            w = generator(h)
            w = w.astype(jnp.float32).reshape(w.shape[:-1] + (self.g, d * taps)) / 5.0
            w = w / (jnp.sum(jnp.abs(w), axis=-1, keepdims=True) + 0.01)
            w = w.reshape(w.shape[:-1] + (d, taps)).astype(dt)
            xs = x.astype(dt).reshape(b, hh, ww, self.in_type.num_fields, d)
            out = apply_spatially_varying(xs, w, self.g, self.kernel_size)
            return out_linear(out.reshape(b, hh, ww, self.in_type.size))
        w = generator(h)  # [T, B, H, W, g, d]
        # (W / 5) / (sum |W / 5| + 0.01) is W times one factor per pixel and operator.
        l1 = jnp.sum(jnp.abs(w.astype(jnp.float32)), axis=(0, 5))  # [B, H, W, g]
        scale = (0.2 / (0.2 * l1 + 0.01)).astype(dt)
        xs = x.astype(dt).reshape(b, hh, ww, self.in_type.num_fields // self.g, self.g, d)
        out = apply_spatially_varying_tap_major(xs, w, self.kernel_size)
        out = out * scale[:, :, :, None, :, None]
        return out_linear(out.reshape(b, hh, ww, self.in_type.size))


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


def group_pool(x: jax.Array, ftype: fields.FieldType, mode: str = "max") -> jax.Array:
    """Invariant pooling over each field's components: [..., F*d] -> [..., F]."""
    xf = x.reshape(x.shape[:-1] + (ftype.num_fields, ftype.field_size))
    if mode == "max":
        return jnp.max(xf, axis=-1)
    if mode == "mean":
        return jnp.mean(xf, axis=-1)
    raise ValueError(f"group_pool: mode must be 'max' or 'mean', got {mode!r}.")


def restrict_dihedral(x: jax.Array, ftype: fields.FieldType) -> tuple[jax.Array, fields.FieldType]:
    """Re-read each D_N regular field (2N components) as two C_N regular fields.

    The reference's fixed permutation: the first block of N is kept, the second reversed (on
    it r acts as a backward shift; reversed, as a forward one). Returns the array and its new
    field type (2F regular fields of C_N).
    """
    group = ftype.group
    if not group.flip or ftype.unit != (("regular", 1),):
        raise ValueError(f"restrict_dihedral needs regular fields of a D_N group, got {ftype!r}.")
    n = group.n
    perm = np.concatenate([np.arange(n), 2 * n - 1 - np.arange(n)])
    xf = x.reshape(x.shape[:-1] + (ftype.num_fields, 2 * n))
    out = jnp.take(xf, jnp.asarray(perm), axis=-1).reshape(x.shape)
    return out, fields.FieldType(groups.Group(n, False), "regular", 2 * ftype.num_fields)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2. Exactly quarter-turn equivariant only for even H and W: odd
    sizes give a one-time warning (the last row/column is dropped, as in PyTorch)."""
    h, w = x.shape[1], x.shape[2]
    if h % 2 or w % 2:
        warnings.warn(
            f"max_pool_2x2 on a {h}x{w} map: odd sizes drop the last row/column, which breaks "
            "exact quarter-turn equivariance; use inputs whose size is divisible by 4.",
            stacklevel=2,
        )
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class ChannelDropout(nn.Module):
    """Dropout of whole channels (PyTorch Dropout2d: the reference's), or of whole fields
    (``per_field=True``: every component of a field dropped together, which keeps the
    training-time map equivariant)."""

    rate: float
    ftype: fields.FieldType | None = None
    per_field: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        b, c = x.shape[0], x.shape[-1]
        if self.per_field:
            f = self.ftype.num_fields
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, (b, 1, 1, f, 1))
            keep = jnp.broadcast_to(keep, (b, 1, 1, f, c // f)).reshape(b, 1, 1, c)
        else:
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, (b, 1, 1, c))
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
