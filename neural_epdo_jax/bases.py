"""Equivariant bases, solved from structure rather than large dense SVDs (pure numpy).

Every representation of a field is a permutation representation on cosets ``G/H``. That
makes the constraints small:

* Maps *into* ``Ind_H^G 1`` (trivial, regular, quotient) from any representation ``rho`` are
  ``X[i, :] = w^T rho(c_i^-1)`` with ``c_i`` the coset representatives and ``w`` any vector
  fixed by ``rho(h)^T`` for ``h`` in H (Frobenius reciprocity). For the regular output H is
  trivial and no system is solved at all; otherwise the fixed space of a few small matrices.
* Maps *out of* the regular representation into any ``rho`` are ``X e_g = rho(g) v`` for any
  vector ``v``.

All functions are memoised (``functools.lru_cache``) on hashable arguments and return
read-only float64 arrays. They are constants at trace time, never parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import scipy.linalg

from neural_epdo_jax import fields, groups, stencils

Matrices = Callable[[groups.Element], np.ndarray]


def _ro(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def _orthonormal_rows(x: np.ndarray) -> np.ndarray:
    """Orthonormalise the flattened basis elements: Gram-Schmidt in element order, computed
    as ``L^-1 X`` with ``L L^T = X X^T`` (the Q of a QR with positive diagonal, at the cost
    of one matrix product; element counts are small, element sizes large)."""
    n = x.shape[0]
    if n == 0:
        return x
    flat = x.reshape(n, -1)
    try:
        chol = np.linalg.cholesky(flat @ flat.T)
        q = scipy.linalg.solve_triangular(chol, flat, lower=True)
    except np.linalg.LinAlgError:
        raise ValueError("basis elements are linearly dependent; cannot orthonormalise.") from None
    return q.reshape(x.shape)


def _fixed_space(mats: list[np.ndarray], dim: int) -> np.ndarray:
    """Orthonormal basis [n, dim] of {w : M w = w for all M in mats}."""
    if not mats:
        return np.eye(dim)
    a = np.concatenate([m - np.eye(dim) for m in mats], axis=0)
    _, s, vt = np.linalg.svd(a)
    tol = 1e-9 * max(1.0, s[0] if s.size else 1.0)
    rank = int(np.sum(s > tol))
    return vt[rank:]


def maps_into(group: groups.Group, rho_in: Matrices, dim_in: int, out_name: str) -> np.ndarray:
    """Basis [n, dim_out, dim_in] of all X with ``rho_out(g) X = X rho_in(g)``, rho_out the
    permutation representation ``out_name``; n = dim Hom_G(rho_in, rho_out)."""
    out = groups.representation(group, out_name)
    w = _fixed_space([rho_in(h).T for h in out.stabiliser_gens], dim_in)  # [n, dim_in]
    rows = np.stack([rho_in(group.inverse(c)) for c in out.coset_reps])  # [dim_out, d, d]
    return np.einsum("nl,ilm->nim", w, rows)


def maps_out_of_regular(group: groups.Group, rho_out: Matrices, dim_out: int) -> np.ndarray:
    """Basis [dim_out, dim_out, |G|] of all X with ``rho_out(g) X = X rho_reg(g)``."""
    reg = groups.representation(group, "regular")
    cols = np.stack([rho_out(c) for c in reg.coset_reps], axis=-1)  # [d, d, |G|]: [:, l, j]
    return np.transpose(cols, (1, 0, 2))  # element l: column j is rho_out(c_j) e_l


def _rep(group: groups.Group, name: str) -> Matrices:
    return lambda g: groups.rep_matrix(group, name, g)


def _embed(blocks: list[tuple[np.ndarray, int, int]], d_out: int, d_in: int) -> np.ndarray:
    """Block-assemble pairwise bases: (basis [n, do, di, ...], out offset, in offset)."""
    parts = []
    for b, oo, io in blocks:
        full = np.zeros((b.shape[0], d_out, d_in) + b.shape[3:])
        full[:, oo : oo + b.shape[1], io : io + b.shape[2]] = b
        parts.append(full)
    if not parts:
        return np.zeros((0, d_out, d_in))
    return np.concatenate(parts, axis=0)


def _offsets(group: groups.Group, unit: fields.Unit) -> list[tuple[str, int]]:
    ft = fields.FieldType(group, unit)
    out, off = [], 0
    for name in ft.reps:
        out.append((name, off))
        off += groups.representation(group, name).dim
    return out


def _check_unit(group: groups.Group, unit) -> fields.Unit:
    return fields.FieldType(group, unit).unit


# ----------------------------------------------------------------------------------------
# Equivariant linear (1x1) maps.


@functools.lru_cache(maxsize=None)
def _linear_pair(group: groups.Group, rep_in: str, rep_out: str) -> np.ndarray:
    d_in = groups.representation(group, rep_in).dim
    return _orthonormal_rows(maps_into(group, _rep(group, rep_in), d_in, rep_out))


@functools.lru_cache(maxsize=None)
def linear_basis(group: groups.Group, in_unit: fields.Unit, out_unit: fields.Unit) -> np.ndarray:
    """Basis of equivariant linear maps between two field types (one field each).

    Solves ``rho_out(g) A = A rho_in(g)`` for all g, block-assembled from the pairs of
    representations; the basis is orthonormal (as flattened matrices).

    Returns:
      read-only [n, dim_out, dim_in].
    """
    in_unit, out_unit = _check_unit(group, in_unit), _check_unit(group, out_unit)
    ins, outs = _offsets(group, in_unit), _offsets(group, out_unit)
    d_in = fields.FieldType(group, in_unit).field_size
    d_out = fields.FieldType(group, out_unit).field_size
    blocks = [(_linear_pair(group, ri, ro), oo, io) for ro, oo in outs for ri, io in ins]
    return _ro(_embed(blocks, d_out, d_in))


# ----------------------------------------------------------------------------------------
# Linear ePDOs (PDO-eConv kernels).


def _check_order(max_order: int) -> int:
    if isinstance(max_order, bool) or not isinstance(max_order, (int, np.integer)) or max_order < 0:
        raise ValueError(f"max_order must be an integer >= 0, got {max_order!r}.")
    return int(max_order)


@functools.lru_cache(maxsize=None)
def _pdo_coefficients(group: groups.Group, rep_in: str, rep_out: str, k: int) -> np.ndarray:
    """Orthonormal basis [n, d_out, d_in, k+1] of order-k coefficient matrices A with
    ``sum_alpha A_alpha d^alpha`` equivariant: ``A (rho_in (x) D_k)(g) = rho_out(g) A``."""
    d_in = groups.representation(group, rep_in).dim
    rho = lambda g: np.kron(groups.rep_matrix(group, rep_in, g), groups.derivative_rep(group, k, g))
    a = _orthonormal_rows(maps_into(group, rho, d_in * (k + 1), rep_out))
    return a.reshape(a.shape[0], a.shape[1], d_in, k + 1)


@functools.lru_cache(maxsize=None)
def _pdo_pair(
    group: groups.Group, rep_in: str, rep_out: str, discretisation: str, max_order: int, size: int
) -> np.ndarray:
    s = stencils.stencils(discretisation, max_order, size)
    parts, start = [], 0
    for k in range(max_order + 1):
        a = _pdo_coefficients(group, rep_in, rep_out, k)
        kern = np.einsum("noia,ahw->noihw", a, s[start : start + k + 1])
        start += k + 1
        norms = np.sqrt(np.sum(kern**2, axis=(1, 2, 3, 4)))
        if np.any(norms < 1e-10):
            raise ValueError(
                f"discretisation {discretisation!r}: the order-{k} stencils are linearly dependent "
                "(an equivariant operator maps to a zero kernel)."
            )
        parts.append(kern / norms[:, None, None, None, None])
    return np.concatenate(parts, axis=0)


@functools.lru_cache(maxsize=None)
def pdo_basis(
    group: groups.Group,
    in_unit: fields.Unit,
    out_unit: fields.Unit,
    discretisation: str = "fd",
    max_order: int = 4,
    size: int = 5,
) -> np.ndarray:
    """Basis of equivariant linear PDO kernels (PDO-eConv, SPEC section 4).

    For each order k the coefficient matrices A_k solve
    ``A_k (rho_in (x) D_k)(g) = rho_out(g) A_k`` (so ``sum_alpha A_k,alpha d^alpha`` commutes
    with the group action); each is contracted with the order-k stencils into a kernel and
    normalised to unit Frobenius norm. Orders are concatenated.

    Returns:
      read-only [n, dim_out, dim_in, size, size] (cross-correlation kernels).
    """
    in_unit, out_unit = _check_unit(group, in_unit), _check_unit(group, out_unit)
    max_order = _check_order(max_order)
    stencils.stencils(discretisation, max_order, size)  # validate early, with a clear error
    ins, outs = _offsets(group, in_unit), _offsets(group, out_unit)
    d_in = fields.FieldType(group, in_unit).field_size
    d_out = fields.FieldType(group, out_unit).field_size
    blocks = [
        (_pdo_pair(group, ri, ro, discretisation, max_order, size), oo, io)
        for ro, oo in outs
        for ri, io in ins
    ]
    out = _embed(blocks, d_out, d_in)
    return _ro(out.reshape(out.shape[0], d_out, d_in, size, size))


# ----------------------------------------------------------------------------------------
# The Neural ePDO generator.


@functools.lru_cache(maxsize=None)
def _generator_block(
    group: groups.Group, rep: str, discretisation: str, max_order: int, size: int
) -> np.ndarray:
    s = stencils.stencils(discretisation, max_order, size).reshape(-1, size * size)
    t = s.shape[0]
    d = groups.representation(group, rep).dim

    def rho(g):  # coefficients transform with rho (x) (D_0 + ... + D_K)^-T
        dall = groups.derivative_rep_all(group, max_order, g)
        return np.kron(groups.rep_matrix(group, rep, g), np.linalg.inv(dall).T)

    x = maps_out_of_regular(group, rho, d * t)  # [n, d*t, |G|]
    x = x.reshape(x.shape[0], d, t, group.order)
    taps = np.einsum("ncaj,ap->ncpj", x, s)  # [n, d, size*size, |G|]
    return _orthonormal_rows(taps).reshape(x.shape[0], d * size * size, group.order)


@functools.lru_cache(maxsize=None)
def generator_basis(
    group: groups.Group,
    unit: fields.Unit,
    discretisation: str = "fd",
    max_order: int = 4,
    size: int = 5,
) -> np.ndarray:
    """Basis of the Neural ePDO generator's last layer (SPEC section 5).

    Equivariant maps from one regular field (the hidden features) to the coefficients of one
    spatially varying operator per component of ``unit``: the coefficients transform with
    ``rho (x) (D_0 + ... + D_K)^-T`` and are mapped to the stencil taps, then orthonormalised
    (each block of the unit separately, block-assembled).

    Returns:
      read-only [n, field_size * size * size, |G|]; output index = component * size^2 + tap,
      tap = row * size + col.
    """
    unit = _check_unit(group, unit)
    max_order = _check_order(max_order)
    stencils.stencils(discretisation, max_order, size)
    p = size * size
    d_unit = fields.FieldType(group, unit).field_size
    blocks = []
    for rep, off in _offsets(group, unit):
        b = _generator_block(group, rep, discretisation, max_order, size)
        blocks.append((b[:, :, None, :], off * p, 0))
    out = _embed(blocks, d_unit * p, 1)
    return _ro(out[:, :, 0, :] if out.ndim == 4 else out.reshape(0, d_unit * p, group.order))
