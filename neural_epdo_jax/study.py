"""Config-file studies: named runs x seeds, trained one after another, tabulated.

  python -m neural_epdo_jax.study --study=configs/studies/<name>.py --workdir=runs/studies/<name>
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
  rotated by every multiple of this angle (`evaluate`, last checkpoint), on the first
  ``rotation_sweep_examples`` test images (-1: the config's test set);
* ``needs_accelerator``: the runs are too long for a CPU; refused there (but ``--dry_run``
  and ``--collect_only``).

Run ``name`` with seed ``s`` is an ordinary train.py workdir, ``<workdir>/<name>/seed_<s>``,
trained by a train.py subprocess (output in its ``train.log``). A rerun of the study skips
finished runs and resumes unfinished ones from their latest checkpoint, so a killed study
loses at most the epoch in progress (SIGINT/SIGTERM: nothing; the run in progress saves its
step and the study stops). A failed run is reported with its error; the others go on.

The runner writes into ``<workdir>``: ``results.csv`` (one row per run and seed),
``results.md`` (mean and sample standard deviation over the finished seeds of each run) and
``results.png`` (last-epoch test accuracy against trainable parameters, with error bars);
with a rotation sweep also ``results_rotation.csv`` and ``results_rotation.png``.
Accuracies are read from each workdir's ``metrics.jsonl``; "best" is selected on the test
set (as the reference does) and is reported next to the last epoch's, never instead of it.
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import json
import math
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(REPO, "train.py")
METRICS_FILE = "metrics.jsonl"  # training.METRICS_FILE; not imported: that pulls in JAX
SWEEP_JSON = "rotation_sweep.json"  # evaluate.SWEEP_JSON
STATUS_FILE = "study_run.json"  # the runner's own record of a run: wall time, last error
LOG_FILE = "train.log"
RESULTS_CSV, RESULTS_MD, RESULTS_PNG = "results.csv", "results.md", "results.png"
ROTATION_CSV, ROTATION_PNG = "results_rotation.csv", "results_rotation.png"
CSV_FIELDS = (
    "name",
    "seed",
    "status",
    "parameters",
    "last_test_accuracy",
    "best_test_accuracy",
    "best_epoch",
    "epochs",
    "train_images_per_s",
    "wall_time_s",
    "rotation_mean_accuracy",
    "rotation_min_accuracy",
    "rotation_quarter_turn_change",
    "error",
    "workdir",
)
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
        command = [python, "-m", "neural_epdo_jax.evaluate", f"--workdir={self.workdir}"]
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
    for i, spec in enumerate(runs):
        spec = dict(spec)
        what = f"run {i} ({spec.get('name', 'unnamed')!r})"
        if set(spec) - RUN_KEYS or not {"name", "config"} <= set(spec):
            raise StudyError(
                f"{what}: keys {sorted(spec)}; a run is dict(name=..., config=..., overrides=...)."
            )
        name = str(spec["name"])
        if not _NAME.match(name):
            raise StudyError(f"{what}: the name must be letters, digits, '_.+-' (a directory).")
        if name in names:
            raise StudyError(f"{what}: the name {name!r} is used twice.")
        names.add(name)
        overrides = flatten_overrides(dict(spec.get("overrides") or {}))
        if "seed" in overrides:
            raise StudyError(f"{what}: the seed comes from the study's `seeds`, not an override.")
        try:
            load_config(spec["config"], overrides)
        except StudyError as e:
            raise StudyError(f"{what}: {e}") from None
        out += [Run(name, spec["config"], overrides, s, workdir) for s in seeds]
    return out


# ------------------------------------------------------------------ a run's results


def read_records(workdir: str) -> list[dict[str, Any]]:
    """The epoch records of a workdir's metrics.jsonl (empty if there is none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r.get("kind") == "epoch"]


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def is_finished(workdir: str, num_epochs: int) -> bool:
    """Whether the run has an evaluated record of its last epoch."""
    return any(r["epoch"] >= num_epochs and "test_accuracy" in r for r in read_records(workdir))


def run_result(run: Run, num_epochs: int) -> dict[str, Any]:
    """One results.csv row: what the run's workdir holds.

    ``status``: 'finished' (an evaluated record of the last epoch), 'failed' (the runner's
    last attempt failed), 'unfinished' (some epochs) or 'not run'.
    """
    records = read_records(run.workdir)
    status_record = _read_json(os.path.join(run.workdir, STATUS_FILE))
    finished = any(r["epoch"] >= num_epochs and "test_accuracy" in r for r in records)
    if finished:
        status = "finished"
    elif status_record.get("error"):
        status = "failed"
    else:
        status = "unfinished" if records else "not run"
    row: dict[str, Any] = dict(name=run.name, seed=run.seed, status=status, workdir=run.workdir)
    tested = [r for r in records if "test_accuracy" in r]
    if tested:
        best = max(reversed(tested), key=lambda r: r["test_accuracy"])  # latest among ties
        row.update(
            last_test_accuracy=tested[-1]["test_accuracy"],
            best_test_accuracy=best["test_accuracy"],
            best_epoch=best["epoch"],
        )
    if records:
        row["epochs"] = records[-1]["epoch"]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r]
    if rates:
        row["train_images_per_s"] = float(np.mean(rates))
    if "wall_time_s" in status_record:
        row["wall_time_s"] = status_record["wall_time_s"]
    sweep = _read_json(os.path.join(run.workdir, SWEEP_JSON))
    if finished and sweep.get("rotated_accuracy"):
        row["rotation_mean_accuracy"] = float(np.mean(sweep["rotated_accuracy"]))
        row["rotation_min_accuracy"] = float(np.min(sweep["rotated_accuracy"]))
        row["rotation_quarter_turn_change"] = quarter_turn_change(
            sweep["angles_degrees"], sweep["rotated_accuracy"]
        )
    errors = [status_record.get("error")] if status != "finished" else []
    errors.append(status_record.get("sweep_error"))
    row["error"] = "; ".join(e for e in errors if e)
    return row


def quarter_turn_change(angles: Sequence[float], accuracies: Sequence[float]) -> float | None:
    """``max_k |acc(90 k) - acc(0)|`` over the quarter turns in the sweep (None if it has
    none): exactly 0 for a network invariant under quarter turns, whose predictions do not
    change on the rotated grid (no interpolation); noise for one that is not."""
    by_angle = dict(zip((round(a, 6) for a in angles), accuracies))
    turns = [by_angle[a] for a in (90.0, 180.0, 270.0) if a in by_angle]
    if 0.0 not in by_angle or not turns:
        return None
    return float(max(abs(t - by_angle[0.0]) for t in turns))


def count_parameters(config: ml_collections.ConfigDict) -> int | None:
    """Trainable parameters of the config's model (shapes only; nothing is computed or
    placed on a device); None if the model cannot be built."""
    import jax

    jax.config.update("jax_platforms", "cpu")  # this process never needs the accelerator
    from neural_epdo_jax import models, training

    try:
        model = training.create_model(config)
        x = jax.ShapeDtypeStruct((1, 28, 28, 1), np.float32)
        key = jax.ShapeDtypeStruct((2,), np.uint32)
        shapes = jax.eval_shape(lambda k, x: model.init(k, x, train=False), key, x)
    except Exception:  # reported by the run itself (train.py's own checks)
        return None
    return models.count_params(shapes["params"])


# --------------------------------------------------------------------- aggregation


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; NaN for one value)."""
    values = np.asarray(values, np.float64)
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def format_mean_std(values: Sequence[float], digits: int = 4) -> str:
    """``'0.9300 ± 0.0361'``; one value alone: ``'0.9300 (1 seed)'``; none: ``'–'``."""
    if len(values) == 0:
        return "–"
    mean, std = mean_std(values)
    if len(values) == 1:
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_duration(seconds: float) -> str:
    """``'3 min 4 s'``, ``'1 h 2 min'``, ``'12 s'``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds} s"


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per run name (in order): the finished seeds' values of every column."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["name"], []).append(row)
    out = []
    for name, group in groups.items():
        done = [r for r in group if r["status"] == "finished"]

        def values(key, done=done):
            return [r[key] for r in done if r.get(key) not in (None, "")]

        out.append(
            dict(
                name=name,
                parameters=group[0].get("parameters"),
                finished=len(done),
                seeds=len(group),
                **{
                    key: values(key)
                    for key in (
                        "last_test_accuracy",
                        "best_test_accuracy",
                        "epochs",
                        "train_images_per_s",
                        "wall_time_s",
                        "rotation_mean_accuracy",
                        "rotation_min_accuracy",
                        "rotation_quarter_turn_change",
                    )
                },
            )
        )
    return out


def write_csv(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    """results.csv: every row with every column of `CSV_FIELDS` (blank where unknown)."""
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_FIELDS})
    os.replace(path + ".tmp", path)


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def markdown(title: str, rows: Sequence[Mapping[str, Any]], sweep_degrees: float = 0.0) -> str:
    """results.md: the per-run table (mean ± std over the finished seeds) and the runs that
    did not finish, with their errors."""
    summary = summarise(rows)
    lines = [
        f"# {title}",
        "",
        "Mean ± sample standard deviation over the finished seeds of each run. Test accuracy "
        "of the last epoch; the best epoch's is selected on the test set (optimistic, as the "
        "reference reports it). Images/s: training throughput, mean over epochs.",
        "",
        "| run | parameters | seeds finished | last test accuracy | best test accuracy | "
        "epochs | train img/s | wall time per seed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        params = "–" if s["parameters"] is None else f"{s['parameters']:,}"
        epochs = "–" if not s["epochs"] else "/".join(str(e) for e in sorted(set(s["epochs"])))
        rate = f"{np.mean(s['train_images_per_s']):.0f}" if s["train_images_per_s"] else "–"
        wall = format_duration(np.mean(s["wall_time_s"])) if s["wall_time_s"] else "–"
        lines.append(
            f"| {s['name']} | {params} | {s['finished']}/{s['seeds']} | "
            f"{format_mean_std(s['last_test_accuracy'])} | "
            f"{format_mean_std(s['best_test_accuracy'])} | {epochs} | {rate} | {wall} |"
        )
    if sweep_degrees > 0:
        lines += [
            "",
            f"Rotation sweep: test accuracy of the last checkpoint on the test images rotated "
            f"by every multiple of {sweep_degrees:g} degrees (bilinear; {ROTATION_CSV}, "
            f"{ROTATION_PNG}). Quarter-turn change: the largest change of the accuracy "
            "under a rotation by 90, 180 or 270 degrees (exact on the pixel grid): 0 for a "
            "network whose predictions are invariant under quarter turns.",
            "",
            "| run | mean over angles | min over angles | quarter-turn change |",
            "|---|---:|---:|---:|",
        ]
        for s in summary:
            lines.append(
                f"| {s['name']} | {format_mean_std(s['rotation_mean_accuracy'])} | "
                f"{format_mean_std(s['rotation_min_accuracy'])} | "
                f"{format_mean_std(s['rotation_quarter_turn_change'])} |"
            )
    other = [r for r in rows if r["status"] != "finished" or r.get("error")]
    if other:
        lines += ["", "Not finished or with errors:", ""]
        for r in other:
            error = f": {r['error']}" if r.get("error") else ""
            lines.append(f"* {r['name']} seed {r['seed']}: {r['status']}{error}")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_parameters(rows: Sequence[Mapping[str, Any]], title: str, path: str) -> bool:
    """results.png: mean last-epoch test accuracy against parameters, one marker per run
    with its standard deviation as error bar; False (and no file) if nothing finished."""
    points = [s for s in summarise(rows) if s["last_test_accuracy"] and s["parameters"] is not None]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in points:
        mean, std = mean_std(s["last_test_accuracy"])
        ax.errorbar(s["parameters"], mean, yerr=0.0 if math.isnan(std) else std, fmt="o", capsize=4)
        ax.annotate(s["name"], (s["parameters"], mean), textcoords="offset points", xytext=(6, 4))
    counts = [s["parameters"] for s in points]
    if max(counts) > 4 * min(counts):
        ax.set_xscale("log")
    ax.set(xlabel="trainable parameters", ylabel="test accuracy (last epoch)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def rotation_table(runs: Sequence[Run], rows: Sequence[Mapping[str, Any]]):
    """Per run name: (angles, [accuracies per finished seed]) from the sweeps on disk."""
    finished = {(r["name"], r["seed"]) for r in rows if r["status"] == "finished"}
    table: dict[str, tuple[list[float], list[list[float]]]] = {}
    for run in runs:
        sweep = _read_json(os.path.join(run.workdir, SWEEP_JSON))
        if (run.name, run.seed) not in finished or not sweep.get("rotated_accuracy"):
            continue
        angles, curves = table.setdefault(run.name, (sweep["angles_degrees"], []))
        if sweep["angles_degrees"] == angles:
            curves.append(sweep["rotated_accuracy"])
    return table


def write_rotation(table, csv_path: str, png_path: str, title: str) -> None:
    """results_rotation.csv (name, angle, mean, std, seeds) and a plot of the mean curves."""
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "angle_degrees", "mean_accuracy", "std_accuracy", "seeds"])
        for name, (angles, curves) in table.items():
            for j, angle in enumerate(angles):
                mean, std = mean_std([c[j] for c in curves])
                writer.writerow([name, f"{angle:g}", f"{mean:.6g}", _csv_value(std), len(curves)])
    os.replace(csv_path + ".tmp", csv_path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (angles, curves) in table.items():
        curves = np.asarray(curves)
        mean = curves.mean(axis=0)
        (line,) = ax.plot(angles, mean, "o-", ms=3, label=f"{name} ({len(curves)} seeds)")
        if len(curves) > 1:
            std = curves.std(axis=0, ddof=1)
            ax.fill_between(angles, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="rotation of the test images (degrees)", ylabel="test accuracy", title=title)
    ax.set_xticks(np.arange(0, 361, 45))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def collect(study: ml_collections.ConfigDict, runs: Sequence[Run], workdir: str, title: str):
    """Writes the results files from whatever the runs' workdirs hold; returns the rows."""
    os.makedirs(workdir, exist_ok=True)
    params: dict[str, int | None] = {}
    rows = []
    for run in runs:
        config = load_config(run.config_file, run.overrides)
        if run.name not in params:
            params[run.name] = count_parameters(config)
        rows.append(dict(run_result(run, config.num_epochs), parameters=params[run.name]))
    write_csv(rows, os.path.join(workdir, RESULTS_CSV))
    with open(os.path.join(workdir, RESULTS_MD), "w") as f:
        f.write(markdown(title, rows, study.rotation_sweep_degrees))
    plot_accuracy_vs_parameters(rows, title, os.path.join(workdir, RESULTS_PNG))
    table = rotation_table(runs, rows)
    if table:
        write_rotation(
            table,
            os.path.join(workdir, ROTATION_CSV),
            os.path.join(workdir, ROTATION_PNG),
            f"{title}: rotation sweep",
        )
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
    path = os.path.join(workdir, STATUS_FILE)
    record = _read_json(path)
    record.update(updates)
    with open(path + ".tmp", "w") as f:
        json.dump({k: v for k, v in record.items() if v is not None}, f, indent=2)
    os.replace(path + ".tmp", path)


def _needs_sweep(run: Run, study: ml_collections.ConfigDict) -> bool:
    """Whether the run's rotation sweep is missing or was made of another checkpoint or
    other angles."""
    if study.rotation_sweep_degrees <= 0:
        return False
    sweep = _read_json(os.path.join(run.workdir, SWEEP_JSON))
    step = max((r["step"] for r in read_records(run.workdir)), default=None)
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
            if is_finished(run.workdir, num_epochs):
                action = "finished earlier"
            else:
                resumed = "resuming" if read_records(run.workdir) else "training"
                print(f"{head}: {resumed} (log {log_path}) ...", file=out, flush=True)
                start = time.time()
                returncode, text = _subprocess(run.train_command(sys.executable), log_path, stop)
                wall = (
                    time.time()
                    - start
                    + _read_json(os.path.join(run.workdir, STATUS_FILE)).get("wall_time_s", 0.0)
                )
                error = None if returncode == 0 else _error_message(text, returncode)
                _write_status(run.workdir, wall_time_s=wall, error=error, returncode=returncode)
                if error is not None:
                    failures += 1
                    print(f"{head}: FAILED: {error}", file=out, flush=True)
                    continue
                if not is_finished(run.workdir, num_epochs):
                    print(f"{head}: stopped; rerun the study to resume it", file=out, flush=True)
                    continue
                action = f"trained in {format_duration(time.time() - start)}"
            if stop.signum is None and _needs_sweep(run, study):
                returncode, text = _subprocess(
                    run.sweep_command(study, sys.executable), log_path, stop
                )
                sweep_error = None if returncode == 0 else _error_message(text, returncode)
                _write_status(run.workdir, sweep_error=sweep_error)
                if sweep_error:
                    action += f"; rotation sweep FAILED: {sweep_error}"
            row = run_result(run, num_epochs)
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
    print(f"results: {os.path.join(workdir, RESULTS_MD)}")
    print(markdown(title, rows, study.rotation_sweep_degrees), end="")
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
