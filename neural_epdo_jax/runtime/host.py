"""Host setup shared by every entry point (`setup_host`): huge pages, logging, CPU devices,
XLA's compilation cache; and the compiler's freed memory handed back (`release_free_memory`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable

import jax

from neural_epdo_jax.runtime import hostmem, parallel


def default_compilation_cache_dir() -> str:
    """``$XDG_CACHE_HOME/neural_epdo_jax/xla`` (default ``~/.cache/...``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "neural_epdo_jax", "xla")


def use_compilation_cache(path: str | None = None) -> str | None:
    """Keeps compiled steps on disk (JAX's persistent compilation cache), so that a rerun of
    the same model and shapes -- resuming, evaluating, the next run of a sweep -- loads its
    steps instead of compiling them again (see docs/performance.md, "Compilation").
    Compilations under a second are not kept. Entries are a few MB each and never expire
    (JAX's size limit needs the ``filelock`` package); deleting the directory at any time is
    safe.

    Args:
      path: the cache directory; None: `default_compilation_cache_dir`; '': keep none. A
        directory set already (``JAX_COMPILATION_CACHE_DIR``, ``jax.config``) wins.
    Returns:
      The directory in use, or None.
    """
    current = jax.config.jax_compilation_cache_dir
    if path is None:
        path = default_compilation_cache_dir()
    if current or not path:
        return current or None
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    return jax.config.jax_compilation_cache_dir


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def release_free_memory() -> None:
    """Hands the C heap's free pages back to the OS (glibc's ``malloc_trim``; a no-op
    elsewhere). Call it after compiling: XLA frees the memory its compiler used, but glibc
    keeps it mapped, so it would add to the peak RSS of the steps that follow."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def setup_host(
    *,
    cpu_devices: int | None = None,
    compilation_cache: str | None = None,
    huge_pages: bool = True,
    quiet: bool = True,
) -> str | None:
    """Prepares this process for a run. Every entry point (train.py, the ``tools`` command
    lines, the benchmarks, the examples) calls it first thing, before JAX computes anything.

    Args:
      cpu_devices: on a CPU host, split it into this many JAX devices, one per core if 0
        (`parallel.use_cpu_cores`: data parallelism); None: JAX's default, one device.
      compilation_cache: XLA's persistent compilation cache directory
        (`use_compilation_cache`: None the default one, '' none).
      huge_pages: start this same command again with transparent huge pages for the C heap
        when they are missing (`hostmem.reexec_with_huge_pages`: faster CPU steps; not in an
        interactive interpreter or ``-c`` code). Call it before threads start or files open.
      quiet: absl logging at WARNING unless ``--verbosity`` was given (orbax logs every
        checkpoint save and restore at INFO; progress goes to stdout).

    Returns:
      The compilation cache directory in use, or None.
    """
    if huge_pages:
        hostmem.reexec_with_huge_pages()
    if quiet:
        from absl import flags, logging

        if not (flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present):
            logging.set_verbosity(logging.WARNING)
    if cpu_devices is not None:
        parallel.use_cpu_cores(cpu_devices)
    return use_compilation_cache(compilation_cache)
