"""A study's results: what each run's workdir holds, the tables and plots over seeds.

Reads the files train.py and `evaluate` write (``metrics.jsonl``, ``rotation_sweep.json``)
and the study runner's own record (``study_run.json``: wall time, last error); writes
``results.csv`` (one row per run and seed), ``results.md`` (mean and sample standard
deviation over the finished seeds), ``results.png`` and, with rotation sweeps,
``results_rotation.csv`` / ``results_rotation.png``. Imports no JAX.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"  # METRICS_FILE (not imported: that pulls in JAX)
SWEEP_JSON = "rotation_sweep.json"  # evaluate.SWEEP_JSON
STATUS_FILE = "study_run.json"  # the runner's record of a run: wall time, last error
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


# ------------------------------------------------------------------ a run's results


def read_records(workdir: str) -> list[dict[str, Any]]:
    """The epoch records of a workdir's metrics.jsonl (empty if there is none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r.get("kind") == "epoch"]


def read_json(path: str) -> dict[str, Any]:
    """A json file's content; {} if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _finished(records: Sequence[Mapping[str, Any]], num_epochs: int) -> bool:
    return any(r["epoch"] >= num_epochs and "test_accuracy" in r for r in records)


def is_finished(workdir: str, num_epochs: int) -> bool:
    """Whether the run has an evaluated record of its last epoch."""
    return _finished(read_records(workdir), num_epochs)


def run_result(name: str, seed: int, workdir: str, num_epochs: int) -> dict[str, Any]:
    """One results.csv row: what the workdir of run ``name`` with ``seed`` holds.

    ``status``: 'finished' (an evaluated record of the last epoch), 'failed' (the runner's
    last attempt failed), 'unfinished' (some epochs) or 'not run'.
    """
    records = read_records(workdir)
    status_record = read_json(os.path.join(workdir, STATUS_FILE))
    finished = _finished(records, num_epochs)
    if finished:
        status = "finished"
    elif status_record.get("error"):
        status = "failed"
    else:
        status = "unfinished" if records else "not run"
    row: dict[str, Any] = dict(name=name, seed=seed, status=status, workdir=workdir)
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
    sweep = read_json(os.path.join(workdir, SWEEP_JSON))
    if finished and sweep.get("rotated_accuracy") and sweep.get("step") == records[-1]["step"]:
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


def rotation_table(rows: Sequence[Mapping[str, Any]]):
    """Per run name: (angles, [accuracies of each finished seed]) from the sweeps on disk."""
    table: dict[str, tuple[list[float], list[list[float]]]] = {}
    for row in rows:
        if row.get("rotation_mean_accuracy") is None:  # no sweep of its last checkpoint
            continue
        sweep = read_json(os.path.join(row["workdir"], SWEEP_JSON))
        angles, curves = table.setdefault(row["name"], (sweep["angles_degrees"], []))
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


def write_results(
    rows: Sequence[Mapping[str, Any]], workdir: str, title: str, sweep_degrees: float = 0.0
) -> None:
    """Writes every results file of ``rows`` into ``workdir``."""
    os.makedirs(workdir, exist_ok=True)
    write_csv(rows, os.path.join(workdir, RESULTS_CSV))
    with open(os.path.join(workdir, RESULTS_MD), "w") as f:
        f.write(markdown(title, rows, sweep_degrees))
    plot_accuracy_vs_parameters(rows, title, os.path.join(workdir, RESULTS_PNG))
    table = rotation_table(rows)
    if table:
        png = os.path.join(workdir, ROTATION_PNG)
        write_rotation(table, os.path.join(workdir, ROTATION_CSV), png, f"{title}: rotation sweep")
