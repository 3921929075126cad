"""The Neural ePDO layer: a spatially adaptive PDO whose coefficients an equivariant MLP
generates per pixel, and its generator's last layer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from neural_epdo_jax.core import bases, fields, fourier
from neural_epdo_jax.layers.backend import check_impl, default_chunk
from neural_epdo_jax.layers.conv import (
    EquivariantLinear,
    Params,
    apply_linear_kernel,
    expand_linear_kernel,
    grouped_weight,
    weight_spec,
)
from neural_epdo_jax.layers.layout import Dtype, as_dtype, check_input
from neural_epdo_jax.layers.norm import FieldGroupNorm, group_norm_relu_cm
from neural_epdo_jax.layers.ops.blocks import apply_linear_cm, linear_blocks, to_cm, with_transpose
from neural_epdo_jax.layers.ops.generator import (
    GeneratorPlan,
    generator_blocks,
    generator_taps_cm,
    group_major,
)
from neural_epdo_jax.layers.ops.normalised_apply import normalised_apply


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
        w = grouped_weight(self, basis_np, self.hidden_type, self.num_out, self.groups)
        dt = as_dtype(self.dtype)
        if check_impl(self.impl) == "dense":
            kernel = expand_linear_kernel(w, basis_np, self.groups).astype(dt)
            return apply_linear_kernel(h.astype(dt), kernel)
        plan = GeneratorPlan(
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


class NeuralEPDO(nn.Module):
    """The Neural ePDO layer (He et al. 2023; docs/design.md): a spatially adaptive PDO whose
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
        check_impl(self.impl)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_input(x, self.in_type, "NeuralEPDO", self.channel_major)
        if self.channel_major and self.impl == "dense":
            raise ValueError("NeuralEPDO: channel_major needs impl='fourier'.")
        if self.impl == "dense":
            return self._dense(x)
        return self._fourier(x)

    def _dense(self, x: jax.Array) -> jax.Array:
        group, dt = self.in_type.group, as_dtype(self.dtype)
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
        group, dt = self.in_type.group, as_dtype(self.dtype)
        m = self.hidden_fields()
        hidden = fields.FieldType(group, "regular", m)
        u_in, u_out, u_h = self.in_type.unit, self.out_type.unit, hidden.unit
        f_in, f_out = self.in_type.num_fields, self.out_type.num_fields
        plan = GeneratorPlan(
            group, u_in, self.discretisation, self.max_order, self.kernel_size, self.s
        )
        # The same parameters (names, shapes, initialisers) as the dense sub-layers.
        (w_h,) = Params(
            (weight_spec(bases.linear_basis(group, u_in, u_h), self.in_type, m, 1),),
            name="hidden",
        )()
        ones, zeros = nn.initializers.ones, nn.initializers.zeros
        norm = Params(
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
        (w_g,) = Params((weight_spec(gen_basis, hidden, self.g, self.s),), name="generator")()
        (w_o,) = Params(
            (weight_spec(bases.linear_basis(group, u_in, u_out), self.in_type, f_out, 1),),
            name="output",
        )()
        # Blocks with their transposes, made once for all chunks (`block_matmul`).
        blocks_h = with_transpose(linear_blocks(w_h, group, u_in, u_h))
        blocks_o = with_transpose(linear_blocks(w_o, group, u_in, u_out))
        gen = generator_blocks(w_g, plan)
        gen_fourier, gen_dense = (None if b is None else with_transpose(b) for b in gen)
        phi_in = fourier.fourier_matrix(group, u_in)
        phi_h = fourier.fourier_matrix(group, u_h)
        phi_out = fourier.fourier_matrix(group, u_out)
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
            h = group_norm_relu_cm(h.reshape(order, m, n, hh * ww), norm)
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
            # buffer that stays live from the forward to the backward pass, which raises
            # the training step's peak memory.
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
