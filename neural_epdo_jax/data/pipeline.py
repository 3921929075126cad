"""Epochs of fixed-shape batches from in-memory arrays, prefetched to device one batch ahead.

Every epoch visits each example exactly once, in the order of a permutation drawn from
``np.random.default_rng((seed, epoch))`` (so epoch e of a resumed run is the same as in an
uninterrupted one). The last, partial batch is padded to the full batch size with zero images
and ``mask`` 0, so a jitted step sees one shape and never retraces; losses and metrics must
weight examples by ``mask``.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from neural_epdo_jax.runtime import parallel

DATA_AXIS = parallel.DATA_AXIS


def num_batches(num_examples: int, batch_size: int) -> int:
    """Batches per epoch, the last one possibly partial: ceil(num_examples / batch_size)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return -(-num_examples // batch_size)


def data_mesh_sharding(batch_sizes: tuple[int, ...] = ()) -> NamedSharding | None:
    """Batch-axis sharding over a 1-D 'data' mesh of the local devices: the most of them
    that split every one of ``batch_sizes`` evenly (`parallel.mesh_size`; all of them when
    none is given). None when that is one device. With several processes
    (``jax.distributed``): all devices of all processes, which must split every batch size.
    """
    if jax.process_count() > 1:
        # Every process's devices, in process order: each process holds a contiguous block
        # of every batch's rows (`epoch_batches` assembles only those).
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        if any(b % len(devices) for b in batch_sizes):
            raise ValueError(
                f"batch sizes {tuple(batch_sizes)} must be multiples of the {len(devices)} "
                f"devices of the {jax.process_count()} processes"
            )
        mesh = Mesh(np.asarray(devices), (DATA_AXIS,))
        return NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    devices = jax.local_devices()
    devices = devices[: parallel.mesh_size(len(devices), tuple(batch_sizes))]
    if len(devices) == 1:
        return None
    mesh = Mesh(np.asarray(devices), (DATA_AXIS,))
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_images(images: np.ndarray) -> None:
    """Raises ValueError unless ``images`` are floats (the pipeline takes pixels in [0, 1])."""
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(
            f"images are {images.dtype}, not float: scale them to [0, 1] first, e.g. "
            "images.astype(np.float32) / 255 for 8-bit pixels."
        )


def local_rows(sharding: jax.sharding.Sharding | None, batch_size: int) -> slice:
    """The rows of a ``batch_size`` batch that this process's devices hold under
    ``sharding`` (all of them unless the sharding spans several processes)."""
    if sharding is None or sharding.is_fully_addressable:
        return slice(0, batch_size)
    blocks = sorted(
        range(batch_size)[index[0]]
        for index in sharding.addressable_devices_indices_map((batch_size,)).values()
    )
    blocks = [(b.start, b.stop) for b in blocks]
    if any(a[1] != b[0] for a, b in zip(blocks, blocks[1:])):
        raise ValueError(f"this process's rows of the batch are not contiguous: {blocks}")
    return slice(blocks[0][0], blocks[-1][1])


def _host_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    order: np.ndarray,
    rows: slice | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches following ``order``; the last one padded (mask 0) to batch_size. With
    ``rows``, only those rows of each batch."""
    n = order.shape[0]
    rows = rows or slice(0, batch_size)
    size = rows.stop - rows.start
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size][rows]
        real = idx.shape[0]
        image = np.zeros((size, *images.shape[1:]), np.float32)
        label = np.zeros((size,), np.int32)
        mask = np.zeros((size,), np.float32)
        image[:real] = images[idx]
        label[:real] = labels[idx]
        mask[:real] = 1.0
        yield {"image": image, "label": label, "mask": mask}


def epoch_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    sharding: jax.sharding.Sharding | None = None,
) -> Iterator[dict[str, jax.Array]]:
    """One epoch of device batches.

    While the caller works on batch i (jitted steps dispatch asynchronously), batch i+1 is
    already assembled and its host-to-device copy issued (double buffering).

    Args:
      images: [N, H, W, C] float32 (host memory).
      labels: [N] integer.
      batch_size: B; with ``sharding``, a multiple of its device count.
      shuffle: visit examples in a seeded random order instead of 0..N-1.
      seed, epoch: the permutation is ``np.random.default_rng((seed, epoch)).permutation(N)``.
      sharding: where to put batches (e.g. :func:`data_mesh_sharding`, which splits the batch
        axis over devices); None puts them on the default device. A sharding over several
        processes' devices: each process assembles only its own rows (`local_rows`).

    Yields:
      ``num_batches(N, B)`` dicts: 'image' float32 [B, H, W, C], 'label' int32 [B] and
      'mask' float32 [B] (1 for real examples, 0 for padding).

    Raises:
      ValueError: mismatched lengths, images that are not floats (`check_images`), or a
        batch size the devices cannot split evenly.
    """
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    check_images(images)
    num_batches(images.shape[0], batch_size)  # validates batch_size
    if sharding is not None:
        num_devices = len(sharding.device_set)
        if batch_size % num_devices:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by the {num_devices} devices of the "
                f"data sharding; use a multiple of {num_devices}"
            )
    n = images.shape[0]
    if shuffle:
        order = np.random.default_rng((seed, epoch)).permutation(n)
    else:
        order = np.arange(n)

    rows = local_rows(sharding, batch_size)

    def to_device(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        if rows.stop - rows.start == batch_size:
            return jax.device_put(batch, sharding)
        return {  # this process's rows of a batch spread over several processes
            key: jax.make_array_from_process_local_data(
                sharding, value, (batch_size, *value.shape[1:])
            )
            for key, value in batch.items()
        }

    pending = None
    for batch in _host_batches(images, labels, batch_size, order, rows):
        ready = to_device(batch)
        if pending is not None:
            yield pending
        pending = ready
    if pending is not None:
        yield pending
