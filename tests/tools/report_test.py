"""The equivariance and robustness report, end to end on a hand-made tiny checkpoint."""

import contextlib
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
from absl.testing import absltest

from configs import test as test_config
from neural_epdo_jax.tools import evaluate, export, report
from neural_epdo_jax.train import checkpointing
from neural_epdo_jax.train.loop import load_split
from neural_epdo_jax.train.state import (
    abstract_train_state,
    create_learning_rate_schedule,
    create_model,
    create_optimizer,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config():
    """configs/test.py (3x3 stencils of order 2, two fields per block) on D8: blocks 1-5
    D8 (mirrors), block 6 C8 after the restriction, and odd multiples of 45 degrees that are
    only interpolated."""
    config = test_config.get_config()
    config.model.n = 8
    config.model.flip = True
    config.model.g = 2
    config.model.s = 1
    config.num_test_examples = 40
    config.eval_batch_size = 20
    return config


def make_workdir(workdir):
    """A workdir as training leaves it (config.json, an orbax checkpoint of a TrainState),
    with random coefficients and BatchNorm statistics calibrated on test images (what
    training converges to), built without compiling a train step."""
    config = tiny_config()
    model = create_model(config)
    tx = create_optimizer(config, create_learning_rate_schedule(config, 3))
    abstract = abstract_train_state(model, tx, (28, 28, 1))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    params = jax.tree.map(
        lambda s: (rng.standard_normal(s.shape) / np.sqrt(max(s.shape[0], 1))).astype(s.dtype),
        abstract.params,
    )
    stats = {
        name: {"mean": np.zeros_like(bn["mean"]), "var": np.ones_like(bn["var"])}
        for name, bn in state.batch_stats.items()
    }
    images, _ = load_split(config, config.test_split, 16)

    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def batch_statistics(params, old, x):
        variables = {"params": params, "batch_stats": old}
        _, new = model.clone(dropout=0.0).apply(variables, x, train=True, mutable=["batch_stats"])
        return jax.tree.map(lambda o, n: (n - 0.9 * o) / 0.1, old, new["batch_stats"])

    stats = batch_statistics(params, stats, images)
    state = state.replace(params=params, batch_stats=stats, step=6, apply_fn=model.apply, tx=tx)
    checkpointing.check_and_save_config(config, workdir)
    manager = checkpointing.create_manager(workdir)
    checkpointing.save(manager, 6, state, {}, test_accuracy=0.1)
    manager.close()


class ReportTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp(prefix="report_test_")
        cls.workdir = os.path.join(cls.root, "run")
        make_workdir(cls.workdir)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            cls.report = report.make_report(
                cls.workdir, num_images=20, num_equivariance_images=2, angle_step_degrees=45
            )
        cls.stdout = out.getvalue()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)
        super().tearDownClass()

    def test_layers_and_groups(self):
        rows = self.report["equivariance"]
        self.assertEqual(
            [r["layer"] for r in rows], [f"block{i}" for i in range(1, 7)] + ["logits"]
        )
        self.assertEqual([r["group"] for r in rows], ["D8"] * 5 + ["C8", "C8"])
        self.assertEqual(rows[0]["shape"], [28, 28, 32])  # 2 fields x regular D8
        self.assertEqual(rows[5]["shape"], [7, 7, 32])  # 4 fields x regular C8
        for row in rows:
            self.assertEqual([r["k"] for r in row["rotations"]], list(range(1, 8)))
            self.assertEqual(
                [r["exact"] for r in row["rotations"]], [k % 2 == 0 for k in range(1, 8)]
            )
            self.assertLen(row["mirrors"], 4 if row["group"] == "D8" else 0)

    def test_exact_elements_are_equivariant_and_the_control_is_not(self):
        for row in self.report["equivariance"]:
            exact = [r["error"] for r in row["rotations"] if r["exact"]]
            exact += [m["error"] for m in row["mirrors"]]
            self.assertLess(max(exact), 1e-4, row["layer"])
            if row["layer"] != "logits":
                self.assertGreater(row["space_only_control"], 1e-2, row["layer"])

    def test_interpolated_rotations_are_measured(self):
        # Bilinear interpolation on both sides: not zero, but far from an unrelated map
        # (relative error ~1.4). The bound is loose on purpose: a measurement, not a guarantee.
        for row in self.report["equivariance"]:
            interp = [r["error"] for r in row["rotations"] if not r["exact"]]
            self.assertTrue(np.all(np.isfinite(interp)))
            self.assertGreater(min(interp), 1e-4, row["layer"])
        block1 = self.report["equivariance"][0]
        self.assertLess(max(r["error"] for r in block1["rotations"]), 0.5)

    def test_rotation_sweep(self):
        rot = self.report["rotation"]
        self.assertEqual(rot["angles_degrees"], [45.0 * i for i in range(8)])
        self.assertEqual(rot["agreement"][0], 1.0)
        self.assertEqual(rot["logit_change_max"][0], 0.0)
        for i in (2, 4, 6):  # 90, 180, 270 degrees: exact on the grid
            self.assertEqual(rot["agreement"][i], 1.0)
            self.assertLess(rot["logit_change_max"][i], 1e-4)
            self.assertAlmostEqual(rot["accuracy"][i], rot["accuracy"][0])
        self.assertGreater(max(rot["logit_change_mean"][1::2]), 1e-4)  # interpolated
        self.assertEqual(self.report["num_images"], 20)

    def test_outputs(self):
        with open(os.path.join(self.workdir, report.REPORT_JSON)) as f:
            self.assertEqual(json.load(f), json.loads(json.dumps(self.report)))
        for name in (report.EQUIVARIANCE_PNG, report.ROTATION_PNG):
            with open(os.path.join(self.workdir, name), "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        self.assertIn("block6", self.stdout)
        self.assertIn("interp mean", self.stdout)
        self.assertIn("agreement", self.stdout)

    def test_export_checkpoint(self):
        path = os.path.join(self.root, "model.jax")
        frozen = export.export_checkpoint(self.workdir, path)
        self.assertIn("step 6", frozen.source)
        x, _ = load_split(tiny_config(), "test", 3)
        np.testing.assert_allclose(export.load(path)(x), frozen(x), rtol=1e-5, atol=1e-6)
        with self.assertRaises(checkpointing.NoCheckpointError):
            export.export_checkpoint(os.path.join(self.root, "missing"), path)

    def test_workdir_without_checkpoints(self):
        empty = os.path.join(self.root, "empty")
        os.makedirs(empty)
        with self.assertRaisesRegex(checkpointing.NoCheckpointError, "no checkpoint"):
            report.make_report(empty)
        with self.assertRaisesRegex(checkpointing.NoCheckpointError, "does not exist"):
            report.make_report(os.path.join(self.root, "missing"))
        with self.assertRaisesRegex(ValueError, "num_images"):
            report.make_report(self.workdir, num_images=0)
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env["JAX_PLATFORMS"] = "cpu"
        result = subprocess.run(
            [sys.executable, "-m", "neural_epdo_jax.tools.report", f"--workdir={empty}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("report: error:", result.stderr)
        self.assertIn("no checkpoint", result.stderr)

    def test_default_images_are_the_runs_test_set(self):
        # The 0-degree accuracy is evaluate's test accuracy (the config's 40 test images).
        result = report.make_report(
            self.workdir,
            num_equivariance_images=1,
            angle_step_degrees=180,
            write=False,
            verbose=False,
        )
        self.assertEqual(result["num_images"], tiny_config().num_test_examples)
        with contextlib.redirect_stdout(io.StringIO()):
            evaluated = evaluate.run(self.workdir, angle_step_degrees=360)
        self.assertEqual(evaluated["num_examples"], result["num_images"])
        self.assertAlmostEqual(result["rotation"]["accuracy"][0], evaluated["test_accuracy"])

    def test_uint8_images_are_refused(self):
        images = np.zeros((2, 28, 28, 1), np.uint8)
        with self.assertRaisesRegex(ValueError, r"uint8, not float: scale them to \[0, 1\]"):
            report.rotation_robustness(lambda v, x: x[:, 0, 0], None, images, np.zeros(2), [0.0])

    def test_export_command_line_is_quiet_and_its_errors_name_no_evaluation(self):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env["JAX_PLATFORMS"] = "cpu"
        empty = os.path.join(self.root, "export_empty")
        os.makedirs(empty, exist_ok=True)
        output = os.path.join(self.root, "cli_model.jax")
        runs = [
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "neural_epdo_jax.tools.export",
                    f"--workdir={workdir}",
                    f"--output={output}",
                ],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )  # fmt: skip
            for workdir in (self.workdir, empty)
        ]
        self.assertEqual(runs[0].returncode, 0, runs[0].stderr)
        self.assertIn(f"wrote {output}", runs[0].stdout)
        self.assertEqual(runs[0].stderr.strip(), "")  # no orbax INFO lines
        self.assertEqual(runs[1].returncode, 1)
        self.assertRegex(
            runs[1].stderr.strip(), r"^export: error: .* holds no checkpoint; train first"
        )
        self.assertNotIn("evaluate", runs[1].stderr)


if __name__ == "__main__":
    absltest.main()
