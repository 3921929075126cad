"""How the layers compute, per backend: the formulation (``impl``) and the chunk sizes.

Neither changes the math: 'fourier' and 'dense' have the same parameters and the same
outputs up to round-off, and chunking only changes how many images run at a time.
"""

from __future__ import annotations

import jax

IMPLS = ("fourier", "dense")


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; use one of {IMPLS}.")
    return impl


def default_chunk(train: bool = True) -> int:
    """Images per `NeuralEPDO` chunk when its ``chunk`` is None: on CPU a few images at a time
    keep each layer's large intermediates (the taps) in cache and the peak memory low.
    Inference: 1. Training: 2 on one CPU device; 1 when the host is split into several
    (`parallel.use_cpu_cores`, one core each: as fast as 2, and the step compiles faster).
    Accelerators want the whole batch (0). docs/performance.md has the measurements."""
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
