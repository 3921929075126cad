"""The fast path ('fourier') against the straightforward one ('dense'): same parameters, same
outputs and gradients at float32 round-off, exact equivariance, one trace per train step."""

import contextlib
import functools
import zlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from neural_epdo_jax import layers, models, testing
from neural_epdo_jax.core import bases, fields, fourier, groups
from neural_epdo_jax.layers.ops import blocks, cpu_kernel
from neural_epdo_jax.train.steps import step_compiler_options

KEY = jax.random.PRNGKey(0)

# Small versions of the four paper variants (same structure: groups, field types, g, s,
# reduction, discretisation; order 2 on 3x3 stencils to keep compilation short). The last
# one runs the whole batch at once (chunk=0, the accelerator default), the others in chunks.
SMALL = {
    "R-fd": (dict(n=4, channels=(4, 4, 8, 8, 8, 8), g=2, s=2), 2),
    "R-gauss": (dict(n=8, channels=(2, 2, 4, 4, 4, 4), g=2, s=2, discretisation="gauss"), 2),
    "Q-gauss": (
        dict(
            n=8,
            field_type="regular+quo_2",
            channels=(2, 2, 4, 4, 4, 4),
            g=2,
            s=1,
            reduction=2,
            discretisation="gauss",
        ),
        2,
    ),
    "D-gauss": (
        dict(n=4, flip=True, channels=(2, 2, 4, 4, 4, 4), g=2, s=1, discretisation="gauss"),
        0,
    ),
}


def _images(batch, size=8, seed=0):
    return jax.random.uniform(jax.random.PRNGKey(seed), (batch, size, size, 1))


def _rel(a, b, floor=0.0):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / (np.linalg.norm(a) + floor))


@pytest.mark.parametrize("name", list(SMALL))
def test_fourier_matches_dense_model(name):
    """Eval and train outputs and the gradients of a scalar loss agree."""
    kwargs, chunk = SMALL[name]
    kwargs = dict(kwargs, order=2, kernel_size=3)
    dense = models.NeuralEPDONet(**kwargs, impl="dense")
    fast = models.NeuralEPDONet(**kwargs, impl="fourier", chunk=chunk)
    x = _images(4)
    v_dense = models.init_variables(dense, KEY, x.shape[1:])
    init = lambda m: jax.eval_shape(functools.partial(m.init, train=False), KEY, x[:1])
    chex.assert_trees_all_equal_shapes_and_dtypes(init(dense), init(fast))  # same parameters

    # Generic parameters and running statistics (not the init's), so that eval mode and
    # every gradient are non-trivial.
    # Seeded by a stable hash of the leaf's path: Python's str hash changes per process, and
    # so did this test's inputs (the worst gradient error over 8 such draws for Q-gauss was
    # 1.3e-3, one draw of the earlier BatchNorm gave 2.7e-3: round-off amplified by
    # training-mode BatchNorm on 4 images).
    def perturb(path, leaf):
        name = jax.tree_util.keystr(path)
        seed = zlib.crc32(name.encode()) % 1000
        noise = jnp.abs(jax.random.normal(jax.random.fold_in(KEY, seed), leaf.shape))
        if "'mean'" in name:  # running means below the batch's: the ReLUs let features through
            return leaf - 0.3 * noise
        return leaf + (0.3 if "'var'" in name else 0.2) * noise

    variables = jax.tree_util.tree_map_with_path(perturb, v_dense)

    def outputs(model):
        def loss(params):
            logits = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                rngs={"dropout": jax.random.PRNGKey(1)},
                mutable=["batch_stats"],
            )[0]
            return jnp.mean(jax.nn.log_softmax(logits)[:, 0] + 0.1 * logits[:, 1]), logits

        (_, train_logits), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        return model.apply(variables, x, train=False), train_logits, grads

    eval_d, train_d, grads_d = jax.jit(lambda: outputs(dense))()
    # The fast path compiled as the training steps are (`train.steps.step_compiler_options`).
    opts = step_compiler_options()
    eval_f, train_f, grads_f = jax.jit(lambda: outputs(fast), compiler_options=opts)()
    assert float(jnp.std(eval_d, axis=0).mean()) > 1e-3  # the logits depend on the input
    assert _rel(eval_d, eval_f) < 1e-4
    assert _rel(train_d, train_f) < 1e-4
    total = np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads_d)))
    for (path, gd), gf in zip(
        jax.tree_util.tree_leaves_with_path(grads_d), jax.tree.leaves(grads_f)
    ):
        # Training-mode BatchNorm chains amplify round-off; a leaf whose gradient is ~0
        # (e.g. a bias right before a BatchNorm) is compared against the global norm.
        err = _rel(gd, gf, floor=1e-3 * total)
        assert err < 2e-3, (jax.tree_util.keystr(path), err)


@pytest.mark.parametrize(
    "group, unit, g, s, reduction, order, size",
    [
        (groups.Group(8), "regular", 2, 2, 1, 2, 3),
        (groups.Group(8), "regular+quo_2", 2, 1, 2, 2, 3),
        (groups.Group(4, True), "regular", 2, 1, 1, 4, 5),
    ],
    ids=["C8", "C8-quotient", "D4-order4"],
)
def test_fourier_matches_dense_layers(group, unit, g, s, reduction, order, size):
    """Single layers agree to ~1e-6 (no BatchNorm to amplify round-off), with and without
    chunking, and the 1x1 layers agree on their own (grouped, mixed field types)."""
    fi, fo = fields.FieldType(group, unit, 4), fields.FieldType(group, unit, 2)
    x = jax.random.normal(KEY, (2, 8, 8, fi.size))
    common = dict(discretisation="gauss", kernel_size=size)
    dense = layers.NeuralEPDO(fi, fo, order, reduction, g, s, impl="dense", **common)
    v = dense.init(KEY, x)
    loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))
    want_y = dense.apply(v, x)
    want_g = jax.grad(loss(dense), argnums=(0, 1))(v, x)
    for chunk in (1,):
        fast = layers.NeuralEPDO(
            fi, fo, order, reduction, g, s, impl="fourier", chunk=chunk, **common
        )
        chex.assert_trees_all_equal(v, fast.init(KEY, x))  # same names, shapes, initial values
        assert _rel(want_y, jax.jit(fast.apply)(v, x)) < 1e-5
        got_g = jax.jit(jax.grad(loss(fast), argnums=(0, 1)))(v, x)
        for a, b in zip(jax.tree.leaves(want_g), jax.tree.leaves(got_g)):
            assert _rel(a, b) < 1e-5
    hidden = fields.FieldType(group, "regular", 4)
    h = jax.random.normal(KEY, (3, 5, hidden.size))
    for make, inp in [
        (lambda impl: layers.EquivariantLinear(fi, fo.with_fields(2), groups=2, impl=impl), x),
        (
            lambda impl: layers.GeneratorLinear(
                hidden, fi.with_fields(1), 2, 2, "gauss", impl=impl
            ),
            h,
        ),
    ]:
        v = make("dense").init(KEY, inp)
        np.testing.assert_allclose(
            make("fourier").apply(v, inp), make("dense").apply(v, inp), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_fast_path_is_exactly_equivariant_with_chunks(jit):
    fi = fields.FieldType(groups.Group(8), "regular", 4)
    fo = fields.FieldType(groups.Group(8), "regular", 2)
    layer = layers.NeuralEPDO(fi, fo, 4, 1, 2, 2, "gauss", impl="fourier", chunk=1)
    x = jax.random.normal(KEY, (2, 8, 8, fi.size))
    v = layer.init(KEY, x)
    fn = lambda z: layer.apply(v, z)
    fn = jax.jit(fn) if jit else fn
    testing.assert_equivariant(fn, x, fi, fo, rtol=1e-4)
    bad = testing.equivariance_errors(fn, x, fi, fo, fibres=False)  # negative control
    assert max(bad.values()) > 1e-2


@pytest.mark.parametrize("use_kernels", [True, False])
def test_normalised_apply_gradient_matches_autodiff(use_kernels):
    """The hand-written backward pass of the fused normalise-and-apply op (the CPU kernels of
    `kernels` where available, and the XLA formulation)."""
    x = jax.random.normal(KEY, (3, 2, 4, 2, 6, 7))
    w = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 9, 2, 2, 6, 7))  # 2 groups of 2
    g = jax.random.normal(jax.random.PRNGKey(2), x.shape)

    def reference(x, w):  # the straightforward formula, differentiated by JAX
        w = jnp.moveaxis(w, 0, 2).reshape(3, 9, 4, 2, 6, 7)  # operator j * 2 + l
        wn = w / 5.0 / (jnp.sum(jnp.abs(w / 5.0), axis=(0, 1)) + 0.01)
        xp = jnp.pad(x, ((0, 0),) * 4 + ((1, 1), (1, 1)))
        return sum(
            wn[:, t][:, None] * xp[..., t // 3 : t // 3 + 6, t % 3 : t % 3 + 7] for t in range(9)
        )

    want, vjp_want = jax.vjp(reference, x, w)
    with contextlib.nullcontext() if use_kernels else cpu_kernel.disabled():
        got, vjp_got = jax.vjp(lambda x, w: layers.normalised_apply(x, w, 3), x, w)
        grads = vjp_got(g)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, vjp_want(g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "a_shape, b_shape", [((3, 4), (4, 6)), ((3, 4), (5, 4, 6)), ((3, 3, 4), (2, 3, 4, 6))]
)
def test_block_matmul_and_gradients_match_matmul(a_shape, b_shape):
    """`blocks.block_matmul` (a broadcast over b's leading axes) and its backward pass, which
    multiplies by the stored transpose, against jnp.matmul differentiated by JAX."""
    ka, kb, kg = jax.random.split(KEY, 3)
    a, b = jax.random.normal(ka, a_shape), jax.random.normal(kb, b_shape)
    want, vjp_want = jax.vjp(jnp.matmul, a, b)
    got, vjp_got = jax.vjp(blocks.block_matmul, a, b)
    g = jax.random.normal(kg, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for x, y in zip(vjp_got(g), vjp_want(g)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    c = np.asarray(a)  # a constant transform
    np.testing.assert_allclose(blocks.const_matmul(c, b), want, rtol=1e-5, atol=1e-5)
    _, vjp_c = jax.vjp(lambda b: blocks.const_matmul(c, b), b)
    np.testing.assert_allclose(vjp_c(g)[0], vjp_want(g)[1], rtol=1e-5, atol=1e-5)
    # Negative control: the backward pass does use the stored transpose (a wrong one shows).
    pair = (a, jnp.swapaxes(a, -1, -2) + 1.0)
    _, vjp_bad = jax.vjp(lambda b: blocks.block_matmul(pair, b), b)
    assert float(jnp.max(jnp.abs(vjp_bad(g)[0] - vjp_want(g)[1]))) > 1e-2


def test_max_pool_matches_flax_including_ties():
    x = jax.nn.relu(jax.random.normal(KEY, (2, 8, 6, 5)))
    x = x.at[0, 0, 0, 0].set(1.0).at[0, 0, 1, 0].set(1.0).at[0, 1, 0, 0].set(1.0)
    g = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 3, 5))
    ref = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2), padding="VALID")
    y_ref, vjp_ref = jax.vjp(ref, x)
    y, vjp = jax.vjp(layers.max_pool_2x2, x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])


def test_max_pool_propagates_nan_like_flax():
    # A NaN in a window pools to NaN, whichever corner it is in, in the plain forward pass
    # and in the differentiated one (which also picks the gradient's corner).
    x = jax.random.uniform(KEY, (1, 4, 4, 2))
    x = x.at[0, 0, 1, 0].set(jnp.nan).at[0, 3, 3, 1].set(jnp.nan).at[0, 2, 0, 0].set(-jnp.inf)
    want = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    assert int(jnp.isnan(want).sum()) == 2
    np.testing.assert_array_equal(layers.max_pool_2x2(x), want)
    np.testing.assert_array_equal(jax.vjp(layers.max_pool_2x2, x)[0], want)


@pytest.mark.parametrize(
    "group, unit",
    [
        (groups.Group(4), (("regular", 1),)),
        (groups.Group(8), (("regular", 1), ("quo_4", 1))),
        (groups.Group(4, True), (("regular", 1),)),
        (groups.Group(3), (("regular", 2), ("trivial", 1))),
        (groups.Group(5, True), (("regular", 1), ("trivial", 1))),
    ],
    ids=["C4", "C8-quotient", "D4", "C3-mixed", "D5-mixed"],
)
def test_bases_fast_forms(group, unit):
    """Closed-form generator basis == the generic construction; Fourier forms reconstruct
    the dense bases."""
    for name, _ in unit:
        np.testing.assert_allclose(
            bases._generator_block(group, name, "gauss", 4, 5),
            bases._generator_block_generic(group, name, "gauss", 4, 5),
            atol=1e-12,
        )
    phi = fourier.fourier_matrix(group, unit)
    d = phi.shape[2]
    np.testing.assert_allclose(np.einsum("kbd,kbe->de", phi, phi), np.eye(d), atol=1e-12)
    lin = bases.linear_basis(group, unit, unit)
    blocks = bases.linear_basis_fourier(group, unit, unit)
    np.testing.assert_allclose(np.einsum("kyo,nkyx,kxi->noi", phi, blocks, phi), lin, atol=1e-12)
    # Generator: factored form applied to a random regular field == dense basis.
    dense = bases.generator_basis(group, unit, "gauss")
    gf = bases.generator_fourier(group, unit, "gauss")
    rng = np.random.default_rng(0)
    w, h = rng.normal(size=dense.shape[0]), rng.normal(size=group.order)
    want = np.einsum("n,nqh,h->q", w, dense, h).reshape(-1, 25)
    phi_r = fourier.fourier_matrix(group, (("regular", 1),))
    got = np.zeros_like(want)
    a, order = gf.untwist.shape[1], group.order
    for off, start in gf.regular_blocks:
        w2 = np.einsum("lx,lxa->la", w[start : start + order * a].reshape(order, a), gf.untwist)
        zh = np.einsum("la,lkyx,kxh,h->kay", w2, gf.shifts, phi_r, h)
        z = np.einsum("kay,kyc->ac", zh, phi_r)
        got[off : off + order] = np.einsum("cpa,ac->cp", gf.taps, z)
    rest = np.einsum("n,nqh,h->q", w, gf.dense, h)
    start = 0
    for off, dim in gf.dense_offsets:
        got[off : off + dim] = rest[start : start + dim * 25].reshape(dim, 25)
        start += dim * 25
    np.testing.assert_allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("n", [8, 5])
def test_dihedral_slots_split_by_the_mirror(n):
    """D_N's Fourier slots are C_N's, each split by the mirror's eigenvalue: the regular
    representation's slots are 2 wide (not 4), so a map between regular fields costs 2 |G|
    multiply-adds per field pair (16 blocks of 2 x 2 for D8) instead of 4 |G|. Control: rows
    mixed across the two halves of one slot no longer give block-diagonal maps, and the
    check that builds the blocks refuses them."""
    dn, cn = groups.Group(n, True), groups.Group(n)
    reg = (("regular", 1),)
    phi_d, phi_c = fourier.fourier_matrix(dn, reg), fourier.fourier_matrix(cn, reg)
    assert phi_d.shape == (2 * phi_c.shape[0], 2, 2 * n)
    assert phi_c.shape[1] == 2
    blocks = bases.linear_basis_fourier(dn, reg, reg)
    padding = 0 if n % 2 == 0 else 4  # odd N: slot 0's halves are 1-dim, padded to 2
    assert blocks.shape[1] * blocks.shape[2] * blocks.shape[3] == 2 * dn.order + padding
    lin = bases.linear_basis(dn, reg, reg)
    np.testing.assert_allclose(
        np.einsum("kyo,nkyx,kxi->noi", phi_d, blocks, phi_d), lin, atol=1e-12
    )
    # Control: rotate slot 1's mirror-even rows into its mirror-odd ones (still orthonormal).
    bad = np.array(phi_d)
    c, s = np.cos(0.3), np.sin(0.3)
    bad[2], bad[3] = c * phi_d[2] + s * phi_d[3], -s * phi_d[2] + c * phi_d[3]
    np.testing.assert_allclose(np.einsum("kbd,kbe->de", bad, bad), np.eye(2 * n), atol=1e-12)
    with pytest.raises(AssertionError, match="block diagonal"):
        bases._to_slots(lin, bad, bad)


def test_train_step_traces_once_with_padded_last_batch():
    model = models.NeuralEPDONet(**SMALL["R-gauss"][0], order=2, kernel_size=3)
    variables = models.init_variables(model, KEY, (8, 8, 1))
    tx = optax.adam(1e-3)
    params, stats = variables["params"], variables["batch_stats"]
    opt = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, stats, opt, batch, rng):
        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": stats},
                batch["image"],
                train=True,
                rngs={"dropout": rng},
                mutable=["batch_stats"],
            )
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            return jnp.sum(losses * batch["mask"]) / jnp.maximum(batch["mask"].sum(), 1), upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt, loss

    images = jax.random.uniform(KEY, (10, 8, 8, 1))
    labels = jnp.arange(10) % 10
    for start in (0, 4, 8):  # the last batch holds 2 real examples and 2 of padding
        idx = jnp.arange(start, start + 4)
        mask = (idx < 10).astype(jnp.float32)
        idx = jnp.minimum(idx, 9)
        batch = {"image": images[idx], "label": labels[idx], "mask": mask}
        params, stats, opt, loss = step(params, stats, opt, batch, jax.random.fold_in(KEY, start))
        assert np.isfinite(float(loss))
