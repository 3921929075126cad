"""Tests of neural_epdo_jax.tools.evaluate on a workdir with hand-made checkpoints (no training)."""

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

import chex
import jax
import numpy as np
from absl.testing import absltest

from configs import test as test_config
from neural_epdo_jax.tools import evaluate
from neural_epdo_jax.train import checkpointing
from neural_epdo_jax.train.state import (
    create_learning_rate_schedule,
    create_model,
    create_optimizer,
    create_train_state,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args):
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


class EvaluateTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp(prefix="evaluate_test_")
        cls.workdir = os.path.join(cls.root, "run")
        config = test_config.get_config()
        model = create_model(config)
        tx = create_optimizer(config, create_learning_rate_schedule(config, 3))
        state = create_train_state(jax.random.key(0), model, tx, (28, 28, 1))
        checkpointing.check_and_save_config(config, cls.workdir)
        manager = checkpointing.create_manager(cls.workdir)
        # Best: the initial parameters (step 3). Latest: scaled ones (step 6), worse on test.
        cls.best_params = state.params
        checkpointing.save(manager, 3, state.replace(step=3), {}, test_accuracy=0.9)
        scaled = jax.tree.map(lambda x: -3.0 * x, state.params)
        checkpointing.save(manager, 6, state.replace(step=6, params=scaled), {}, test_accuracy=0.1)
        manager.close()
        cls.result = evaluate.run(cls.workdir)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)
        super().tearDownClass()

    def test_loads_best_or_latest(self):
        _, state, step, which = evaluate.load_state(self.workdir)
        self.assertEqual((step, which), (3, "best"))
        chex.assert_trees_all_equal(state.params, self.best_params)
        _, state, step, which = evaluate.load_state(self.workdir, "latest")
        self.assertEqual((step, which), (6, "latest"))
        with self.assertRaisesRegex(ValueError, "best.*latest"):
            evaluate.load_state(self.workdir, "first")

    def test_best_falls_back_to_latest_without_test_metrics(self):
        workdir = os.path.join(self.root, "no_metrics")
        config, state, _, _ = evaluate.load_state(self.workdir, "latest")
        checkpointing.check_and_save_config(test_config.get_config(), workdir)
        manager = checkpointing.create_manager(workdir)
        checkpointing.save(manager, 2, state.replace(step=2), {})  # Mid-epoch: no test metric.
        manager.close()
        self.assertEqual(evaluate.load_state(workdir)[2:], (2, "latest"))

    def test_rotation_sweep_every_7_5_degrees(self):
        result = self.result
        self.assertEqual(result["checkpoint"], "best")
        self.assertEqual(result["num_examples"], 50)
        np.testing.assert_allclose(result["angles_degrees"], np.arange(48) * 7.5)
        self.assertLen(result["rotated_accuracy"], 48)
        # No rotation is the identity; quarter turns are exact on the grid and the C4 model is
        # invariant to them (up to float rounding: at most one of the 50 predictions flips).
        self.assertEqual(result["rotated_accuracy"][0], result["test_accuracy"])
        for quarter in (12, 24, 36):
            self.assertLessEqual(
                abs(result["rotated_accuracy"][quarter] - result["test_accuracy"]), 1 / 50
            )
        with open(os.path.join(self.workdir, evaluate.SWEEP_JSON)) as f:
            self.assertEqual(json.load(f), json.loads(json.dumps(result)))
        self.assertGreater(os.path.getsize(os.path.join(self.workdir, evaluate.SWEEP_PNG)), 1000)

    def test_sweep_angles(self):
        np.testing.assert_allclose(evaluate.sweep_angles(90), [0, 90, 180, 270])
        with self.assertRaises(ValueError):
            evaluate.sweep_angles(0)

    def test_no_checkpoint_is_a_clear_error(self):
        empty = os.path.join(self.root, "empty")
        os.makedirs(empty)
        with self.assertRaisesRegex(checkpointing.NoCheckpointError, "no checkpoint"):
            evaluate.load_state(empty)
        for command in (
            ["-m", "neural_epdo_jax.tools.evaluate", f"--workdir={empty}"],
            ["train.py", "--mode=eval", f"--workdir={empty}"],
        ):
            proc = _run(*command)
            self.assertNotEqual(proc.returncode, 0)
            self.assertIn("holds no checkpoint; train first", proc.stderr)
            self.assertNotIn("Traceback", proc.stderr)

    def _copy(self, name):
        workdir = os.path.join(self.root, name)
        shutil.copytree(self.workdir, workdir)
        return workdir

    def test_unreadable_latest_falls_back_with_a_warning(self):
        truncated, metadata = self._copy("truncated"), self._copy("metadata")
        state = os.path.join(checkpointing.checkpoint_dir(truncated), "6", "state")
        for path in glob.glob(os.path.join(state, "**", "d", "*"), recursive=True):
            with open(path, "r+b") as f:  # every data file: which holds what is orbax's affair
                f.truncate(os.path.getsize(path) // 2)
        step6 = os.path.join(checkpointing.checkpoint_dir(metadata), "6")
        open(os.path.join(step6, "_CHECKPOINT_METADATA"), "w").close()
        os.remove(os.path.join(step6, "state", "_METADATA"))
        for workdir, reason in ((truncated, "ValueError: "), (metadata, "_CHECKPOINT_METADATA")):
            with self.assertLogs("absl", level="WARNING") as logs:
                _, state, step, which = evaluate.load_state(workdir, "latest")
            self.assertEqual((step, which), (3, "latest readable"))
            chex.assert_trees_all_equal(state.params, self.best_params)
            (warning,) = [line for line in logs.output if "cannot be read" in line]
            self.assertIn(f"checkpoint step 6 cannot be read ({reason}", warning)
            self.assertIn(f"rm -r {checkpointing.checkpoint_dir(workdir)}/6", warning)
            self.assertNotIn("\n", warning)
            self.assertEqual(checkpointing.all_steps(workdir), [3, 6])  # nothing deleted

    def test_no_readable_checkpoint_is_a_one_line_error(self):
        workdir = self._copy("unreadable")
        for step in (3, 6):
            os.remove(
                os.path.join(checkpointing.checkpoint_dir(workdir), str(step), "state", "_METADATA")
            )
        with self.assertRaisesRegex(
            checkpointing.UnreadableWorkdirError, r"step 6: state/_METADATA is missing; step 3"
        ):
            evaluate.load_state(workdir, "latest")
        proc = _run(
            "-m", "neural_epdo_jax.tools.evaluate", f"--workdir={workdir}", "--checkpoint=latest"
        )
        self.assertEqual(proc.returncode, 1)
        self.assertRegex(
            proc.stderr.strip().splitlines()[-1],
            "^evaluate: error: no checkpoint in .* can be read",
        )
        self.assertNotIn("Traceback", proc.stderr)

    def test_truncated_config_json_is_named(self):
        workdir = self._copy("bad_config")
        path = os.path.join(workdir, checkpointing.CONFIG_FILE)
        with open(path, "r+") as f:
            f.truncate(100)
        with self.assertRaisesRegex(
            checkpointing.UnreadableWorkdirError, f"{path} is not valid JSON"
        ):
            evaluate.load_state(workdir)
        with self.assertRaisesRegex(
            checkpointing.UnreadableWorkdirError, f"{path} is not valid JSON"
        ):
            checkpointing.check_and_save_config(test_config.get_config(), workdir)

    def test_command_line(self):
        workdir = os.path.join(self.root, "command_line")
        shutil.copytree(self.workdir, workdir)
        proc = _run(
            "-m",
            "neural_epdo_jax.tools.evaluate",
            f"--workdir={workdir}",
            "--checkpoint=latest",
            "--angle_step_degrees=90",
            "--num_test_examples=20",
        )
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("latest checkpoint (step 6)", proc.stdout)
        self.assertIn("rotation (deg) | test accuracy", proc.stdout)
        self.assertLen([line for line in proc.stdout.splitlines() if " | 0." in line or " | 1." in line], 4)  # fmt: skip


if __name__ == "__main__":
    absltest.main()
