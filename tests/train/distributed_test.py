"""Training with several processes (``jax.distributed``): two local processes, one CPU device
each, with CPU collectives over gloo, against one process with two devices.

train.py is launched twice per process pair: the first pair is stopped by a SIGTERM sent to
process 1 only (both must stop at the same step and save it once), the second resumes to the
end. Its first epoch's losses must equal those of the one-process, two-device run up to float
summation order (relative 1e-5), its parameters as closely as Adam allows.
"""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import chex
import jax
import numpy as np
from absl.testing import absltest

from neural_epdo_jax.tools import evaluate
from neural_epdo_jax.train import checkpointing, workdir_lock
from neural_epdo_jax.train.metrics import METRICS_FILE

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPOCHS = 4  # 3 steps each
TIMEOUT_S = 300


def _gloo_missing() -> str | None:
    """Why two CPU processes cannot run collectives here, or None."""
    if not hasattr(jax.config, "jax_cpu_collectives_implementation"):
        return "this jax has no jax_cpu_collectives_implementation option (no CPU collectives)"
    from jax._src.lib import _jax

    if not hasattr(_jax, "make_gloo_tcp_collectives"):
        return "this jaxlib is built without gloo CPU collectives"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env():
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        PYTHONUNBUFFERED="1",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
    )
    return env


def _command(workdir, *extra):
    return [
        sys.executable,
        os.path.join(REPO, "train.py"),
        f"--config={os.path.join(REPO, 'configs', 'test.py')}",
        f"--workdir={workdir}",
        f"--config.num_epochs={EPOCHS}",
        *extra,
    ]


def _start_pair(workdir):
    port = _free_port()
    return [
        subprocess.Popen(
            _command(
                workdir,
                "--cpu_devices=1",
                "--config.distributed=True",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


def _finish(procs):
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return [proc.returncode for proc in procs], outputs


def _records(workdir):
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


def _state_bytes(workdir, step):
    pattern = os.path.join(checkpointing.checkpoint_dir(workdir), str(step), "state", "**")
    return sum(os.path.getsize(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))


@absltest.skipIf(_gloo_missing() is not None, _gloo_missing() or "")
class TwoProcessTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp(prefix="distributed_test_")
        cls.reference_dir = os.path.join(cls.root, "one_process")
        cls.reference = subprocess.run(
            _command(cls.reference_dir, "--cpu_devices=2"),
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        cls.workdir = os.path.join(cls.root, "two_processes")
        # First pair: SIGTERM to process 1 once a step is logged (process 0 logs).
        procs = _start_pair(cls.workdir)
        path = os.path.join(cls.workdir, METRICS_FILE)
        deadline = time.time() + TIMEOUT_S
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            if os.path.exists(path) and any('"step": 2' in line for line in open(path)):
                break
            time.sleep(0.01)
        procs[1].send_signal(signal.SIGTERM)
        cls.stopped_codes, cls.stopped_outputs = _finish(procs)
        cls.stopped_steps = checkpointing.all_steps(cls.workdir)
        # Second pair: resumes to the end.
        cls.resumed_codes, cls.resumed_outputs = _finish(_start_pair(cls.workdir))

    @classmethod
    def tearDownClass(cls):
        import shutil

        shutil.rmtree(cls.root, ignore_errors=True)
        super().tearDownClass()

    def test_a_signal_to_one_process_stops_both_at_the_same_step(self):
        self.assertEqual(
            self.stopped_codes, [128 + signal.SIGTERM] * 2, "\n".join(self.stopped_outputs)
        )
        self.assertIn("To resume, rerun:", self.stopped_outputs[0].strip().splitlines()[-1])
        # The stop's checkpoint (and an earlier best one, kept by the preservation policy).
        self.assertBetween(max(self.stopped_steps), 2, 3 * EPOCHS - 1)

    def test_resumed_run_equals_one_process_with_two_devices(self):
        self.assertEqual(self.reference.returncode, 0, self.reference.stderr)
        self.assertEqual(self.resumed_codes, [0, 0], "\n".join(self.resumed_outputs))
        self.assertIn(f"at step {max(self.stopped_steps)} ", self.resumed_outputs[0])
        self.assertIn("2 device(s)", self.resumed_outputs[0])
        # The first epoch's losses agree up to float summation order. Later ones drift apart:
        # Adam moves a parameter whose gradient is rounding noise by about +-lr whatever the
        # noise's sign, so parameters agree only to the steps' learning rates (2e-3 for 3
        # steps, 2e-4 after); one process with one device and with two differ as much.
        ours, theirs = _records(self.workdir), _records(self.reference_dir)
        self.assertEqual([r["step"] for r in ours], [r["step"] for r in theirs])
        losses = np.array([[r["train_loss"] for r in rs] for rs in (ours, theirs)])
        np.testing.assert_allclose(losses[0, :4], losses[1, :4], rtol=1e-5)
        np.testing.assert_allclose(losses[0], losses[1], rtol=1e-2)
        _, ours, step, _ = evaluate.load_state(self.workdir, "latest")
        _, theirs, reference_step, _ = evaluate.load_state(self.reference_dir, "latest")
        self.assertEqual((step, reference_step), (3 * EPOCHS, 3 * EPOCHS))
        chex.assert_trees_all_close(
            jax.device_get(ours.params),
            jax.device_get(theirs.params),
            atol=2 * (3 * 2e-3 + 3 * (EPOCHS - 1) * 2e-4),
        )

    def test_written_once(self):
        self.assertEqual(self.resumed_codes, [0, 0], "\n".join(self.resumed_outputs))
        # Every record once (process 0 writes), as in the one-process run.
        ours = [(r["kind"], r["step"]) for r in _records(self.workdir)]
        theirs = [(r["kind"], r["step"]) for r in _records(self.reference_dir)]
        self.assertEqual(ours, theirs)
        # One copy of the replicated state: orbax spreads it over the processes, not twice.
        steps = checkpointing.all_steps(self.workdir)
        self.assertEqual(steps, checkpointing.all_steps(self.reference_dir))
        last = 3 * EPOCHS
        self.assertLess(
            _state_bytes(self.workdir, last), 1.5 * _state_bytes(self.reference_dir, last)
        )
        self.assertFalse(os.path.exists(os.path.join(self.workdir, workdir_lock.LOCK_FILE)))


if __name__ == "__main__":
    absltest.main()
