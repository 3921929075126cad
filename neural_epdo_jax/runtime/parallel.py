"""Data parallelism: the batch split over a 'data' axis of devices, the result the one-device
step's.

The train and eval steps (`train.steps`) are written per device (SPMD): given
``axis_name``, they run inside ``jax.shard_map`` over that axis, each device on its rows of
the batch, and sum losses, gradients and metrics over the axis; BatchNorm gathers the
per-example moments of the whole batch (`layers.FieldBatchNorm`). Random draws
(augmentation angles, dropout masks) are made for the whole batch and sliced
(:func:`batch_rows`), so a step on D devices equals the one-device step up to the order of
float summation.

On CPU the same code runs the cores in parallel: XLA runs one CPU device's program mostly on
one core, so the entry points (train.py, the evaluation and benchmark commands) split the
host into one device per core (:func:`use_cpu_cores`, through `host.setup_host`) before JAX
starts (gain: see
docs/performance.md, "Both cores").
"""

from __future__ import annotations

import os
import re
import types
import warnings
from collections.abc import Callable, Mapping

import jax

DATA_AXIS = "data"

_FORCE_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")

# XLA's CPU backend schedules for concurrency by default: it computes values that depend on
# nothing, such as the zero buffers of the backward pass's loops, at the start of a step, where
# they stay live through the whole forward pass. Its memory-optimised scheduler does not
# (fewer temporaries at the same speed: docs/performance.md, "Memory of the training step").
CPU_SCHEDULER_FLAG = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"

# XLA's default CPU fusion emitter compiles each loop fusion as its own MLIR module, each
# holding an MLIR context; on few cores hundreds of them queue and set the compile's peak
# memory. The LLVM IR emitter (one module) does not, and gives steps as fast with gradients
# equal to float32 rounding (docs/performance.md, "Compilation"). The option is a
# per-compile one, so it also holds for code that runs after JAX has started.
CPU_CODEGEN_OPTIONS: Mapping[str, bool] = types.MappingProxyType(
    {"xla_cpu_use_fusion_emitters": False}
)


def compiler_options(platform: str | None = None, **options: int | bool) -> dict:
    """XLA compiler options for a ``jax.jit`` that runs on ``platform`` (default: JAX's
    default backend): ``options``, plus `CPU_CODEGEN_OPTIONS` on CPU. Use it for any large
    program (the package's steps, initialisers and exports do)."""
    platform = platform or jax.default_backend()
    return {**CPU_CODEGEN_OPTIONS, **options} if platform == "cpu" else dict(options)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def use_cpu_cores(num_devices: int = 0) -> int | None:
    """Splits the host into ``num_devices`` JAX CPU devices (0: one per usable core).

    Call it before JAX runs anything (JAX fixes its devices when it starts). An explicit
    ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` wins. It also selects XLA's
    memory-optimised CPU scheduler (`use_memory_optimised_scheduler`). On machines with an
    accelerator the CPU devices are unused, so this changes nothing there.

    Returns:
      The number of CPU devices requested, or None when nothing was changed (XLA_FLAGS sets
      it, or JAX had already started: then a warning says so if a count was asked for).
    """
    if num_devices < 0:
        raise ValueError(f"num_devices must be >= 0 (0: one per core), got {num_devices}.")
    use_memory_optimised_scheduler()
    if _FORCE_FLAG.search(os.environ.get("XLA_FLAGS", "")):
        return None
    num = num_devices or usable_cores()
    try:
        jax.config.update("jax_num_cpu_devices", num)
    except RuntimeError:
        if num_devices:
            warnings.warn(
                f"use_cpu_cores({num_devices}): JAX has already started, so its devices are "
                "fixed; call it before the first JAX operation.",
                stacklevel=2,
            )
        return None
    return num


def use_memory_optimised_scheduler() -> bool:
    """Adds `CPU_SCHEDULER_FLAG` to ``XLA_FLAGS`` unless they already choose a CPU scheduler
    (`use_cpu_cores` calls it). XLA reads its flags once, when JAX first compiles something;
    call it before that. Returns whether the flag was added."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_cpu_scheduler_type" in flags:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}".strip()
    return True


def mesh_size(num_devices: int, batch_sizes: tuple[int, ...]) -> int:
    """The most devices, at most ``num_devices``, that split every batch size evenly."""
    return max(n for n in range(1, num_devices + 1) if all(b % n == 0 for b in batch_sizes))


def batch_rows(draw: Callable[[int], jax.Array], rows: int, axis_name: str | None) -> jax.Array:
    """``draw(rows)``, or inside a map over ``axis_name`` (each device holding ``rows`` rows of
    the batch, in device order) this device's rows of ``draw(rows * devices)``: random draws
    that do not depend on how the batch is split. ``draw(n)`` returns an array of n rows."""
    if axis_name is None:
        return draw(rows)
    devices = jax.lax.axis_size(axis_name)
    full = draw(rows * devices)
    return jax.lax.dynamic_slice_in_dim(full, jax.lax.axis_index(axis_name) * rows, rows, 0)


def total(tree, axis_name: str | None):
    """``tree`` summed over the devices of ``axis_name`` (unchanged without one)."""
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)
