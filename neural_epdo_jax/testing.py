"""Equivariance checks for users' own layers and networks.

* `equivariance_errors` / `assert_equivariant`: exact checks under the grid elements of the
  group (quarter turns and mirrors, `jnp.rot90` / `jnp.flip`, no interpolation).
* `equivariance_error_at_angle`: a *measurement* at an arbitrary group rotation, using an
  interpolated rotation and a centre-disc mask; report it, do not assert tight bounds on it.

A "type" argument is a `fields.FieldType` (fibres transform by its representation) or
``None`` for outputs that must be invariant (e.g. logits, with no spatial axes) -- in that
case the output is compared as is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from neural_epdo_jax.core import fields, groups
from neural_epdo_jax.data import augment


def _act(x: jax.Array, ftype: fields.FieldType | None, group: groups.Group, g, *, spatial: bool):
    if ftype is None:
        return fields.transform_space(x, group, g) if spatial else x
    return ftype.transform(x, g) if spatial else ftype.act_on_channels(x, g)


def _rel(a: jax.Array, b: jax.Array) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def equivariance_errors(
    fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    in_type: fields.FieldType | None,
    out_type: fields.FieldType | None,
    *,
    group: groups.Group | None = None,
    elements: Sequence[groups.Element] | None = None,
    spatial_output: bool = True,
    fibres: bool = True,
) -> dict[groups.Element, float]:
    """Relative error ``|fn(g.x) - g.fn(x)| / |g.fn(x)|`` for each grid element ``g``.

    Args:
      fn: maps an NHWC array to an NHWC array (or to [B, C] with ``spatial_output=False``).
      x: input [B, H, W, C] (H == W so that quarter turns are defined).
      in_type, out_type: field types of input and output (None: trivial action on fibres).
      group: defaults to the group of ``in_type`` / ``out_type``.
      elements: defaults to all grid elements except the identity.
      spatial_output: False when the output has no spatial axes (e.g. logits).
      fibres: False rotates space only -- a negative control that must fail for
        non-trivial field types.
    """
    group = group or (in_type or out_type).group
    if elements is None:
        elements = [e for e in group.grid_elements() if e != group.identity]
    fx = fn(x)
    errs = {}
    for g in elements:
        if fibres:
            gx = _act(x, in_type, group, g, spatial=True)
            expect = _act(fx, out_type, group, g, spatial=spatial_output)
        else:
            gx = fields.transform_space(x, group, g)
            expect = fields.transform_space(fx, group, g) if spatial_output else fx
        errs[g] = _rel(fn(gx), expect)
    return errs


def assert_equivariant(
    fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    in_type: fields.FieldType | None,
    out_type: fields.FieldType | None,
    *,
    rtol: float = 1e-4,
    **kwargs,
) -> dict[groups.Element, float]:
    """Raise AssertionError unless `equivariance_errors` are all <= rtol; returns them."""
    errs = equivariance_errors(fn, x, in_type, out_type, **kwargs)
    bad = {g: e for g, e in errs.items() if not e <= rtol}
    if bad:
        raise AssertionError(
            f"not equivariant: relative error above {rtol} for elements {bad} (all: {errs})"
        )
    return errs


def _rotate(x: jax.Array, angle: float) -> jax.Array:
    """``x`` [..., H, W, C] rotated counter-clockwise by ``angle`` radians (`augment.rotate`:
    bilinear, zero fill, about the centre)."""
    flat = x.reshape((-1, *x.shape[-3:]))
    return augment.rotate(flat, jnp.full(flat.shape[:1], angle), order=1).reshape(x.shape)


def disc_mask(h: int, w: int, radius_fraction: float = 0.8) -> np.ndarray:
    """[H, W] boolean mask of the centred disc of radius ``radius_fraction * min(H, W) / 2``."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    r = np.hypot(rows - (h - 1) / 2, cols - (w - 1) / 2)
    return r <= radius_fraction * min(h, w) / 2


def equivariance_error_at_angle(
    fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    in_type: fields.FieldType | None,
    out_type: fields.FieldType | None,
    k: int,
    *,
    group: groups.Group | None = None,
    spatial_output: bool = True,
    radius_fraction: float = 0.8,
) -> float:
    """Measured relative error under the rotation ``r^k`` (angle 2*pi*k/N), interpolated.

    Both sides are rotated with bilinear interpolation (the input before ``fn``, the output
    after it) and compared inside a centre disc, so the number includes interpolation error:
    report it, compare it with a non-equivariant baseline, never assert it tightly.
    """
    group = group or (in_type or out_type).group
    g = (0, k % group.n)
    angle = 2 * np.pi * k / group.n
    gx = _rotate(x, angle)
    if in_type is not None:
        gx = in_type.act_on_channels(gx, g)
    fx = fn(x)
    if spatial_output:
        expect = _rotate(fx, angle)
        if out_type is not None:
            expect = out_type.act_on_channels(expect, g)
        mask = disc_mask(fx.shape[-3], fx.shape[-2], radius_fraction)[..., None]
        return _rel(np.asarray(fn(gx)) * mask, np.asarray(expect) * mask)
    expect = fx if out_type is None else out_type.act_on_channels(fx, g)
    return _rel(fn(gx), expect)


def blob_images(batch: int = 3, seed: int = 0, size: int = 28) -> np.ndarray:
    """[batch, size, size, 1] float32 images of four soft off-centre blobs each, in [0, 1]:
    digit-like inputs whose outputs differ between images and change under a quarter turn
    (unlike white noise or a centred disc), for checks on untrained networks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((batch, size, size, 1), np.float32)
    lo, hi = 6 * size / 28, 22 * size / 28
    for b in range(batch):
        for _ in range(4):
            cy, cx = rng.uniform(lo, hi, size=2)
            out[b, :, :, 0] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(4, 12))
    return np.clip(out, 0, 1)
