"""Checkpoints of a training run: an orbax CheckpointManager plus the run's config (json).

A workdir holds ``config.json`` (the config of the run that owns the checkpoints) and
``checkpoints/<step>/`` (orbax). Every checkpoint stores the whole ``TrainState`` and a small
json ``progress`` record (the running sums of the unfinished epoch, for mid-epoch saves).
The latest checkpoint and the best one by test accuracy are kept, all others deleted.

A workdir that holds checkpoints of a run with a different config is never overwritten:
:func:`check_and_save_config` refuses with the differing keys. Only keys that do not change
the training trajectory (:data:`RESUMABLE_KEYS`) may differ, so that e.g. ``num_epochs``
can be raised to extend a finished run.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
BEST_METRIC = "test_accuracy"

# Config keys that may differ between a run and its resumption: none changes the parameters
# a run reaches at a given step (data paths only say where the same files are).
RESUMABLE_KEYS = frozenset(
    {
        "num_epochs",
        "eval_every_epochs",
        "eval_from_epoch",
        "eval_batch_size",
        "log_every_steps",
        "checkpoint_every_epochs",
        "progress_bar",
        "distributed",
        "data_dir",
        "manual_dir",
        "idx_dir",
    }
)


# Model keys of the same kind: how the network runs (its formulation, its chunking), not its
# parameters or math. Absent in the config.json of runs from before they existed.
RESUMABLE_MODEL_KEYS = frozenset({"model.impl", "model.chunk", "model.eval_chunk"})


class IncompatibleWorkdirError(ValueError):
    """The workdir holds checkpoints of a run whose config differs from the requested one."""


class NoCheckpointError(FileNotFoundError):
    """The workdir holds no checkpoint to evaluate."""


def checkpoint_dir(workdir: str) -> str:
    """The orbax directory of a workdir."""
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain json data (tuples become lists), as written to config.json."""
    return json.loads(config.to_json_best_effort())


def config_differences(saved: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """Human-readable differences of the trajectory-relevant keys of two config dicts."""
    saved_flat, requested_flat = _flatten(saved), _flatten(requested)
    lines = []
    for key in sorted(set(saved_flat) | set(requested_flat)):
        if key.split(".")[0] in RESUMABLE_KEYS or key in RESUMABLE_MODEL_KEYS:
            continue
        missing = "<absent>"
        old, new = saved_flat.get(key, missing), requested_flat.get(key, missing)
        if old != new:
            lines.append(f"{key}: {old!r} in the workdir, {new!r} requested")
    return lines


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config saved in a workdir (lists where the original had tuples)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise NoCheckpointError(f"{path} does not exist: {workdir!r} is not a training workdir.")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def all_steps(workdir: str) -> list[int]:
    """Steps of the finished checkpoints in a workdir (no directory is created)."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def check_and_save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes ``config.json``, refusing if the workdir's checkpoints belong to another config.

    Raises:
      IncompatibleWorkdirError: the workdir has checkpoints and its saved config differs from
        ``config`` in a key outside :data:`RESUMABLE_KEYS` (or was deleted). Nothing is
        written in that case.
    """
    requested = config_to_dict(config)
    path = os.path.join(workdir, CONFIG_FILE)
    if all_steps(workdir):
        if not os.path.exists(path):
            raise IncompatibleWorkdirError(
                f"{workdir} holds checkpoints but no {CONFIG_FILE}; refusing to resume from "
                "them. Use another --workdir."
            )
        with open(path) as f:
            saved = json.load(f)
        differences = config_differences(saved, requested)
        if differences:
            raise IncompatibleWorkdirError(
                f"{workdir} holds checkpoints of a run with a different config; refusing to "
                "resume or overwrite it. Differing keys:\n  "
                + "\n  ".join(differences)
                + f"\nUse another --workdir, or delete {checkpoint_dir(workdir)} to start over."
            )
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(requested, f, indent=2, sort_keys=True)
        os.replace(tmp, path)


def _score(metrics: dict[str, float]) -> float:
    return metrics.get(BEST_METRIC, -math.inf)


def create_manager(workdir: str, *, read_only: bool = False) -> ocp.CheckpointManager:
    """A manager keeping the latest checkpoint and the best one by test accuracy.

    Saves are synchronous: a checkpoint is complete on disk when :func:`save` returns, and a
    save interrupted by ``kill -9`` leaves only a temporary directory, which is ignored.
    ``read_only``: for loading only; creates and cleans up nothing (never save through it).
    """
    policy = checkpoint_managers.AnyPreservationPolicy(
        [
            checkpoint_managers.LatestN(n=1),
            checkpoint_managers.BestN(
                get_metric_fn=_score, n=1, keep_checkpoints_without_metrics=False
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        best_fn=_score,  # Makes the manager write each checkpoint's metrics to disk.
        best_mode="max",
        enable_async_checkpointing=False,
        # read_only: nothing is created or cleaned up (orbax's own read_only flag only adds
        # warnings; this module never saves through such a manager).
        cleanup_tmp_directories=not read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def best_step(manager: ocp.CheckpointManager) -> int | None:
    """The step of the kept checkpoint with the highest test accuracy (the latest among
    ties, the one the preservation policy keeps); None if no checkpoint has one."""
    best = None
    for step in sorted(manager.all_steps()):
        metrics = manager.metrics(step)
        if metrics and BEST_METRIC in metrics:
            if best is None or metrics[BEST_METRIC] >= best[0]:
                best = (metrics[BEST_METRIC], step)
    return None if best is None else best[1]


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    progress: dict[str, Any],
    *,
    test_accuracy: float | None = None,
) -> None:
    """Saves ``state`` and the json-able ``progress`` at ``step`` (blocking)."""
    metrics = {} if test_accuracy is None else {BEST_METRIC: float(test_accuracy)}
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)
        ),
        metrics=metrics,
    )
    manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict]:
    """Restores ``(state, progress)`` at ``step`` into the structure and shardings of ``target``.

    ``target`` is a state or its ``jax.eval_shape``; leaves without a sharding are placed on
    the first device.
    """
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def as_abstract(x):
        sharding = getattr(x, "sharding", None) or default
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    abstract = jax.tree.map(as_abstract, target)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()
        ),
    )
    return restored["state"], dict(restored["progress"])
