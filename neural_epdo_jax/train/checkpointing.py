"""Checkpoints of a training run: an orbax CheckpointManager plus the run's config (json).

A workdir holds ``config.json`` (the config of the run that owns the checkpoints) and
``checkpoints/<step>/`` (orbax). Every checkpoint stores the whole ``TrainState`` and a small
json ``progress`` record (the running sums of the unfinished epoch, for mid-epoch saves).
The latest checkpoint and the best one by test accuracy are kept, all others deleted.

A checkpoint that cannot be read (a truncated file, missing metadata) is reported in one
line and skipped for the newest readable one (:func:`restore_newest_readable`); nothing is
deleted.

A workdir that holds checkpoints of a run with a different config is never overwritten:
:func:`check_and_save_config` refuses with the differing keys. Only keys that do not change
the training trajectory (:data:`RESUMABLE_KEYS`) may differ, so that e.g. ``num_epochs``
can be raised to extend a finished run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
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
    """The workdir holds no checkpoint (or no config.json)."""


class UnreadableWorkdirError(ValueError):
    """The workdir's config.json, or every one of its checkpoints, cannot be read."""


UNREADABLE_DIR = "unreadable_checkpoints"


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
    return ml_collections.ConfigDict(_read_config_json(path))


def _read_config_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UnreadableWorkdirError(
            f"{path} is not valid JSON ({e}); it is the config the run's checkpoints were "
            "trained with: restore it (the run's config file with its overrides, as JSON) or "
            "use another --workdir."
        ) from None


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
        saved = _read_config_json(path)
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
    ties, the one the preservation policy keeps); None if no checkpoint has one. Checkpoints
    with missing or broken files (`file_problem`) are left out."""
    best = None
    for step in sorted(manager.all_steps()):
        if file_problem(manager, step):
            continue
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


def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
    """The directory of checkpoint ``step``."""
    return os.path.join(str(manager.directory), str(step))


def file_problem(manager: ocp.CheckpointManager, step: int) -> str | None:
    """Why checkpoint ``step`` is incomplete, judged from the files orbax reads first (its
    metadata, the state's tree structure, the progress item); None if they are there."""
    path = step_dir(manager, step)
    try:
        with open(os.path.join(path, "_CHECKPOINT_METADATA")) as f:
            json.load(f)
    except FileNotFoundError:
        return "_CHECKPOINT_METADATA is missing"
    except (ValueError, UnicodeDecodeError) as e:
        return f"_CHECKPOINT_METADATA is not valid JSON ({e})"
    for item in ("state/_METADATA", "progress"):
        if not os.path.exists(os.path.join(path, item)):
            return f"{item} is missing"
    return None


def _one_line(error: BaseException) -> str:
    """The innermost cause of ``error`` (TensorStore's reason sits under orbax's wrapper),
    as one line of at most 300 characters."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines() or [type(error).__name__]
    line = f"{type(error).__name__}: {lines[0]}"
    return line if len(line) <= 300 else line[:297] + "..."


def restore_newest_readable(
    manager: ocp.CheckpointManager, steps: list[int], restore: Callable[[int], Any]
) -> tuple[int, Any, list[tuple[int, str]]]:
    """Restores the first of ``steps`` that can be read: ``restore(step)`` is tried in order,
    after `file_problem`; any error it raises marks the step unreadable.

    Returns:
      ``(step, restore(step), unreadable)``: ``unreadable`` lists ``(step, reason)`` for
      each step tried before it, the reason one line. Nothing is deleted.

    Raises:
      NoCheckpointError: ``steps`` is empty.
      UnreadableWorkdirError: no step can be read; names every step and its reason.
    """
    if not steps:
        raise NoCheckpointError(f"{manager.directory} holds no checkpoint.")
    unreadable = []
    for step in steps:
        reason = file_problem(manager, step)
        if reason is None:
            try:
                return step, restore(step), unreadable
            except Exception as e:  # noqa: BLE001 -- orbax and TensorStore raise many types
                reason = _one_line(e)
        unreadable.append((step, reason))
    raise UnreadableWorkdirError(
        f"no checkpoint in {manager.directory} can be read ("
        + "; ".join(f"step {s}: {r}" for s, r in unreadable)
        + "). Nothing was deleted; to start afresh use another --workdir."
    )


def unreadable_warning(
    step: int, reason: str, path: str, fallback: int, *, moved: bool = False
) -> str:
    """The one-line warning for an unreadable checkpoint, kept (or ``moved``) at ``path``."""
    kept = "It was moved to" if moved else "It is kept in"
    return (
        f"checkpoint step {step} cannot be read ({reason}); using step {fallback} instead. "
        f"{kept} {path}; once inspected, remove it with: rm -r {path}"
    )


def set_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Moves checkpoint ``step`` out of the checkpoint directory, to
    ``<workdir>/unreadable_checkpoints/<step>`` (a new name if taken), so that training can
    save earlier steps again; returns the new path. Nothing is deleted."""
    directory = os.path.join(os.path.dirname(str(manager.directory)), UNREADABLE_DIR)
    os.makedirs(directory, exist_ok=True)
    target, n = os.path.join(directory, str(step)), 1
    while os.path.exists(target):
        target, n = os.path.join(directory, f"{step}.{n}"), n + 1
    os.rename(step_dir(manager, step), target)
    return target
