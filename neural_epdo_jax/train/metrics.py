"""The run's records: ``metrics.jsonl``, the epoch lines, the summary and the curves."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"


def read_metrics(path: str, max_step: int) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` up to ``max_step``; rewrites the file without the
    later ones (left by a run killed after logging but before its checkpoint)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in records if r["step"] <= max_step]
    if len(kept) != len(records) and jax.process_index() == 0:
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(path + ".tmp", path)
    return kept


class MetricsWriter:
    """Appends records to ``metrics.jsonl`` (process 0 only), each synced to disk."""

    def __init__(self, path: str):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        if jax.process_index() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())


def best_epoch(records: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The evaluated epoch record with the highest test accuracy (the latest among ties,
    as the checkpoint manager keeps it)."""
    best = None
    for r in records:
        if "test_accuracy" in r and (best is None or r["test_accuracy"] >= best["test_accuracy"]):
            best = r
    return best


def summary_line(result: Mapping[str, Any]) -> str:
    """One line with the last-epoch and the best test accuracy."""
    if result.get("test_accuracy") is None:
        return f"stopped at step {result['step']} before a test evaluation; rerun to resume"
    line = f"test accuracy: {result['test_accuracy']:.4f} (last epoch)"
    if result.get("interrupted"):
        line = line.replace(
            "(last epoch)", f"(epoch {result['test_epoch']}; interrupted, rerun to resume)"
        )
    if result.get("best_test_accuracy") is not None:
        line += (
            f" | best {result['best_test_accuracy']:.4f} at epoch {result['best_epoch']}"
            " (selected on the test set, as the reference does)"
        )
    return line


def plot_curves(records: list[dict[str, Any]], path: str) -> None:
    """Training loss, train and test accuracy per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r for r in records if r.get("kind") == "epoch"]
    if not epochs:
        return
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["epoch"] for r in epochs], [r["train_loss"] for r in epochs], "o-")
    ax_loss.set(xlabel="epoch", ylabel="train loss (cross-entropy)", yscale="log")
    ax_acc.plot(
        [r["epoch"] for r in epochs], [r["train_accuracy"] for r in epochs], "o-", label="train"
    )
    tested = [r for r in epochs if "test_accuracy" in r]
    ax_acc.plot(
        [r["epoch"] for r in tested], [r["test_accuracy"] for r in tested], "s-", label="test"
    )
    ax_acc.set(xlabel="epoch", ylabel="accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_epoch(record: Mapping[str, Any], num_epochs: int) -> str:
    """The log line of an epoch record."""
    parts = [f"epoch {record['epoch']}/{num_epochs}"]
    for key, fmt in (
        ("train_loss", "{:.4f}"),
        ("train_accuracy", "{:.4f}"),
        ("test_accuracy", "{:.4f}"),
        ("learning_rate", "{:.3g}"),
        ("images_per_s", "{:.1f}"),
    ):
        if key in record:
            parts.append(f"{key} " + fmt.format(record[key]))
    return " | ".join(parts)
