"""The paper's networks: parameter counts, invariance of the logits, bad configurations."""

import functools

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from neural_epdo_jax import layers, models, testing
from neural_epdo_jax.core import fields, groups

# Expected trainable parameter counts: the reference's numbers, not computed here.
PAPER = {
    name: (models.PAPER_VARIANTS[name], count)
    for name, count in [
        ("R-fd", 234_186),
        ("R-gauss", 234_186),
        ("Q-gauss", 229_374),
        ("D-gauss", 525_190),
    ]
}

# Small versions of each variant (same structure, small group and field counts).
SMALL = {
    "R-fd": dict(n=4, channels=(4, 4, 8, 8, 8, 8), g=2, s=2),
    "R-gauss": dict(n=8, channels=(2, 2, 4, 4, 4, 4), g=2, s=2, discretisation="gauss"),
    "Q-gauss": dict(
        n=8,
        field_type="regular+quo_2",
        channels=(4, 4, 4, 4, 4, 4),
        g=2,
        s=1,
        reduction=2,
        discretisation="gauss",
    ),
    "D-gauss": dict(n=4, flip=True, channels=(2, 2, 4, 4, 4, 4), g=2, s=1, discretisation="gauss"),
    "PDO-eConv": dict(n=4, channels=(2, 2, 4, 4, 4, 4), g=-1),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_parameter_counts_match_reference(name):
    kwargs, want = PAPER[name]
    model = models.NeuralEPDONet(**kwargs)
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.PRNGKey(0), jnp.zeros((2, 28, 28, 1))
    )
    assert models.count_params(shapes["params"]) == want
    # Bases are constants: only coefficient, norm and head arrays are parameters.
    assert set(shapes) == {"params", "batch_stats"}


@functools.lru_cache(maxsize=None)
def _setup(name):
    model = models.NeuralEPDONet(**SMALL[name])
    x = _images()
    return model, x, _trained_variables(model, x)


def _trained_variables(model, x):
    """Init, then training-mode passes until the BN running statistics are generic (one
    compile for all of it)."""

    def run(key, x):
        v = model.init(key, x, train=False)
        # Generic parameters rather than the init's, so that the logits depend on the input.
        flat, unravel = jax.flatten_util.ravel_pytree(v["params"])  # one RNG call: cheap compile
        params = unravel(flat + 0.5 * jax.random.normal(key, flat.shape))
        v = {"params": params, "batch_stats": v["batch_stats"]}

        def step(i, stats):
            _, upd = model.apply(
                {"params": v["params"], "batch_stats": stats},
                x,
                train=True,
                rngs={"dropout": jax.random.fold_in(key, i)},
                mutable=["batch_stats"],
            )
            return upd["batch_stats"]

        return {
            "params": v["params"],
            "batch_stats": jax.lax.fori_loop(0, 40, step, v["batch_stats"]),
        }

    return jax.jit(run)(jax.random.PRNGKey(0), x)


def _images(batch=3, seed=0):
    return jnp.asarray(testing.blob_images(batch, seed))


@pytest.mark.parametrize("name", ["R-gauss", "D-gauss"])
def test_inference_loop_over_images_gives_the_batch_logits(name):
    """In inference the network runs on ``eval_chunk`` images at a time (a loop over the
    batch: the largest divisor of it up to eval_chunk): the same logits as the whole batch
    at once; a batch of at most eval_chunk images runs unlooped."""
    _, _, v = _setup(name)
    x = _images(batch=6, seed=3)
    whole = models.NeuralEPDONet(**SMALL[name], eval_chunk=0)

    def run(m, x):
        return jax.jit(functools.partial(m.apply, train=False))(v, x)

    def top_level_scans(m, x):  # the lengths of the loops at the jaxpr's top level
        jaxpr = jax.make_jaxpr(functools.partial(m.apply, train=False))(v, x)
        return [e.params["length"] for e in jaxpr.eqns if e.primitive.name == "scan"]

    cases = ((2, 6, 3), (4, 5, 5)) if name == "R-gauss" else ((4, 6, 2),)
    for eval_chunk, batch, steps in cases:
        looped = models.NeuralEPDONet(**SMALL[name], eval_chunk=eval_chunk)
        # atol: a few float32 ulps of logits of magnitude ~10 (the loop sums in another order).
        np.testing.assert_allclose(
            run(looped, x[:batch]), run(whole, x[:batch]), rtol=1e-5, atol=1e-5
        )
        assert top_level_scans(looped, x[:batch]) == [steps]
    # Unlooped: whole batch at once (the layers' own loops, if any, go over single images).
    for m in (whole, models.NeuralEPDONet(**SMALL[name], eval_chunk=6)):
        assert all(n == 6 for n in top_level_scans(m, x))
    # Control: the logits do depend on the image (a loop mixing images up would show).
    want = run(whole, x)
    assert np.max(np.abs(want - want[::-1])) > 1e-3


class InvarianceTest(chex.TestCase, parameterized.TestCase):
    @chex.variants(with_jit=True)
    @parameterized.named_parameters(*[(k, k) for k in SMALL])
    def test_logits_invariant_under_grid_rotations(self, name):
        kwargs = SMALL[name]
        model, x, v = _setup(name)

        def fn(img):  # logits minus their batch mean: the input-dependent part
            logits = model.apply(v, img, train=False)
            return logits - jnp.mean(logits, axis=0)

        fn = self.variant(fn)
        assert float(jnp.std(fn(x), axis=0).mean()) > 1e-3  # depends on the input
        group = groups.Group(kwargs["n"], False)  # the whole network is C_N-invariant
        # Relative to the input-dependent part of the logits, after six blocks of float32
        # round-off (amplified by max pooling near ties): a broken network is off by O(1).
        testing.assert_equivariant(fn, x, None, None, group=group, spatial_output=False, rtol=2e-3)
        # Negative control: an input-dependent but non-invariant perturbation is caught.
        bias = jnp.asarray(np.random.default_rng(5).uniform(size=(1, 28, 28, 1)), jnp.float32)
        broken = lambda img: fn(img + bias)
        errs = testing.equivariance_errors(broken, x, None, None, group=group, spatial_output=False)
        assert max(errs.values()) > 5e-2

    def test_dihedral_blocks_1_to_5_mirror_equivariant(self):
        kwargs = SMALL["D-gauss"]
        model, x, v = _setup("D-gauss")
        d4 = groups.Group(4, True)
        block5_type = fields.FieldType(d4, "regular", kwargs["channels"][4])

        def block5(img):  # output of block 5 (= the input of the restriction), eval mode
            _, inter = model.apply(
                v,
                img,
                train=False,
                capture_intermediates=lambda mdl, _: isinstance(mdl, layers.ChannelDropout),
                mutable=["intermediates"],
            )
            return layers.to_nhwc(inter["intermediates"]["ChannelDropout_2"]["__call__"][0])

        fn = jax.jit(block5)
        errs = testing.assert_equivariant(fn, x, None, block5_type, group=d4, rtol=1e-4)
        assert (1, 0) in errs  # the mirror was checked
        bad = testing.equivariance_errors(fn, x, None, None, group=d4)
        assert max(bad.values()) > 1e-2


def test_full_size_r_fd_invariant():
    model = models.NeuralEPDONet(**PAPER["R-fd"][0])
    x = _images(batch=2)
    v = _trained_variables(model, x)
    fn = jax.jit(lambda img: model.apply(v, img, train=False))
    testing.assert_equivariant(fn, x, None, None, group=groups.Group(16), spatial_output=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(g=3, s=1), "divisible by g=3"),
        (dict(g=4, s=3), "g=4 must be divisible by s=3"),
        (dict(flip=True, field_type="regular+quo_4"), "only 'regular' fields"),
        (dict(discretisation="spline"), "unknown discretisation 'spline'"),
        (dict(channels=(16, 24)), "6 positive field counts"),
        (dict(dropout=1.5), "dropout must be in"),
        (dict(field_type="regular+quo_5"), "M=5 must divide N=16"),
        (dict(dtype="float8"), "unknown dtype"),
        (dict(reduction=64), "hidden fields M"),
    ],
)
def test_bad_configuration_raises_before_tracing(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.NeuralEPDONet(**kwargs)


def test_bad_input_shape():
    model = models.NeuralEPDONet(n=4, channels=(4, 4, 4, 4, 4, 4), g=2, s=2)
    with pytest.raises(ValueError, match=r"\[batch, height, width, 1\]"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((2, 28, 28)), train=False)
    with pytest.warns(UserWarning, match="divisible by 4"):
        jax.eval_shape(
            functools.partial(model.init, train=False),
            jax.random.PRNGKey(0),
            jnp.zeros((1, 30, 30, 1)),
        )
