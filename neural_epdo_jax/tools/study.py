"""Config-file studies: named runs x seeds, trained one after another, tabulated.

  python -m neural_epdo_jax.tools.study --study=configs/studies/<name>.py \
      --workdir=runs/studies/<name>
  ... --dry_run        # print every run's `python train.py ...` command, run nothing
  ... --collect_only   # tabulate whatever has finished (e.g. runs a scheduler ran), run nothing

A study file is an ``ml_collections`` config (``get_config()``; overridable with
``--study.<key>=<value>``, e.g. ``--study.seeds='(0,)'``) with

* ``runs``: a list of ``dict(name=..., config=..., overrides=...)``: a base config file (a
  path, as train.py's ``--config``) and overrides of any of its keys, nested
  (``dict(model=dict(g=-1))``) or dotted (``{'model.g': -1}``); they become train.py's
  ``--config.<key>=<value>`` flags;
* ``seeds``: every run is trained once per seed (``--config.seed``);
* ``rotation_sweep_degrees``: if > 0, each finished run is also evaluated on its test images
  rotated by every multiple of this angle (`evaluate`, last checkpoint), on a fixed subset
  of ``rotation_sweep_examples`` test images (-1: the config's test set);
* ``needs_accelerator``: the runs are too long for a CPU; refused there (but ``--dry_run``
  and ``--collect_only``).

Run ``name`` with seed ``s`` is an ordinary train.py workdir, ``<workdir>/<name>/seed_<s>``,
trained by a train.py subprocess (output in its ``train.log``). A rerun of the study skips
finished runs and resumes unfinished ones from their latest checkpoint, so a killed study
loses at most the epoch in progress (SIGINT/SIGTERM: nothing; the run in progress saves its
step and the study stops). A failed run is reported with its error; the others go on.

The runner then writes into ``<workdir>`` (`study_results`): ``results.csv`` (one row per
run and seed), ``results.md`` (mean and sample standard deviation over the finished seeds
of each run), ``results.png`` (last-epoch test accuracy against trainable parameters, with
error bars) and, with rotation sweeps, ``results_rotation.csv`` and ``results_rotation.png``.
Accuracies are read from each workdir's ``metrics.jsonl``; "best" is selected on the test
set (as the reference does) and is reported next to the last epoch's, never instead of it.
Wall time is the runner's own measurement of train.py over all attempts (blank for runs
that a scheduler ran).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from neural_epdo_jax.tools import study_results as results

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_PY = os.path.join(REPO, "train.py")
LOG_FILE = "train.log"
STUDY_KEYS = frozenset(
    {"runs", "seeds", "rotation_sweep_degrees", "rotation_sweep_examples", "needs_accelerator"}
)
RUN_KEYS = frozenset({"name", "config", "overrides"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class StudyError(ValueError):
    """An invalid study file (found before anything runs)."""


# ------------------------------------------------------------------------ the study


class Run:
    """One run of a study: a base config file, its overrides, and one seed."""

    def __init__(self, name: str, config_file: str, overrides: dict[str, Any], seed: int, root):
        self.name, self.config_file, self.overrides, self.seed = name, config_file, overrides, seed
        self.workdir = os.path.join(root, name, f"seed_{seed}")

    def config_flags(self) -> list[str]:
        """train.py's ``--config`` flags: the file first (config_flags needs it first), then
        the overrides in the study's order, then the seed."""
        flags = [f"--config={self.config_file}"]
        flags += [f"--config.{k}={format_value(v)}" for k, v in self.overrides.items()]
        return flags + [f"--config.seed={self.seed}"]

    def train_command(self, python: str = "python") -> list[str]:
        """The train.py command of this run."""
        return [python, _display_path(TRAIN_PY), *self.config_flags(), f"--workdir={self.workdir}"]

    def sweep_command(self, study: ml_collections.ConfigDict, python: str = "python") -> list[str]:
        """The `evaluate` command of this run's rotation sweep (its last checkpoint)."""
        command = [python, "-m", "neural_epdo_jax.tools.evaluate", f"--workdir={self.workdir}"]
        command += ["--checkpoint=latest", f"--angle_step_degrees={study.rotation_sweep_degrees:g}"]
        if study.rotation_sweep_examples != -1:
            command.append(f"--num_test_examples={study.rotation_sweep_examples}")
        return command


def format_value(value: Any) -> str:
    """A Python value as the text of a ``--config.<key>=<text>`` flag (parsed back by
    ``ml_collections.config_flags`` into the key's type)."""
    if value is None:
        raise StudyError("None cannot be passed as a --config override; leave the key out.")
    if isinstance(value, (list, tuple)):
        items = [repr(v) for v in value]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def flatten_overrides(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested (``{'model': {'g': -1}}``) and dotted (``{'model.g': -1}``) overrides as one
    dict of dotted keys, in order."""
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            flat.update(flatten_overrides(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _display_path(path: str) -> str:
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else path


def load_config(config_file: str, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The config train.py would build from ``--config=config_file`` and the overrides
    (the same parser, so that typos fail here, before any run starts).

    Raises:
      StudyError: the file does not load, or an override names an unknown key or a value
        of the wrong type.
    """
    from absl import flags
    from ml_collections import config_flags

    if not os.path.isfile(config_file):
        raise StudyError(
            f"config file {config_file!r} not found (a path from the current directory, as "
            "train.py's --config)."
        )
    argv = ["study", f"--config={config_file}"]
    argv += [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
    )
    try:
        values(argv)
        config = values.config
        if not isinstance(config, ml_collections.ConfigDict):
            config.num_epochs  # noqa: B018 -- a file that failed to load: raises its error
        return config
    except (AttributeError, KeyError) as e:
        message = str(e.args[0] if e.args else e).strip("'\"").replace("\\n", "\n")
        raise StudyError(f"unknown config key: {message}") from None
    except (flags.Error, OSError, TypeError, ValueError) as e:
        raise StudyError(str(e)) from None


def expand(study: ml_collections.ConfigDict, workdir: str) -> list[Run]:
    """The study's runs, one per run and seed, in the file's order (seeds innermost); every
    config is loaded with its overrides, so a bad one fails before anything runs.

    Raises:
      StudyError: naming the problem (unknown study or run key, duplicate or unsafe name,
        a seed among the overrides, an override the base config rejects).
    """
    unknown = set(study.keys()) - STUDY_KEYS
    if unknown:
        raise StudyError(f"unknown study keys {sorted(unknown)}; known: {sorted(STUDY_KEYS)}.")
    runs = list(study.get("runs") or [])
    seeds = [int(s) for s in study.get("seeds") or ()]
    if not runs or not seeds:
        raise StudyError("a study needs `runs` (a list of dicts) and `seeds` (a tuple of ints).")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"seeds {tuple(seeds)} repeat a seed.")
    names, out = set(), []
    for i, entry in enumerate(runs):
        entry = dict(entry)
        what = f"run {i} ({entry.get('name', 'unnamed')!r})"
        if set(entry) - RUN_KEYS or not {"name", "config"} <= set(entry):
            raise StudyError(
                f"{what}: keys {sorted(entry)}; a run is dict(name=..., config=..., overrides=...)."
            )
        name = str(entry["name"])
        if not _NAME.match(name):
            raise StudyError(f"{what}: the name must be letters, digits, '_.+-' (a directory).")
        if name in names:
            raise StudyError(f"{what}: the name {name!r} is used twice.")
        names.add(name)
        overrides = flatten_overrides(dict(entry.get("overrides") or {}))
        if "seed" in overrides:
            raise StudyError(f"{what}: the seed comes from the study's `seeds`, not an override.")
        try:
            load_config(entry["config"], overrides)
        except StudyError as e:
            raise StudyError(f"{what}: {e}") from None
        out += [Run(name, entry["config"], overrides, s, workdir) for s in seeds]
    return out


def count_parameters(config: ml_collections.ConfigDict) -> int | None:
    """Trainable parameters of the config's model (shapes only; nothing is computed or
    placed on a device); None if the model cannot be built."""
    import jax

    jax.config.update("jax_platforms", "cpu")  # this process never needs the accelerator
    from neural_epdo_jax import models
    from neural_epdo_jax.train.state import create_model

    try:
        model = create_model(config)
        x = jax.ShapeDtypeStruct((1, 28, 28, 1), np.float32)
        key = jax.ShapeDtypeStruct((2,), np.uint32)
        shapes = jax.eval_shape(lambda k, x: model.init(k, x, train=False), key, x)
    except Exception:  # reported by the run itself (train.py's own checks)
        return None
    return models.count_params(shapes["params"])


def collect(
    study: ml_collections.ConfigDict, runs: Sequence[Run], workdir: str, title: str
) -> list[dict[str, Any]]:
    """Writes the results files (`study_results`) from whatever the runs' workdirs hold;
    returns the rows of results.csv."""
    params: dict[str, int | None] = {}
    rows = []
    for run in runs:
        config = load_config(run.config_file, run.overrides)
        if run.name not in params:
            params[run.name] = count_parameters(config)
        row = results.run_result(run.name, run.seed, run.workdir, config.num_epochs)
        rows.append(dict(row, parameters=params[run.name]))
    results.write_results(rows, workdir, title, study.rotation_sweep_degrees)
    return rows


# ------------------------------------------------------------------------- running


class _Stop:
    """SIGINT/SIGTERM: forwards SIGTERM to the run in progress (which saves its step and
    exits) and stops the study after it; a second signal gets the default behaviour."""

    def __init__(self):
        self.signum, self.child = None, None

    def __enter__(self):
        self._previous = {
            s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)
        }
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the runner dies (Linux), so that a run whose
    study is killed (even with ``kill -9``) saves its step and stops instead of training on
    unsupervised."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _error_message(log_text: str, returncode: int) -> str:
    """The error a failed subprocess reports: train.py's and evaluate's own one-line errors
    (with their continuation lines), else the last line of a traceback."""
    lines = [line.rstrip() for line in log_text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if re.match(r"^(train\.py|evaluate): error: ", line):
            return " ".join([line, *[x.strip() for x in lines[i + 1 :]]])[:500]
    if returncode < 0:
        return f"killed by signal {-returncode}"
    tail = lines[-1] if lines else ""
    return f"exit status {returncode}: {tail}"[:500]


def _subprocess(command: list[str], log_path: str, stop: _Stop) -> tuple[int, str]:
    """Runs ``command`` with its output appended to ``log_path``; returns the exit status
    and what this attempt wrote."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log_path, "a") as log:
        start = log.tell()
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        # Its own session: a Ctrl-C in the terminal reaches the runner, which forwards one
        # SIGTERM (the run's clean stop); two signals would kill the run unsaved.
        child = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        stop.child = child
        try:
            returncode = child.wait()
        finally:
            stop.child = None
    with open(log_path) as f:
        f.seek(start)
        return returncode, f.read()


def _write_status(workdir: str, **updates: Any) -> None:
    path = os.path.join(workdir, results.STATUS_FILE)
    record = results.read_json(path)
    record.update(updates)
    with open(path + ".tmp", "w") as f:
        json.dump({k: v for k, v in record.items() if v is not None}, f, indent=2)
    os.replace(path + ".tmp", path)


def _needs_sweep(run: Run, study: ml_collections.ConfigDict) -> bool:
    """Whether the run's rotation sweep is missing or was made of another checkpoint or
    other angles."""
    if study.rotation_sweep_degrees <= 0:
        return False
    sweep = results.read_json(os.path.join(run.workdir, results.SWEEP_JSON))
    step = max((r["step"] for r in results.read_records(run.workdir)), default=None)
    angles = np.arange(0.0, 360.0 - 1e-9, study.rotation_sweep_degrees)
    done = np.asarray(sweep.get("angles_degrees", []))
    return not (
        sweep.get("checkpoint") == "latest"
        and sweep.get("step") == step
        and done.shape == angles.shape
        and np.allclose(done, angles)
    )


def _outcome(row: Mapping[str, Any]) -> str:
    if row.get("last_test_accuracy") is None:
        return f"{row['status']}"
    text = (
        f"test accuracy {row['last_test_accuracy']:.4f} (best {row['best_test_accuracy']:.4f} "
        f"at epoch {row['best_epoch']}) after {row['epochs']} epochs"
    )
    if row.get("train_images_per_s"):
        text += f", {row['train_images_per_s']:.0f} img/s"
    return text


def execute(
    study: ml_collections.ConfigDict, runs: Sequence[Run], out=sys.stdout
) -> tuple[int, bool]:
    """Trains (or resumes) every unfinished run in order, then its rotation sweep; prints a
    progress line per run. Returns (number of failed runs, whether a signal stopped it)."""
    failures = 0
    with _Stop() as stop:
        for i, run in enumerate(runs, 1):
            if stop.signum is not None:
                break
            head = f"[{i}/{len(runs)}] {run.name} seed {run.seed}"
            num_epochs = load_config(run.config_file, run.overrides).num_epochs
            os.makedirs(run.workdir, exist_ok=True)
            log_path = os.path.join(run.workdir, LOG_FILE)
            if results.is_finished(run.workdir, num_epochs):
                action = "finished earlier"
            else:
                resumed = "resuming" if results.read_records(run.workdir) else "training"
                print(f"{head}: {resumed} (log {log_path}) ...", file=out, flush=True)
                start = time.time()
                returncode, text = _subprocess(run.train_command(sys.executable), log_path, stop)
                previous = results.read_json(os.path.join(run.workdir, results.STATUS_FILE))
                wall = previous.get("wall_time_s", 0.0) + time.time() - start  # all attempts
                finished = results.is_finished(run.workdir, num_epochs)
                # A run stopped by a signal saves its step and exits 0 or 128 + the signal.
                stopped = not finished and (
                    stop.signum is not None
                    or returncode == 0
                    or returncode - 128 in (signal.SIGINT, signal.SIGTERM)
                )
                failed = not finished and not stopped
                error = _error_message(text, returncode) if failed else None
                _write_status(run.workdir, wall_time_s=wall, error=error, returncode=returncode)
                if failed:
                    failures += 1
                    print(f"{head}: FAILED: {error}", file=out, flush=True)
                    continue
                if stopped:
                    print(f"{head}: stopped; rerun the study to resume it", file=out, flush=True)
                    continue
                action = f"trained in {results.format_duration(time.time() - start)}"
            if stop.signum is None and _needs_sweep(run, study):
                returncode, text = _subprocess(
                    run.sweep_command(study, sys.executable), log_path, stop
                )
                sweep_error = None if returncode == 0 else _error_message(text, returncode)
                _write_status(run.workdir, sweep_error=sweep_error)
                if sweep_error:
                    action += f"; rotation sweep FAILED: {sweep_error}"
            row = results.run_result(run.name, run.seed, run.workdir, num_epochs)
            print(f"{head}: {action}: {_outcome(row)}", file=out, flush=True)
    return failures, stop.signum is not None


def _accelerator_backend() -> str:
    """JAX's default backend, asked in a subprocess (this process must not take the
    accelerator's memory away from the runs)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.default_backend())"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else "unknown"


def with_defaults(study: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The study with its optional keys filled in (no rotation sweep, CPU allowed)."""
    defaults = dict(rotation_sweep_degrees=0.0, rotation_sweep_examples=-1, needs_accelerator=False)
    return ml_collections.ConfigDict({**defaults, **study.to_dict()})


def main(argv: list[str]) -> None:
    """Command-line entry point (flags below)."""
    from absl import app, flags
    from ml_collections import config_flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    study_file = config_flags.get_config_filename(values["study"])
    title = os.path.splitext(os.path.basename(study_file))[0]
    workdir = values.workdir or os.path.join("runs", "studies", title)
    try:
        study = with_defaults(values.study)
        runs = expand(study, workdir)
    except StudyError as e:
        sys.exit(f"study: error in {study_file}: {e}")
    if values.dry_run:
        for run in runs:
            command = shlex.join(run.train_command())
            if study.rotation_sweep_degrees > 0:
                command += " && " + shlex.join(run.sweep_command(study))
            print(command)
        return
    from neural_epdo_jax.runtime.host import setup_host

    # Huge pages once here: the train.py runs inherit them instead of each starting again.
    setup_host(quiet=False)
    failures, stopped = 0, False
    if not values.collect_only:
        if study.needs_accelerator and (backend := _accelerator_backend()) == "cpu":
            sys.exit(
                f"study: {title} needs a GPU or TPU (JAX's backend here is {backend}): its runs "
                "take hours each on a CPU. Print its commands for a scheduler with --dry_run, "
                "or run it anyway with --study.needs_accelerator=False."
            )
        print(
            f"study {title}: {len(runs)} runs ({len(runs) // len(study.seeds)} configs x "
            f"{len(study.seeds)} seeds) in {workdir}",
            flush=True,
        )
        failures, stopped = execute(study, runs)
    rows = collect(study, runs, workdir, title)
    print(f"results: {os.path.join(workdir, results.RESULTS_MD)}")
    print(results.markdown(title, rows, study.rotation_sweep_degrees), end="")
    if stopped:
        sys.exit("study: stopped by a signal; rerun the same command to resume.")
    if failures:
        sys.exit(f"study: {failures} run(s) failed (see the table).")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("study", None, "Study file (configs/studies/*.py).")
    flags.DEFINE_string(
        "workdir", None, "Study directory (one workdir per run). Default: runs/studies/<stem>."
    )
    flags.DEFINE_bool("dry_run", False, "Print each run's train.py command; run nothing.")
    flags.DEFINE_bool(
        "collect_only", False, "Write the results files from what has finished; run nothing."
    )
    flags.mark_flag_as_required("study")
    app.run(main)
