"""Discretisations of the partial derivatives of order <= K on a size x size stencil.

A stencil set is a read-only float64 array ``S`` of shape [num_terms, size, size], one
stencil per partial derivative in the order of `groups.derivative_terms` (each order
x-first). Stencils are cross-correlation kernels: ``d^alpha f(p) ~ sum_q S_alpha(q) f(p + q)``
where array entry ``[row, col]`` is the offset ``q = (x, y) = (col - c, c - row)``, c = size//2
(x right, y up). All discretisations share this order and sign (docs/design.md), so fields
always transform with the same representation whatever the discretisation.

Built in: ``fd`` (the reference's central differences), ``gauss`` (derivatives of a sampled
Gaussian) and ``rbf-fd`` (polyharmonic-spline RBF-FD weights). New ones can be added with
`register_discretisation`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
from numpy.polynomial import hermite as _hermite

from neural_epdo_jax.core import groups

StencilFn = Callable[[int, int], np.ndarray]
_REGISTRY: dict[str, StencilFn] = {}


def register_discretisation(name: str, fn: StencilFn, *, overwrite: bool = False) -> None:
    """Register ``fn(max_order, size) -> array [num_terms, size, size]`` under ``name``.

    The returned stencils are validated (shape, finiteness) when first used.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"discretisation name must be a non-empty string, got {name!r}.")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"discretisation {name!r} is already registered (pass overwrite=True).")
    _REGISTRY[name] = fn
    stencils.cache_clear()


def discretisations() -> tuple[str, ...]:
    """Names of the registered discretisations."""
    return tuple(_REGISTRY)


def _check_size(size: int) -> None:
    if (
        isinstance(size, bool)
        or not isinstance(size, (int, np.integer))
        or size < 3
        or size % 2 == 0
    ):
        raise ValueError(f"stencil size must be an odd integer >= 3, got {size!r}.")


def offsets(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) offset of every stencil entry, each [size, size] float64."""
    _check_size(size)
    c = size // 2
    t = np.arange(size) - c
    return np.broadcast_to(t[None, :], (size, size)).astype(float), np.broadcast_to(
        -t[:, None], (size, size)
    ).astype(float)


@functools.lru_cache(maxsize=None)
def stencils(name: str, max_order: int = 4, size: int = 5) -> np.ndarray:
    """The stencils of discretisation ``name`` for all derivatives of order <= max_order.

    Returns:
      read-only float64 array [(K+1)(K+2)/2, size, size].
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown discretisation {name!r}; known: {', '.join(sorted(_REGISTRY))} "
            "(add one with neural_epdo_jax.core.stencils.register_discretisation)."
        )
    if isinstance(max_order, bool) or not isinstance(max_order, (int, np.integer)) or max_order < 0:
        raise ValueError(f"max_order must be an integer >= 0, got {max_order!r}.")
    _check_size(size)
    out = np.array(_REGISTRY[name](int(max_order), int(size)), dtype=np.float64)
    want = (groups.num_derivatives(max_order), size, size)
    if out.shape != want:
        raise ValueError(
            f"discretisation {name!r} returned stencils of shape {out.shape}; expected {want} "
            f"(one {size}x{size} stencil per partial derivative of order <= {max_order})."
        )
    if not np.all(np.isfinite(out)):
        raise ValueError(f"discretisation {name!r} returned non-finite stencil values.")
    out.setflags(write=False)
    return out


# ----------------------------------------------------------------------------------------
# fd: the reference's central differences (second-order accurate), zero-embedded.

_FD_1D = {
    0: [0.0, 0.0, 1.0, 0.0, 0.0],
    1: [0.0, -0.5, 0.0, 0.5, 0.0],
    2: [0.0, 1.0, -2.0, 1.0, 0.0],
    3: [-0.5, 1.0, 0.0, -1.0, 0.5],
    4: [1.0, -4.0, 6.0, -4.0, 1.0],
}


def fd(max_order: int, size: int) -> np.ndarray:
    """Products of 1-D central differences: d^a/dx^a d^b/dy^b = d_a(x) d_b(y)."""
    if max_order > 4:
        raise ValueError(f"'fd' supports derivative orders <= 4, got max_order={max_order}.")
    needed = 3 if max_order <= 2 else 5
    if size < needed:
        raise ValueError(
            f"'fd' stencils of order {max_order} need size >= {needed}, got size={size}."
        )
    w = max(size, 5)
    c, lo = w // 2, (w - size) // 2  # build at width >= 5, then crop (orders <= 2 fit in 3)
    out = []
    for a, b in groups.derivative_terms(max_order):
        dx = np.zeros(w)
        dy = np.zeros(w)
        dx[c - 2 : c + 3] = _FD_1D[a]
        dy[c - 2 : c + 3] = _FD_1D[b][::-1]  # rows run downwards, y upwards
        out.append(np.outer(dy, dx)[lo : lo + size, lo : lo + size])
    return np.stack(out)


# ----------------------------------------------------------------------------------------
# gauss: derivatives of phi(r) = exp(-(eps r)^2) sampled on the grid.


def gauss(max_order: int, size: int, eps: float = 0.99) -> np.ndarray:
    """``S_alpha(q) = (-1)^|alpha| d^alpha phi(q)``: cross-correlating with it gives
    ``d^alpha (f * phi)``. Uses ``d^n/dx^n exp(-e^2 x^2) = (-e)^n H_n(e x) exp(-e^2 x^2)``."""
    x, y = offsets(size)
    phi = np.exp(-(eps**2) * (x**2 + y**2))
    out = []
    for a, b in groups.derivative_terms(max_order):
        ha = _hermite.hermval(eps * x, [0] * a + [1])
        hb = _hermite.hermval(eps * y, [0] * b + [1])
        out.append(eps ** (a + b) * ha * hb * phi)
    return np.stack(out)


# ----------------------------------------------------------------------------------------
# rbf-fd: polyharmonic spline r^6 log r plus polynomials up to the derivative's order.


def _phs6_radial_derivatives(m_max: int) -> list[tuple[float, float, int]]:
    # F(s) = s^3 log(s) / 2 with s = r^2, so that F(r^2) = r^6 log r. Each derivative is
    # A s^p log s + B s^p; d/ds gives A p s^(p-1) log s + (A + B p) s^(p-1).
    out, a, b, p = [], 0.5, 0.0, 3
    for _ in range(m_max + 1):
        out.append((a, b, p))
        a, b, p = a * p, a + b * p, p - 1
    return out


def _phs6_partial(a: int, b: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """d^a/dx^a d^b/dy^b of r^6 log r at (x, y) (0 at the origin, where it is C^5-flat)."""
    s = x**2 + y**2
    safe = np.where(s > 0, s, 1.0)
    coeffs = _phs6_radial_derivatives(a + b)
    total = np.zeros_like(s)
    # d^n/dx^n F(x^2 + c) = sum_i n!/(i!(n-2i)!) (2x)^(n-2i) F^(n-i)(s).
    for i in range(a // 2 + 1):
        ci = math.factorial(a) / (math.factorial(i) * math.factorial(a - 2 * i))
        for j in range(b // 2 + 1):
            cj = math.factorial(b) / (math.factorial(j) * math.factorial(b - 2 * j))
            A, B, p = coeffs[a + b - i - j]
            radial = (A * np.log(safe) + B) * safe ** float(p)
            total = total + ci * cj * (2 * x) ** (a - 2 * i) * (2 * y) ** (b - 2 * j) * radial
    return np.where(s > 0, total, 0.0)


def rbf_fd(max_order: int, size: int) -> np.ndarray:
    """RBF-FD weights for phi = r^6 log r on the size x size points, augmented with all
    monomials of degree <= the derivative's order (saddle-point system, float64)."""
    if max_order > 5:
        raise ValueError(f"'rbf-fd' (r^6 log r is C^5) supports orders <= 5, got {max_order}.")
    x, y = offsets(size)
    px, py = x.reshape(-1), y.reshape(-1)
    n = px.size
    phi = _phs6_partial(0, 0, px[:, None] - px[None, :], py[:, None] - py[None, :])
    out = []
    for a, b in groups.derivative_terms(max_order):
        k = a + b
        monos = [(k2 - j, j) for k2 in range(k + 1) for j in range(k2 + 1)]
        if len(monos) > n:
            raise ValueError(
                f"'rbf-fd' of order {k} needs at least {len(monos)} stencil points, size={size} "
                f"has {n}."
            )
        P = np.stack([px**i * py**j for i, j in monos], axis=1)
        mat = np.block([[phi, P], [P.T, np.zeros((len(monos), len(monos)))]])
        # L applied (in the evaluation point) to phi(|x - x_j|) at x = 0.
        rhs_rbf = _phs6_partial(a, b, -px, -py)
        rhs_poly = np.array(
            [math.factorial(a) * math.factorial(b) if (i, j) == (a, b) else 0.0 for i, j in monos]
        )
        w = np.linalg.solve(mat, np.concatenate([rhs_rbf, rhs_poly]))[:n]
        out.append(w.reshape(size, size))
    return np.stack(out)


register_discretisation("fd", fd)
register_discretisation("gauss", gauss)
register_discretisation("rbf-fd", rbf_fd)
