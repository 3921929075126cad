"""Evaluates a training workdir: test accuracy and a rotation-robustness sweep.

  python -m neural_epdo_jax.tools.evaluate --workdir=runs/default [--checkpoint=latest]
  python train.py --mode=eval --workdir=runs/default          # the same, best checkpoint

Loads the workdir's config and its best (by test accuracy, selected on the test set as the
reference does) or latest checkpoint, prints the test accuracy, then the accuracy on the test
images rotated by every multiple of ``angle_step_degrees`` (bilinear, ``augment.rotate``;
multiples of 90 degrees are exact on the grid, the others interpolated). Writes
``rotation_sweep.json`` and ``rotation_sweep.png`` into the workdir.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from neural_epdo_jax.data import augment, pipeline
from neural_epdo_jax.runtime.host import setup_host
from neural_epdo_jax.train import checkpointing
from neural_epdo_jax.train.loop import load_split
from neural_epdo_jax.train.state import (
    TrainState,
    create_learning_rate_schedule,
    create_model,
    restore_train_state,
)
from neural_epdo_jax.train.steps import eval_step, evaluate, jit_data_parallel, replicated

SWEEP_JSON = "rotation_sweep.json"
SWEEP_PNG = "rotation_sweep.png"
CHECKPOINTS = ("best", "latest")


def load_state(
    workdir: str, checkpoint: str = "best", image_shape: tuple[int, ...] = (28, 28, 1)
) -> tuple[ml_collections.ConfigDict, TrainState, int, str]:
    """The workdir's config and the state of its best or latest checkpoint.

    Returns:
      ``(config, state, step, which)``; ``which`` is the checkpoint actually loaded
      ('latest' when 'best' was asked but no checkpoint has a test accuracy, or when the one
      asked for cannot be read: then a warning names it and the newest readable step is
      loaded instead).

    Raises:
      NoCheckpointError: no config.json or no checkpoint in ``workdir``.
      UnreadableWorkdirError: config.json or every checkpoint cannot be read.
      ValueError: ``checkpoint`` is not 'best' or 'latest'.
    """
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}")
    if not checkpointing.all_steps(workdir):
        raise checkpointing.NoCheckpointError(
            f"{os.path.abspath(workdir)} holds no checkpoint; train first: "
            f"python train.py --workdir={workdir} [--config=...]"
        )
    config = checkpointing.load_config(workdir)
    model = create_model(config)
    schedule = create_learning_rate_schedule(config, 1)
    manager = checkpointing.create_manager(workdir, read_only=True)
    try:
        newest_first = sorted(manager.all_steps(), reverse=True)
        best, which = checkpointing.best_step(manager), checkpoint
        if checkpoint == "latest" or best is None:
            which = "latest"
        else:
            newest_first.remove(best)
            newest_first.insert(0, best)
        step, (state, _), unreadable = checkpointing.restore_newest_readable(
            manager,
            newest_first,
            lambda s: restore_train_state(manager, s, model, config, schedule, tuple(image_shape)),
        )
        for bad, reason in unreadable:
            which = "latest readable"
            path = checkpointing.step_dir(manager, bad)
            logging.warning(checkpointing.unreadable_warning(bad, reason, path, step))
    finally:
        manager.close()
    return config, state, step, which


def sweep_angles(angle_step_degrees: float) -> np.ndarray:
    """``0, step, 2 step, ...`` below 360 degrees."""
    if not 0 < angle_step_degrees <= 360:
        raise ValueError(f"angle_step_degrees must be in (0, 360], got {angle_step_degrees}")
    return np.arange(0.0, 360.0 - 1e-9, angle_step_degrees)


def rotated_runs(
    step: Callable,
    state: Any,
    images: np.ndarray,
    labels: np.ndarray,
    angles_degrees: Iterable[float],
    *,
    batch_size: int,
    sharding: jax.sharding.NamedSharding | None = None,
) -> Iterator[tuple[Callable, Iterator[dict]]]:
    """The one loop over rotated test images: for each angle, ``(fn, batches)``, where
    ``fn(state, batch)`` runs ``step(state, batch, axis_name=None)`` (a step as `eval_step`,
    jitted once for all angles, data-parallel over ``sharding``: `jit_data_parallel`) on the
    batch's images rotated by the angle (counter-clockwise, bilinear, zero fill, about the
    centre: `augment.rotate`), and ``batches`` are the images' batches in order (the last one
    padded; its ``mask`` marks the real rows)."""

    def rotated_step(state, batch, angle_degrees, axis_name=None):
        angles = jnp.full(batch["image"].shape[:1], jnp.deg2rad(angle_degrees))  # [B]
        images = augment.rotate(batch["image"], angles, order=1)
        return step(state, dict(batch, image=images), axis_name=axis_name)

    fn = jit_data_parallel(rotated_step, sharding)
    for angle in angles_degrees:
        batches = pipeline.epoch_batches(
            images, labels, batch_size, shuffle=False, sharding=sharding
        )
        angle = np.float32(angle)
        yield (lambda s, b, a=angle: fn(s, b, a)), batches


def rotation_sweep(
    state: TrainState,
    images: np.ndarray,
    labels: np.ndarray,
    angles_degrees: np.ndarray,
    *,
    batch_size: int,
    sharding: jax.sharding.NamedSharding | None = None,
) -> list[float]:
    """Test accuracy of ``state`` on the images rotated by each angle (`rotated_runs`)."""
    runs = rotated_runs(
        eval_step,
        state,
        images,
        labels,
        angles_degrees,
        batch_size=batch_size,
        sharding=sharding,
    )
    return [evaluate(fn, state, batches)["accuracy"] for fn, batches in runs]


def plot_sweep(angles: np.ndarray, accuracies: list[float], title: str, path: str) -> None:
    """Accuracy against rotation angle as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(angles, accuracies, "o-", ms=3)
    ax.set(xlabel="rotation of the test images (degrees)", ylabel="test accuracy", title=title)
    ax.set_xticks(np.arange(0, 361, 45))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(
    workdir: str,
    *,
    checkpoint: str = "best",
    angle_step_degrees: float = 7.5,
    num_test_examples: int | None = None,
) -> dict[str, Any]:
    """Evaluates ``workdir``: prints the test accuracy and the rotation sweep table, writes
    the sweep as json and PNG into ``workdir``; returns what the json holds."""
    angles = sweep_angles(angle_step_degrees)
    config, state, step, which = load_state(workdir, checkpoint)
    limit = config.num_test_examples if num_test_examples is None else num_test_examples
    images, labels = load_split(config, config.test_split, limit)
    batch_size = config.eval_batch_size
    sharding = pipeline.data_mesh_sharding((batch_size,))
    if sharding is not None:
        state = jax.device_put(state, replicated(sharding))

    eval_fn = jit_data_parallel(eval_step, sharding)
    test = evaluate(
        eval_fn,
        state,
        pipeline.epoch_batches(images, labels, batch_size, shuffle=False, sharding=sharding),
    )
    print(
        f"{workdir}: {which} checkpoint (step {step}): test accuracy {test['accuracy']:.4f} "
        f"on {len(images)} {config.dataset} '{config.test_split}' images"
    )
    accuracies = rotation_sweep(
        state, images, labels, angles, batch_size=batch_size, sharding=sharding
    )
    print("rotation (deg) | test accuracy")
    for angle, accuracy in zip(angles, accuracies):
        print(f"{angle:14.1f} | {accuracy:.4f}")
    print(
        f"mean over angles {np.mean(accuracies):.4f}, min {np.min(accuracies):.4f} "
        f"at {angles[int(np.argmin(accuracies))]:g} deg"
    )
    result = {
        "workdir": os.path.abspath(workdir),
        "checkpoint": which,
        "step": int(step),
        "dataset": config.dataset,
        "split": config.test_split,
        "num_examples": len(images),
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "angles_degrees": [float(a) for a in angles],
        "rotated_accuracy": accuracies,
    }
    if jax.process_index() == 0:
        with open(os.path.join(workdir, SWEEP_JSON), "w") as f:
            json.dump(result, f, indent=2)
        plot_sweep(
            angles,
            accuracies,
            f"{os.path.basename(os.path.abspath(workdir))} ({which}, step {step})",
            os.path.join(workdir, SWEEP_PNG),
        )
    return result


def main(argv: list[str]) -> None:
    """Command-line entry point (flags below)."""
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    setup_host(cpu_devices=values.cpu_devices, compilation_cache=values.compilation_cache_dir)
    try:
        run(
            values.workdir,
            checkpoint=values.checkpoint,
            angle_step_degrees=values.angle_step_degrees,
            num_test_examples=values.num_test_examples,
        )
    except (checkpointing.NoCheckpointError, ValueError) as e:
        raise SystemExit(f"evaluate: error: {e}") from None


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
    flags.DEFINE_enum("checkpoint", "best", list(CHECKPOINTS), "Which checkpoint to load.")
    flags.DEFINE_float("angle_step_degrees", 7.5, "Spacing of the rotation sweep.")
    flags.DEFINE_integer(
        "num_test_examples", None, "Evaluate the first N test images (default: the config's)."
    )
    flags.DEFINE_integer(
        "cpu_devices",
        0,
        "On CPU: JAX devices, one per core if 0 (`parallel.use_cpu_cores`).",
        lower_bound=0,
    )
    flags.DEFINE_string(
        "compilation_cache_dir", None, "As train.py's (default ~/.cache/neural_epdo_jax/xla)."
    )
    flags.mark_flag_as_required("workdir")
    app.run(main)
