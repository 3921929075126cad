"""Stencils: values, polynomial exactness, analytic derivatives, transformation law."""

import math

import numpy as np
import pytest

from neural_epdo_jax.core import groups, stencils

TERMS = groups.derivative_terms(4)


def _apply(s, f):  # cross-correlation at the centre: sum_q S(q) f(q)
    return float(np.sum(s * f))


def test_fd_reference_values():
    s = stencils.stencils("fd", 4, 5)
    idx = {t: i for i, t in enumerate(TERMS)}
    np.testing.assert_array_equal(s[idx[(1, 0)]][2], [0, -0.5, 0, 0.5, 0])
    np.testing.assert_array_equal(s[idx[(2, 0)]][2], [0, 1, -2, 1, 0])
    np.testing.assert_array_equal(s[idx[(3, 0)]][2], [-0.5, 1, 0, -1, 0.5])
    np.testing.assert_array_equal(s[idx[(4, 0)]][2], [1, -4, 6, -4, 1])
    dxy = s[idx[(1, 1)]]
    # +1/4 where x*y > 0 (row 1 is y = +1, column 3 is x = +1), -1/4 where x*y < 0.
    assert (dxy[1, 3], dxy[3, 1], dxy[1, 1], dxy[3, 3]) == (0.25, 0.25, -0.25, -0.25)
    np.testing.assert_array_equal(s[idx[(0, 1)]][:, 2], [0, 0.5, 0, -0.5, 0])


@pytest.mark.parametrize("name, extra", [("fd", 1), ("rbf-fd", 0)])
@pytest.mark.parametrize("size", [5, 7])
def test_exact_on_polynomials(name, extra, size):
    """fd is second-order accurate (exact to degree k+1); rbf-fd exact to degree k."""
    s = stencils.stencils(name, 4, size)
    x, y = stencils.offsets(size)
    for t, (a, b) in enumerate(groups.derivative_terms(4)):
        k = a + b
        for d in range(k + extra + 1):
            for j in range(d + 1):
                i = d - j
                exact = math.factorial(a) * math.factorial(b) if (i, j) == (a, b) else 0.0
                assert abs(_apply(s[t], x**i * y**j) - exact) < 1e-9, (name, (a, b), (i, j))
    # ...and not beyond (a claim that cannot fail is no claim): fd's d/dx on x^3 is off.
    if name == "fd":
        assert abs(_apply(s[1], x**3)) > 0.5


def test_gauss_equals_analytic_derivative():
    eps = 0.99
    s = stencils.stencils("gauss", 4, 5)
    x, y = stencils.offsets(5)

    def dpoly(n):  # d^n/dt^n exp(-e^2 t^2) = p_n(t) exp(-e^2 t^2), p_{n+1} = p_n' - 2 e^2 t p_n
        p = np.polynomial.Polynomial([1.0])
        for _ in range(n):
            p = p.deriv() - 2 * eps**2 * np.polynomial.Polynomial([0, 1]) * p
        return p

    g = lambda t: np.exp(-(eps**2) * t**2)
    for idx, (a, b) in enumerate(TERMS):
        want = (-1) ** (a + b) * dpoly(a)(x) * g(x) * dpoly(b)(y) * g(y)
        np.testing.assert_allclose(s[idx], want, atol=1e-12)


def _transform_law_error(s, group, terms_order=None):
    size = s.shape[-1]
    c = size // 2
    worst = 0.0
    for g in group.grid_elements():
        mat = np.rint(group.matrix(g)).astype(int)
        d = groups.derivative_rep_all(group, 4, g)
        sg = np.empty_like(s)  # S(g q)
        for r in range(size):
            for col in range(size):
                gx, gy = mat @ np.array([col - c, c - r])
                sg[:, r, col] = s[:, c - gy, gx + c]
        worst = max(worst, float(np.abs(sg - np.einsum("ab,bhw->ahw", d, s)).max()))
    return worst


@pytest.mark.parametrize("name", ["fd", "gauss", "rbf-fd"])
def test_quarter_turn_and_mirror_law(name):
    """S_alpha(g q) = sum_beta D(g)[alpha, beta] S_beta(q) for every grid element."""
    s = stencils.stencils(name, 4, 5)
    group = groups.Group(4, True)
    assert _transform_law_error(s, group) < 1e-10
    # Negative control: the reference's reversed order within each order fails the law.
    rev = np.concatenate([s[k * (k + 1) // 2 : (k + 1) * (k + 2) // 2][::-1] for k in range(5)])
    assert _transform_law_error(rev, group) > 1e-2


def test_arrays_are_read_only_and_cached():
    a = stencils.stencils("gauss", 4, 5)
    assert a is stencils.stencils("gauss", 4, 5)
    with pytest.raises(ValueError):
        a[0, 0, 0] = 1.0


def test_register_custom_discretisation():
    stencils.register_discretisation(
        "test-fd-twice", lambda k, n: 2 * stencils.fd(k, n), overwrite=True
    )
    np.testing.assert_array_equal(stencils.stencils("test-fd-twice", 2, 3), 2 * stencils.fd(2, 3))
    stencils.register_discretisation(
        "test-bad-shape", lambda k, n: np.zeros((3, n, n)), overwrite=True
    )
    with pytest.raises(ValueError, match="expected \\(15, 5, 5\\)"):
        stencils.stencils("test-bad-shape", 4, 5)
    stencils.register_discretisation(
        "test-nan", lambda k, n: np.full((groups.num_derivatives(k), n, n), np.nan), overwrite=True
    )
    with pytest.raises(ValueError, match="non-finite"):
        stencils.stencils("test-nan", 4, 5)
    with pytest.raises(ValueError, match="already registered"):
        stencils.register_discretisation("fd", stencils.fd)


@pytest.mark.parametrize(
    "args, match",
    [
        (("fd", 4, 4), "odd integer >= 3"),
        (("fd", 4, 1), "odd integer >= 3"),
        (("fd", 5, 5), "orders <= 4"),
        (("fd", 3, 3), "need size >= 5"),
        (("rbf-fd", 4, 3), "needs at least 10 stencil points, size=3 has 9"),
        (("spectral", 4, 5), "unknown discretisation 'spectral'; known: .*fd"),
        (("gauss", -1, 5), "max_order must be"),
    ],
)
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        stencils.stencils(*args)
