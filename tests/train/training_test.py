"""Tests of neural_epdo_jax.train.loop: schedule, optimizer, steps, the loop and its recovery.

Unit tests of the steps use a tiny stand-in network (``_TinyNet``, same interface as the
model: ``train`` flag, BatchNorm statistics, dropout) so that they compile in a second. The
end-to-end tests run the real model on ``configs/test.py`` (C4, two fields per block, 80
training digits): straight runs, resumption, SIGTERM and ``kill -9`` recovery, two devices,
bfloat16 and non-finite losses.
"""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from unittest import mock

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from configs import default as default_config
from configs import mnist_rot_regular_fd
from configs import test as test_config
from neural_epdo_jax import models
from neural_epdo_jax.data import pipeline
from neural_epdo_jax.runtime.host import default_compilation_cache_dir, use_compilation_cache
from neural_epdo_jax.tools import evaluate
from neural_epdo_jax.train import checkpointing
from neural_epdo_jax.train.loop import NonFiniteLossError, load_split, train_and_evaluate
from neural_epdo_jax.train.metrics import CURVES_FILE, METRICS_FILE, summary_line
from neural_epdo_jax.train.state import (
    ConfigError,
    create_learning_rate_schedule,
    create_model,
    create_optimizer,
    create_train_state,
    reset_adam_state,
    restore_train_state,
)
from neural_epdo_jax.train.steps import (
    CPU_STEP_COMPILER_OPTIONS,
    eval_step,
    jit_steps,
    step_compiler_options,
    train_step,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _TinyNet(nn.Module):
    """A few-parameter CNN with the model's interface, for fast step tests."""

    @nn.compact
    def __call__(self, x, *, train, mask=None):
        x = nn.Conv(4, (3, 3))(x)
        bn_mask = None if mask is None else mask[:, None, None, None] > 0
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x, mask=bn_mask)
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


@functools.cache
def _tiny_state():
    """A fresh tiny-net state (cached: tests must not donate it)."""
    config = test_config.get_config()
    config.learning_rate = 1e-2
    tx = create_optimizer(config, create_learning_rate_schedule(config, 3))
    return create_train_state(jax.random.key(0), _TinyNet(), tx, (8, 8, 1))


# Shared by the step tests (one compilation): batches are always 32 rows.
_train_step = jax.jit(train_step)


def _batch(n=32, pad=0, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((n + pad, 8, 8, 1), dtype=np.float32)
    labels = rng.integers(0, 10, n + pad).astype(np.int32)
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    return {"image": images, "label": labels, "mask": mask}


def _subprocess_env(**extra):
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        **extra,
    )
    return env


def _train_command(workdir, *overrides):
    return [
        sys.executable,
        os.path.join(REPO, "train.py"),
        f"--config={os.path.join(REPO, 'configs', 'test.py')}",
        f"--workdir={workdir}",
        "--cpu_devices=1",  # bitwise comparisons with the in-process (one-device) runs
        *overrides,
    ]


def _tiny_run_config(**overrides):
    config = test_config.get_config()
    for key, value in overrides.items():
        config[key] = value
    return config


def _latest_params(workdir):
    _, state, step, _ = evaluate.load_state(workdir, "latest")
    return jax.device_get(state.params), jax.device_get(state.batch_stats), step


def _records(workdir):
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f]


def _max_logged_step(workdir):
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        steps = [json.loads(line)["step"] for line in f if line.strip().endswith("}")]
    return max(steps, default=0)


class ScheduleTest(parameterized.TestCase):
    # The reference: epochs 1-59 at 2e-3, 60-119 at 2e-4, 120-149 at 1e-4, 150-179 at 5e-5,
    # 180-199 at 2.5e-5; with 10 steps per epoch, epoch e (from 1) starts at step 10 (e - 1).
    @parameterized.parameters(
        (0, 2e-3),
        (589, 2e-3),
        (590, 2e-4),
        (1189, 2e-4),
        (1190, 1e-4),
        (1489, 1e-4),
        (1490, 5e-5),
        (1789, 5e-5),
        (1790, 2.5e-5),
        (1989, 2.5e-5),
    )
    def test_paper_schedule_at_boundaries(self, step, expected):
        schedule = create_learning_rate_schedule(mnist_rot_regular_fd.get_config(), 10)
        np.testing.assert_allclose(schedule(step), expected, rtol=1e-6)

    def test_boundary_at_first_epoch_scales_from_the_start(self):
        config = default_config.get_config()
        config.lr_boundaries_epochs, config.lr_scales = (1,), (0.5,)
        schedule = create_learning_rate_schedule(config, 7)
        np.testing.assert_allclose(schedule(0), config.learning_rate * 0.5, rtol=1e-6)


class OptimizerTest(absltest.TestCase):
    def test_matches_pytorch_adam_with_coupled_weight_decay(self):
        config = default_config.get_config()
        config.lr_boundaries_epochs, config.lr_scales = (2,), (0.1,)
        tx = create_optimizer(config, create_learning_rate_schedule(config, 2))
        params = {"w": jnp.array([0.5, -1.0, 2.0])}
        grads = [np.array([0.1, 0.2, -0.3]), np.array([-0.2, 0.05, 0.4]), np.array([1.0, 0, 0])]
        state = tx.init(params)
        # PyTorch Adam(weight_decay): g += wd * p, then Adam with bias correction.
        p, m, v = np.array([0.5, -1.0, 2.0]), np.zeros(3), np.zeros(3)
        b1, b2, eps, wd = config.adam_b1, config.adam_b2, config.adam_eps, config.weight_decay
        for t, g in enumerate(grads, start=1):
            updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
            params = optax.apply_updates(params, updates)
            lr = config.learning_rate * (0.1 if t > 2 else 1.0)  # Epoch 2 = steps 3, 4.
            g = g + wd * p
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
            p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
            np.testing.assert_allclose(params["w"], p, rtol=1e-5, err_msg=f"step {t}")

    def test_flat_state_is_the_per_array_update(self):
        config = default_config.get_config()
        schedule = create_learning_rate_schedule(config, 2)
        flat = create_optimizer(config, schedule)
        per_array = create_optimizer(config, schedule, flat=False)
        params = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.array([0.5, -1.0])}}
        states = [flat.init(params), per_array.init(params)]
        adam = states[0][1]
        self.assertEqual(adam.mu.shape, (8,))  # one vector for all arrays
        rng = np.random.default_rng(0)
        for _ in range(3):
            grads = jax.tree.map(
                lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params
            )
            (u_flat, states[0]), (u_arr, states[1]) = (
                flat.update(grads, states[0], params),
                per_array.update(grads, states[1], params),
            )
            chex.assert_trees_all_close(u_flat, u_arr, rtol=1e-6, atol=1e-9)
            params = optax.apply_updates(params, u_flat)

    def test_reset_adam_state_keeps_schedule_count(self):
        config = default_config.get_config()
        tx = create_optimizer(config, create_learning_rate_schedule(config, 3))
        params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
        opt_state = tx.init(params)
        update = jax.jit(tx.update)
        for _ in range(3):
            _, opt_state = update(jax.tree.map(jnp.ones_like, params), opt_state, params)
        reset_fn = jax.jit(reset_adam_state)
        reset = reset_fn(opt_state, jnp.array(True))
        kept = reset_fn(opt_state, jnp.array(False))
        chex.assert_trees_all_equal(kept, opt_state)
        adam = [s for s in jax.tree.leaves(reset, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]  # fmt: skip
        self.assertLen(adam, 1)
        self.assertEqual(int(adam[0].count), 0)
        for leaf in jax.tree.leaves((adam[0].mu, adam[0].nu)):
            self.assertEqual(float(jnp.abs(leaf).sum()), 0.0)
        counts = [int(x) for x in jax.tree.leaves(reset) if jnp.ndim(x) == 0]
        self.assertIn(3, counts)  # The schedule's count.


class RestoreTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        self.config = test_config.get_config()
        self.schedule = create_learning_rate_schedule(self.config, 3)
        tx = create_optimizer(self.config, self.schedule)
        state = create_train_state(jax.random.key(0), _TinyNet(), tx, (8, 8, 1))
        self.saved, _ = jax.jit(train_step)(state, _batch(), jax.random.key(1))
        workdir = self.enter_context(tempfile.TemporaryDirectory())
        self.manager = checkpointing.create_manager(workdir)
        self.addCleanup(self.manager.close)
        checkpointing.save(self.manager, 1, self.saved, {"epoch": 1})

    def test_restores_the_saved_state(self):
        state, progress = restore_train_state(
            self.manager, 1, _TinyNet(), self.config, self.schedule, (8, 8, 1)
        )
        self.assertEqual(progress, {"epoch": 1})
        chex.assert_trees_all_equal(state.params, self.saved.params)
        chex.assert_trees_all_equal(state.opt_state, self.saved.opt_state)

    def test_another_model_is_refused(self):
        class Wider(_TinyNet):
            @nn.compact
            def __call__(self, x, *, train, mask=None):
                return nn.Dense(10)(jnp.mean(nn.Conv(5, (3, 3))(x), axis=(1, 2)))

        with self.assertRaisesRegex(ValueError, "do not match"):
            restore_train_state(self.manager, 1, Wider(), self.config, self.schedule, (8, 8, 1))


class StepTest(parameterized.TestCase):
    def test_train_step_restarts_adam_every_epoch(self):
        state, batch, rng = _tiny_state(), _batch(), jax.random.key(1)
        step = jax.jit(functools.partial(train_step, adam_reset_every_steps=2))
        for _ in range(3):  # Steps 0, 1, 2: Adam restarts before steps 0 and 2.
            state, _ = step(state, batch, rng)
        adam = state.opt_state[1]
        self.assertIsInstance(adam, optax.ScaleByAdamState)
        self.assertEqual(int(adam.count), 1)
        self.assertEqual(int(state.opt_state[2].count), 3)

    def test_padded_examples_count_nothing(self):
        state, rng = _tiny_state(), jax.random.key(1)
        batch = _batch(27, pad=5)
        padding = batch["mask"] == 0
        other = dict(batch, label=np.where(padding, (batch["label"] + 1) % 10, batch["label"]))
        state_a, metrics_a = _train_step(state, batch, rng)
        state_b, metrics_b = _train_step(state, other, rng)
        chex.assert_trees_all_equal((state_a.params, metrics_a), (state_b.params, metrics_b))
        self.assertEqual(float(metrics_a["count"]), 27.0)

        # Inference: a padded batch gives the sums of its real examples.
        padded = eval_step(state_a, batch)
        real = eval_step(state_a, {k: v[:27] for k, v in batch.items()})
        chex.assert_trees_all_close(padded, real, rtol=1e-5)

    def test_padded_batch_makes_the_step_of_its_real_examples(self):
        """Padding stays out of the BatchNorm statistics too (the model takes the mask):
        without dropout, 5 real rows padded to 8 make the step of the 5 rows alone, whatever
        the padding holds. Control: a model that ignores the mask."""
        model = models.NeuralEPDONet(
            n=4, channels=(2, 2, 2, 2, 2, 2), g=2, s=2, order=2, kernel_size=3, dropout=0.0
        )
        tx = optax.sgd(0.1)  # (Adam would turn round-off in ~0 gradients into +-lr steps)
        state = create_train_state(jax.random.key(0), model, tx, (8, 8, 1))
        real = _batch(5, seed=4)

        def padded(fill):
            return {
                "image": np.concatenate([real["image"], fill.astype(np.float32)]),
                "label": np.concatenate([real["label"], np.arange(3, dtype=np.int32)]),
                "mask": np.concatenate([real["mask"], np.zeros(3, np.float32)]),
            }

        zeros = padded(np.zeros((3, 8, 8, 1)))
        noise = padded(np.random.default_rng(0).normal(size=(3, 8, 8, 1)) * 50)
        step = jax.jit(train_step)
        rng = jax.random.key(2)
        want, want_m = step(state, real, rng)
        got, got_m = step(state, zeros, rng)
        # Exact: what the padding holds changes nothing (same shapes, same arithmetic).
        again, _ = step(state, noise, rng)
        chex.assert_trees_all_close(
            (again.params, again.batch_stats), (got.params, got.batch_stats), rtol=1e-6, atol=1e-7
        )
        # Up to round-off (8 rows are summed in another order than 5): updates are ~1.
        chex.assert_trees_all_close(got_m, want_m, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(got.params, want.params, atol=2e-3)
        chex.assert_trees_all_close(got.batch_stats, want.batch_stats, atol=1e-4)

        def ignores_mask(variables, x, **kwargs):
            kwargs.pop("mask")
            return model.apply(variables, x, **kwargs)

        leaky, _ = step(state.replace(apply_fn=ignores_mask), zeros, rng)
        for part, at_least in (("batch_stats", 0.02), ("params", 0.1)):
            a, b = getattr(leaky, part), getattr(want, part)
            diff = jax.tree.map(lambda p, q: float(np.max(np.abs(p - q))), a, b)
            self.assertGreater(max(jax.tree.leaves(diff)), at_least)

    def test_model_without_mask_warns(self):
        class NoMask(nn.Module):
            @nn.compact
            def __call__(self, x, *, train):
                return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))

        tx = optax.sgd(0.1)
        state = create_train_state(jax.random.key(0), NoMask(), tx, (8, 8, 1))
        with self.assertWarnsRegex(UserWarning, "NoMask takes no `mask`"):
            train_step(state, _batch(), jax.random.key(0))

    def test_train_step_traces_once_over_epochs_with_padded_last_batch(self):
        @chex.assert_max_traces(n=1)
        def traced_train_step(state, batch, rng):
            return train_step(state, batch, rng, augmentation="none")

        step = jax.jit(traced_train_step, donate_argnums=(0,))
        data = _batch(70)
        state = jax.tree.map(jnp.copy, _tiny_state())  # Donated below.
        seen = []
        for epoch in range(2):
            for batch in pipeline.epoch_batches(
                data["image"], data["label"], 32, shuffle=True, seed=0, epoch=epoch
            ):
                state, metrics = step(state, batch, jax.random.key(0))
                seen.append(float(metrics["count"]))
        self.assertEqual(seen, [32.0, 32.0, 6.0] * 2)
        self.assertEqual(int(state.step), 6)

    def test_step_is_a_function_of_state_batch_and_rng(self):
        state, batch, rng = _tiny_state(), _batch(), jax.random.key(3)
        first, _ = _train_step(state, batch, rng)
        again, _ = _train_step(state, batch, rng)
        chex.assert_trees_all_equal(first.params, again.params)
        # Another step count draws another dropout mask.
        later, _ = _train_step(state.replace(step=state.step + 1), batch, rng)
        self.assertFalse(
            np.array_equal(later.params["Dense_0"]["kernel"], first.params["Dense_0"]["kernel"])
        )

    def test_step_compiler_options_per_platform(self):
        # CPU steps are compiled at backend optimisation level 1 (measured: faster compiles,
        # the same step time) with XLA's LLVM IR fusion emitter (parallel.CPU_CODEGEN_OPTIONS:
        # a lower compile peak); other platforms keep XLA's defaults.
        self.assertEqual(
            step_compiler_options("cpu"),
            {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False},
        )
        self.assertEqual(step_compiler_options("gpu"), {})
        self.assertEqual(step_compiler_options(), step_compiler_options(jax.default_backend()))
        options = step_compiler_options("cpu")
        options["xla_backend_optimization_level"] = 3  # a copy: the module's stays put
        self.assertEqual(CPU_STEP_COMPILER_OPTIONS["xla_backend_optimization_level"], 1)

    def test_non_finite_flag(self):
        batch = _batch()
        batch["image"][3, 2, 2, 0] = np.nan
        _, metrics = _train_step(_tiny_state(), batch, jax.random.key(0))
        self.assertFalse(bool(metrics["finite"]))
        _, metrics = _train_step(_tiny_state(), _batch(), jax.random.key(0))
        self.assertTrue(bool(metrics["finite"]))


class ConfigErrorTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("dataset", "dataset", "mnist_rotated", "dataset"),
        ("augmentation", "augmentation", "random", "augmentation"),
        ("model_name", "model_name", "ResNet", "model_name"),
        ("dtype", "dtype", "float16", "dtype"),
        ("batch_size", "batch_size", 0, "batch_size"),
        ("boundaries", "lr_boundaries_epochs", (5, 3), "lr_boundaries_epochs"),
        ("scales", "lr_scales", (0.1, 0.5, 0.5), "lr_scales"),
        ("g_not_divisible_by_s", "model.s", 3, "model"),
        ("channels_not_divisible_by_g", "model.channels", (3, 2, 2, 2, 2, 2), "model"),
        ("quotient_with_flip", "model.flip", True, "model"),
        ("discretisation", "model.discretisation", "spline", "model"),
    )
    def test_invalid_config_raises_before_anything_is_written(self, key, value, named):
        config = test_config.get_config()
        if key == "model.flip":
            config.model.field_type = "regular+quo_4"
        target, _, leaf = key.rpartition(".")
        (config.model if target else config)[leaf] = value
        workdir = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), "run")
        with self.assertRaisesRegex(ConfigError, named):
            train_and_evaluate(config, workdir)
        self.assertFalse(os.path.exists(workdir))

    @parameterized.named_parameters(
        ("bad_value", ["--config.batch_size=abc"], "train.py: error: flag --config.batch_size=abc: invalid literal for int()"),
        ("missing_file", ["--config=configs/nope.py"], "train.py: error: config file configs/nope.py does not exist; configs/ has: cnn_baseline.py, default.py,"),
        ("hosts_without_distributed", ["--config=configs/test.py", "--num_processes=2"], "train.py: error: --coordinator_address/--num_processes/--process_id need --config.distributed=True"),
    )  # fmt: skip
    def test_bad_command_line_is_one_line(self, args, message):
        proc = subprocess.run(
            [sys.executable, "train.py", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=_subprocess_env(),
            timeout=120,
        )
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertEqual(proc.stderr.strip().splitlines(), [proc.stderr.strip()])
        self.assertIn(message, proc.stderr)

    def test_broken_config_file_is_one_line(self):
        path = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), "broken.py")
        with open(path, "w") as f:
            f.write("def get_config(:\n")
        proc = subprocess.run(
            [sys.executable, "train.py", f"--config={path}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=_subprocess_env(),
            timeout=120,
        )
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertRegex(
            proc.stderr.strip(), rf"^train.py: error: cannot load config file {path}: [^\n]+$"
        )

    def test_truncated_config_json_is_one_line(self):
        workdir = self.enter_context(tempfile.TemporaryDirectory())
        config = test_config.get_config()
        checkpointing.check_and_save_config(config, workdir)
        manager = checkpointing.create_manager(workdir)
        state = create_train_state(
            jax.random.key(0), create_model(config), optax.sgd(0.1), (28, 28, 1)
        )
        checkpointing.save(manager, 3, state, {})
        manager.close()
        path = os.path.join(workdir, checkpointing.CONFIG_FILE)
        with open(path, "r+") as f:
            f.truncate(50)
        proc = subprocess.run(
            _train_command(workdir), cwd=REPO, capture_output=True, text=True, env=_subprocess_env(), timeout=120
        )  # fmt: skip
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertRegex(
            proc.stderr.strip(), rf"^train.py: error: {path} is not valid JSON \(.*\); [^\n]+$"
        )

    def test_non_finite_loss_exits_3_and_says_what_to_do(self):
        workdir = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), "run")
        proc = subprocess.run(
            _train_command(workdir, "--config.learning_rate=1e30"),
            cwd=REPO,
            capture_output=True,
            text=True,
            env=_subprocess_env(),
            timeout=300,
        )
        self.assertEqual(proc.returncode, 3, proc.stdout + proc.stderr)
        last = proc.stderr.strip().splitlines()[-1]
        self.assertRegex(last, r"^train.py: error: non-finite loss or parameters at step \d")
        self.assertIn("no checkpoint had been saved yet", last)
        self.assertIn("lower --config.learning_rate, in a new --workdir", last)
        self.assertNotIn("step None", last)

    def test_unknown_config_key_on_the_command_line(self):
        for extra in ([], ["--config=configs/test.py"]):
            proc = subprocess.run(
                [sys.executable, "train.py", *extra, "--config.learning_rat=0.1"],
                cwd=REPO,
                capture_output=True,
                text=True,
                env=_subprocess_env(),
                timeout=120,
            )
            self.assertNotEqual(proc.returncode, 0)
            self.assertIn("unknown config key", proc.stderr)
            self.assertIn('Did you mean "learning_rate"', proc.stderr)
            self.assertNotIn("Traceback", proc.stderr)


class EndToEndTest(parameterized.TestCase):
    """Real model, tiny config. The reference runs are shared by the tests."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp(prefix="training_test_")
        # Straight: 2 epochs. Resumed: 1 epoch, then the same command extended to 2.
        cls.straight_dir = os.path.join(cls.root, "straight")
        cls.straight = train_and_evaluate(_tiny_run_config(), cls.straight_dir)
        cls.resumed_dir = os.path.join(cls.root, "resumed")
        cls.first_half = train_and_evaluate(_tiny_run_config(num_epochs=1), cls.resumed_dir)
        cls.one_epoch = _latest_params(cls.resumed_dir)
        cls.one_epoch_dir = os.path.join(cls.root, "one_epoch")
        shutil.copytree(cls.resumed_dir, cls.one_epoch_dir)
        cls.resumed = train_and_evaluate(_tiny_run_config(), cls.resumed_dir)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)
        super().tearDownClass()

    def test_straight_run_outputs(self):
        result = self.straight
        self.assertEqual(result["step"], 6)
        self.assertFalse(result["interrupted"])
        self.assertBetween(result["test_accuracy"], 0.0, 1.0)
        self.assertEqual(result["best_test_accuracy"], max(result["best_test_accuracy"], 0))
        self.assertIn(result["best_epoch"], (1, 2))
        self.assertTrue(np.isfinite(result["train_loss"]))
        self.assertRegex(
            summary_line(result),
            r"test accuracy: \d\.\d{4} \(last epoch\) \| best \d\.\d{4} at epoch \d "
            r"\(selected on the test set",
        )
        for name in ("config.json", METRICS_FILE, CURVES_FILE):
            self.assertTrue(os.path.exists(os.path.join(self.straight_dir, name)), name)
        with open(os.path.join(self.straight_dir, METRICS_FILE)) as f:
            records = [json.loads(line) for line in f]
        epochs = [r for r in records if r["kind"] == "epoch"]
        self.assertEqual([r["epoch"] for r in epochs], [1, 2])
        self.assertEqual([r["step"] for r in records if r["kind"] == "train"], list(range(1, 7)))
        self.assertAlmostEqual(epochs[1]["test_accuracy"], result["test_accuracy"])
        np.testing.assert_allclose([r["learning_rate"] for r in epochs], [2e-3, 2e-4], rtol=1e-6)
        # Latest and best kept; nothing else.
        steps = checkpointing.all_steps(self.straight_dir)
        self.assertIn(6, steps)
        self.assertLessEqual(len(steps), 2)

    def test_resumed_run_is_bitwise_identical(self):
        self.assertEqual(self.first_half["step"], 3)
        self.assertEqual(self.resumed["step"], 6)
        chex.assert_trees_all_equal(
            _latest_params(self.straight_dir), _latest_params(self.resumed_dir)
        )
        self.assertEqual(self.straight["test_accuracy"], self.resumed["test_accuracy"])
        self.assertEqual(self.straight["train_loss"], self.resumed["train_loss"])

    def test_rerunning_a_finished_run_changes_nothing(self):
        workdir = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), "copy")
        shutil.copytree(self.straight_dir, workdir)
        result = train_and_evaluate(_tiny_run_config(), workdir)
        self.assertEqual(result["step"], 6)
        self.assertEqual(result["test_accuracy"], self.straight["test_accuracy"])
        chex.assert_trees_all_equal(_latest_params(workdir), _latest_params(self.straight_dir))

    def test_incompatible_config_is_refused_and_nothing_overwritten(self):
        workdir = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), "copy")
        shutil.copytree(self.straight_dir, workdir)
        before = {
            name: open(os.path.join(workdir, name), "rb").read()
            for name in ("config.json", METRICS_FILE)
        }
        steps = checkpointing.all_steps(workdir)
        config = _tiny_run_config(learning_rate=0.1)
        config.model.n = 8
        with self.assertRaisesRegex(checkpointing.IncompatibleWorkdirError, "learning_rate") as e:
            train_and_evaluate(config, workdir)
        self.assertIn("model.n: 4 in the workdir, 8 requested", str(e.exception))
        for name, content in before.items():
            self.assertEqual(open(os.path.join(workdir, name), "rb").read(), content)
        self.assertEqual(checkpointing.all_steps(workdir), steps)

    def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(self):
        workdir = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), "nan")
        shutil.copytree(self.one_epoch_dir, workdir)
        config = _tiny_run_config()
        images, labels = load_split(config, "train", config.num_train_examples)
        images = images.copy()
        images[17] = np.nan  # Seen in epoch 2 at position p of its permutation:
        position = int(np.argmax(np.random.default_rng((config.seed, 1)).permutation(80) == 17))
        step = 3 + position // config.batch_size + 1

        def poisoned(config, split, limit):
            return (images, labels) if split == "train" else load_split(config, split, limit)

        with mock.patch("neural_epdo_jax.train.loop.load_split", poisoned):
            with self.assertRaisesRegex(
                NonFiniteLossError, rf"at step {step} \(epoch 2, batch {step - 3}/3"
            ):
                train_and_evaluate(config, workdir)
        self.assertEqual(checkpointing.all_steps(workdir), [3])
        chex.assert_trees_all_equal(_latest_params(workdir), self.one_epoch)

    def test_unreadable_latest_checkpoint_resumes_from_the_earlier_one(self):
        workdir = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), "corrupt")
        shutil.copytree(self.straight_dir, workdir)
        directory = checkpointing.checkpoint_dir(workdir)
        shutil.rmtree(os.path.join(directory, "3"), ignore_errors=True)
        shutil.copytree(os.path.join(self.one_epoch_dir, "checkpoints", "3"), os.path.join(directory, "3"))  # fmt: skip
        data = os.path.join(directory, "6", "state", "ocdbt.process_0", "d")
        for name in os.listdir(data):  # every data file: which holds what is orbax's affair
            with open(os.path.join(data, name), "r+b") as f:
                f.truncate(os.path.getsize(os.path.join(data, name)) // 2)
        with self.assertLogs("absl", level="WARNING") as logs:
            result = train_and_evaluate(_tiny_run_config(), workdir)
        moved = os.path.join(workdir, checkpointing.UNREADABLE_DIR, "6")
        (warning,) = [line for line in logs.output if "cannot be read" in line]
        self.assertIn("checkpoint step 6 cannot be read (ValueError: ", warning)
        self.assertIn(f"It was moved to {moved}; once inspected, remove it with: rm -r {moved}", warning)  # fmt: skip
        self.assertTrue(os.path.isdir(moved))  # kept, not deleted
        self.assertEqual(result["step"], 6)
        chex.assert_trees_all_equal(_latest_params(workdir), _latest_params(self.straight_dir))

    def test_no_readable_checkpoint_never_starts_afresh(self):
        workdir = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), "corrupt")
        shutil.copytree(self.straight_dir, workdir)
        for step in checkpointing.all_steps(workdir):
            os.remove(os.path.join(checkpointing.checkpoint_dir(workdir), str(step), "state", "_METADATA"))  # fmt: skip
        steps = checkpointing.all_steps(workdir)
        with self.assertRaisesRegex(checkpointing.UnreadableWorkdirError, "state/_METADATA is missing"):  # fmt: skip
            train_and_evaluate(_tiny_run_config(), workdir)
        self.assertEqual(checkpointing.all_steps(workdir), steps)

    def test_sigterm_then_kill_9_then_resume_is_bitwise_identical(self):
        epochs, root = 5, self.enter_context(tempfile.TemporaryDirectory())
        reference_dir = os.path.join(root, "reference")
        shutil.copytree(self.straight_dir, reference_dir)
        train_and_evaluate(_tiny_run_config(num_epochs=epochs), reference_dir)

        workdir = os.path.join(root, "interrupted")
        command = _train_command(workdir, f"--config.num_epochs={epochs}")

        def run_until(min_step, signum):
            proc = subprocess.Popen(
                command, cwd=REPO, env=_subprocess_env(), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            deadline = time.time() + 120
            while _max_logged_step(workdir) < min_step and proc.poll() is None:
                self.assertLess(time.time(), deadline, "the training subprocess stalled")
                time.sleep(0.002)
            proc.send_signal(signum)
            output, _ = proc.communicate(timeout=120)
            return proc.returncode, output

        # SIGTERM: the current step finishes, is saved (mid-epoch), the process exits with
        # 128 + 15 (a scheduler requeues it) and says how to resume.
        returncode, output = run_until(2, signal.SIGTERM)
        self.assertEqual(returncode, 128 + signal.SIGTERM, output)
        self.assertIn("stopped by SIGTERM", output)
        last = output.strip().splitlines()[-1]
        self.assertIn("To resume, rerun: python ", last)
        self.assertIn(f"--workdir={workdir}", last)
        stopped_at = max(checkpointing.all_steps(workdir))
        self.assertGreaterEqual(stopped_at, 2)
        self.assertLess(stopped_at, 3 * epochs)

        # kill -9 a resumed run a few steps later: at most the unfinished epoch is lost.
        returncode, output = run_until(stopped_at + 5, signal.SIGKILL)
        self.assertEqual(returncode, -signal.SIGKILL, f"finished before the kill:\n{output}")
        killed_at = _max_logged_step(workdir)
        self.assertGreaterEqual(max(checkpointing.all_steps(workdir)), killed_at - 2 * 3)

        result = train_and_evaluate(_tiny_run_config(num_epochs=epochs), workdir)
        self.assertEqual(result["step"], 3 * epochs)
        chex.assert_trees_all_equal(_latest_params(workdir), _latest_params(reference_dir))
        with open(os.path.join(workdir, METRICS_FILE)) as f:
            records = [json.loads(line) for line in f]
        epochs_logged = [r["epoch"] for r in records if r["kind"] == "epoch"]
        self.assertEqual(epochs_logged, list(range(1, epochs + 1)))

    def test_two_devices_match_one_device(self):
        root = self.enter_context(tempfile.TemporaryDirectory())
        workdir, cache = os.path.join(root, "two_devices"), os.path.join(root, "cache")
        env = _subprocess_env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        del env["JAX_COMPILATION_CACHE_DIR"]  # train.py's --compilation_cache_dir, tested here
        proc = subprocess.run(
            _train_command(
                workdir,
                "--config.num_epochs=1",
                "--cpu_devices=2",
                f"--compilation_cache_dir={cache}",
            ),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertNotEqual(os.listdir(cache), [])  # the compiled steps were kept
        self.assertIn("2 device(s)", proc.stdout + proc.stderr)
        self.assertIn("test accuracy:", proc.stdout)
        # Same data, augmentation and dropout draws; only float summation order differs.
        one_records, two_records = _records(self.one_epoch_dir), _records(workdir)
        self.assertEqual([r["step"] for r in two_records], [r["step"] for r in one_records])
        for one, two in zip(one_records, two_records):
            np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=1e-3)
        self.assertAlmostEqual(two_records[-1]["test_loss"], one_records[-1]["test_loss"], 2)
        # BatchNorm statistics are over the global batch (per-device ones would differ by far
        # more). Parameters: Adam moves an element with a near-zero gradient by about +-lr
        # whatever its rounding, so they agree only to a few steps' learning rate.
        two_params, two_stats, two_step = _latest_params(workdir)
        self.assertEqual(two_step, 3)
        chex.assert_trees_all_close(two_stats, self.one_epoch[1], rtol=1e-2, atol=2e-3)
        chex.assert_trees_all_close(two_params, self.one_epoch[0], atol=3 * 2 * 2e-3)

    def test_use_compilation_cache(self):
        current = jax.config.jax_compilation_cache_dir
        self.assertEqual(use_compilation_cache("/elsewhere"), current)  # set: kept
        try:
            jax.config.update("jax_compilation_cache_dir", None)
            self.assertIsNone(use_compilation_cache(""))
            self.assertIsNone(jax.config.jax_compilation_cache_dir)
            default = default_compilation_cache_dir()
            self.assertEqual(use_compilation_cache(None), default)
            jax.config.update("jax_compilation_cache_dir", None)
            self.assertEqual(use_compilation_cache("~/x"), os.path.expanduser("~/x"))
        finally:
            jax.config.update("jax_compilation_cache_dir", current)

    def test_bfloat16_activations_stay_close_to_float32(self):
        config = _tiny_run_config()
        images, labels = load_split(config, "train", config.batch_size)
        batch = {"image": images, "label": labels, "mask": np.ones(len(labels), np.float32)}
        losses = {}
        for dtype in ("float32", "bfloat16"):
            config.dtype = dtype
            model = create_model(config)
            tx = create_optimizer(config, create_learning_rate_schedule(config, 3))
            state = create_train_state(jax.random.key(0), model, tx, (28, 28, 1))
            # Committed as in training: float32 reuses the end-to-end runs' compiled step.
            state = jax.device_put(state, jax.local_devices()[0])
            train_fn, _ = jit_steps(config, 3, None)
            new_state, metrics = train_fn(state, batch, jax.random.key(1))
            self.assertTrue(bool(metrics["finite"]))
            chex.assert_trees_all_equal_dtypes(new_state.params, state.params)  # float32
            losses[dtype] = float(metrics["loss"]) / len(labels)
        np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.05)


if __name__ == "__main__":
    absltest.main()
