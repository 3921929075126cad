"""The Neural ePDO generator's last layer in the factored form of
`bases.generator_fourier`: Fourier block products into untwisted coefficients, one inverse
transform, one small matrix per component to the stencil taps."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from neural_epdo_jax.core import bases, fields, groups
from neural_epdo_jax.core.fourier import fourier_matrix
from neural_epdo_jax.layers.ops.blocks import block_matmul, const_matmul


@dataclasses.dataclass(frozen=True)
class GeneratorPlan:
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
    weight: jax.Array, plan: GeneratorPlan
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


def generator_taps_cm(h: jax.Array, fourier, dense, plan: GeneratorPlan) -> tuple[jax.Array, ...]:
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
        phi = fourier_matrix(plan.group, (("regular", 1),))
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
