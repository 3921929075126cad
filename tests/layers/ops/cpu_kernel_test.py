"""The fused CPU kernels of `neural_epdo_jax.layers.ops.cpu_kernel` against the XLA formulation.

The whole network with the kernels (the default on CPU) is compared with the straightforward
formulation in perf_equivalence_test.py, and its equivariance is tested in models_test.py."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neural_epdo_jax import layers
from neural_epdo_jax.layers.ops import cpu_kernel, normalised_apply

KEY = jax.random.PRNGKey(0)

pytestmark = pytest.mark.skipif(
    not cpu_kernel.available(warn=False) or jax.default_backend() != "cpu",
    reason=f"CPU kernels unavailable: {cpu_kernel._load()}",
)


def _operands(shape, k, seed=0, groups=1):
    """x [d, Q, g, ..., H, W], raw taps w [S, d, k*k, g / S, ..., H, W] (S = groups) and an
    output cotangent."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(keys[0], shape)
    w_shape = (groups, shape[0], k * k, shape[2] // groups) + shape[3:]
    w = jax.random.normal(keys[1], w_shape)
    return x, w, jax.random.normal(keys[2], shape)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


# Q = 1, 2, 5 (the kernels take 4 planes at a time), widths below and above a vector (8
# floats; a partial vector is loaded and stored whole where it fits in its plane), planes
# narrower than half a vector (2 x 2, 3 x 3: the pooled sizes of small inputs), one row,
# several middle axes, every kernel size the kernels support, and grouped taps (S = 2: one
# and two operators per group).
SHAPES = [
    ((3, 1, 2, 2, 6, 7), 3, 2),
    ((4, 5, 1, 2, 3, 9, 14), 5, 1),
    ((2, 2, 3, 1, 10, 17), 7, 1),
    ((2, 3, 4, 1, 6, 9), 5, 2),
    ((2, 2, 2, 3, 1, 11), 3, 1),
    ((2, 2, 2, 3, 2, 2), 5, 1),
    ((3, 1, 2, 2, 3, 3), 3, 2),
]


@pytest.mark.parametrize("shape, k, groups", SHAPES)
def test_kernels_match_xla_formulation(shape, k, groups):
    x, w, g = _operands(shape, k, groups=groups)
    out, scale = jax.jit(cpu_kernel.normalised_apply_fwd, static_argnums=2)(x, w, k)
    want_out, want_scale = jax.jit(normalised_apply.normalised_apply_fwd_xla, static_argnums=2)(
        x, w, k
    )
    assert out.shape == x.shape and scale.shape == x.shape[2:]
    assert _rel(want_out, out) < 1e-5
    assert _rel(want_scale, scale) < 1e-6
    gx, gw = jax.jit(cpu_kernel.normalised_apply_bwd, static_argnums=5)(x, w, scale, out, g, k)
    want_gx, want_gw = jax.jit(normalised_apply.normalised_apply_bwd_xla, static_argnums=0)(
        k, x, w, want_scale, g
    )
    assert gw.shape == w.shape
    assert _rel(want_gx, gx) < 1e-5
    assert _rel(want_gw, gw) < 1e-5
    # Negative controls: the same comparison catches taps applied mirrored (w[t] at -off_t),
    # and, with two operators per group, the operators of a group read in the wrong order.
    bad, _ = cpu_kernel.normalised_apply_fwd(x, w[:, :, ::-1], k)
    assert _rel(want_out, bad) > 1e-2
    if w.shape[3] > 1 and groups > 1:
        swapped = jnp.moveaxis(w, 0, 3).reshape((1,) + w.shape[1:3] + (-1,) + w.shape[4:])
        bad, _ = cpu_kernel.normalised_apply_fwd(x, swapped, k)
        assert _rel(want_out, bad) > 1e-2


@pytest.mark.parametrize("sizes, groups", [((3, 2), 2), ((1, 2, 2), 1)])
def test_taps_in_parts_match_the_whole(sizes, groups):
    """Taps given as parts of the component axis (the generator's output for mixed field
    types; read in place, never concatenated): the kernels and `layers.normalised_apply`, on
    both paths, give the outputs and gradients of the whole array, the gradient in parts."""
    k = 5
    x, w, g = _operands((sum(sizes), 2, 2, 1, 6, 9), k, seed=4, groups=groups)
    parts = tuple(jnp.split(w, np.cumsum(sizes)[:-1].tolist(), axis=1))
    out, scale = cpu_kernel.normalised_apply_fwd(x, parts, k)
    want_out, want_scale = cpu_kernel.normalised_apply_fwd(x, w, k)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(scale, want_scale)
    gx, gw = cpu_kernel.normalised_apply_bwd(x, parts, scale, out, g, k)
    want_gx, want_gw = cpu_kernel.normalised_apply_bwd(x, w, scale, out, g, k)
    assert isinstance(gw, tuple) and [p.shape for p in gw] == [p.shape for p in parts]
    np.testing.assert_array_equal(gx, want_gx)
    np.testing.assert_array_equal(jnp.concatenate(gw, axis=1), want_gw)

    def loss(x, w):
        return jnp.sum(layers.normalised_apply(x, w, k) * g)

    want = jax.grad(loss, (0, 1))(x, w)
    for use_kernel in (True, False):
        with contextlib.ExitStack() as stack:
            if not use_kernel:
                stack.enter_context(cpu_kernel.disabled())
            got_x, got_w = jax.jit(jax.grad(loss, (0, 1)))(x, parts)
        assert isinstance(got_w, tuple) and len(got_w) == len(sizes)
        assert _rel(want[0], got_x) < 1e-5
        assert _rel(want[1], jnp.concatenate(got_w, axis=1)) < 1e-5
    # Negative control: the parts in the wrong order.
    bad, _ = cpu_kernel.normalised_apply_fwd(x, parts[::-1], k)
    assert _rel(want_out, bad) > 1e-2
    with pytest.raises(ValueError, match="d_0 \\+ d_1"):
        layers.normalised_apply(x, parts[1:], k)
    with pytest.raises(ValueError, match="empty"):
        layers.normalised_apply(x, (), k)


def test_normalised_apply_rejects_mismatched_taps():
    x, w, _ = _operands((2, 1, 2, 1, 5, 5), 3)
    with pytest.raises(ValueError, match=r"\[S, d, 9, g / S, \.\.\., H, W\]"):
        layers.normalised_apply(x, w[0], 3)  # the old layout, without the group axis


def test_normalised_apply_takes_the_kernel():
    """`layers.normalised_apply` calls the kernels on CPU (float32) in both passes, and
    `cpu_kernel.disabled()` removes them. (Its gradient against autodiff of the straightforward
    formula, on both paths: perf_equivalence_test.test_normalised_apply_gradient_matches_autodiff.)"""
    k = 3
    x, w, g = _operands((3, 2, 2, 2, 6, 7), k, seed=3)
    fn = functools.partial(layers.normalised_apply, kernel_size=k)
    hlo = jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w) * g), (0, 1))).lower(x, w).as_text()
    assert cpu_kernel._FWD in hlo and cpu_kernel._BWD in hlo
    with cpu_kernel.disabled():
        hlo = jax.jit(lambda x, w: fn(x, w)).lower(x, w).as_text()
    assert cpu_kernel._FWD not in hlo  # the switch works, so the XLA tests test the XLA path
    # vmap (a batch of independent calls) goes through the kernels one call at a time.
    xs, ws = jnp.stack([x, 2 * x]), jnp.stack([w, -w])
    np.testing.assert_allclose(
        jax.vmap(fn)(xs, ws), jnp.stack([fn(x, w), fn(2 * x, -w)]), rtol=1e-6, atol=1e-7
    )


def test_other_dtypes_and_sizes_use_the_xla_formulation():
    x, w, _ = _operands((2, 1, 2, 1, 5, 5), 3)
    assert cpu_kernel.use_for(x, w, 3)
    assert not cpu_kernel.use_for(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), 3)
    assert not cpu_kernel.use_for(x, jnp.zeros(w.shape[:2] + (81,) + w.shape[3:]), 9)
    fn = jax.jit(functools.partial(layers.normalised_apply, kernel_size=3))
    y = fn(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y)))


def test_unavailable_compiler_falls_back_with_a_warning(monkeypatch, tmp_path):
    """No compiler: a warning names the reason, and the layer still runs (XLA formulation)."""
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
    cpu_kernel._load.cache_clear()
    cpu_kernel._warn_once.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
            assert not cpu_kernel.available()
        x, w, _ = _operands((2, 1, 2, 1, 5, 5), 3)
        assert not cpu_kernel.use_for(x, w, 3)
        hlo = jax.jit(lambda x, w: layers.normalised_apply(x, w, 3)).lower(x, w).as_text()
        assert cpu_kernel._FWD not in hlo
    finally:
        monkeypatch.undo()
        cpu_kernel._load.cache_clear()
        assert cpu_kernel.available()
