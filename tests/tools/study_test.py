"""Tests of the study runner (neural_epdo_jax.tools.study).

Unit tests build workdirs by hand (metrics written as numbers chosen here) and check the
tables against means and standard deviations worked out by hand. The end-to-end test runs a
tiny study, 2 runs x 2 seeds of configs/test.py plus a run that fails, through the command
line: dry run, a killed run resumed, the failure reported, a rerun that skips what finished,
and --collect_only.
"""

import csv
import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import jax
import ml_collections
from absl.testing import absltest

from neural_epdo_jax.tools import study
from neural_epdo_jax.tools import study_results as results
from neural_epdo_jax.train.state import validate_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env():
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
    )
    return env


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    return path


def _fake_run(workdir, test_accuracies, *, images_per_s=100.0, sweep=None):
    """A workdir as train.py leaves it: one epoch record per test accuracy."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, results.METRICS_FILE), "w") as f:
        for epoch, accuracy in enumerate(test_accuracies, 1):
            record = dict(kind="epoch", epoch=epoch, step=3 * epoch, test_accuracy=accuracy)
            record.update(train_loss=1.0, images_per_s=images_per_s)
            f.write(json.dumps(dict(kind="train", step=3 * epoch - 1)) + "\n")
            f.write(json.dumps(record) + "\n")
    if sweep is not None:
        angles, accuracies = sweep
        with open(os.path.join(workdir, results.SWEEP_JSON), "w") as f:
            json.dump(
                dict(
                    checkpoint="latest",
                    step=3 * len(test_accuracies),
                    angles_degrees=angles,
                    rotated_accuracy=accuracies,
                ),
                f,
            )


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _study(runs, seeds=(0, 1), **extra):
    return study.with_defaults(ml_collections.ConfigDict(dict(runs=runs, seeds=seeds, **extra)))


class HelpersTest(absltest.TestCase):
    def test_override_values_are_the_flags_train_py_parses(self):
        self.assertEqual(study.format_value((8, 8, 12)), "(8, 8, 12)")
        self.assertEqual(study.format_value((0.1,)), "(0.1,)")
        self.assertEqual(study.format_value(False), "False")
        self.assertEqual(study.format_value(1e-2), "0.01")
        self.assertEqual(study.format_value("gauss"), "gauss")
        overrides = study.flatten_overrides(
            {"num_epochs": 1, "model": {"channels": (4, 4, 6, 6, 8, 8), "g": -1}, "model.s": 1}
        )
        self.assertEqual(list(overrides), ["num_epochs", "model.channels", "model.g", "model.s"])
        config = study.load_config("configs/default.py", overrides)
        self.assertEqual(config.model.channels, (4, 4, 6, 6, 8, 8))
        self.assertEqual((config.model.g, config.model.s, config.num_epochs), (-1, 1, 1))
        config = study.load_config("configs/default.py", {"lr_scales": (0.5,), "model.flip": True})
        self.assertEqual((config.lr_scales, config.model.flip), ((0.5,), True))

    def test_bad_studies_fail_before_anything_runs(self):
        root = self.enter_context(tempfile.TemporaryDirectory())
        ok = dict(name="a", config="configs/test.py")
        cases = [
            ([dict(ok, overrides={"model.gg": 2})], "run 0 ('a'): unknown config key"),
            ([dict(ok, overrides={"num_epochs": "two"})], "run 0 ('a'): flag --config.num_epochs"),
            ([dict(ok, overrides={"seed": 3})], "the seed comes from the study's `seeds`"),
            ([ok, ok], "the name 'a' is used twice"),
            ([dict(ok, name="a/b")], "the name must be"),
            ([dict(ok, config="configs/nope.py")], "nope.py"),
            ([dict(ok, extra=1)], "a run is dict(name=..., config=..., overrides=...)"),
        ]
        for runs, message in cases:
            with self.subTest(message):
                with self.assertRaises(study.StudyError) as caught:
                    study.expand(_study(runs), root)
                self.assertIn(message, str(caught.exception))
        with self.assertRaisesRegex(study.StudyError, "unknown study keys"):
            study.expand(_study([ok], sede=1), root)
        with self.assertRaisesRegex(study.StudyError, "repeat a seed"):
            study.expand(_study([ok], seeds=(1, 1)), root)

    def test_error_message_of_a_failed_subprocess(self):
        log = "loading...\ntrain.py: error: invalid config:\n  - model: g=3 is bad\n"
        self.assertEqual(
            study._error_message(log, 1), "train.py: error: invalid config: - model: g=3 is bad"
        )
        traceback = "Traceback (most recent call last):\n  File x\nRuntimeError: boom\n"
        self.assertEqual(study._error_message(traceback, 1), "exit status 1: RuntimeError: boom")
        self.assertEqual(study._error_message("", -9), "killed by signal 9")

    def test_mean_and_std_by_hand(self):
        # 0.90, 0.92, 0.97: mean 0.93; deviations -0.03, -0.01, 0.04; squares sum 0.0026;
        # sample variance 0.0026 / 2 = 0.0013; std sqrt(0.0013) = 0.036056.
        mean, std = results.mean_std([0.90, 0.92, 0.97])
        self.assertAlmostEqual(mean, 0.93, places=12)
        self.assertAlmostEqual(std, 0.0360555127546399, places=12)
        self.assertEqual(results.format_mean_std([0.90, 0.92, 0.97]), "0.9300 ± 0.0361")
        self.assertEqual(results.format_mean_std([0.5]), "0.5000 (1 seed)")
        self.assertEqual(results.format_mean_std([]), "–")
        self.assertEqual(results.format_duration(184.4), "3 min 4 s")
        self.assertAlmostEqual(
            results.quarter_turn_change([0, 90, 180, 270], [0.9, 0.9, 0.88, 0.93]), 0.03
        )
        self.assertIsNone(results.quarter_turn_change([0, 45], [0.9, 0.8]))

    def test_tables_from_hand_written_workdirs(self):
        root = self.enter_context(tempfile.TemporaryDirectory())
        runs = [
            dict(name="good", config="configs/test.py"),
            dict(name="other", config="configs/test.py", overrides={"model.g": 1}),
        ]
        config = _study(runs, seeds=(0, 1, 2), rotation_sweep_degrees=90.0)
        expanded = study.expand(config, root)
        self.assertEqual(
            [(r.name, r.seed) for r in expanded],
            [("good", 0), ("good", 1), ("good", 2), ("other", 0), ("other", 1), ("other", 2)],
        )
        # good: last-epoch accuracies 0.90, 0.92, 0.97; best 0.95 (epoch 1) for seed 1.
        angles = [0.0, 90.0, 180.0, 270.0]
        _fake_run(expanded[0].workdir, [0.80, 0.90], sweep=(angles, [0.9, 0.9, 0.9, 0.9]))
        _fake_run(expanded[1].workdir, [0.95, 0.92], images_per_s=200.0)
        _fake_run(expanded[2].workdir, [0.97, 0.97], sweep=(angles, [0.97, 0.95, 0.97, 0.93]))
        # other: seed 0 finished (0.5); seed 1 stopped after epoch 1; seed 2 failed.
        _fake_run(expanded[3].workdir, [0.4, 0.5])
        _fake_run(expanded[4].workdir, [0.3])
        os.makedirs(expanded[5].workdir)
        study._write_status(expanded[5].workdir, error="train.py: error: boom", wall_time_s=2.0)

        rows = study.collect(config, expanded, root, "toy")
        table = _read_csv(os.path.join(root, results.RESULTS_CSV))
        self.assertEqual(len(table), 6)
        self.assertEqual(list(table[0]), list(results.CSV_FIELDS))
        by_key = {(r["name"], r["seed"]): r for r in table}
        self.assertEqual(
            [by_key["good", s]["last_test_accuracy"] for s in "012"], ["0.9", "0.92", "0.97"]
        )
        self.assertEqual(by_key["good", "1"]["best_test_accuracy"], "0.95")
        self.assertEqual(by_key["good", "1"]["best_epoch"], "1")
        self.assertEqual(by_key["good", "2"]["best_epoch"], "2")  # the latest among ties
        self.assertEqual(by_key["good", "1"]["train_images_per_s"], "200")
        self.assertEqual(by_key["good", "0"]["rotation_quarter_turn_change"], "0")
        self.assertEqual(by_key["good", "2"]["rotation_quarter_turn_change"], "0.04")
        self.assertEqual(
            [by_key["other", s]["status"] for s in "012"], ["finished", "unfinished", "failed"]
        )
        self.assertEqual(by_key["other", "2"]["error"], "train.py: error: boom")
        self.assertEqual(by_key["other", "2"]["wall_time_s"], "2")
        # Parameters: the model of each run's config (configs/test.py: C4, 2 fields a block).
        self.assertEqual(rows[0]["parameters"], study.count_parameters(
            study.load_config("configs/test.py", {})
        ))  # fmt: skip
        self.assertNotEqual(rows[0]["parameters"], rows[3]["parameters"])  # g=1 vs g=2

        with open(os.path.join(root, results.RESULTS_MD)) as f:
            md = f.read()
        good = next(line for line in md.splitlines() if line.startswith("| good |"))
        # last: 0.93 ± 0.0361 (above); best 0.90, 0.95, 0.97: mean 0.94, deviations -0.04,
        # 0.01, 0.03, squares 0.0026, std 0.0361; images/s (100 + 200 + 100) / 3 = 133.
        self.assertIn("| 3/3 | 0.9300 ± 0.0361 | 0.9400 ± 0.0361 | 2 | 133 |", good)
        other = next(line for line in md.splitlines() if line.startswith("| other |"))
        self.assertIn("| 1/3 | 0.5000 (1 seed) |", other)
        self.assertIn("* other seed 1: unfinished", md)
        self.assertIn("* other seed 2: failed: train.py: error: boom", md)
        # Rotation: means over angles 0.9 and 0.955 (2 seeds): mean 0.9275, std 0.0389.
        rotation = [line for line in md.splitlines() if line.startswith("| good |")][1]
        self.assertIn("| 0.9275 ± 0.0389 |", rotation)
        for name in (results.RESULTS_PNG, results.ROTATION_CSV, results.ROTATION_PNG):
            self.assertTrue(os.path.exists(os.path.join(root, name)), name)
        curve = [
            r for r in _read_csv(os.path.join(root, results.ROTATION_CSV)) if r["name"] == "good"
        ]
        self.assertEqual([r["angle_degrees"] for r in curve], ["0", "90", "180", "270"])
        self.assertEqual(curve[1]["mean_accuracy"], "0.925")
        self.assertEqual(curve[1]["seeds"], "2")

    def test_a_stopped_or_killed_runner_stops_its_run_cleanly(self):
        # SIGTERM to the runner is forwarded to the run; when the runner dies (even by
        # kill -9) the run gets SIGTERM too (train.py's clean stop: save, exit) instead of
        # training on unsupervised.
        for signum in (signal.SIGTERM, signal.SIGKILL):
            with self.subTest(signal.Signals(signum).name):
                self._check_run_gets_sigterm(signum)

    def _check_run_gets_sigterm(self, signum):
        root = self.enter_context(tempfile.TemporaryDirectory())
        marker, log = os.path.join(root, "child_got_sigterm"), os.path.join(root, "log")
        child = _write(
            os.path.join(root, "child.py"),
            f"""
            import signal, sys, time
            def stop(*_):
                open({marker!r}, "w").close()
                sys.exit(0)
            signal.signal(signal.SIGTERM, stop)
            print("ready", flush=True)
            time.sleep(60)
            """,
        )
        parent = _write(
            os.path.join(root, "parent.py"),
            f"""
            import sys
            sys.path.insert(0, {REPO!r})
            from neural_epdo_jax.tools import study
            with study._Stop() as stop:
                print(study._subprocess([sys.executable, {child!r}], {log!r}, stop)[0])
            print("stopped" if stop.signum else "not stopped")
            """,
        )
        proc = subprocess.Popen(
            [sys.executable, parent], env=_env(), stdout=subprocess.PIPE, text=True
        )
        deadline = time.time() + 60
        while not os.path.exists(log) or "ready" not in open(log).read():  # noqa: SIM115
            self.assertLess(time.time(), deadline, "the child did not start")
            time.sleep(0.05)
        proc.send_signal(signum)
        output, _ = proc.communicate(timeout=60)
        while not os.path.exists(marker):
            self.assertLess(time.time(), deadline, "the child did not get SIGTERM")
            time.sleep(0.05)
        if signum == signal.SIGTERM:  # the runner waited for the run, then stopped
            self.assertEqual(output.split(), ["0", "stopped"])


STUDIES = ("neural_vs_linear", "ablation_g_s", "paper_variants")


class ShippedStudiesTest(absltest.TestCase):
    def _expand(self, name):
        config = importlib.import_module(f"configs.studies.{name}").get_config()
        return study.expand(study.with_defaults(config), os.path.join("runs", "studies", name))

    def test_every_study_loads_and_says_command_result_and_cost(self):
        for name in STUDIES:
            with self.subTest(name):
                runs = self._expand(name)  # every run's config and overrides are valid
                for run in runs[:: len({r.seed for r in runs})]:  # and builds its model
                    validate_config(study.load_config(run.config_file, run.overrides))
                self.assertGreaterEqual(len({r.seed for r in runs}), 3)
                doc = importlib.import_module(f"configs.studies.{name}").__doc__
                self.assertIn(f"--study=configs/studies/{name}.py", doc)
                self.assertIn("Expected", doc)
                self.assertIn("Cost", doc)
                self.assertIn("docs/results.md", doc)

    def test_neural_vs_linear_models(self):
        runs = {r.name: r for r in self._expand("neural_vs_linear") if r.seed == 0}
        params = {
            name: study.count_parameters(study.load_config(r.config_file, r.overrides))
            for name, r in runs.items()
        }
        self.assertEqual(params, dict(neural_epdo=20_466, pdo_econv=92_370, cnn=21_010))
        # The CNN is matched to the Neural ePDO's parameter count (within 5%).
        self.assertLess(abs(params["cnn"] / params["neural_epdo"] - 1), 0.05)
        # One protocol for all three: every key but the model's is the same.
        configs = {n: study.load_config(r.config_file, r.overrides) for n, r in runs.items()}
        for key in configs["cnn"]:
            if key not in ("model", "model_name"):
                self.assertLen({str(c[key]) for c in configs.values()}, 1, key)
        self.assertEqual(configs["pdo_econv"].model.g, -1)
        self.assertEqual(configs["cnn"].model_name, "CNN")

    def test_paper_variants_run_only_on_an_accelerator_or_as_a_dry_run(self):
        runner = [sys.executable, "-m", "neural_epdo_jax.tools.study"]
        flags = ["--study=configs/studies/paper_variants.py", "--workdir=/nonexistent/x"]
        kwargs = dict(cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        refused = subprocess.run([*runner, *flags], **kwargs)
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn("needs a GPU or TPU", refused.stderr)
        self.assertIn("--dry_run", refused.stderr)
        dry = subprocess.run([*runner, *flags, "--dry_run"], **kwargs)
        self.assertEqual(dry.returncode, 0, dry.stderr)
        commands = dry.stdout.splitlines()
        self.assertLen(commands, 18)
        self.assertIn("--config=configs/mnist_rot_dihedral_gauss.py", commands[9])
        self.assertIn("python -m neural_epdo_jax.tools.evaluate", commands[0])


class EndToEndTest(absltest.TestCase):
    """A tiny study through the command line (each run a train.py subprocess)."""

    def _study_file(self, root):
        return _write(
            os.path.join(root, "tiny.py"),
            """
            import ml_collections

            def get_config():
                study = ml_collections.ConfigDict()
                study.seeds = (0, 1)
                study.runs = [
                    dict(name="a", config="configs/test.py"),
                    # Same compiled steps as "a" (fewer test images of the same shapes).
                    dict(name="b", config="configs/test.py", overrides={"num_test_examples": 40}),
                    # g=3 does not divide the 2 fields per block: train.py refuses it.
                    dict(name="bad", config="configs/test.py", overrides=dict(model=dict(g=3))),
                ]
                return study
            """,
        )

    def _runner(self, *flags):
        return subprocess.run(
            [sys.executable, "-m", "neural_epdo_jax.tools.study", *flags],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )

    def test_tiny_study(self):
        root = self.enter_context(tempfile.TemporaryDirectory())
        study_file, workdir = self._study_file(root), os.path.join(root, "out")
        flags = [f"--study={study_file}", f"--workdir={workdir}"]

        # --dry_run: one train.py command per run and seed; nothing runs or is written.
        dry = self._runner(*flags, "--dry_run")
        self.assertEqual(dry.returncode, 0, dry.stderr)
        commands = dry.stdout.splitlines()
        self.assertLen(commands, 6)
        self.assertFalse(os.path.exists(workdir))
        first = shlex.split(commands[0])
        self.assertEqual(first[:3], ["python", "train.py", "--config=configs/test.py"])
        self.assertIn(f"--workdir={workdir}/a/seed_0", first)
        self.assertIn("--config.seed=0", first)
        self.assertIn("--config.num_test_examples=40", commands[2])
        self.assertIn("--config.model.g=3", commands[5])

        # A killed study: run a, seed 0 stopped after its first epoch, its checkpoint saved.
        # (The dry run's command, as a scheduler would run it.)
        partial = subprocess.run(
            [sys.executable, *first[1:], "--config.num_epochs=1"],
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        self.assertEqual(partial.returncode, 0, partial.stderr)
        first_epoch = results.read_records(f"{workdir}/a/seed_0")
        self.assertEqual([r["epoch"] for r in first_epoch], [1])

        run = self._runner(*flags)
        self.assertEqual(run.returncode, 1, run.stdout + run.stderr)  # one run failed
        self.assertIn("study: 2 run(s) failed", run.stderr)
        out = run.stdout
        self.assertIn("[1/6] a seed 0: resuming", out)
        self.assertIn("[2/6] a seed 1: training", out)
        self.assertRegex(out, r"\[5/6\] bad seed 0: FAILED: train.py: error: invalid config")
        self.assertIn("divisible by g=3", out)
        # The killed run resumed: its first epoch is the one it had, its second new.
        with open(f"{workdir}/a/seed_0/train.log") as f:
            self.assertIn("resumed from", f.read())
        records = results.read_records(f"{workdir}/a/seed_0")
        self.assertEqual([r["epoch"] for r in records], [1, 2])
        self.assertEqual(records[0], first_epoch[0])

        table = _read_csv(f"{workdir}/{results.RESULTS_CSV}")
        self.assertEqual(
            [(r["name"], r["seed"], r["status"]) for r in table],
            [
                ("a", "0", "finished"), ("a", "1", "finished"),
                ("b", "0", "finished"), ("b", "1", "finished"),
                ("bad", "0", "failed"), ("bad", "1", "failed"),
            ],
        )  # fmt: skip
        for row in table[:4]:
            self.assertEqual(row["epochs"], "2")
            self.assertGreater(float(row["wall_time_s"]), 0)
            self.assertGreater(float(row["train_images_per_s"]), 0)
            self.assertBetween(float(row["last_test_accuracy"]), 0.0, 1.0)
            self.assertEqual(row["parameters"], table[0]["parameters"])
            self.assertEqual(row["error"], "")
        self.assertIn("divisible by g=3", table[4]["error"])
        self.assertEqual(table[4]["parameters"], "")  # the model cannot be built
        # results.md: the mean and std of exactly the values in results.csv.
        with open(f"{workdir}/{results.RESULTS_MD}") as f:
            md = f.read()
        a_values = [float(r["last_test_accuracy"]) for r in table[:2]]
        self.assertIn(f"| a | {int(table[0]['parameters']):,} | 2/2 | "
                      f"{results.format_mean_std(a_values)} |", md)  # fmt: skip
        self.assertIn("| bad | – | 0/2 | – |", md)
        self.assertTrue(os.path.exists(f"{workdir}/{results.RESULTS_PNG}"))

        # Rerun: finished runs are skipped (nothing is trained again), the failure retried.
        mtimes = [
            os.path.getmtime(f"{workdir}/{r}/seed_{s}/metrics.jsonl") for r in "ab" for s in "01"
        ]
        again = self._runner(*flags)
        self.assertIn("[1/6] a seed 0: finished earlier: test accuracy", again.stdout)
        self.assertNotIn("training", again.stdout.split("[5/6]")[0])
        self.assertIn("[6/6] bad seed 1: FAILED", again.stdout)
        self.assertEqual(
            mtimes,
            [os.path.getmtime(f"{workdir}/{r}/seed_{s}/metrics.jsonl") for r in "ab" for s in "01"],
        )
        table = _read_csv(f"{workdir}/{results.RESULTS_CSV}")

        # --collect_only: the tables again from the workdirs, nothing run.
        os.remove(f"{workdir}/{results.RESULTS_CSV}")
        collected = self._runner(*flags, "--collect_only")
        self.assertEqual(collected.returncode, 0, collected.stderr)
        self.assertNotRegex(collected.stdout, r"\[\d/6\]")  # no run's progress line
        self.assertEqual(_read_csv(f"{workdir}/{results.RESULTS_CSV}"), table)


if __name__ == "__main__":
    absltest.main()
