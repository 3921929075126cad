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

import dataclasses
import functools
from collections.abc import Callable

import numpy as np
import scipy.linalg

from neural_epdo_jax.core import fields, fourier, groups, stencils

Matrices = Callable[[groups.Element], np.ndarray]


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


def _offsets(group: groups.Group, unit: fields.Unit) -> tuple[tuple[str, int], ...]:
    return fields.FieldType(group, unit).rep_offsets


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
    return groups.read_only(_embed(blocks, d_out, d_in))


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
    """Basis of equivariant linear PDO kernels (PDO-eConv; docs/design.md).

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
    return groups.read_only(out.reshape(out.shape[0], d_out, d_in, size, size))


# ----------------------------------------------------------------------------------------
# The Neural ePDO generator.


def _generator_block_generic(
    group: groups.Group, rep: str, discretisation: str, max_order: int, size: int
) -> np.ndarray:
    """Straightforward construction of `_generator_block` (solve, map to taps, Cholesky QR);
    kept as the reference the closed form is tested against."""
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
def _derivative_reps(group: groups.Group, max_order: int) -> tuple[np.ndarray, np.ndarray]:
    """D(g_j) and D(g_j)^-T ([|G|, A, A] each, D = D_0 + ... + D_K) for the elements g_j in
    the order of the regular representation's components."""
    elems = groups.representation(group, "regular").coset_reps
    d = np.stack([groups.derivative_rep_all(group, max_order, g) for g in elems])
    return d, np.transpose(np.linalg.inv(d), (0, 2, 1))


@functools.lru_cache(maxsize=None)
def _generator_untwisted(
    group: groups.Group, discretisation: str, max_order: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The orthonormalisation of the generator basis in closed form.

    The coefficients transform with ``V(g) = rho(g) (x) E(g)``, ``E = D^-T``; the unnormalised
    elements are ``X_(c, b) e_j = V(g_j) (e_c (x) e_b)`` mapped to taps by ``S^T``. Their Gram
    matrix is ``I (x) M`` with ``M = sum_j E_j^T S S^T E_j`` (15 x 15), because ``rho`` is a
    permutation representation: Gram-Schmidt in element order is ``I (x) chol(M)^-1``.

    Returns:
      U = chol(M)^-1 [A, A] and W[j] = S^T E(g_j) U^T [|G|, size^2, A].
    """
    s = stencils.stencils(discretisation, max_order, size).reshape(-1, size * size)
    _, e = _derivative_reps(group, max_order)
    m = np.einsum("jba,bc,jcd->ad", e, s @ s.T, e, optimize=True)
    try:
        chol = np.linalg.cholesky(m)
    except np.linalg.LinAlgError:
        raise ValueError("basis elements are linearly dependent; cannot orthonormalise.") from None
    u = scipy.linalg.solve_triangular(chol, np.eye(len(m)), lower=True)
    w = np.einsum("bp,jba,ga->jpg", s, e, u, optimize=True)
    return u, w


@functools.lru_cache(maxsize=None)
def _generator_block(
    group: groups.Group, rep: str, discretisation: str, max_order: int, size: int
) -> np.ndarray:
    """Orthonormal basis [d * A, d * size^2, |G|] of the maps from a regular field to the taps
    of one operator per component of ``rep`` (closed form of `_generator_block_generic`):
    element (c, a), column j is ``e_{g_j c} (x) W[j][:, a]``."""
    _, w = _generator_untwisted(group, discretisation, max_order, size)
    rep_ = groups.representation(group, rep)
    d, (order, p, a) = rep_.dim, w.shape
    elems = groups.representation(group, "regular").coset_reps
    perm = rep_.perms[[groups.element_index(group, g) for g in elems]]  # [|G|, d]
    out = np.zeros((d, a, d, p, order))
    comps = np.arange(d)
    for j in range(order):
        out[comps, :, perm[j], :, j] = w[j].T
    return out.reshape(d * a, d * p, order)


@functools.lru_cache(maxsize=None)
def generator_basis(
    group: groups.Group,
    unit: fields.Unit,
    discretisation: str = "fd",
    max_order: int = 4,
    size: int = 5,
) -> np.ndarray:
    """Basis of the Neural ePDO generator's last layer (docs/design.md).

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
    return groups.read_only(
        out[:, :, 0, :] if out.ndim == 4 else out.reshape(0, d_unit * p, group.order)
    )


# ----------------------------------------------------------------------------------------
# Group-Fourier forms (performance): the same bases in coordinates where they are block
# diagonal. Used by the layers' fast path; the dense forms above stay the definition.


def _to_slots(basis: np.ndarray, phi_out: np.ndarray, phi_in: np.ndarray) -> np.ndarray:
    """[n, d_out, d_in] equivariant maps -> [n, K, rb_out, rb_in] slot blocks (checked)."""
    blocks = np.einsum("kyo,noi,kxi->nkyx", phi_out, basis, phi_in, optimize=True)
    back = np.einsum("kyo,nkyx,kxi->noi", phi_out, blocks, phi_in, optimize=True)
    err = np.max(np.abs(back - basis), initial=0.0)
    if err > 1e-9 * max(1.0, np.max(np.abs(basis), initial=0.0)):
        raise AssertionError(f"basis is not block diagonal over the Fourier slots (err {err}).")
    return blocks


@functools.lru_cache(maxsize=None)
def linear_basis_fourier(
    group: groups.Group, in_unit: fields.Unit, out_unit: fields.Unit
) -> np.ndarray:
    """`linear_basis` in group-Fourier coordinates: ``Phi_out[k] A Phi_in[k].T`` per slot.

    ``A = sum_k Phi_out[k].T @ blocks[:, k] @ Phi_in[k]`` reconstructs every basis element
    (checked to 1e-9), because an equivariant map never mixes slots.

    Returns:
      read-only [n, K, r_out * b, r_in * b].
    """
    in_unit, out_unit = _check_unit(group, in_unit), _check_unit(group, out_unit)
    basis = linear_basis(group, in_unit, out_unit)
    return groups.read_only(
        _to_slots(
            basis, fourier.fourier_matrix(group, out_unit), fourier.fourier_matrix(group, in_unit)
        )
    )


@dataclasses.dataclass(frozen=True, eq=False)
class GeneratorFourier:
    """`generator_basis` factored for the fast path (all arrays read-only float64).

    In a regular block of the unit, the coefficients ``y[c]`` generated for component ``c``
    (group element ``g_c``) are untwisted, ``z[c] = D(g_c)^T y[c]`` (``D = D_0 + ... + D_K``):
    ``z`` is then a family of A regular fields (A = number of derivatives) produced by an
    ordinary regular -> regular map, a group convolution, which is block diagonal over the
    Fourier slots. The taps follow with one small matrix per component:
    ``taps[c] = T[c] @ z[c]``, ``T[c] = S^T D(g_c)^-T`` (S: the stencils [A, size^2]).

    For the weights ``w[..., n]`` of the elements ``n = (l, alpha)`` of a regular block (in
    `generator_basis` order), the group convolution's Fourier blocks are
    ``sum_{l, alpha} w[..., (l, alpha)] untwist[l, alpha, a] shifts[l, k]`` (block of
    derivative a in slot k).

    Attributes:
      untwist: [|G|, A, A] ``(U D(g_l))[alpha, a]``, U the closed-form Gram-Schmidt.
      shifts: [|G|, K, b, b] ``Phi[k] R_l Phi[k]^T`` (out, in), ``R_l e_h = e_{g_h g_l}``.
      taps: [|G|, size^2, A] the matrices T[c].
      regular_blocks: (component offset, first basis element) of each regular block.
      dense: [n, d_rest * size^2, |G|] the basis rows of the other (non-regular) blocks.
      dense_offsets: ((component offset, dim), ...) of those blocks.
    """

    untwist: np.ndarray
    shifts: np.ndarray
    taps: np.ndarray
    regular_blocks: tuple[tuple[int, int], ...]
    dense: np.ndarray
    dense_offsets: tuple[tuple[int, int], ...]


@functools.lru_cache(maxsize=None)
def generator_fourier(
    group: groups.Group,
    unit: fields.Unit,
    discretisation: str = "fd",
    max_order: int = 4,
    size: int = 5,
) -> GeneratorFourier:
    """`generator_basis` in the factored form of `GeneratorFourier`."""
    unit = _check_unit(group, unit)
    basis = generator_basis(group, unit, discretisation, max_order, size)
    u, _ = _generator_untwisted(group, discretisation, max_order, size)
    d, d_inv_t = _derivative_reps(group, max_order)
    s = stencils.stencils(discretisation, max_order, size).reshape(-1, size * size)  # [A, P]
    a, p, order = s.shape[0], size * size, group.order
    reg = groups.representation(group, "regular")
    elems = reg.coset_reps
    perm = reg.perms[[groups.element_index(group, g) for g in elems]]  # [h, l]: g_h g_l
    r = np.zeros((order, order, order))  # [l, c, h]
    r[np.arange(order)[None, :], perm, np.arange(order)[:, None]] = 1.0
    phi = fourier.rep_fourier(group, "regular")  # [K, b, |G|]
    shifts = np.einsum("kyc,lch,kxh->lkyx", phi, r, phi, optimize=True)
    untwist = np.einsum("xb,lba->lxa", u, d, optimize=True)
    taps = np.einsum("ap,cab->cpb", s, d_inv_t, optimize=True)
    reg_blocks, dense, dense_offs, start = [], [], [], 0
    for name, off in _offsets(group, unit):
        dim = groups.representation(group, name).dim
        if name == "regular":
            reg_blocks.append((off, start))
        else:
            dense.append(basis[:, off * p : (off + dim) * p])
            dense_offs.append((off, dim))
        start += dim * a  # every block has dim * A elements (Hom(regular, V) = dim V)
    if start != basis.shape[0]:
        raise AssertionError("generator basis blocks do not have dim * A elements each.")
    dense_arr = np.concatenate(dense, axis=1) if dense else np.zeros((basis.shape[0], 0, order))
    return GeneratorFourier(
        groups.read_only(untwist),
        groups.read_only(shifts),
        groups.read_only(taps),
        tuple(reg_blocks),
        groups.read_only(dense_arr),
        tuple(dense_offs),
    )
