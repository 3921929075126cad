"""Training and evaluation of the MNIST-rot networks: the logic behind train.py.

The protocol (optimizer, schedule, augmentation) is in docs/design.md, "Training protocol".

``train_and_evaluate(config, workdir)`` trains, evaluates, checkpoints and resumes, as a
loop of named steps sharing one `Run`: `start_run` (data, state, jitted steps), then per
epoch `run_epoch` (`train_one_step`, `consume_step`) and `end_epoch` (evaluation, record,
checkpoint), `save_interrupted` on a stop, and `finish_run` (curves, the result).
Determinism: the data order is a pure function of ``(seed, epoch)`` and every step's random
numbers (augmentation, dropout) of ``(seed, step)``, so a run interrupted at any point
(SIGINT/SIGTERM: the current step finishes and is saved; ``kill -9``: the unfinished epoch is
lost) and rerun ends, on CPU, with bitwise the same parameters as an uninterrupted one.

Multi-device (data parallelism, `parallel`): with several local devices the batch is split
over a 'data' mesh axis, the state replicated, and the steps run per device
(``jax.shard_map``, `jit_data_parallel`); BatchNorm statistics are those of the whole
batch, the loss, the gradients and the metrics are summed over the devices and the random
draws made for the whole batch, so a step equals the one-device step up to float summation
order. train.py splits a CPU host into one device per core (`parallel.use_cpu_cores`): XLA
runs each device's program mostly on one core.
Multi-host: ``config.distributed = True`` calls ``jax.distributed.initialize()`` first
(cluster auto-detection, e.g. SLURM; `initialize_distributed` takes explicit coordinator
arguments). The mesh then spans every process's devices, each process assembles its own rows
of every batch, and a stop requested by a signal to any process is agreed by all (it rides
in the step's metrics), so they stop after the same step.

One run per workdir: a run holds ``<workdir>/train.lock`` (`workdir_lock`). A latest
checkpoint that cannot be read is moved to ``<workdir>/unreadable_checkpoints/`` with a
warning, and training resumes from the newest readable one.

Reference choices kept as switches: ``reset_adam_every_epoch`` re-creates the Adam moments
(and bias correction) at every epoch start, as the reference's per-epoch ``torch.optim.Adam``
does; off by default. Model selection on the test set (the reference's "best") is reported
next to the last-epoch accuracy, never instead of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from neural_epdo_jax.data import pipeline, sources
from neural_epdo_jax.runtime.host import release_free_memory
from neural_epdo_jax.train import checkpointing, workdir_lock
from neural_epdo_jax.train.metrics import (
    CURVES_FILE,
    METRICS_FILE,
    MetricsWriter,
    best_epoch,
    format_epoch,
    plot_curves,
    read_metrics,
)
from neural_epdo_jax.train.state import (
    ConfigError,
    TrainState,
    create_learning_rate_schedule,
    create_model,
    create_optimizer,
    create_train_state,
    restore_train_state,
    validate_config,
)
from neural_epdo_jax.train.steps import evaluate, jit_steps, state_sharding


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or non-finite parameters."""


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """``jax.distributed.initialize`` with these arguments (None: auto-detected, e.g. from
    SLURM), unless it has run already. Call it before JAX computes anything."""
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )


def _any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def load_split(
    config: ml_collections.ConfigDict, split: str, limit: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of a split of ``config.dataset``; with ``limit`` != -1 a fixed
    subset of ``limit`` examples (the same on every run: seed 0, in the split's order; splits
    may be sorted by class, so not simply the first ones)."""
    images, labels = sources.load(
        config.dataset,
        split,
        data_dir=config.data_dir or None,
        manual_dir=config.manual_dir or None,
        idx_dir=config.idx_dir or None,
        rotate=config.dataset == "idx" and config.idx_rotate,
    )
    if limit != -1 and limit < len(images):
        keep = np.sort(np.random.default_rng(0).permutation(len(images))[:limit])
        images, labels = images[keep], labels[keep]
    return images, labels


class _StopRequest:
    """SIGINT/SIGTERM handler: asks the loop to stop after the current step (main thread
    only; a second signal gets the previous handler's behaviour)."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


def _log(message: str) -> None:
    if jax.process_index() == 0:
        tqdm.tqdm.write(message)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint), evaluating on
    the test split; returns the final metrics.

    Writes ``config.json``, ``checkpoints/`` (latest + best), ``metrics.jsonl`` (a record
    every ``log_every_steps`` steps and one per epoch) and ``training_curves.png``.

    Returns:
      ``test_accuracy`` (last epoch), ``best_test_accuracy`` / ``best_epoch`` (selected on the
      test set), ``train_loss``, ``train_accuracy``, ``epoch``, ``step``, ``images_per_s``
      (training throughput after this process's first step), ``wall_time_s``,
      ``interrupted`` (True if stopped by SIGINT/SIGTERM; rerun to resume) and ``signal``
      (the stopping signal's number, or None).

    Raises:
      ValueError: invalid config; IncompatibleWorkdirError: the workdir belongs to another
        config (both before any data is read or anything compiled).
      WorkdirLockedError: another run holds the workdir (`workdir_lock`).
      UnreadableWorkdirError: config.json or every checkpoint cannot be read.
      NonFiniteLossError: the loss or parameters became non-finite (the last checkpoint,
        from before, stays).
    """
    wall_start = time.time()
    if config.distributed:
        initialize_distributed()
    model = validate_config(config)
    try:
        sharding = pipeline.data_mesh_sharding((config.batch_size, config.eval_batch_size))
    except ValueError as e:
        raise ConfigError(f"invalid config: {e}") from None
    num_shards = 1 if sharding is None else sharding.mesh.size
    if sharding is not None:
        model = create_model(config, axis_name=sharding.mesh.axis_names[0])
    workdir = os.path.abspath(workdir)
    with _lock(workdir):
        return _train_and_evaluate(config, workdir, model, sharding, num_shards, wall_start)


@contextlib.contextmanager
def _lock(workdir: str):
    """The workdir lock, taken by process 0 for all processes (each fails if it fails)."""
    error, record = None, None
    if jax.process_index() == 0:
        try:
            record = workdir_lock.acquire(workdir)
        except workdir_lock.WorkdirLockedError as e:
            error = e
    if jax.process_count() > 1:
        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if failed and error is None:
            error = workdir_lock.WorkdirLockedError(f"process 0 could not lock {workdir}")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if record is not None:
            workdir_lock.release(workdir, record)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_processes(name)


def _restore_newest_readable(manager, workdir, restore):
    """(manager, step, (state, progress)) of the newest readable checkpoint; newer unreadable
    ones are moved aside (so that training can save their steps again) with a warning."""
    newest_first = sorted(manager.all_steps(), reverse=True)
    step, restored, unreadable = checkpointing.restore_newest_readable(
        manager, newest_first, restore
    )
    if unreadable:
        _sync("unreadable checkpoints found")
        if jax.process_index() == 0:
            for bad, reason in unreadable:
                path = checkpointing.set_aside(manager, bad)
                logging.warning(
                    checkpointing.unreadable_warning(bad, reason, path, step, moved=True)
                )
        _sync("unreadable checkpoints moved")
        manager.close()
        manager = checkpointing.create_manager(workdir)
    return manager, step, restored


@dataclasses.dataclass
class Run:
    """What the steps of one `train_and_evaluate` call share: data, state, records, timing."""

    config: ml_collections.ConfigDict
    workdir: str
    sharding: jax.sharding.NamedSharding | None
    train_data: tuple[np.ndarray, np.ndarray]
    test_data: tuple[np.ndarray, np.ndarray]
    steps_per_epoch: int
    schedule: optax.Schedule
    manager: Any
    state: TrainState
    progress: dict[str, Any]
    step: int
    train_fn: Callable
    eval_fn: Callable
    train_rng: jax.Array
    records: list[dict[str, Any]]
    writer: MetricsWriter
    num_params: int
    stop_rows: slice  # this process's rows of a training batch
    best: dict[str, Any] | None = None
    epoch_record: dict[str, Any] | None = None
    # (images, seconds) per epoch, not counting this process's first step.
    throughput: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    timing_start: float | None = None  # set after the first (compiling) step
    timing_images: int = 0
    stop: _StopRequest | None = None
    # Whether to stop (a signal): agreed by all processes at the same step (`_any_process` at
    # epoch ends, the step's ``stop`` metric in between), so that they save the same step.
    stop_agreed: bool = False
    interrupted: bool = False

    @property
    def multiprocess(self) -> bool:
        return jax.process_count() > 1

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.num_epochs


def _train_and_evaluate(config, workdir, model, sharding, num_shards, wall_start):
    checkpointing.check_and_save_config(config, workdir)
    run = start_run(config, workdir, model, sharding, num_shards)
    try:
        with _StopRequest() as run.stop:
            for epoch in range(run.step // run.steps_per_epoch, config.num_epochs):
                sums = run_epoch(run, epoch)
                if run.step < (epoch + 1) * run.steps_per_epoch and _stopping(run):
                    save_interrupted(run, {"epoch_sums": sums})
                    break
                end_epoch(run, epoch, sums)
                if _stopping(run):
                    save_interrupted(run, {})
                    break
    finally:
        run.manager.close()
    return finish_run(run, wall_start)


def start_run(config, workdir, model, sharding, num_shards) -> Run:
    """Loads the data, restores the latest checkpoint (or initialises), jits the steps."""
    train_data = load_split(config, config.train_split, config.num_train_examples)
    test_data = load_split(config, config.test_split, config.num_test_examples)
    steps_per_epoch = pipeline.num_batches(len(train_data[0]), config.batch_size)
    _log(
        f"{config.dataset}: {len(train_data[0])} training / {len(test_data[0])} test images, "
        f"{steps_per_epoch} steps per epoch, {config.num_epochs} epochs, "
        f"{num_shards} device(s) ({jax.devices()[0].platform})"
    )
    schedule = create_learning_rate_schedule(config, steps_per_epoch)
    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    manager, state, progress, step = _initial_state(
        config,
        workdir,
        model,
        schedule,
        init_rng,
        train_data[0].shape[1:],
        sharding,
        steps_per_epoch,
    )
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    _log(f"{config.model_name}: {num_params:,} trainable parameters")

    metrics_path = os.path.join(workdir, METRICS_FILE)
    records = read_metrics(metrics_path, step)
    train_fn, eval_fn = jit_steps(
        config, steps_per_epoch, sharding, stop_flag=jax.process_count() > 1
    )
    return Run(
        config=config,
        workdir=workdir,
        sharding=sharding,
        train_data=train_data,
        test_data=test_data,
        steps_per_epoch=steps_per_epoch,
        schedule=schedule,
        manager=manager,
        state=state,
        progress=progress,
        step=step,
        train_fn=train_fn,
        eval_fn=eval_fn,
        train_rng=train_rng,
        records=records,
        writer=MetricsWriter(metrics_path),
        num_params=num_params,
        stop_rows=pipeline.local_rows(sharding, config.batch_size),
        best=best_epoch(records),
        epoch_record=next((r for r in reversed(records) if r.get("kind") == "epoch"), None),
    )


def _initial_state(
    config, workdir, model, schedule, init_rng, image_shape, sharding, steps_per_epoch
):
    """(manager, state, progress, step): the newest readable checkpoint's, or a fresh state."""
    tx = create_optimizer(config, schedule)
    manager = checkpointing.create_manager(workdir)
    if manager.latest_step() is None:
        state = create_train_state(init_rng, model, tx, image_shape)
        # Committed like a restored state, so that fresh and resumed runs share one program.
        return manager, jax.device_put(state, state_sharding(sharding)), {}, 0
    manager, _, (state, progress) = _restore_newest_readable(
        manager,
        workdir,
        lambda s: restore_train_state(
            manager, s, model, config, schedule, image_shape, state_sharding(sharding)
        ),
    )
    step = int(jax.device_get(state.step))
    if progress.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        raise checkpointing.IncompatibleWorkdirError(
            f"{workdir}: the checkpoint has {progress['steps_per_epoch']} steps per epoch, "
            f"this config {steps_per_epoch}; the dataset changed. Use another --workdir."
        )
    _log(f"resumed from {manager.directory} at step {step} (epoch {step / steps_per_epoch:g})")
    if step >= config.num_epochs * steps_per_epoch:
        _log(
            f"the checkpoint is at or past num_epochs={config.num_epochs}: nothing to train, "
            "reporting its results (raise --config.num_epochs to continue, or use another "
            "--workdir to start afresh)"
        )
    return manager, state, progress, step


def run_epoch(run: Run, epoch: int) -> dict[str, float]:
    """Trains ``epoch`` from ``run.step`` (a resumed epoch skips its done batches) until its
    end or a stop; returns the epoch's metric sums (``loss``, ``correct``, ``count``)."""
    config = run.config
    skip = run.step - epoch * run.steps_per_epoch
    sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    if skip:
        sums.update(run.progress.get("epoch_sums", {}))
    window = {"loss": 0.0, "count": 0.0}
    bar = tqdm.tqdm(
        total=run.steps_per_epoch,
        initial=skip,
        desc=f"epoch {epoch + 1}/{config.num_epochs}",
        unit="step",
        leave=False,
        disable=not config.progress_bar or jax.process_index() != 0,
    )
    if run.timing_start is not None:
        run.timing_start, run.timing_images = time.time(), 0
    batches = pipeline.epoch_batches(
        *run.train_data,
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        epoch=epoch,
        sharding=run.sharding,
    )
    pending = None
    for batch in itertools.islice(batches, skip, None):
        step_metrics = train_one_step(run, batch)
        run.step += 1
        if pending is not None:
            consume_step(run, *pending, epoch, sums, window, bar)
        pending = (step_metrics, run.step)
        if run.stop_agreed if run.multiprocess else run.stop.signum is not None:
            break
    if pending is not None:
        consume_step(run, *pending, epoch, sums, window, bar)
    bar.close()
    if run.timing_images:
        run.throughput.append((run.timing_images, time.time() - run.timing_start))
    return sums


def train_one_step(run: Run, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Dispatches one train step (updating ``run.state``); returns its metrics, on device. The
    first one is timed with its compilation, the others counted for the throughput."""
    if run.multiprocess:
        rows = run.stop_rows.stop - run.stop_rows.start
        flag = np.full((rows,), run.stop.signum is not None, np.float32)
        stop = jax.make_array_from_process_local_data(run.sharding, flag, (run.config.batch_size,))
        batch = dict(batch, stop=stop)
    if run.timing_start is not None:
        run.state, step_metrics = run.train_fn(run.state, batch, run.train_rng)
        run.timing_images += run.config.batch_size
        return step_metrics
    compile_start = time.time()
    run.state, step_metrics = run.train_fn(run.state, batch, run.train_rng)
    release_free_memory()  # the compiler's
    jax.block_until_ready(step_metrics)
    _log(f"first train step (compile included): {time.time() - compile_start:.1f}s")
    run.timing_start = time.time()
    return step_metrics


def consume_step(run: Run, step_metrics, at_step, epoch, sums, window, bar) -> None:
    """Host side of a finished step: finiteness check, sums, progress bar, train record."""
    m = jax.device_get(step_metrics)
    if not m["finite"]:
        latest = run.manager.latest_step()
        kept = (
            "no checkpoint had been saved yet"
            if latest is None
            else f"the last good checkpoint (step {latest}) in {run.manager.directory} is kept"
        )
        raise NonFiniteLossError(
            f"non-finite loss or parameters at step {at_step} (epoch "
            f"{epoch + 1}, batch {at_step - epoch * run.steps_per_epoch}/"
            f"{run.steps_per_epoch}; summed batch loss {float(m['loss'])}). "
            f"Stopped; {kept}. Try a lower --config.learning_rate, in a new "
            "--workdir (this one keeps the config it was trained with)."
        )
    if m.get("stop"):
        run.stop_agreed = True
    for key in sums:
        sums[key] += float(m[key])
    for key in window:
        window[key] += float(m[key])
    bar.update(1)
    if at_step % run.config.log_every_steps == 0 or at_step == run.total_steps:
        loss = window["loss"] / max(window["count"], 1.0)
        seconds = time.time() - (run.timing_start or time.time())
        rate = run.timing_images / seconds if seconds > 0 else 0.0
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}")
        run.writer.write(
            {
                "kind": "train",
                "step": at_step,
                "epoch": at_step / run.steps_per_epoch,
                "train_loss": loss,
                "learning_rate": float(run.schedule(at_step - 1)),
            }
        )
        window.update(loss=0.0, count=0.0)


def end_epoch(run: Run, epoch: int, sums: Mapping[str, float]) -> None:
    """A finished epoch: its record (train metrics, a test evaluation when due), logged and
    written, and a checkpoint when due or the test accuracy is a new best."""
    config = run.config
    count = max(sums["count"], 1.0)
    record = {
        "kind": "epoch",
        "step": run.step,
        "epoch": epoch + 1,
        "train_loss": sums["loss"] / count,
        "train_accuracy": sums["correct"] / count,
        "learning_rate": float(run.schedule(run.step - 1)),
    }
    if run.timing_images:
        record["images_per_s"] = run.throughput[-1][0] / run.throughput[-1][1]
    last_epoch = epoch + 1 == config.num_epochs
    evaluate_now = last_epoch or (
        epoch + 1 >= config.eval_from_epoch
        and (epoch + 1 - config.eval_from_epoch) % config.eval_every_epochs == 0
    )
    new_best = False
    if evaluate_now:
        eval_start = time.time()
        test = evaluate(run.eval_fn, run.state, _test_batches(run))
        record.update(
            test_loss=test["loss"],
            test_accuracy=test["accuracy"],
            eval_time_s=time.time() - eval_start,
        )
        new_best = run.best is None or test["accuracy"] >= run.best["test_accuracy"]
        if new_best:
            run.best = record
    run.epoch_record = record
    run.writer.write(record)
    run.records.append(record)
    _log(format_epoch(record, config.num_epochs))
    if (epoch + 1) % config.checkpoint_every_epochs == 0 or last_epoch or new_best:
        checkpointing.save(
            run.manager,
            run.step,
            run.state,
            {"steps_per_epoch": run.steps_per_epoch},
            test_accuracy=record.get("test_accuracy"),
        )


def _stopping(run: Run) -> bool:
    """Whether a stop was requested (on any process: a collective at epoch ends)."""
    if not run.stop_agreed:
        run.stop_agreed = _any_process(run.stop.signum is not None)
    return run.stop_agreed


def save_interrupted(run: Run, progress: dict[str, Any]) -> None:
    """Marks the run interrupted, saving ``run.step`` (with ``progress``) unless it is saved."""
    if run.manager.latest_step() != run.step:
        progress = dict(progress, steps_per_epoch=run.steps_per_epoch)
        checkpointing.save(run.manager, run.step, run.state, progress)
    run.interrupted = True


def _test_batches(run: Run):
    return pipeline.epoch_batches(
        *run.test_data, run.config.eval_batch_size, shuffle=False, sharding=run.sharding
    )


def finish_run(run: Run, wall_start: float) -> dict[str, Any]:
    """Logs how the run ended, plots its curves, and returns `train_and_evaluate`'s result."""
    # A process that did not get the signal itself stops for another's: reported as SIGTERM.
    signum = (run.stop.signum or signal.SIGTERM) if run.interrupted else None
    if run.interrupted:
        _log(
            f"stopped by {signal.Signals(signum).name} at step {run.step}; checkpoint saved in "
            f"{checkpointing.checkpoint_dir(run.workdir)}. Rerun the same command to resume."
        )
    elif jax.process_index() == 0:
        plot_curves(run.records, os.path.join(run.workdir, CURVES_FILE))

    epoch_record = run.epoch_record
    if not run.interrupted and (epoch_record is None or "test_accuracy" not in epoch_record):
        # A finished run resumed without its metrics.jsonl: evaluate the final state.
        test = evaluate(run.eval_fn, run.state, _test_batches(run))
        epoch_record = dict(epoch_record or {}, test_accuracy=test["accuracy"])
    epoch_record = epoch_record or {}
    best = run.best
    images, seconds = (sum(x) for x in zip(*run.throughput)) if run.throughput else (0, 0.0)
    return {
        "test_accuracy": epoch_record.get("test_accuracy"),
        "test_epoch": epoch_record.get("epoch"),
        "best_test_accuracy": None if best is None else best["test_accuracy"],
        "best_epoch": None if best is None else best["epoch"],
        "train_loss": epoch_record.get("train_loss", math.nan),
        "train_accuracy": epoch_record.get("train_accuracy", math.nan),
        "epoch": run.step / run.steps_per_epoch,
        "step": run.step,
        "num_params": run.num_params,
        "images_per_s": images / seconds if seconds else math.nan,
        "wall_time_s": time.time() - wall_start,
        "interrupted": run.interrupted,
        "signal": signum,
        "workdir": run.workdir,
    }
