"""Random-rotation augmentation of image batches, on device (jittable, batched).

Rotation convention, shared with ``sources.rotate_bilinear_np``: a positive angle turns the
image counter-clockwise as displayed (row 0 at the top), about the centre ((H-1)/2, (W-1)/2)
in pixel indices; so a quarter turn equals ``jnp.rot90(x, k=1, axes=(1, 2))``. Output pixel p
samples the input at R(-angle) p; samples outside the image read 0 (zero fill).

Methods (docs/design.md, "Training protocol"):

* ``'reference'``: the reference's train transform. Upsample 28 -> 84 (bilinear, half-pixel
  centres, like torchvision/PIL ``Resize``), rotate by an angle uniform in [-180, 180] degrees
  with nearest-neighbour sampling and zero fill (``RandomRotation(180)``), downsample 84 -> 28
  (bilinear with antialiasing, i.e. a triangle filter widened 3x, like PIL's ``Resize``).
* ``'bilinear'``: one bilinear rotation at the input resolution, same angle distribution;
  cheaper and blurs less than 'reference'.
* ``'none'``: the identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from neural_epdo_jax.runtime import parallel

METHODS: tuple[str, ...] = ("reference", "bilinear", "none")

REFERENCE_UPSAMPLE = 3  # 28 -> 84 -> 28


def random_angles(rng: jax.Array, num: int) -> jax.Array:
    """Angles [num] in radians, uniform in [-pi, pi) (the reference's U[-180, 180] degrees)."""
    return jax.random.uniform(rng, (num,), minval=-jnp.pi, maxval=jnp.pi)


def source_coordinates(cos, sin, height: int, width: int):
    """Input (row, col) that each output pixel samples, for rotations with these cosines and
    sines [B]: two arrays [B, H, W] in their dtype (numpy for numpy input, whose float64
    arithmetic `sources.rotate_bilinear_np` keeps exact; else JAX)."""
    xp = np if isinstance(cos, np.ndarray) else jnp
    centre_r, centre_c = (height - 1) / 2.0, (width - 1) / 2.0
    rows = xp.arange(height, dtype=cos.dtype)[:, None]
    cols = xp.arange(width, dtype=cos.dtype)[None, :]
    x, y = cols - centre_c, centre_r - rows  # display coordinates (y up), [H, W] by broadcast
    cos, sin = cos[:, None, None], sin[:, None, None]
    src_c = cos * x + sin * y + centre_c  # [B, H, W]
    src_r = centre_r - (cos * y - sin * x)
    return src_r, src_c


def _gather(images: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """images[b, rows, cols, :] with 0 where (rows, cols) is outside: [B, H, W, C].

    Args:
      images: [B, H, W, C].
      rows, cols: int32 [B, H', W'] (any values; out-of-range ones read 0).
    """
    b, h, w, c = images.shape
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    flat = jnp.clip(rows, 0, h - 1) * w + jnp.clip(cols, 0, w - 1)  # [B, H', W']
    values = jax.vmap(lambda im, idx: im.reshape(h * w, c)[idx])(images, flat)  # [B, H', W', C]
    return jnp.where(inside[..., None], values, jnp.zeros((), images.dtype))


def rotate(images: jax.Array, angles: jax.Array, *, order: int) -> jax.Array:
    """Rotates each image counter-clockwise (as displayed) about its centre, zero fill.

    Args:
      images: [B, H, W, C].
      angles: [B] radians.
      order: 0 nearest neighbour, 1 bilinear.

    Returns:
      [B, H, W, C], the dtype of ``images``.
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (bilinear), got {order}")
    _, h, w, _ = images.shape
    cos, sin = jnp.cos(angles).astype(jnp.float32), jnp.sin(angles).astype(jnp.float32)
    src_r, src_c = source_coordinates(cos, sin, h, w)
    if order == 0:
        # floor(x + 0.5): exact quarter turns land on integer coordinates up to float error.
        r = jnp.floor(src_r + 0.5).astype(jnp.int32)
        c = jnp.floor(src_c + 0.5).astype(jnp.int32)
        return _gather(images, r, c)
    r0f, c0f = jnp.floor(src_r), jnp.floor(src_c)
    fr, fc = (src_r - r0f)[..., None], (src_c - c0f)[..., None]  # [B, H, W, 1]
    r0, c0 = r0f.astype(jnp.int32), c0f.astype(jnp.int32)
    out = (1 - fr) * (1 - fc) * _gather(images, r0, c0)
    out += (1 - fr) * fc * _gather(images, r0, c0 + 1)
    out += fr * (1 - fc) * _gather(images, r0 + 1, c0)
    out += fr * fc * _gather(images, r0 + 1, c0 + 1)
    return out.astype(images.dtype)


def reference_transform(images: jax.Array, angles: jax.Array) -> jax.Array:
    """The reference's train transform for given angles: up x3, rotate (nearest), down x3.

    Args:
      images: [B, H, W, C].
      angles: [B] radians.

    Returns:
      [B, H, W, C].
    """
    b, h, w, c = images.shape
    big = (b, h * REFERENCE_UPSAMPLE, w * REFERENCE_UPSAMPLE, c)
    up = jax.image.resize(images, big, method="bilinear")
    turned = rotate(up, angles, order=0)
    down = jax.image.resize(turned, images.shape, method="bilinear", antialias=True)
    return down.astype(images.dtype)


def augment(
    rng: jax.Array, images: jax.Array, method: str, *, axis_name: str | None = None
) -> jax.Array:
    """Rotates every image of a batch by its own random angle, uniform in [-180, 180] degrees.

    Jittable with ``method`` static. Test images are not augmented (pass ``'none'``).

    Args:
      rng: a PRNG key.
      images: [B, H, W, C] float.
      method: 'reference', 'bilinear' or 'none' (see the module docstring).
      axis_name: when the batch is split over the devices of this axis (`parallel`), the
        angles are drawn for the whole batch and each device takes its rows: the same angles
        as on one device.

    Returns:
      [B, H, W, C], same dtype.

    Raises:
      ValueError: unknown method (listing the valid ones).
    """
    if method not in METHODS:
        raise ValueError(f"unknown augmentation method {method!r}; valid: {', '.join(METHODS)}")
    if method == "none":
        return images
    angles = parallel.batch_rows(lambda n: random_angles(rng, n), images.shape[0], axis_name)
    if method == "reference":
        return reference_transform(images, angles)
    return rotate(images, angles, order=1)
