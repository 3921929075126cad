"""The plain CNN baseline: parameter count, no rotation invariance, the training path."""

import functools
import json
import os

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cnn_baseline
from configs import test as test_config
from neural_epdo_jax import cnn, models, testing
from neural_epdo_jax.core import groups
from neural_epdo_jax.tools import evaluate
from neural_epdo_jax.train.loop import train_and_evaluate
from neural_epdo_jax.train.state import create_model

R_GAUSS_PARAMETERS = 234_186  # the reference's count (tests/models_test.py checks ours)


def _count(model):
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, 28, 28, 1))
    )
    return models.count_params(shapes["params"])


def test_baseline_parameters_within_5_percent_of_r_gauss():
    model = create_model(cnn_baseline.get_config())
    assert isinstance(model, cnn.CNN)
    # 6 convs 5x5 without bias: 25 (1*20 + 20*28 + 28*36 + 36*36 + 36*56 + 56*76) = 228,900;
    # BatchNorms 2 (20 + 28 + 36 + 36 + 56 + 76) = 504; head 76*64 + 64 + 2*64 + 64*10 + 10.
    assert _count(model) == 228_900 + 504 + 4_928 + 128 + 650 == 235_110
    assert abs(_count(model) / R_GAUSS_PARAMETERS - 1) < 0.05


def _images(batch=4, seed=0):
    return jnp.asarray(testing.blob_images(batch, seed))


def _generic_logits_fn(model, x):
    """Logits (minus their batch mean) of ``model`` with random, non-initial parameters and
    batch statistics from a few training-mode passes: a generic network of the class."""

    @jax.jit
    def generic_variables(key, x):  # one compile for all of it
        v = model.init(key, x, train=False)
        flat, unravel = jax.flatten_util.ravel_pytree(v["params"])
        params = unravel(flat + 0.5 * jax.random.normal(key, flat.shape))

        def step(i, stats):
            _, upd = model.apply(
                {"params": params, "batch_stats": stats},
                x,
                train=True,
                rngs={"dropout": jax.random.fold_in(key, i)},
                mutable=["batch_stats"],
            )
            return upd["batch_stats"]

        return {"params": params, "batch_stats": jax.lax.fori_loop(0, 3, step, v["batch_stats"])}

    v = generic_variables(jax.random.key(0), x)

    @jax.jit
    def fn(img):
        logits = model.apply(v, img, train=False)
        return logits - jnp.mean(logits, axis=0)

    return fn


def test_cnn_is_not_rotation_invariant_unlike_the_equivariant_network():
    """The control for the equivariance tests: the same check that passes for a C4 Neural
    ePDO network fails for the plain CNN, by far."""
    x = _images()
    c4 = groups.Group(4)
    plain = _generic_logits_fn(cnn.CNN(channels=(4, 4, 8, 8, 8, 8)), x)
    assert float(jnp.std(plain(x), axis=0).mean()) > 1e-3  # depends on the input
    errors = testing.equivariance_errors(plain, x, None, None, group=c4, spatial_output=False)
    assert min(errors.values()) > 0.1, errors
    with pytest.raises(AssertionError):
        testing.assert_equivariant(plain, x, None, None, group=c4, spatial_output=False)
    equivariant = models.NeuralEPDONet(
        n=4, channels=(2, 2, 2, 2, 2, 2), order=2, kernel_size=3, g=2, s=1
    )
    fn = _generic_logits_fn(equivariant, x)
    testing.assert_equivariant(fn, x, None, None, group=c4, spatial_output=False, rtol=2e-3)


def test_padding_rows_stay_out_of_the_batch_statistics():
    model = cnn.CNN(channels=(2, 2, 2, 2, 2, 2), dropout=0.0)
    x = _images(batch=3)
    v = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), x)
    padded = jnp.concatenate([x, jnp.ones_like(x[:2])])
    mask = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0])

    @jax.jit
    def train_pass(images, mask):
        return model.apply(v, images, train=True, mask=mask, mutable=["batch_stats"])

    logits, stats = train_pass(padded, mask)
    want_logits, want_stats = train_pass(x, None)
    np.testing.assert_allclose(logits[:3], want_logits, rtol=1e-5, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, want_stats
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(channels=(4, 4)), "6 positive channel counts"),
        (dict(kernel_size=4), "kernel_size must be odd"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(dtype="float8"), "unknown dtype"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cnn.CNN(**kwargs)


def test_trains_evaluates_and_sweeps_through_the_config_path(tmp_path):
    config = test_config.get_config()
    baseline = cnn_baseline.get_config()
    config.model_name, config.model = baseline.model_name, baseline.model
    config.model.channels = (4, 4, 4, 4, 4, 4)
    config.num_epochs = 1
    workdir = str(tmp_path / "cnn")
    result = train_and_evaluate(config, workdir)
    assert result["num_params"] == _count(create_model(config))
    assert 0.0 <= result["test_accuracy"] <= 1.0
    sweep = evaluate.run(workdir, checkpoint="latest", angle_step_degrees=90)
    assert sweep["angles_degrees"] == [0.0, 90.0, 180.0, 270.0]
    assert sweep["rotated_accuracy"][0] == pytest.approx(result["test_accuracy"])
    with open(os.path.join(workdir, evaluate.SWEEP_JSON)) as f:
        assert json.load(f)["rotated_accuracy"] == sweep["rotated_accuracy"]
