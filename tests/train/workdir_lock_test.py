"""Tests of neural_epdo_jax.train.workdir_lock: one run per workdir, stale locks taken over."""

import json
import os
import socket
import subprocess
import sys
import tempfile

from absl.testing import absltest

from neural_epdo_jax.train import workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(workdir, **record):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, workdir_lock.LOCK_FILE), "w") as f:
        json.dump({"since": 0.0, "start": None, **record}, f)


class WorkdirLockTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        self.workdir = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), "run")
        self.path = os.path.join(self.workdir, workdir_lock.LOCK_FILE)

    def test_held_then_released(self):
        with workdir_lock.hold(self.workdir):
            with open(self.path) as f:
                record = json.load(f)
            self.assertEqual(record["pid"], os.getpid())
            self.assertEqual(record["host"], socket.gethostname())
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual(os.listdir(self.workdir), [])  # no private file left behind

    def test_second_holder_fails_naming_the_first(self):
        with workdir_lock.hold(self.workdir):
            with self.assertRaises(workdir_lock.WorkdirLockedError) as e:
                workdir_lock.acquire(self.workdir)
        message = str(e.exception)
        self.assertNotIn("\n", message)
        self.assertIn(f"process {os.getpid()} on host {socket.gethostname()}", message)
        self.assertIn(f"delete {self.path}", message)

    def test_stale_lock_is_taken_over_with_a_warning(self):
        _write_lock(self.workdir, host=socket.gethostname(), pid=_dead_pid())
        with self.assertLogs("absl", level="WARNING") as logs:
            record = workdir_lock.acquire(self.workdir)
        self.assertIn("stale lock", logs.output[0])
        with open(self.path) as f:
            self.assertEqual(json.load(f), record)
        workdir_lock.release(self.workdir, record)
        self.assertFalse(os.path.exists(self.path))

    def test_a_recycled_process_id_is_stale(self):
        _write_lock(self.workdir, host=socket.gethostname(), pid=os.getpid(), start="0")
        with self.assertLogs("absl", level="WARNING"):
            workdir_lock.release(self.workdir, workdir_lock.acquire(self.workdir))

    def test_another_hosts_lock_is_never_taken_over(self):
        _write_lock(self.workdir, host="elsewhere.invalid", pid=_dead_pid())
        with self.assertRaisesRegex(workdir_lock.WorkdirLockedError, "on host elsewhere.invalid"):
            workdir_lock.acquire(self.workdir)
        self.assertTrue(os.path.exists(self.path))

    def test_release_leaves_another_runs_lock(self):
        record = workdir_lock.acquire(self.workdir)
        _write_lock(self.workdir, host="elsewhere.invalid", pid=1)
        workdir_lock.release(self.workdir, record)
        self.assertTrue(os.path.exists(self.path))

    def test_train_py_refuses_a_held_workdir_in_one_line(self):
        # The configs/test.py command of two runs in one workdir: the second fails at once.
        env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
        env["JAX_PLATFORMS"] = "cpu"
        with workdir_lock.hold(self.workdir):
            proc = subprocess.run(
                [
                    sys.executable,
                    "train.py",
                    "--config=configs/test.py",
                    f"--workdir={self.workdir}",
                    "--cpu_devices=1",
                ],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
        self.assertEqual(proc.returncode, 1, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        self.assertRegex(lines[-1], r"^train.py: error: .* is in use by another run: process")
        self.assertNotIn("Traceback", proc.stderr)
        self.assertEqual(os.listdir(self.workdir), [])  # nothing written


if __name__ == "__main__":
    absltest.main()
