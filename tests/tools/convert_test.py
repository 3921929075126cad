"""Parity with the official PyTorch implementation, through its weights.

The fixtures are outputs of the official code for five seeded networks (their README says
what is inside). They are read from ``$NEURAL_EPDO_JAX_REFERENCE_FIXTURES`` or from
``../shared/fixtures/reference`` beside the repository; the parity tests skip when absent.

One inconsistency of the fixture files is handled here, not in the converter: their
BatchNorm running statistics are the ones *after* the training-mode pass that produced
``logits_train_mode`` (every ``num_batches_tracked`` is 1), while ``logits_eval`` was
computed before it. A PyTorch momentum update ``r' = 0.9 r + 0.1 b`` (``b`` the batch's mean
and unbiased variance) is undone exactly with the batch statistics of that same pass, which
our model computes in training mode on the same images. Without this, the eval logits differ
by ~0.4 of the largest logit (a test below shows it), with it by ~1e-5.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import (
    mnist_rot_dihedral_gauss,
    mnist_rot_pdo_econv,
    mnist_rot_quotient_gauss,
    mnist_rot_regular_fd,
    mnist_rot_regular_gauss,
)
from neural_epdo_jax import layers
from neural_epdo_jax.core import groups
from neural_epdo_jax.tools import convert

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.environ.get("NEURAL_EPDO_JAX_REFERENCE_FIXTURES") or os.path.join(
    ROOT, "..", "shared", "fixtures", "reference"
)
VARIANTS = {
    "R-fd": mnist_rot_regular_fd,
    "R-gauss": mnist_rot_regular_gauss,
    "Q-gauss": mnist_rot_quotient_gauss,
    "PDO-eConv-fd": mnist_rot_pdo_econv,
    "D-gauss": mnist_rot_dihedral_gauss,
}
EVAL_TOL, TRAIN_TOL, RESIDUAL_TOL = 1e-4, 1e-3, 1e-4


def _path(name: str) -> str:
    path = os.path.join(FIXTURES, f"{name}-seed0.npz")
    if not os.path.exists(path):
        pytest.skip(
            f"reference fixture {path} is absent: set NEURAL_EPDO_JAX_REFERENCE_FIXTURES to "
            "the folder of the official implementation's outputs."
        )
    return path


def _config(name: str, z) -> ml_collections.ConfigDict:
    config = VARIANTS[name].get_config()
    config.model.channels = tuple(int(c) for c in z["channels"])
    return config


def _rel(a, b) -> float:
    """Largest difference relative to the largest entry of the reference ``b``."""
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def _nhwc(images_nchw: np.ndarray) -> jax.Array:
    return jnp.asarray(np.transpose(images_nchw, (0, 2, 3, 1)))


def _stats_before_train_pass(model, variables, x) -> dict:
    """The running statistics as they were before one training-mode pass on ``x`` updated
    them (momentum m = 0.1): r = ((2 - m) r' - u) / (1 - m), with u what the same update
    makes of r'."""
    _, updated = model.clone(dropout=0.0).apply(variables, x, train=True, mutable=["batch_stats"])
    m = 0.1
    return jax.tree.map(
        lambda r, u: ((2 - m) * r - u) / (1 - m),
        variables["batch_stats"],
        updated["batch_stats"],
    )


_CACHE: dict = {}


def _converted(name: str):
    """(fixture, Imported, variables for eval mode), converted once per process."""
    if name not in _CACHE:
        z = dict(np.load(_path(name)))
        imported = convert.import_reference(convert.load_state_dict(_path(name)), _config(name, z))
        variables = imported.variables
        tracked = {int(v) for k, v in z.items() if k.endswith("num_batches_tracked")}
        if tracked == {1}:
            x = _nhwc(z["images_nchw"])
            stats = _stats_before_train_pass(imported.model, variables, x)
            variables = {"params": variables["params"], "batch_stats": stats}
        elif tracked != {0}:
            pytest.skip(f"{name}: num_batches_tracked {tracked}: the eval statistics are unknown")
        _CACHE[name] = (z, imported, variables)
    return _CACHE[name]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_eval_logits_and_residuals(name):
    z, imported, variables = _converted(name)
    worst = max(imported.residuals, key=imported.residuals.get)
    print(f"{name}: largest projection residual {imported.residuals[worst]:.2e} ({worst})")
    assert imported.residuals[worst] < RESIDUAL_TOL
    apply = jax.jit(lambda v, x: imported.model.apply(v, x, train=False))
    x = _nhwc(z["images_nchw"])
    err = _rel(apply(variables, x), z["logits_eval"])
    err_rot = _rel(apply(variables, jnp.rot90(x, 1, axes=(1, 2))), z["logits_eval_rot90"])
    print(f"{name}: eval logits {err:.2e}, quarter-turned {err_rot:.2e}")
    assert err < EVAL_TOL
    assert err_rot < EVAL_TOL


@pytest.mark.parametrize("name", list(VARIANTS))
def test_train_mode_logits(name):
    z, imported, _ = _converted(name)
    model = imported.model.clone(dropout=0.0)
    logits, _ = model.apply(
        imported.variables, _nhwc(z["images_nchw"]), train=True, mutable=["batch_stats"]
    )
    err = _rel(logits, z["logits_train_mode"])
    print(f"{name}: train-mode logits {err:.2e}")
    assert err < TRAIN_TOL


# Block outputs further than EVAL_TOL from the reference's, with the bound they are held to.
# D-gauss blocks 3 and 4 differ by up to 1.7e-4 of their largest entry (mean difference 5e-6)
# although its logits agree to 1.3e-5. It is the reference's float32 round-off, not a
# different layer: fed the reference's own block-2 output, our block 3 computed in float64 is
# 8e-6 from our float32 and 7.8e-5 from the reference's; the same D16 layer matches to 1.4e-7
# in block 2 and 1e-5 in block 5, so the difference does not propagate as a systematic one
# would; and in the other variants the Neural ePDO blocks differ by up to 6e-5 (R-fd bn6).
# Neither our formulation ('fourier' or 'dense') nor the projection (the reference's raw
# generator kernels give the same) changes it.
KNOWN = {("D-gauss", 3): 3e-4, ("D-gauss", 4): 3e-4}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_block_activations(name):
    """bn1..bn6, the group pooling and the logits of the first two images, channel by channel
    in the reference's labels."""
    z, imported, variables = _converted(name)
    is_bn = lambda module, method: isinstance(module, layers.FieldBatchNorm)
    x = _nhwc(z["images_nchw"][:2])
    logits, state = imported.model.apply(
        variables, x, train=False, capture_intermediates=is_bn, mutable=["intermediates"]
    )
    inter = state["intermediates"]
    plan = imported.model.plan()
    bn6 = None
    for i, perm in enumerate(imported.plan.block_perms):
        ours = np.asarray(layers.to_nhwc(inter[f"FieldBatchNorm_{i}"]["__call__"][0]))
        ours = np.transpose(ours, (0, 3, 1, 2))  # NCHW, our labels
        ref = z[f"act_eval/bn{i + 1}"][:, perm]  # the reference's, in our labels
        err = _rel(ours, ref)
        print(f"{name}: bn{i + 1} {err:.2e}")
        assert err < KNOWN.get((name, i + 1), EVAL_TOL), f"bn{i + 1}"
        bn6 = ours
    pooled = layers.group_pool(
        jnp.asarray(np.transpose(np.maximum(bn6, 0), (0, 2, 3, 1))), plan[-1].out_type
    )
    assert _rel(np.transpose(pooled, (0, 3, 1, 2)), z["act_eval/group_pool"]) < EVAL_TOL
    assert _rel(logits, z["act_eval/fully_net"]) < EVAL_TOL


def test_stored_statistics_are_the_updated_ones():
    """Documents the fixture inconsistency that `_stats_before_train_pass` undoes: with the
    statistics as stored, the eval logits are far off."""
    z, imported, _ = _converted("R-fd")
    logits = imported.model.apply(imported.variables, _nhwc(z["images_nchw"]), train=False)
    assert _rel(logits, z["logits_eval"]) > 100 * EVAL_TOL


def test_negative_control_without_relabelling():
    """The gauss network converted without turning its fields round: the projection is
    refused, and when forced the logits are off by orders of magnitude."""
    z, imported, variables = _converted("R-gauss")
    sd = convert.load_state_dict(_path("R-gauss"))
    with pytest.raises(convert.ConversionError, match="conv1"):
        convert.import_reference(sd, _config("R-gauss", z), reverse=False)
    forced = convert.import_reference(sd, _config("R-gauss", z), reverse=False, max_residual=np.inf)
    assert max(forced.residuals.values()) > 0.1
    forced_vars = {"params": forced.variables["params"], "batch_stats": variables["batch_stats"]}
    x = _nhwc(z["images_nchw"])
    good = _rel(imported.model.apply(variables, x, train=False), z["logits_eval"])
    bad = _rel(forced.model.apply(forced_vars, x, train=False), z["logits_eval"])
    # The head of a random network averages a lot away: the logits move less than the
    # features, but still three orders of magnitude more than with the right labels.
    assert bad > 30 * EVAL_TOL and bad > 1000 * good, (bad, good)


def test_negative_control_wrong_stencil():
    z = dict(np.load(_path("R-gauss")))
    config = _config("R-gauss", z)
    config.model.discretisation = "fd"
    with pytest.raises(convert.ConversionError, match="outside the span"):
        convert.import_reference(convert.load_state_dict(_path("R-gauss")), config)


def test_wrong_channels_named():
    z = dict(np.load(_path("R-fd")))
    config = _config("R-fd", z)
    config.model.channels = (8, 24, 32, 32, 48, 64)
    with pytest.raises(convert.ConversionError, match="conv1.param has shape"):
        convert.import_reference(convert.load_state_dict(_path("R-fd")), config)


@pytest.mark.parametrize("name", ["Q-gauss", "D-gauss"])
def test_round_trip(name):
    """ours -> reference state_dict -> ours is the identity on the outputs, and the
    state_dict has the reference's keys and shapes."""
    z, imported, variables = _converted(name)
    sd = convert.to_reference(imported.model, variables)
    reference = convert.load_state_dict(_path(name))
    expected = {k: v.shape for k, v in reference.items() if not k.endswith(".kernel")}
    for key in reference:  # stored expanded: the reference has param + base there
        if key.endswith(".kernel"):
            expected[key[: -len(".kernel")] + ".param"] = sd[
                key[: -len(".kernel")] + ".param"
            ].shape
            expected[key[: -len(".kernel")] + ".base"] = sd[key[: -len(".kernel")] + ".base"].shape
    assert {k: v.shape for k, v in sd.items()} == expected
    back = convert.import_reference(sd, _config(name, z))
    assert max(back.residuals.values()) < 1e-6
    x = _nhwc(z["images_nchw"])
    a = imported.model.apply(variables, x, train=False)
    b = back.model.apply(back.variables, x, train=False)
    assert _rel(b, np.asarray(a)) < 1e-5


# ------------------------------------------------------------------ no fixtures needed


@pytest.mark.parametrize(
    "group, unit",
    [
        (groups.Group(8), (("regular", 1),)),
        (groups.Group(8), (("regular", 1), ("quo_2", 1))),
        (groups.Group(4, True), (("regular", 1),)),
        (groups.Group(8), (("trivial", 1),)),
    ],
)
def test_relabelling_intertwines(group, unit):
    """P rho(phi(g)) = rho(g) P for the generators, phi(g) = s g s: the reference's fields,
    which transform by rho o phi, become fields of our type. Control: without relabelling the
    regular and quotient fields do not."""

    rho = lambda g: _rho(group, unit, g)

    perm = convert.unit_permutation(group, unit, reverse=True)
    p = np.eye(len(perm))[perm]  # (P x)[c] = x[perm[c]]
    ok = all(
        np.allclose(p @ rho(convert._automorphism(group, g)), rho(g) @ p)
        for g in group.generators()
    )
    assert ok
    if unit != (("trivial", 1),):
        assert not all(
            np.allclose(rho(convert._automorphism(group, g)), rho(g)) for g in group.generators()
        )


def _rho(group, unit, g) -> np.ndarray:
    blocks = [groups.rep_matrix(group, name, g) for name, mult in unit for _ in range(mult)]
    size = sum(b.shape[0] for b in blocks)
    out, at = np.zeros((size, size)), 0
    for b in blocks:
        out[at : at + b.shape[0], at : at + b.shape[0]] = b
        at += b.shape[0]
    return out


def test_cli_convert_evaluate_export(tmp_path):
    """The command line: reference npz -> workdir -> evaluate -> export -> back to npz."""
    _path("D-gauss")
    workdir, exported, back = tmp_path / "imported", tmp_path / "m.jax", tmp_path / "back.npz"
    env = dict(os.environ, PYTHONPATH=ROOT)
    py = [sys.executable, "-m"]
    common = ["--config.dataset=rotated_digits", "--config.model.channels=(4,4,4,4,8,16)"]

    def run(*args):
        res = subprocess.run(
            [*py, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    out = run(
        "neural_epdo_jax.tools.convert",
        f"--reference={_path('D-gauss')}",
        "--config=configs/mnist_rot_dihedral_gauss.py",
        *common,
        f"--workdir={workdir}",
    )
    assert "largest relative residual" in out
    out = run(
        "neural_epdo_jax.tools.evaluate",
        f"--workdir={workdir}",
        "--checkpoint=latest",
        "--num_test_examples=16",
        "--angle_step_degrees=90",
    )
    assert "test accuracy" in out
    run("neural_epdo_jax.tools.export", f"--workdir={workdir}", f"--output={exported}")
    assert exported.stat().st_size > 0
    run(
        "neural_epdo_jax.tools.convert",
        "--direction=to_reference",
        f"--workdir={workdir}",
        f"--output={back}",
    )
    sd = dict(np.load(back))
    reference = convert.load_state_dict(_path("D-gauss"))
    np.testing.assert_array_equal(sd["bn3.bn.running_var"], reference["bn3.bn.running_var"])
    # A second conversion into the same workdir is refused and overwrites nothing.
    res = subprocess.run(
        [
            *py,
            "neural_epdo_jax.tools.convert",
            f"--reference={_path('D-gauss')}",
            "--config=configs/mnist_rot_dihedral_gauss.py",
            *common,
            f"--workdir={workdir}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode != 0 and "already holds checkpoints" in res.stderr
