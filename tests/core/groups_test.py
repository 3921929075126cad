"""Groups, representations, derivative actions and field types."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from neural_epdo_jax.core import fields, groups

GROUPS = [groups.Group(n, f) for n in (1, 2, 3, 4, 6, 8, 16) for f in (False, True)]


@pytest.mark.parametrize("group", GROUPS, ids=repr)
def test_group_axioms_and_planar_homomorphism(group):
    els = group.elements()
    assert len(els) == group.order == len(set(els))
    for a, b in itertools.product(els, els):
        ab = group.multiply(a, b)
        assert ab in els
        np.testing.assert_allclose(group.matrix(ab), group.matrix(a) @ group.matrix(b), atol=1e-12)
    for a in els:
        assert group.multiply(a, group.inverse(a)) == group.identity


@pytest.mark.parametrize("group", GROUPS, ids=repr)
def test_representations_are_homomorphisms(group):
    names = ["trivial", "regular"]
    if not group.flip:
        names += [f"quo_{m}" for m in range(1, group.n + 1) if group.n % m == 0]
    els = group.elements()
    for name in names:
        rep = groups.representation(group, name)
        for a, b in itertools.product(els, els):
            np.testing.assert_array_equal(
                groups.rep_matrix(group, name, group.multiply(a, b)),
                groups.rep_matrix(group, name, a) @ groups.rep_matrix(group, name, b),
            )
        assert groups.rep_matrix(group, name, els[0]).shape == (rep.dim, rep.dim)


def test_regular_dihedral_matches_definition():
    g = groups.Group(4, True)
    r = groups.rep_matrix(g, "regular", (0, 1))
    m = groups.rep_matrix(g, "regular", (1, 0))
    e = np.eye(8)
    np.testing.assert_array_equal(r @ e[0], e[1])  # first block: forward shift
    np.testing.assert_array_equal(r @ e[4 + 1], e[4 + 0])  # second block: backward shift
    np.testing.assert_array_equal(m @ e[2], e[4 + 2])  # mirror swaps the blocks
    q = groups.rep_matrix(groups.Group(16), "quo_4", (0, 1))
    np.testing.assert_array_equal(q @ np.eye(4)[3], np.eye(4)[0])  # cyclic shift on N/M = 4


@pytest.mark.parametrize("group", [groups.Group(16), groups.Group(6, True)], ids=repr)
@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 6])
def test_derivative_rep_on_plane_waves(group, k):
    # f(p) = exp(a.p): d^beta f = a^beta f and (g.f)(p) = exp((g a).p), so the law
    # d^alpha (g.f)(p) = sum_beta D_k(g)[alpha, beta] (d^beta f)(g^-1 p) reads
    # (g a)^alpha = sum_beta D_k(g)[alpha, beta] a^beta.
    rng = np.random.default_rng(k)
    for g in group.elements():
        a = rng.normal(size=2)
        ga = group.matrix(g) @ a
        mono = lambda v: np.array([v[0] ** (k - j) * v[1] ** j for j in range(k + 1)])
        np.testing.assert_allclose(
            mono(ga), groups.derivative_rep(group, k, g) @ mono(a), atol=1e-10
        )
    # Negative control: the reference's reversed derivative order breaks the law for k >= 1.
    if k >= 1:
        g = group.generators()[0]
        a = rng.normal(size=2)
        ga = group.matrix(g) @ a
        mono = lambda v: np.array([v[0] ** (k - j) * v[1] ** j for j in range(k + 1)])
        assert not np.allclose(mono(ga)[::-1], groups.derivative_rep(group, k, g) @ mono(a)[::-1])


def test_orientation_convention_pinned_once():
    """A pixel at offset (x=1, y=0) (right of centre) moves to (x=0, y=1) (above centre)
    under the quarter turn; the mirror sends x -> -x."""
    img = np.zeros((5, 5, 1))
    img[2, 3] = 1.0
    c4 = groups.Group(4, True)
    ft = fields.FieldType(c4, "trivial")
    rot = np.asarray(ft.transform(jnp.asarray(img), c4.quarter_turn()))
    assert rot[1, 2, 0] == 1.0 and rot.sum() == 1.0
    mir = np.asarray(ft.transform(jnp.asarray(img), c4.mirror()))
    assert mir[2, 1, 0] == 1.0 and mir.sum() == 1.0


def test_characters_give_dimensions():
    g = groups.Group(8, True)
    chi = groups.character(g, lambda e: groups.rep_matrix(g, "regular", e))
    assert groups.intertwiner_dimension(g, chi, chi) == g.order
    triv = groups.character(g, lambda e: groups.rep_matrix(g, "trivial", e))
    assert groups.intertwiner_dimension(g, triv, chi) == 1


def test_field_type_layout_and_action():
    c16 = groups.Group(16)
    ft = fields.FieldType(c16, "regular+quo_4", 3)
    assert (ft.field_size, ft.size, ft.reps) == (20, 60, ("regular", "quo_4"))
    assert hash(ft) == hash(fields.FieldType(c16, (("regular", 1), ("quo_4", 1)), 3))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 60)))
    # Four quarter turns are the identity; the channel action is the representation.
    y = x
    for _ in range(4):
        y = ft.rotate(y)
    np.testing.assert_allclose(y, x)
    g = (0, 3)
    np.testing.assert_allclose(ft.act_on_channels(x, g), np.asarray(x) @ ft.matrix(g).T, atol=1e-6)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: groups.Group(0), "n must be an integer >= 1"),
        (lambda: groups.Group(2.5), "n must be an integer"),
        (lambda: groups.representation(groups.Group(8), "bogus"), "Unknown representation 'bogus'"),
        (lambda: groups.representation(groups.Group(16), "quo_3"), "M=3 must divide N=16"),
        (lambda: groups.representation(groups.Group(8, True), "quo_2"), "only defined for C_N"),
        (lambda: groups.Group(6).quarter_turn(), "not divisible by 4"),
        (lambda: groups.Group(8).mirror(), "no mirror"),
        (lambda: fields.FieldType(groups.Group(8), ()), "empty"),
        (lambda: fields.FieldType(groups.Group(8), ""), "empty"),
        (lambda: fields.FieldType(groups.Group(8), "regular", 0), "num_fields"),
        (
            lambda: fields.FieldType(groups.Group(8), "regular", 2).act_on_channels(
                jnp.ones((3, 5)), (0, 1)
            ),
            "16 channels",
        ),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
