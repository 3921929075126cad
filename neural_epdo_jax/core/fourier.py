"""The group-Fourier transform of field types (pure numpy).

Every C_N- or D_N-equivariant linear map between two permutation representations is block
diagonal in these coordinates (`fourier_slots`), which is what makes the layers' fast path
cheap: a map between regular C16 fields is 8 blocks of 2 x 2 instead of one 16 x 16 matrix.
The bases of `bases` in these coordinates are `bases.linear_basis_fourier` and
`bases.generator_fourier`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from neural_epdo_jax.core import fields, groups

Matrices = Callable[[groups.Element], np.ndarray]


def _matrices(group: groups.Group, name: str) -> Matrices:
    return lambda g: groups.rep_matrix(group, name, g)


def fourier_slots(group: groups.Group) -> tuple[tuple[tuple[int, ...], int], ...]:
    """The slots of the group-Fourier transform: (rotation frequencies, mirror eigenvalue).

    Frequencies: slot 0 holds 0 and N/2 (N even), slot k (1 <= k < N/2) the frequency k (with
    -k). C_N: one slot per frequency group, mirror eigenvalue 0 (none). D_N: each frequency
    group is split by the mirror's eigenvalue (+1, then -1). Every C_N- or D_N-equivariant
    linear map between two representations commutes with the rotations, so it maps each
    frequency's isotypic component to itself, and (D_N) with the mirror, which commutes with
    those projections, so it keeps the mirror's eigenspaces inside them too: it is block
    diagonal over the slots. For D_N the split halves the slots' width (the regular
    representation: 2 instead of 4), and so the multiply-adds of a map between regular
    fields (D16: 16 blocks of 2 x 2 per field pair instead of 8 of 4 x 4): the map on a
    two-dimensional irrep's isotypic component splits into one block per eigenvalue, each
    with half its rows and columns.
    """
    n = group.n
    first = (0, n // 2) if n % 2 == 0 and n > 1 else (0,)
    freqs = (first,) + tuple((k,) for k in range(1, (n + 1) // 2))
    mirror = (1, -1) if group.flip else (0,)
    return tuple((f, e) for f in freqs for e in mirror)


def slot_projectors(group: groups.Group, rho: Matrices, dim: int) -> list[np.ndarray]:
    """Orthogonal projectors [dim, dim] onto the slots' components of ``rho``."""
    n = group.n
    rots = [rho((0, j)) for j in range(n)]
    out = []
    for freqs, mirror in fourier_slots(group):
        p = np.zeros((dim, dim))
        for k in freqs:
            c = 1.0 if (2 * k) % n == 0 else 2.0
            for j in range(n):
                p += (c / n) * np.cos(2 * np.pi * k * j / n) * rots[j]
        if mirror:  # commutes with p: m r^j m = r^-j, and the cosine sums are even in j
            p = p @ (np.eye(dim) + mirror * rho((1, 0))) / 2
        out.append(p)
    return out


@functools.lru_cache(maxsize=None)
def rep_fourier(group: groups.Group, rep: str) -> np.ndarray:
    """[K, b, dim]: orthonormal rows spanning each slot's component of ``rep`` (zero-padded
    to the slot width b of the regular representation)."""
    reg = groups.representation(group, "regular").dim
    width = max(
        int(round(np.trace(p))) for p in slot_projectors(group, _matrices(group, "regular"), reg)
    )
    dim = groups.representation(group, rep).dim
    projs = slot_projectors(group, _matrices(group, rep), dim)
    out = np.zeros((len(projs), width, dim))
    for k, p in enumerate(projs):
        vals, vecs = np.linalg.eigh((p + p.T) / 2)
        rows = vecs[:, vals > 0.5].T
        out[k, : len(rows)] = rows
    if not np.allclose(np.einsum("kbd,kbe->de", out, out), np.eye(dim), atol=1e-12):
        raise AssertionError(f"Fourier basis of {rep} in {group} is not orthonormal.")
    return out


@functools.lru_cache(maxsize=None)
def fourier_matrix(group: groups.Group, unit: fields.Unit) -> np.ndarray:
    """The group-Fourier transform of one field of type ``unit``.

    ``x_hat[k] = Phi[k] @ x`` splits a field into the slots of `fourier_slots`; ``Phi`` is
    orthonormal (``sum_k Phi[k].T @ Phi[k] = I``), zero rows pad every slot to the same
    width r * b (r = number of representations in the unit, b = 2: the regular
    representation's width of every slot).

    Returns:
      read-only [K, r * b, field_size].
    """
    ftype = fields.FieldType(group, unit)
    offs, d = ftype.rep_offsets, ftype.field_size
    blocks = [rep_fourier(group, name) for name, _ in offs]
    k, b = blocks[0].shape[:2]
    out = np.zeros((k, len(blocks) * b, d))
    for j, ((_, off), blk) in enumerate(zip(offs, blocks)):
        out[:, j * b : (j + 1) * b, off : off + blk.shape[2]] = blk
    return groups.read_only(out)
