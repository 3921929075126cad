"""Optional fused CPU kernels (XLA FFI custom calls), built from C++ on first use.

`layers.normalised_apply` (steps 3-4 of the Neural ePDO layer: the per-pixel taps, their L1
normalisation and application) is the one op that XLA's CPU backend compiles poorly: fused
with the layer's output map it runs far below the machine's multiply-add rate, and its
backward pass is several loop fusions over the 25 taps. `normalised_apply.cc` computes the
same formulas (float32, kernel sizes 3, 5 and 7) in one pass over the taps with vector
multiply-adds; `normalised_apply` uses it on CPU when it is available and falls back to the
XLA formulation otherwise (other dtypes, other backends, no compiler).
tests/layers/ops/cpu_kernel_test.py checks both paths against each other.

The library is compiled with the host's C++ compiler (``$CXX``, else ``g++``/``c++``,
``-O3 -march=native``: vectors of 16 floats where the CPU has AVX-512, else 8) against the
XLA FFI headers shipped with jaxlib, once per source, jaxlib version and CPU, into
``~/.cache/neural_epdo_jax/kernels`` (``NEURAL_EPDO_JAX_KERNEL_DIR`` moves it); a build takes
a few seconds. ``NEURAL_EPDO_JAX_CPU_KERNELS=0`` turns the kernels off
(the XLA formulation everywhere). If the build fails, a warning says why and the XLA
formulation is used.

Serialising a traced model with ``jax.export`` refuses custom calls: trace it inside
`disabled()`, or use `tools.export.save`, whose frozen network does not use this op's kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "normalised_apply.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_FWD, _BWD = "neural_epdo_normalised_apply_fwd", "neural_epdo_normalised_apply_bwd"
KERNEL_SIZES = (3, 5, 7)
_REGISTERED: set[str] = set()
ENV_SWITCH = "NEURAL_EPDO_JAX_CPU_KERNELS"


def cache_dir() -> str:
    return os.environ.get("NEURAL_EPDO_JAX_KERNEL_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "neural_epdo_jax", "kernels"
    )


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _library_path(compiler: str) -> str:
    with open(_SOURCE, "rb") as f:
        key = hashlib.sha256(f.read())
    versions = (jax.__version__, jaxlib.version.__version__)  # the FFI headers are jaxlib's
    for part in (*versions, compiler, " ".join(_FLAGS), _cpu_id(), platform.machine()):
        key.update(part.encode())
    return os.path.join(cache_dir(), f"normalised_apply-{key.hexdigest()[:16]}.so")


def _build(compiler: str, path: str) -> None:
    """Compiles into a temporary file, then renames it into place (atomic: concurrent builds,
    e.g. pytest workers, each produce a complete library)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    cmd = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), _SOURCE, "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.cache
def _load() -> str | None:
    """Builds (if needed) and registers the kernels; None when they are usable, else why not."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{ENV_SWITCH}=0"
    compiler = _compiler()
    if compiler is None:
        return "no C++ compiler found (set CXX or install g++)"
    path = _library_path(compiler)
    try:
        if not os.path.exists(path):
            _build(compiler, path)
        lib = ctypes.cdll.LoadLibrary(path)
        for name, symbol in ((_FWD, "NormalisedApplyForward"), (_BWD, "NormalisedApplyBackward")):
            if name not in _REGISTERED:  # XLA keeps the first registration of a name
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), "cpu")
                _REGISTERED.add(name)
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(
        f"neural_epdo_jax: the fused CPU kernel is unavailable ({reason}); using the XLA "
        "formulation of normalised_apply (same results, slower on CPU).",
        stacklevel=3,
    )


def available(warn: bool = True) -> bool:
    """Whether the CPU kernels are built and registered (builds them on the first call)."""
    reason = _load()
    if reason is not None and warn and not reason.startswith(ENV_SWITCH):
        _warn_once(reason)
    return reason is None


_DISABLED = [0]


@contextlib.contextmanager
def disabled():
    """Within this context, functions traced use the XLA formulation (for comparisons; jitted
    functions traced before keep what they traced)."""
    _DISABLED[0] += 1
    try:
        yield
    finally:
        _DISABLED[0] -= 1


def use_for(x: jax.Array, w, kernel_size: int) -> bool:
    """Whether `layers.normalised_apply` should call the kernels for these operands (``w``: the
    taps, or a sequence of their parts): float32, a supported kernel size, the CPU backend,
    and the kernels available (decided when the caller is traced)."""
    return (
        not _DISABLED[0]
        and x.dtype == jnp.float32
        and all(p.dtype == jnp.float32 for p in _parts(w))
        and kernel_size in KERNEL_SIZES
        and jax.default_backend() == "cpu"
        and available()
    )


def _as_4d(a: jax.Array) -> jax.Array:
    """[d, P, g, ..., H, W] -> [d, P, g, M * H * W]: the kernels' operand (H and W are passed as
    attributes; with size-1 axes in the 6-D form, XLA copied x into a layout of its own)."""
    return a.reshape(a.shape[:3] + (-1,))


def _taps_3d(w: jax.Array) -> jax.Array:
    """[S, d, T, g / S, ..., H, W] -> [S, d, T * g / S * ... * H * W]: the kernels' operand (with
    size-1 axes in the 7-D form, XLA copied the taps into a layout of its own)."""
    return w.reshape(w.shape[:2] + (-1,))


def _attributes(x: jax.Array, kernel_size: int) -> dict:
    return dict(
        kernel_size=np.int64(kernel_size), height=np.int64(x.shape[-2]), width=np.int64(x.shape[-1])
    )


def _parts(w) -> tuple[jax.Array, ...]:
    return tuple(w) if isinstance(w, (tuple, list)) else (w,)


def normalised_apply_fwd(x: jax.Array, w, kernel_size: int):
    """(out [d, Q, g, ..., H, W], scale [g, ..., H, W]) from x [d, Q, g, ..., H, W] and the raw
    taps w [S, d, kernel_size^2, g / S, ..., H, W], or a sequence of parts [S, d_i, ...] that
    split the component axis (read in place: no concatenation; see
    `layers.normalised_apply`)."""
    x4 = _as_4d(x)
    out, scale = jax.ffi.ffi_call(
        _FWD,
        (
            jax.ShapeDtypeStruct(x4.shape, jnp.float32),
            jax.ShapeDtypeStruct(x4.shape[2:], jnp.float32),
        ),
        vmap_method="sequential",
    )(x4, *(_taps_3d(p) for p in _parts(w)), **_attributes(x, kernel_size))
    return out.reshape(x.shape), scale.reshape(x.shape[2:])


def normalised_apply_bwd(x, w, scale, out, g, kernel_size: int):
    """Cotangents (of x, of w: like w, an array or a tuple of parts) of
    `normalised_apply_fwd`'s ``out`` (and ``scale``) given the cotangent g of out."""
    x4, parts = _as_4d(x), _parts(w)
    w3 = [_taps_3d(p) for p in parts]
    gx, *gw = jax.ffi.ffi_call(
        _BWD,
        (jax.ShapeDtypeStruct(x4.shape, jnp.float32),)
        + tuple(jax.ShapeDtypeStruct(p.shape, jnp.float32) for p in w3),
        vmap_method="sequential",
    )(
        x4,
        scale.reshape(x4.shape[2:]),
        _as_4d(out),
        _as_4d(g),
        *w3,
        **_attributes(x, kernel_size),
    )
    gw = tuple(gp.reshape(p.shape) for gp, p in zip(gw, parts))
    return gx.reshape(x.shape), gw if isinstance(w, (tuple, list)) else gw[0]
