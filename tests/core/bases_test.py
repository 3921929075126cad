"""Equivariant bases: dimensions from characters, reference shapes, exact equivariance."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neural_epdo_jax import testing
from neural_epdo_jax.core import bases, fields, groups, stencils

jax.config.update("jax_enable_x64", False)

C16, D16 = groups.Group(16), groups.Group(16, True)
R, T, Q = (("regular", 1),), (("trivial", 1),), (("regular", 1), ("quo_4", 1))


def _chi_unit(group, unit):
    ft = fields.FieldType(group, unit)
    return groups.character(group, ft.matrix)


def _chi_deriv(group, k):
    return groups.character(group, lambda g: groups.derivative_rep(group, k, g))


def _units(group):
    out = [T, R, (("trivial", 1), ("regular", 2))]
    if not group.flip and group.n % 2 == 0:
        out += [(("regular", 1), (f"quo_{group.n // 2}", 1)), ((f"quo_{2}", 1),)]
    return out


CASES = [groups.Group(n, f) for n in (1, 2, 4, 6, 8) for f in (False, True)]


@pytest.mark.parametrize("group", CASES, ids=repr)
def test_dimensions_match_character_formula(group):
    for u_in, u_out in itertools.product(_units(group), repeat=2):
        chi_i, chi_o = _chi_unit(group, u_in), _chi_unit(group, u_out)
        lin = bases.linear_basis(group, u_in, u_out)
        assert lin.shape[0] == groups.intertwiner_dimension(group, chi_i, chi_o)
        want = sum(
            groups.intertwiner_dimension(group, chi_i * _chi_deriv(group, k), chi_o)
            for k in range(5)
        )
        assert bases.pdo_basis(group, u_in, u_out, "fd").shape[0] == want
    for u in _units(group):
        chi = _chi_unit(group, u)
        coeff = sum(chi * _chi_deriv(group, k) for k in range(5))  # D^-T has the same character
        reg = groups.character(group, lambda g: groups.rep_matrix(group, "regular", g))
        assert bases.generator_basis(group, u, "gauss").shape[0] == groups.intertwiner_dimension(
            group, reg, coeff
        )


def test_reference_shapes():
    assert bases.pdo_basis(C16, T, R, "fd").shape == (15, 16, 1, 5, 5)
    assert bases.linear_basis(C16, R, R).shape == (16, 16, 16)
    assert bases.generator_basis(C16, R, "gauss").shape == (240, 400, 16)


@pytest.mark.parametrize("group", [C16, D16, groups.Group(4, True), groups.Group(8)], ids=repr)
def test_linear_basis_intertwines(group):
    for u_in, u_out in [(R, R), (T, R), (R, T)] + ([(Q, Q)] if group == C16 else []):
        b = bases.linear_basis(group, u_in, u_out)
        fi, fo = fields.FieldType(group, u_in), fields.FieldType(group, u_out)
        for g in group.elements():
            np.testing.assert_allclose(fo.matrix(g) @ b, b @ fi.matrix(g), atol=1e-12)
        flat = b.reshape(len(b), -1)
        np.testing.assert_allclose(flat @ flat.T, np.eye(len(b)), atol=1e-12)


def _conv(x, kern):  # x [B,H,W,din], kern [dout, din, S, S] -> cross-correlation, SAME
    k = jnp.asarray(np.transpose(kern, (2, 3, 1, 0)), jnp.float32)
    return jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize("disc", ["fd", "gauss", "rbf-fd"])
@pytest.mark.parametrize(
    "group, u_in, u_out",
    [
        (C16, T, R),
        (C16, R, R),
        (C16, Q, Q),
        (groups.Group(8, True), R, R),
        (groups.Group(4, True), T, R),
    ],
    ids=["C16 T->R", "C16 R->R", "C16 Q->Q", "D8 R->R", "D4 T->R"],
)
def test_pdo_basis_kernels_are_exactly_equivariant(group, u_in, u_out, disc):
    basis = bases.pdo_basis(group, u_in, u_out, disc)
    fi, fo = fields.FieldType(group, u_in), fields.FieldType(group, u_out)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 12, 12, fi.size))
    # All basis kernels at once, random combination per element to keep it fast.
    coeffs = np.random.default_rng(1).normal(size=len(basis))
    for kern in [basis[0], basis[-1], np.tensordot(coeffs, basis, 1)]:
        fn = lambda v, kern=kern: _conv(v, kern)
        errs = testing.assert_equivariant(fn, x, fi, fo, rtol=1e-5)
        assert max(errs.values()) < 1e-5
    # Negative control: rotating space without the fibres must fail.
    bad = testing.equivariance_errors(fn, x, fi, fo, fibres=False)
    assert max(bad.values()) > 1e-2


def test_pdo_negative_control_broken_stencils():
    """Bases built on the reference's reversed gauss order are not equivariant under our
    representation: the exact check catches it."""
    s = stencils.stencils("gauss", 4, 5)
    rev = np.concatenate([s[k * (k + 1) // 2 : (k + 1) * (k + 2) // 2][::-1] for k in range(5)])
    stencils.register_discretisation("test-reversed-gauss", lambda k, n: rev, overwrite=True)
    basis = bases.pdo_basis(C16, T, R, "test-reversed-gauss")
    fi, fo = fields.FieldType(C16, T), fields.FieldType(C16, R)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 12, 12, 1))
    kern = np.tensordot(np.random.default_rng(0).normal(size=len(basis)), basis, 1)
    errs = testing.equivariance_errors(lambda v: _conv(v, kern), x, fi, fo)
    assert max(errs.values()) > 1e-2


@pytest.mark.parametrize("group, unit", [(C16, R), (C16, Q), (groups.Group(8, True), R)], ids=repr)
@pytest.mark.parametrize("disc", ["fd", "gauss"])
def test_generator_basis_equivariance(group, unit, disc):
    """X rho_reg(g) = (rho_unit(g) (x) Pi(g)) X, where Pi(g) moves taps: W'(q) = W(g^-1 q)."""
    b = bases.generator_basis(group, unit, disc)
    ft = fields.FieldType(group, unit)
    size = 5
    flat = b.reshape(len(b), -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(len(b)), atol=1e-10)
    for g in group.grid_elements():
        reg = groups.rep_matrix(group, "regular", g)
        taps = np.arange(size * size).reshape(1, size, size, 1)
        moved = np.asarray(fields.transform_space(jnp.asarray(taps), group, g)).reshape(-1)
        pi = np.zeros((size * size, size * size))
        pi[np.arange(size * size), moved] = 1.0  # new tap p reads old tap moved[p]
        full = np.kron(ft.matrix(g), pi)
        np.testing.assert_allclose(b @ reg, full @ b, atol=1e-10)
        if g != group.identity and g[1] != 0:  # negative control: taps not moved
            assert not np.allclose(b @ reg, np.kron(ft.matrix(g), np.eye(25)) @ b)


def test_bases_read_only_deterministic():
    a = bases.pdo_basis(C16, T, R, "gauss")
    assert not a.flags.writeable
    bases.pdo_basis.cache_clear()
    bases._pdo_pair.cache_clear()
    np.testing.assert_array_equal(a, bases.pdo_basis(C16, T, R, "gauss"))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: bases.pdo_basis(C16, (), R), "empty"),
        (lambda: bases.pdo_basis(C16, T, R, "nope"), "unknown discretisation"),
        (lambda: bases.pdo_basis(C16, T, R, "fd", 4, 4), "odd integer"),
        (lambda: bases.pdo_basis(C16, T, R, "fd", 5, 5), "orders <= 4"),
        (lambda: bases.linear_basis(C16, (("irrep", 1),), R), "Unknown representation"),
        (lambda: bases.generator_basis(D16, Q, "fd"), "only defined for C_N"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
