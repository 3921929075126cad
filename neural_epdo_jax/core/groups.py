"""Planar symmetry groups C_N and D_N, their permutation representations, and their action
on partial derivatives.

Conventions (docs/design.md), pinned once by `tests/core/groups_test.py`:

* A group element is a pair ``(flip, k)`` meaning ``r^k m^flip``: first the mirror (if
  ``flip == 1``), then the rotation by ``2*pi*k/N`` counter-clockwise.
* On the plane (x right, y up) ``r`` acts as the rotation matrix ``R(2*pi/N)`` and the mirror
  ``m`` as ``diag(-1, 1)`` (x -> -x).
* Every representation used by the layers is a *permutation* representation on the cosets
  ``G/H`` of a subgroup ``H``: ``trivial`` (H = G), ``regular`` (H = {e}) and the quotient
  ``quo_M`` of C_N (H = C_M, dimension N/M). ``rho(g) e_i = e_{perm(g)[i]}``.
* ``D_k`` is the action on the k+1 partial derivatives of order k, ordered
  ``d^k/dx^k, d^k/dx^(k-1)dy, ..., d^k/dy^k``:
  ``d^alpha (g.f)(p) = sum_beta D_k(g)[alpha, beta] (d^beta f)(g^-1 p)`` with
  ``(g.f)(p) = f(g^-1 p)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import numpy as np

Element = tuple[int, int]  # (flip, k): r^k m^flip


@dataclasses.dataclass(frozen=True)
class Group:
    """The cyclic group C_N (``flip=False``) or the dihedral group D_N (``flip=True``).

    Attributes:
      n: number of rotations N >= 1.
      flip: whether the mirror is included.
    """

    n: int
    flip: bool = False

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or self.n < 1:
            raise ValueError(
                f"Group: n must be an integer >= 1 (number of rotations), got {self.n!r}."
            )
        if not isinstance(self.flip, (bool, np.bool_)):
            raise ValueError(f"Group: flip must be a bool, got {self.flip!r}.")
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "flip", bool(self.flip))

    @property
    def name(self) -> str:
        return f"{'D' if self.flip else 'C'}{self.n}"

    def __repr__(self) -> str:
        return self.name

    @property
    def order(self) -> int:
        """|G|: N for C_N, 2N for D_N."""
        return self.n * (2 if self.flip else 1)

    @property
    def identity(self) -> Element:
        return (0, 0)

    def elements(self) -> tuple[Element, ...]:
        """All elements, rotations first (index of ``(f, k)`` is ``f * N + k``)."""
        return tuple((f, k) for f in range(2 if self.flip else 1) for k in range(self.n))

    def generators(self) -> tuple[Element, ...]:
        """The rotation r by 2*pi/N and, for D_N, the mirror m."""
        return ((0, 1), (1, 0)) if self.flip else ((0, 1),)

    def check(self, g: Element) -> Element:
        f, k = g
        if f not in (0, 1) or (f == 1 and not self.flip):
            raise ValueError(f"{self.name} has no element {g!r} (mirrors need a D_N group).")
        return (int(f), int(k) % self.n)

    def multiply(self, a: Element, b: Element) -> Element:
        """``a * b``, using ``m r^k = r^-k m``."""
        fa, ka = self.check(a)
        fb, kb = self.check(b)
        return ((fa + fb) % 2, (ka + (-kb if fa else kb)) % self.n)

    def inverse(self, a: Element) -> Element:
        f, k = self.check(a)
        return (1, k) if f else (0, (-k) % self.n)

    def power(self, a: Element, p: int) -> Element:
        out = self.identity
        for _ in range(p % self.order if p >= 0 else 0):
            out = self.multiply(out, a)
        return out

    def quarter_turn(self) -> Element:
        """The rotation by +90 degrees (exact on the pixel grid); needs 4 | N."""
        if self.n % 4:
            raise ValueError(f"{self.name} has no quarter turn: N={self.n} is not divisible by 4.")
        return (0, self.n // 4)

    def mirror(self) -> Element:
        if not self.flip:
            raise ValueError(f"{self.name} has no mirror; use a D_N group (flip=True).")
        return (1, 0)

    def grid_elements(self) -> tuple[Element, ...]:
        """The elements that map the square pixel grid onto itself (exact tests use these)."""
        out = []
        for f, k in self.elements():
            if (4 * k) % self.n == 0:
                out.append((f, k))
        return tuple(out)

    def matrix(self, g: Element) -> np.ndarray:
        """The 2x2 matrix of ``g`` acting on the plane (x right, y up), float64."""
        f, k = self.check(g)
        t = 2.0 * np.pi * k / self.n
        c, s = math.cos(t), math.sin(t)
        # Snap the grid-exact angles so that quarter turns are exact permutations.
        c, s = (
            (round(c) if abs(c - round(c)) < 1e-12 else c),
            (round(s) if abs(s - round(s)) < 1e-12 else s),
        )
        rot = np.array([[c, -s], [s, c]], dtype=np.float64)
        return rot @ np.diag([-1.0, 1.0]) if f else rot

    def quarter_turns_of(self, g: Element) -> tuple[int, bool]:
        """For a grid element ``g``, the number of quarter turns and whether it mirrors."""
        f, k = self.check(g)
        if (4 * k) % self.n:
            raise ValueError(f"{g!r} is not a multiple of 90 degrees in {self.name}.")
        return (4 * k) // self.n, bool(f)


# ----------------------------------------------------------------------------------------
# Permutation representations.

_REP_RE = re.compile(r"^(trivial|regular|quo_(\d+))$")


@dataclasses.dataclass(frozen=True)
class PermRep:
    """A permutation representation on cosets G/H (read-only tables).

    Attributes:
      name: 'trivial', 'regular' or 'quo_M'.
      dim: number of cosets.
      perms: int array [|G|, dim]; ``rho(g) e_i = e_{perms[index(g), i]}``.
      coset_reps: the elements c_i with ``c_i . e_0 = e_i``.
      stabiliser_gens: generators of H, the stabiliser of e_0.
    """

    name: str
    dim: int
    perms: np.ndarray = dataclasses.field(repr=False, compare=False)
    coset_reps: tuple[Element, ...] = dataclasses.field(repr=False, compare=False)
    stabiliser_gens: tuple[Element, ...] = dataclasses.field(repr=False, compare=False)


def element_index(group: Group, g: Element) -> int:
    f, k = group.check(g)
    return f * group.n + k


def _regular_index(group: Group, g: Element) -> int:
    # Component (0, j) <-> r^j, component (1, j) <-> r^-j m: r shifts the first block forward,
    # the second backward, and m swaps the blocks.
    f, k = group.check(g)
    return k if f == 0 else group.n + (-k) % group.n


@functools.lru_cache(maxsize=None)
def representation(group: Group, name: str) -> PermRep:
    """The permutation representation ``name`` of ``group``.

    Raises:
      ValueError: for an unknown name, M not dividing N, or a quotient of D_N.
    """
    m = _REP_RE.match(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(
            f"Unknown representation {name!r}: expected 'trivial', 'regular' or 'quo_M' "
            "(quotient C_N/C_M, M dividing N)."
        )
    elems = group.elements()
    if name == "trivial":
        perms = np.zeros((group.order, 1), dtype=np.int64)
        return PermRep("trivial", 1, read_only(perms), ((0, 0),), group.generators())
    if name == "regular":
        dim = group.order
        reps = [None] * dim
        for g in elems:
            reps[_regular_index(group, g)] = g
        perms = np.array(
            [[_regular_index(group, group.multiply(g, h)) for h in reps] for g in elems],
            dtype=np.int64,
        )
        return PermRep("regular", dim, read_only(perms), tuple(reps), ())
    mm = int(m.group(2))
    if group.flip:
        raise ValueError(
            f"Representation {name!r} is only defined for C_N groups; {group.name} has a mirror "
            "(the dihedral quotient is not implemented). Use 'regular' or 'trivial'."
        )
    if mm < 1 or group.n % mm:
        raise ValueError(
            f"Representation {name!r}: M={mm} must divide N={group.n} (allowed: "
            f"{', '.join(f'quo_{d}' for d in range(1, group.n + 1) if group.n % d == 0)})."
        )
    dim = group.n // mm
    perms = np.array([[(i + k) % dim for i in range(dim)] for (_, k) in elems], dtype=np.int64)
    gens = ((0, dim % group.n),) if mm > 1 else ()
    return PermRep(name, dim, read_only(perms), tuple((0, i) for i in range(dim)), gens)


def rep_matrix(group: Group, name: str, g: Element) -> np.ndarray:
    """The matrix ``rho(g)`` of representation ``name`` (float64 [dim, dim])."""
    rep = representation(group, name)
    p = rep.perms[element_index(group, g)]
    mat = np.zeros((rep.dim, rep.dim))
    mat[p, np.arange(rep.dim)] = 1.0
    return mat


# ----------------------------------------------------------------------------------------
# Derivatives.


def num_derivatives(max_order: int) -> int:
    """Number of partial derivatives of orders 0..max_order in 2D: (K+1)(K+2)/2."""
    return (max_order + 1) * (max_order + 2) // 2


def derivative_terms(max_order: int) -> tuple[tuple[int, int], ...]:
    """The (x-order, y-order) of each partial derivative, orders 0..K, each order x-first."""
    return tuple((k - a, a) for k in range(max_order + 1) for a in range(k + 1))


def _derivative_matrix(mat: np.ndarray, k: int) -> np.ndarray:
    # d'_x = G11 d_x + G12 d_y, d'_y = G21 d_x + G22 d_y for f'(p) = f(G^-1 p), G orthogonal.
    # Row a = d'_x^(k-a) d'_y^a expanded in d_x^(k-b) d_y^b; track the d_y power with t.
    P = np.polynomial.polynomial
    out = np.zeros((k + 1, k + 1))
    for a in range(k + 1):
        poly = P.polymul(
            P.polypow([mat[0, 0], mat[0, 1]], k - a), P.polypow([mat[1, 0], mat[1, 1]], a)
        )
        out[a, : len(poly)] = poly[: k + 1]
    return out


def derivative_rep(group: Group, k: int, g: Element) -> np.ndarray:
    """D_k(g): the action of ``g`` on the partial derivatives of order ``k`` ([k+1, k+1])."""
    if k < 0:
        raise ValueError(f"derivative order must be >= 0, got {k}.")
    return _derivative_matrix(group.matrix(g), k)


def derivative_rep_all(group: Group, max_order: int, g: Element) -> np.ndarray:
    """D_0 + ... + D_K (block diagonal) acting on all derivatives of order <= K."""
    blocks = [derivative_rep(group, k, g) for k in range(max_order + 1)]
    n = sum(b.shape[0] for b in blocks)
    out = np.zeros((n, n))
    i = 0
    for b in blocks:
        out[i : i + len(b), i : i + len(b)] = b
        i += len(b)
    return out


def character(group: Group, matrices) -> np.ndarray:
    """Character [|G|] of a representation given as a callable element -> matrix."""
    return np.array([np.trace(matrices(g)) for g in group.elements()])


def intertwiner_dimension(group: Group, chi_in: np.ndarray, chi_out: np.ndarray) -> int:
    """dim Hom_G(rho_in, rho_out) = 1/|G| sum_g chi_in(g) chi_out(g) (real characters)."""
    return int(round(float(np.dot(chi_in, chi_out)) / group.order))


def read_only(a: np.ndarray) -> np.ndarray:
    """``a`` as a contiguous array that cannot be written (the bases' constants)."""
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a
