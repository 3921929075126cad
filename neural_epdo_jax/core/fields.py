"""Field types: frozen, hashable descriptions of a feature map's channels.

A feature map of ``FieldType(group, unit, num_fields)`` has ``num_fields`` fields, each of
the (possibly mixed) type ``unit`` -- an ordered direct sum of permutation representations,
e.g. ``(('regular', 1), ('quo_4', 1))`` (dimension 16 + 4 = 20 for C16). Channels are
field-major: channel ``f * field_size + c`` is component ``c`` of field ``f`` (NHWC layout).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from neural_epdo_jax.core import groups

Unit = tuple[tuple[str, int], ...]


def parse_unit(value) -> Unit:
    """``'regular+quo_4'`` or ``(('regular', 1), ('quo_4', 1))`` -> normalised unit tuple."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split("+")]
        if not value.strip() or any(not p for p in parts):
            raise ValueError(f"field type {value!r} is empty or malformed; e.g. 'regular+quo_4'.")
        out = []
        for p in parts:
            mult, _, name = p.rpartition("*")
            out.append((name.strip(), int(mult) if mult else 1))
        return tuple(out)
    try:
        unit = tuple((str(name), int(mult)) for name, mult in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"field type {value!r} is not a string like 'regular+quo_4' nor a tuple of "
            "(representation, multiplicity) pairs."
        ) from None
    if not unit:
        raise ValueError("field type is empty: give at least one (representation, multiplicity).")
    return unit


@dataclasses.dataclass(frozen=True)
class FieldType:
    """``num_fields`` fields of the direct-sum type ``unit`` of ``group``.

    Attributes:
      group: the symmetry group.
      unit: the type of one field, e.g. ``(('regular', 1),)``.
      num_fields: how many fields of that type the feature map has.
    """

    group: groups.Group
    unit: Unit = (("regular", 1),)
    num_fields: int = 1

    def __post_init__(self):
        object.__setattr__(self, "unit", parse_unit(self.unit))
        if not isinstance(self.num_fields, (int, np.integer)) or self.num_fields < 1:
            raise ValueError(
                f"FieldType: num_fields must be an integer >= 1, got {self.num_fields!r}."
            )
        for name, mult in self.unit:
            if mult < 1:
                raise ValueError(f"FieldType: multiplicity of {name!r} must be >= 1, got {mult}.")
            groups.representation(self.group, name)  # validates the name

    @property
    def reps(self) -> tuple[str, ...]:
        """The representation of each block of one field, multiplicities expanded."""
        return tuple(name for name, mult in self.unit for _ in range(mult))

    @property
    def rep_offsets(self) -> tuple[tuple[str, int], ...]:
        """(representation, first component) of each block of one field."""
        out, off = [], 0
        for name in self.reps:
            out.append((name, off))
            off += groups.representation(self.group, name).dim
        return tuple(out)

    @property
    def field_size(self) -> int:
        return sum(groups.representation(self.group, r).dim for r in self.reps)

    @property
    def size(self) -> int:
        """Number of channels."""
        return self.num_fields * self.field_size

    @property
    def unit_name(self) -> str:
        return "+".join(name if m == 1 else f"{m}*{name}" for name, m in self.unit)

    def __repr__(self) -> str:
        return f"FieldType({self.group.name}, {self.num_fields} x {self.unit_name})"

    def with_fields(self, num_fields: int) -> "FieldType":
        return dataclasses.replace(self, num_fields=num_fields)

    def unit_permutation(self, g: groups.Element) -> np.ndarray:
        """Permutation p of one field's components: ``rho(g) e_i = e_{p[i]}``."""
        return _unit_permutation(self.group, self.unit, g)

    def permutation(self, g: groups.Element) -> np.ndarray:
        """Permutation of all channels: ``rho(g) e_i = e_{p[i]}`` (int [size])."""
        p = self.unit_permutation(g)
        d = self.field_size
        return (np.arange(self.num_fields)[:, None] * d + p[None, :]).reshape(-1)

    def matrix(self, g: groups.Element) -> np.ndarray:
        """The representation matrix of ``g`` on all channels ([size, size])."""
        p = self.permutation(g)
        mat = np.zeros((self.size, self.size))
        mat[p, np.arange(self.size)] = 1.0
        return mat

    def act_on_channels(self, x: jax.Array, g: groups.Element) -> jax.Array:
        """``rho(g)`` applied to the channel axis (last) of ``x``."""
        if x.shape[-1] != self.size:
            raise ValueError(
                f"{self!r} has {self.size} channels but the array's last axis has {x.shape[-1]}."
            )
        inv = np.argsort(self.permutation(g))
        return jnp.take(x, jnp.asarray(inv), axis=-1)

    def transform(self, x: jax.Array, g: groups.Element) -> jax.Array:
        """Exact action of a grid element ``g`` on an NHWC (or HWC) array.

        ``(g.x)(p) = rho(g) x(g^-1 p)``; only multiples of 90 degrees (and the mirror) are
        exact on the pixel grid, other elements raise ValueError.
        """
        return self.act_on_channels(transform_space(x, self.group, g), g)

    def rotate(self, x: jax.Array, k: int = 1) -> jax.Array:
        """Rotate by ``k`` quarter turns (space and fibres)."""
        return self.transform(x, self.group.power(self.group.quarter_turn(), k % 4))


def transform_space(x: jax.Array, group: groups.Group, g: groups.Element) -> jax.Array:
    """``x(g^-1 p)`` on the H, W axes (the two axes before the last) for a grid element."""
    quarter, mirrored = group.quarter_turns_of(g)
    axes = (x.ndim - 3, x.ndim - 2)
    if mirrored:  # g = r^k m: first the mirror x -> -x (flip W), then the rotation.
        x = jnp.flip(x, axis=axes[1])
    # jnp.rot90 turns counter-clockwise as displayed (row 0 on top), i.e. +90 degrees with y up.
    return jnp.rot90(x, k=quarter, axes=axes)


@functools.lru_cache(maxsize=None)
def _unit_permutation(group: groups.Group, unit: Unit, g: groups.Element) -> np.ndarray:
    idx = groups.element_index(group, g)
    out, off = [], 0
    for name, mult in unit:
        rep = groups.representation(group, name)
        for _ in range(mult):
            out.append(rep.perms[idx] + off)
            off += rep.dim
    p = np.concatenate(out)
    p.setflags(write=False)
    return p
