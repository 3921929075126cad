"""Layers: exact equivariance (with negative controls), reference semantics, bad input."""

import functools
import warnings

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from neural_epdo_jax import layers, testing
from neural_epdo_jax.core import bases, fields, groups

C4, C8, D4 = groups.Group(4), groups.Group(8), groups.Group(4, True)
KEY = jax.random.PRNGKey(0)


def _x(ftype, hw=8, batch=2, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, hw, hw, ftype.size))


def _perturbed(variables, seed=3):
    """Random parameters (not the init's) so that the check sees a generic layer."""
    flat, unravel = jax.flatten_util.ravel_pytree(variables)  # one RNG call: cheap compile
    return unravel(flat + 0.3 * jax.random.normal(jax.random.PRNGKey(seed), flat.shape))


class EquivarianceTest(chex.TestCase, parameterized.TestCase):
    def _check(self, module, in_type, out_type, x, pointwise=False, **kw):
        variables = _perturbed(jax.jit(functools.partial(module.init, **kw))(KEY, x))
        if kw.get("train"):  # batch statistics: apply in training mode, drop the updates
            fn = self.variant(
                lambda v: module.apply(variables, v, mutable=["batch_stats"], **kw)[0]
            )
        else:
            fn = self.variant(lambda v: module.apply(variables, v, **kw))
        errs = testing.assert_equivariant(fn, x, in_type, out_type, rtol=1e-4)
        # Negative controls: rotating space but not the fibres, and expecting the wrong
        # (trivial) action on the output, must both be caught.
        if not pointwise:
            bad = testing.equivariance_errors(fn, x, in_type, out_type, fibres=False)
            self.assertGreater(max(bad.values()), 1e-2)
        bad = testing.equivariance_errors(fn, x, in_type, None, group=in_type.group)
        self.assertGreater(max(bad.values()), 1e-2)
        return errs

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("C4_trivial_regular_fd", C4, "trivial", "regular", "fd"),
        ("C8_regular_regular_gauss", C8, "regular", "regular", "gauss"),
        ("C8_quotient_rbf", C8, "regular+quo_2", "regular+quo_2", "rbf-fd"),
        ("D4_regular_regular_gauss", D4, "regular", "regular", "gauss"),
    )
    def test_pdo_conv(self, group, t_in, t_out, disc):
        fi, fo = fields.FieldType(group, t_in, 2), fields.FieldType(group, t_out, 3)
        self._check(layers.PDOConv(fi, fo, disc), fi, fo, _x(fi))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("C8_regular", C8, "regular", "regular", 1),
        ("C8_quotient_grouped", C8, "regular+quo_4", "regular", 2),
        ("D4_regular_grouped", D4, "regular", "regular", 2),
    )
    def test_equivariant_linear(self, group, t_in, t_out, s):
        fi, fo = fields.FieldType(group, t_in, 4), fields.FieldType(group, t_out, 2)
        self._check(layers.EquivariantLinear(fi, fo, groups=s), fi, fo, _x(fi), pointwise=True)

    @chex.variants(with_jit=True)
    @parameterized.named_parameters(
        ("C4_regular_fd", C4, "regular", 4, 2, 2, 1, "fd"),
        ("C8_quotient_gauss", C8, "regular+quo_4", 4, 2, 1, 2, "gauss"),
        ("D4_regular_gauss", D4, "regular", 4, 2, 1, 1, "gauss"),
    )
    def test_neural_epdo(self, group, t, f, g, s, r, disc):
        fi, fo = fields.FieldType(group, t, f), fields.FieldType(group, t, 2)
        self._check(layers.NeuralEPDO(fi, fo, 4, r, g, s, disc), fi, fo, _x(fi))

    # Op by op (no jit) too, on one small case of each path: the eager run dispatches every
    # tap slice separately, so the jitted cases above cover the larger configurations.
    @chex.variants(without_jit=True)
    @parameterized.named_parameters(("fourier_chunked", "fourier", 1), ("dense", "dense", None))
    def test_neural_epdo_op_by_op(self, impl, chunk):
        fi, fo = fields.FieldType(C4, "regular", 2), fields.FieldType(C4, "regular", 1)
        layer = layers.NeuralEPDO(fi, fo, 2, 1, 2, 2, "fd", kernel_size=3, impl=impl, chunk=chunk)
        self._check(layer, fi, fo, _x(fi, hw=4))

    @chex.variants(with_jit=True, without_jit=True)
    def test_norms_and_field_dropout(self):
        ft = fields.FieldType(D4, "regular", 3)
        x = _x(ft)
        self._check(layers.FieldGroupNorm(ft), ft, ft, x, pointwise=True)
        self._check(layers.FieldBatchNorm(ft), ft, ft, x, pointwise=True, train=True)
        drop = layers.ChannelDropout(0.5, ft, per_field=True)
        fn = self.variant(lambda v: drop.apply({}, v, train=True, rngs={"dropout": KEY}))
        testing.assert_equivariant(fn, x, ft, ft, rtol=1e-6)
        # The reference's channel-wise Dropout2d is not equivariant in training mode.
        chan = layers.ChannelDropout(0.5, ft, per_field=False)
        fn = self.variant(lambda v: chan.apply({}, v, train=True, rngs={"dropout": KEY}))
        self.assertGreater(max(testing.equivariance_errors(fn, x, ft, ft).values()), 1e-2)


def test_group_pool_and_restriction():
    ft = fields.FieldType(D4, "regular", 2)
    x = _x(ft)
    pooled = lambda v: layers.group_pool(v, ft)
    testing.assert_equivariant(pooled, x, ft, None, rtol=1e-6)
    restricted, rt = layers.restrict_dihedral(x, ft)
    assert rt == fields.FieldType(C4, "regular", 4)
    fn = lambda v: layers.restrict_dihedral(v, ft)[0]
    testing.assert_equivariant(fn, x, ft, rt, group=C4, rtol=1e-6)
    # Negative control: reading the D4 field as two C4 fields without reversing the second
    # block is not equivariant (r shifts that block backwards).
    plain = fields.FieldType(C4, "regular", 4)
    errs = testing.equivariance_errors(lambda v: v, x, ft, plain, group=C4)
    assert max(errs.values()) > 1e-2


def test_spatially_varying_matches_unfold():
    b, h, w, f, d, g, k = 2, 6, 5, 4, 3, 2, 5
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, h, w, f, d)).astype(np.float32)
    wt = rng.normal(size=(b, h, w, g, d, k * k)).astype(np.float32)
    got = np.asarray(layers.apply_spatially_varying(jnp.asarray(x), jnp.asarray(wt), g, k))
    xp = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0), (0, 0)))
    want = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            patch = xp[:, i : i + k, j : j + k].reshape(b, k * k, f, d)  # [B, taps, F, d]
            for fi in range(f):
                want[:, i, j, fi] = np.einsum("btd,bdt->bd", patch[:, :, fi], wt[:, i, j, fi % g])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_batch_norm_matches_pytorch_semantics(offset):
    """Float64 two-pass statistics as the reference; with a large common offset the merged
    per-example moments stay exact where the one-pass E[x^2] - E[x]^2 fails (control)."""
    ft = fields.FieldType(C4, "regular", 2)
    x = _x(ft, batch=3) + offset
    bn = layers.FieldBatchNorm(ft)
    v = bn.init(KEY, x, train=False)
    y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    xf = np.asarray(x, np.float64).reshape(3, 8, 8, 2, 4)
    mean = xf.mean(axis=(0, 1, 2, 4))
    var = xf.var(axis=(0, 1, 2, 4))
    want = (xf - mean[:, None]) / np.sqrt(var[:, None] + 1e-5)
    np.testing.assert_allclose(np.asarray(y).reshape(xf.shape), want, atol=1e-3 if offset else 1e-4)
    n = xf.size // 2
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, rtol=1e-6, atol=1e-6)
    want_var = 0.9 + 0.1 * var * n / (n - 1)
    np.testing.assert_allclose(upd["batch_stats"]["var"], want_var, rtol=1e-5, atol=1e-5)
    if offset:
        x32 = np.asarray(x).reshape(xf.shape)
        one_pass = np.mean(np.square(x32), axis=(0, 1, 2, 4)) - np.square(
            x32.mean(axis=(0, 1, 2, 4))
        )
        assert np.max(np.abs(one_pass - var)) > 1e-2


@pytest.mark.parametrize("shape", [(8, 8), ()])
def test_batch_norm_mask_keeps_padding_out_of_the_statistics(shape):
    """A masked batch (3 real rows + 2 rows of padding) normalises its real rows and updates
    the running statistics exactly as the 3 real rows alone; unmasked, the padding leaks in
    (the control)."""
    ft = fields.FieldType(C4, "regular", 2)
    real = jax.random.normal(KEY, (3, *shape, ft.size)) * 2 + 1
    padded = jnp.concatenate([real, jnp.zeros((2, *shape, ft.size))])
    mask = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0])
    bn = layers.FieldBatchNorm(ft)
    v = bn.init(KEY, real, train=False)
    run = functools.partial(bn.apply, v, train=True, mutable=["batch_stats"])
    want, want_stats = run(real)
    got, got_stats = run(padded, mask=mask)
    np.testing.assert_allclose(got[:3], want, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(got_stats, want_stats, rtol=1e-6, atol=1e-6)
    leaky, leaky_stats = run(padded)
    assert np.max(np.abs(leaky[:3] - want)) > 0.1
    assert (
        np.max(np.abs(leaky_stats["batch_stats"]["var"] - want_stats["batch_stats"]["var"])) > 0.01
    )
    with pytest.raises(ValueError, match="mask must have shape"):
        run(padded, mask=mask[:3])


_cm = layers.to_channel_major


def test_pdo_conv_channel_major_output_matches_nhwc():
    """`PDOConv(channel_major_out=True)` (a product with the input's patches) gives the NHWC
    convolution's output, and its gradients, channel-major: block 1's case (one trivial
    input channel, an even-sized and an odd-sized plane) and several input channels; a
    kernel with its taps mirrored does not."""
    t_in1 = fields.FieldType(C4, "trivial", 1)
    t_in3 = fields.FieldType(C4, "regular+quo_2", 2)
    t_out = fields.FieldType(C4, "regular+quo_2", 3)
    for t_in, hw in ((t_in1, (8, 8)), (t_in1, (7, 9)), (t_in3, (6, 5))):
        x = jax.random.normal(KEY, (2, *hw, t_in.size))
        conv = layers.PDOConv(t_in, t_out, discretisation="gauss")
        conv_cm = layers.PDOConv(t_in, t_out, discretisation="gauss", channel_major_out=True)
        v = conv.init(KEY, x)
        r = jax.random.normal(jax.random.PRNGKey(3), (2, t_out.field_size, 3, *hw))
        want = lambda v, x: _cm(conv.apply(v, x), t_out)  # noqa: B023 (used at once)
        np.testing.assert_allclose(conv_cm.apply(v, x), want(v, x), rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(
            jax.vjp(conv_cm.apply, v, x)[1](r), jax.vjp(want, v, x)[1](r), rtol=1e-4, atol=1e-4
        )
    # Control: the same weights applied with the taps mirrored (a slip in the patches).
    basis = bases.pdo_basis(C4, t_in.unit, t_out.unit, "gauss", 4, 5)
    kernel = layers.expand_pdo_kernel(v["params"]["weight"], basis)
    mirrored = layers.conv.conv_channel_major(x, kernel[::-1], 3, t_out.field_size)
    assert np.max(np.abs(mirrored - conv_cm.apply(v, x))) > 1e-2


def test_channel_major_layers_match_nhwc():
    """BatchNorm (training with a mask, then inference), channel dropout (per channel and per
    field) and the Neural ePDO layer give in the channel-major layout what they give in NHWC;
    an input with its components out of order does not."""
    ft = fields.FieldType(C4, "regular+quo_2", 4)  # components of unequal kinds
    x = _x(ft, batch=3) * 2 + 1
    mask = jnp.array([1.0, 1.0, 0.0])
    bn, bn_cm = layers.FieldBatchNorm(ft), layers.FieldBatchNorm(ft, channel_major=True)
    v = _perturbed(bn.init(KEY, x, train=False))
    y, stats = bn.apply(v, x, train=True, mask=mask, mutable=["batch_stats"])
    y_cm, stats_cm = bn_cm.apply(v, _cm(x, ft), train=True, mask=mask, mutable=["batch_stats"])
    np.testing.assert_allclose(y_cm, _cm(y, ft), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(stats_cm, stats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        bn_cm.apply(v, _cm(x, ft), train=False), _cm(bn.apply(v, x, train=False), ft), rtol=1e-6
    )
    for per_field in (False, True):
        drop = layers.ChannelDropout(0.5, ft, per_field)
        drop_cm = layers.ChannelDropout(0.5, ft, per_field, channel_major=True)
        rngs = {"dropout": jax.random.PRNGKey(7)}
        want = _cm(drop.apply({}, x, train=True, rngs=rngs), ft)
        np.testing.assert_array_equal(drop_cm.apply({}, _cm(x, ft), train=True, rngs=rngs), want)
    t_out = fields.FieldType(C4, "regular", 2)
    for chunk in (1, 2):
        nepdo = layers.NeuralEPDO(ft, t_out, g=2, s=1, reduction=2, chunk=chunk)
        nepdo_cm = layers.NeuralEPDO(
            ft, t_out, g=2, s=1, reduction=2, chunk=chunk, channel_major=True
        )
        v = _perturbed(nepdo.init(KEY, x))
        want = _cm(nepdo.apply(v, x), t_out)
        np.testing.assert_allclose(nepdo_cm.apply(v, _cm(x, ft)), want, rtol=1e-5, atol=1e-5)
    # Control: the components in the wrong order (a layout slip) change the output.
    assert np.max(np.abs(nepdo_cm.apply(v, _cm(x, ft)[:, ::-1]) - want)) > 1e-2
    # Pooling over space and over each field's components; the layout round trip.
    np.testing.assert_array_equal(layers.to_nhwc(_cm(x, ft)), x)
    pooled = layers.max_pool_2x2(x)
    np.testing.assert_array_equal(
        layers.max_pool_2x2(_cm(x, ft), channel_major=True), _cm(pooled, ft)
    )
    for mode, elementwise in (("max", False), ("max", True), ("mean", False)):
        got = layers.group_pool(_cm(x, ft), ft, mode, channel_major=True, elementwise=elementwise)
        want_pool = layers.group_pool(x, ft, mode)  # [B, H, W, F]; got [B, F, H, W]
        np.testing.assert_allclose(
            jnp.transpose(got, (0, 2, 3, 1)), want_pool, rtol=1e-6, atol=1e-6
        )
    # D_N -> C_N restriction, then a BatchNorm with the D_N fields' statistics (D-gauss's
    # block 6) on the restricted channel-major layout.
    d4 = fields.FieldType(groups.Group(4, True), "regular", 3)
    xd = _x(d4, batch=2) * 2 + 1
    r, c4 = layers.restrict_dihedral(xd, d4)
    r_cm, c4_cm = layers.restrict_dihedral(_cm(xd, d4), d4, channel_major=True)
    assert c4_cm == c4 and r_cm.shape == (2, 4, 6, 8, 8)
    np.testing.assert_array_equal(r_cm, _cm(r, c4))
    bn, bn_cm = layers.FieldBatchNorm(d4), layers.FieldBatchNorm(d4, channel_major=True)
    v = _perturbed(bn.init(KEY, r, train=False))
    y, stats = bn.apply(v, r, train=True, mutable=["batch_stats"])
    y_cm, stats_cm = bn_cm.apply(v, r_cm, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y_cm, _cm(y, c4), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(stats_cm, stats, rtol=1e-5, atol=1e-6)
    # Control: per C_N field statistics (half a D_N field each) are not these.
    bn_c4 = layers.FieldBatchNorm(c4, channel_major=True)
    v_c4 = bn_c4.init(KEY, r_cm, train=False)
    assert (
        np.max(np.abs(bn_c4.apply(v_c4, r_cm, train=True, mutable=["batch_stats"])[0] - y_cm))
        > 1e-2
    )
    with pytest.raises(ValueError, match="channel-major array"):
        bn_cm.apply(v, r_cm[:, :, :5], train=False)
    with pytest.raises(ValueError, match="channel-major array"):
        nepdo_cm.apply(v, x)
    with pytest.raises(ValueError, match="needs impl='fourier'"):
        layers.NeuralEPDO(ft, t_out, g=2, s=1, impl="dense", channel_major=True).init(
            KEY, _cm(x, ft)
        )


def test_group_norm_statistics_per_sample_and_field():
    ft = fields.FieldType(C4, "regular", 3)
    x = _x(ft, batch=2) * 3 + 1
    gn = layers.FieldGroupNorm(ft)
    y = gn.apply(gn.init(KEY, x), x)
    yf = np.asarray(y).reshape(2, 8, 8, 3, 4)
    np.testing.assert_allclose(yf.mean(axis=(1, 2, 4)), 0, atol=1e-5)
    np.testing.assert_allclose(yf.var(axis=(1, 2, 4)), 1, atol=1e-3)
    assert sum(p.size for p in jax.tree_util.tree_leaves(gn.init(KEY, x))) == 4 * 3


def test_odd_pooling_warns():
    with pytest.warns(UserWarning, match="breaks exact quarter-turn equivariance"):
        layers.max_pool_2x2(jnp.ones((1, 7, 7, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layers.max_pool_2x2(jnp.ones((1, 8, 8, 2)))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ft: layers.PDOConv(ft, ft).init(KEY, jnp.ones((8, 8, ft.size))), "rank 4"),
        (lambda ft: layers.PDOConv(ft, ft).init(KEY, jnp.ones((1, 8, 8, 5))), "has 8 channels"),
        (lambda ft: layers.NeuralEPDO(ft, ft, g=3, s=1), "divisible by g=3"),
        (lambda ft: layers.NeuralEPDO(ft, ft, g=2, s=4), "g=2 must be divisible by s=4"),
        (lambda ft: layers.NeuralEPDO(ft, ft, g=2, s=2, reduction=4), "hidden fields M"),
        (
            lambda ft: layers.EquivariantLinear(ft, ft, groups=3).init(KEY, jnp.ones((1, 8))),
            "3 groups",
        ),
        (lambda ft: layers.group_pool(jnp.ones((1, 8)), ft, "median"), "'max' or 'mean'"),
    ],
)
def test_bad_input(make, match):
    ft = fields.FieldType(C4, "regular", 2)
    with pytest.raises(ValueError, match=match):
        make(ft)
