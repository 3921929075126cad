"""Tests for runtime.parallel and the data-parallel steps (`train.steps.jit_data_parallel`).

The two-device checks run in a subprocess: JAX fixes its CPU devices when it starts, and the
test process has one.
"""

import os
import subprocess
import sys
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from neural_epdo_jax.runtime import parallel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# One training step (SGD, so that the update shows the gradient's scale; bilinear
# augmentation and dropout on; a padded batch) and one evaluation on one device and on two.
_TWO_DEVICES = r"""
import sys
sys.path.insert(0, {repo!r})
from neural_epdo_jax.runtime import parallel
assert parallel.use_cpu_cores(2) == 2
import jax, jax.numpy as jnp, numpy as np, optax
from configs import test as test_config
from neural_epdo_jax.train.state import create_model, create_train_state
from neural_epdo_jax.train.steps import eval_step, jit_data_parallel, replicated, train_step
from neural_epdo_jax.data import pipeline

config = test_config.get_config()
sharding = pipeline.data_mesh_sharding((8,))
assert sharding is not None and sharding.mesh.size == 2, sharding
rng = np.random.default_rng(0)
batch = {{
    "image": rng.random((8, 28, 28, 1), dtype=np.float32),
    "label": rng.integers(0, 10, 8).astype(np.int32),
    "mask": np.array([1] * 6 + [0] * 2, np.float32),
}}

def step(state, batch, rng, axis_name=None):
    return train_step(state, batch, rng, augmentation="bilinear", axis_name=axis_name)

def run(shard, axis_name):
    model = create_model(config, axis_name=axis_name)
    state = create_train_state(jax.random.key(0), model, optax.sgd(0.1), (28, 28, 1))
    b = batch if shard is None else jax.device_put(batch, shard)
    new, metrics = jit_data_parallel(step, shard)(state, b, jax.random.key(1))
    sums = jit_data_parallel(eval_step, shard)(new, b)
    update = jax.tree.map(jnp.subtract, new.params, state.params)
    return update, new.batch_stats, metrics, sums

def worst(a, b):
    # relative L2 error over all leaves (single leaves can be round-off: a BatchNorm bias
    # before the global max pooling gets a gradient of 1e-8)
    diff = sum(float(jnp.sum(jnp.square(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    ref = sum(float(jnp.sum(jnp.square(y))) for y in jax.tree.leaves(b))
    return (diff / ref) ** 0.5

one = run(None, None)
two = run(sharding, "data")
print("update", worst(two[0], one[0]))
print("stats", worst(two[1], one[1]))
print("loss", abs(float(two[2]["loss"]) / float(one[2]["loss"]) - 1))
print("eval_loss", abs(float(two[3]["loss"]) / float(one[3]["loss"]) - 1))
print("count", float(two[2]["count"]), float(two[3]["count"]))
# A model built without the axis is refused: its BatchNorm statistics would be per device.
try:
    run(sharding, None)
except ValueError as e:
    print("refused:", str(e).splitlines()[0][:80])
# No retracing: one trace of the data-parallel step over an epoch whose last batch is padded.
import chex
counted = chex.assert_max_traces(step, n=1)
model = create_model(config, axis_name="data")
state = create_train_state(jax.random.key(0), model, optax.sgd(0.1), (28, 28, 1))
state = jax.device_put(state, replicated(sharding))
train_fn = jit_data_parallel(counted, sharding, donate_state=True)
images = rng.random((20, 28, 28, 1), dtype=np.float32)
labels = rng.integers(0, 10, 20).astype(np.int32)
epoch = list(pipeline.epoch_batches(images, labels, 8, shuffle=True, sharding=sharding))
for b in epoch:
    state, metrics = train_fn(state, b, jax.random.key(1))
print("steps", len(epoch), float(metrics["count"]))
# Control: the step run per device without the axis (statistics and draws per device).
model = create_model(config)
state = create_train_state(jax.random.key(0), model, optax.sgd(0.1), (28, 28, 1))
per_device = jax.jit(jax.shard_map(
    lambda s, b, r: train_step(s, b, r, augmentation="bilinear") [1]["loss"][None],
    mesh=sharding.mesh, in_specs=(jax.P(), jax.P("data"), jax.P()), out_specs=jax.P("data"),
    check_vma=False))
loss = float(jnp.sum(per_device(state, jax.device_put(batch, sharding), jax.random.key(1))))
print("control_loss", abs(loss / float(one[2]["loss"]) - 1))
"""


class ParallelTest(absltest.TestCase):
    def test_mesh_size(self):
        self.assertEqual(parallel.mesh_size(2, (64, 256)), 2)
        self.assertEqual(parallel.mesh_size(3, (64, 256)), 2)
        self.assertEqual(parallel.mesh_size(8, (64, 20)), 4)
        self.assertEqual(parallel.mesh_size(4, (7,)), 1)
        self.assertEqual(parallel.mesh_size(6, ()), 6)

    def test_batch_rows_without_axis_is_the_draw(self):
        draw = lambda n: jnp.arange(n)
        np.testing.assert_array_equal(parallel.batch_rows(draw, 5, None), np.arange(5))
        self.assertEqual(parallel.total(3.0, None), 3.0)

    def test_batch_rows_inside_a_map_are_the_global_draw(self):
        key = jax.random.key(0)
        draw = lambda n: jax.random.uniform(key, (n, 3))
        rows = jax.vmap(lambda _: parallel.batch_rows(draw, 2, "d"), axis_name="d")(
            jnp.zeros(4)
        )  # 4 "devices" with 2 rows each
        np.testing.assert_array_equal(rows.reshape(8, 3), draw(8))

    def test_use_cpu_cores_after_start(self):
        jax.devices()  # JAX has started: nothing changes, a requested count warns.
        self.assertIsNone(parallel.use_cpu_cores(0))
        with self.assertWarnsRegex(UserWarning, "already started"):
            self.assertIsNone(parallel.use_cpu_cores(3))
        with self.assertRaisesRegex(ValueError, "num_devices"):
            parallel.use_cpu_cores(-1)

    def test_memory_optimised_scheduler_flag(self):
        # Added once, after the user's flags; a scheduler the user chose wins. (The subprocess
        # of test_two_devices_match_one_device runs with it: XLA accepts the flag.)
        with mock.patch.dict(os.environ, {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}):
            self.assertTrue(parallel.use_memory_optimised_scheduler())
            want = "--xla_dump_to=/tmp/x " + parallel.CPU_SCHEDULER_FLAG
            self.assertEqual(os.environ["XLA_FLAGS"], want)
            self.assertFalse(parallel.use_memory_optimised_scheduler())
            self.assertEqual(os.environ["XLA_FLAGS"], want)
        mine = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"
        with mock.patch.dict(os.environ, {"XLA_FLAGS": mine}):
            self.assertFalse(parallel.use_memory_optimised_scheduler())
            self.assertEqual(os.environ["XLA_FLAGS"], mine)
        with mock.patch.dict(os.environ, clear=True):
            parallel.use_memory_optimised_scheduler()
            self.assertEqual(os.environ["XLA_FLAGS"], parallel.CPU_SCHEDULER_FLAG)

    def test_compiler_options(self):
        # On CPU: the caller's options plus CPU_CODEGEN_OPTIONS (the caller's win); elsewhere
        # the caller's alone; a fresh dict each time.
        self.assertEqual(
            parallel.compiler_options("cpu", xla_backend_optimization_level=0),
            {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 0},
        )
        self.assertEqual(
            parallel.compiler_options("cpu", xla_cpu_use_fusion_emitters=True),
            {"xla_cpu_use_fusion_emitters": True},
        )
        self.assertEqual(
            parallel.compiler_options("gpu", xla_backend_optimization_level=0),
            {"xla_backend_optimization_level": 0},
        )
        self.assertEqual(
            parallel.compiler_options(), parallel.compiler_options(jax.default_backend())
        )
        parallel.compiler_options("cpu")["xla_cpu_use_fusion_emitters"] = True
        self.assertFalse(parallel.CPU_CODEGEN_OPTIONS["xla_cpu_use_fusion_emitters"])

    def test_xla_accepts_the_cpu_codegen_options(self):
        # XLA rejects an option it does not know (the control), so a jax upgrade that drops
        # one fails here; with them a loop fusion computes what XLA's default emitter does.
        f = lambda x: jnp.tanh(x) * 2.0 + jnp.exp(-x)
        x = jnp.linspace(-3.0, 3.0, 1000).reshape(10, 100)
        with self.assertRaisesRegex(Exception, "No such compile option"):
            jax.jit(f, compiler_options={"xla_no_such_option_here": True}).lower(x).compile()
        ours = jax.jit(f, compiler_options=parallel.compiler_options("cpu"))
        np.testing.assert_allclose(ours(x), jax.jit(f)(x), rtol=1e-6)

    def test_two_devices_match_one_device(self):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(
            JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir
        )
        tmp = self.enter_context(tempfile.TemporaryDirectory())
        script = os.path.join(tmp, "two_devices.py")
        with open(script, "w") as f:  # a file: chex.assert_max_traces reads its source
            f.write(_TWO_DEVICES.format(repo=REPO))
        proc = subprocess.run(
            [sys.executable, script],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        values = {}
        for line in proc.stdout.splitlines():
            key, _, rest = line.partition(" ")
            values[key] = rest
        # The same augmentation angles, dropout masks, BatchNorm statistics (over the whole
        # padded batch, padding excluded) and gradient scale: equal up to summation order.
        self.assertLess(float(values["update"]), 1e-4, proc.stdout)
        self.assertLess(float(values["stats"]), 1e-5, proc.stdout)
        self.assertLess(float(values["loss"]), 1e-5, proc.stdout)
        self.assertLess(float(values["eval_loss"]), 1e-5, proc.stdout)
        self.assertEqual(values["count"], "6.0 6.0")
        self.assertEqual(values["steps"], "3 4.0")  # traced once (else assert_max_traces raises)
        self.assertIn("refused: train_step(axis_name='data')", proc.stdout)
        # Control: per-device BatchNorm statistics change the loss by far more.
        self.assertGreater(float(values["control_loss"]), 1e-3, proc.stdout)


if __name__ == "__main__":
    absltest.main()
