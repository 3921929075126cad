"""Training and evaluation of the MNIST-rot networks: the logic behind train.py.

The protocol (optimizer, schedule, augmentation) is in docs/design.md, "Training protocol".

``train_and_evaluate(config, workdir)`` trains, evaluates, checkpoints and resumes.
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
import itertools
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
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


def _train_and_evaluate(config, workdir, model, sharding, num_shards, wall_start):
    checkpointing.check_and_save_config(config, workdir)

    # Data.
    train_images, train_labels = load_split(config, config.train_split, config.num_train_examples)
    test_images, test_labels = load_split(config, config.test_split, config.num_test_examples)
    steps_per_epoch = pipeline.num_batches(len(train_images), config.batch_size)
    total_steps = steps_per_epoch * config.num_epochs
    _log(
        f"{config.dataset}: {len(train_images)} training / {len(test_images)} test images, "
        f"{steps_per_epoch} steps per epoch, {config.num_epochs} epochs, "
        f"{num_shards} device(s) ({jax.devices()[0].platform})"
    )

    # State: the latest checkpoint, or a fresh one.
    schedule = create_learning_rate_schedule(config, steps_per_epoch)
    tx = create_optimizer(config, schedule)
    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    image_shape = train_images.shape[1:]
    manager = checkpointing.create_manager(workdir)
    if manager.latest_step() is None:
        state = create_train_state(init_rng, model, tx, image_shape)
        # Committed like a restored state, so that fresh and resumed runs share one program.
        state = jax.device_put(state, state_sharding(sharding))
        progress = {}
        step = 0
    else:
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
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    _log(f"{config.model_name}: {num_params:,} trainable parameters")

    metrics_path = os.path.join(workdir, METRICS_FILE)
    records = read_metrics(metrics_path, step)
    writer = MetricsWriter(metrics_path)
    multiprocess = jax.process_count() > 1
    train_fn, eval_fn = jit_steps(config, steps_per_epoch, sharding, stop_flag=multiprocess)
    stop_rows = pipeline.local_rows(sharding, config.batch_size)

    def test_batches():
        return pipeline.epoch_batches(
            test_images, test_labels, config.eval_batch_size, shuffle=False, sharding=sharding
        )

    best = best_epoch(records)
    epoch_record = next((r for r in reversed(records) if r.get("kind") == "epoch"), None)
    throughput = []  # (images, seconds) per epoch, not counting this process's first step.
    timing = {"start": None, "images": 0}
    interrupted = False
    # Whether to stop (a signal): agreed by all processes at the same step (`_any_process` at
    # epoch ends, the step's ``stop`` metric in between), so that they save the same step.
    agreed = {"stop": False}

    def stopping() -> bool:
        if not agreed["stop"]:
            agreed["stop"] = _any_process(stop.signum is not None)
        return agreed["stop"]

    try:
        with _StopRequest() as stop:
            for epoch in range(step // steps_per_epoch, config.num_epochs):
                skip = step - epoch * steps_per_epoch
                sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
                if skip:
                    sums.update(progress.get("epoch_sums", {}))
                window = {"loss": 0.0, "count": 0.0}
                bar = tqdm.tqdm(
                    total=steps_per_epoch,
                    initial=skip,
                    desc=f"epoch {epoch + 1}/{config.num_epochs}",
                    unit="step",
                    leave=False,
                    disable=not config.progress_bar or jax.process_index() != 0,
                )
                if timing["start"] is not None:
                    timing.update(start=time.time(), images=0)

                def consume(step_metrics, at_step, epoch=epoch, sums=sums, window=window, bar=bar):
                    """Host side of a finished step: finiteness check, sums, logging."""
                    m = jax.device_get(step_metrics)
                    if not m["finite"]:
                        latest = manager.latest_step()
                        kept = (
                            "no checkpoint had been saved yet"
                            if latest is None
                            else f"the last good checkpoint (step {latest}) in "
                            f"{manager.directory} is kept"
                        )
                        raise NonFiniteLossError(
                            f"non-finite loss or parameters at step {at_step} (epoch "
                            f"{epoch + 1}, batch {at_step - epoch * steps_per_epoch}/"
                            f"{steps_per_epoch}; summed batch loss {float(m['loss'])}). "
                            f"Stopped; {kept}. Try a lower --config.learning_rate, in a new "
                            "--workdir (this one keeps the config it was trained with)."
                        )
                    if m.get("stop"):
                        agreed["stop"] = True
                    for key in sums:
                        sums[key] += float(m[key])
                    for key in window:
                        window[key] += float(m[key])
                    bar.update(1)
                    if at_step % config.log_every_steps == 0 or at_step == total_steps:
                        loss = window["loss"] / max(window["count"], 1.0)
                        seconds = time.time() - (timing["start"] or time.time())
                        rate = timing["images"] / seconds if seconds > 0 else 0.0
                        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}")
                        writer.write(
                            {
                                "kind": "train",
                                "step": at_step,
                                "epoch": at_step / steps_per_epoch,
                                "train_loss": loss,
                                "learning_rate": float(schedule(at_step - 1)),
                            }
                        )
                        window.update(loss=0.0, count=0.0)

                batches = pipeline.epoch_batches(
                    train_images,
                    train_labels,
                    config.batch_size,
                    shuffle=True,
                    seed=config.seed,
                    epoch=epoch,
                    sharding=sharding,
                )
                pending = None
                for batch in itertools.islice(batches, skip, None):
                    if multiprocess:
                        rows = stop_rows.stop - stop_rows.start
                        flag = np.full((rows,), stop.signum is not None, np.float32)
                        batch = dict(
                            batch,
                            stop=jax.make_array_from_process_local_data(
                                sharding, flag, (config.batch_size,)
                            ),
                        )
                    if timing["start"] is None:
                        compile_start = time.time()
                        state, step_metrics = train_fn(state, batch, train_rng)
                        release_free_memory()  # the compiler's
                        jax.block_until_ready(step_metrics)
                        seconds = time.time() - compile_start
                        _log(f"first train step (compile included): {seconds:.1f}s")
                        timing["start"] = time.time()
                    else:
                        state, step_metrics = train_fn(state, batch, train_rng)
                        timing["images"] += config.batch_size
                    step += 1
                    if pending is not None:
                        consume(*pending)
                    pending = (step_metrics, step)
                    if agreed["stop"] if multiprocess else stop.signum is not None:
                        break
                if pending is not None:
                    consume(*pending)
                bar.close()
                if timing["images"]:
                    throughput.append((timing["images"], time.time() - timing["start"]))

                if step < (epoch + 1) * steps_per_epoch and stopping():
                    if manager.latest_step() != step:
                        progress = {"epoch_sums": sums, "steps_per_epoch": steps_per_epoch}
                        checkpointing.save(manager, step, state, progress)
                    interrupted = True
                    break

                # End of the epoch: train metrics, evaluation, record, checkpoint.
                count = max(sums["count"], 1.0)
                epoch_record = {
                    "kind": "epoch",
                    "step": step,
                    "epoch": epoch + 1,
                    "train_loss": sums["loss"] / count,
                    "train_accuracy": sums["correct"] / count,
                    "learning_rate": float(schedule(step - 1)),
                }
                if timing["images"]:
                    epoch_record["images_per_s"] = throughput[-1][0] / throughput[-1][1]
                last_epoch = epoch + 1 == config.num_epochs
                evaluate_now = last_epoch or (
                    epoch + 1 >= config.eval_from_epoch
                    and (epoch + 1 - config.eval_from_epoch) % config.eval_every_epochs == 0
                )
                new_best = False
                if evaluate_now:
                    eval_start = time.time()
                    test = evaluate(eval_fn, state, test_batches())
                    epoch_record.update(
                        test_loss=test["loss"],
                        test_accuracy=test["accuracy"],
                        eval_time_s=time.time() - eval_start,
                    )
                    new_best = best is None or test["accuracy"] >= best["test_accuracy"]
                    if new_best:
                        best = epoch_record
                writer.write(epoch_record)
                records.append(epoch_record)
                _log(format_epoch(epoch_record, config.num_epochs))
                if (epoch + 1) % config.checkpoint_every_epochs == 0 or last_epoch or new_best:
                    checkpointing.save(
                        manager,
                        step,
                        state,
                        {"steps_per_epoch": steps_per_epoch},
                        test_accuracy=epoch_record.get("test_accuracy"),
                    )
                if stopping():
                    if manager.latest_step() != step:
                        checkpointing.save(
                            manager, step, state, {"steps_per_epoch": steps_per_epoch}
                        )
                    interrupted = True
                    break
    finally:
        manager.close()

    # A process that did not get the signal itself stops for another's: reported as SIGTERM.
    signum = (stop.signum or signal.SIGTERM) if interrupted else None
    if interrupted:
        _log(
            f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved in "
            f"{checkpointing.checkpoint_dir(workdir)}. Rerun the same command to resume."
        )
    elif jax.process_index() == 0:
        plot_curves(records, os.path.join(workdir, CURVES_FILE))

    if not interrupted and (epoch_record is None or "test_accuracy" not in epoch_record):
        # A finished run resumed without its metrics.jsonl: evaluate the final state.
        test = evaluate(eval_fn, state, test_batches())
        epoch_record = dict(epoch_record or {}, test_accuracy=test["accuracy"])
    epoch_record = epoch_record or {}
    images, seconds = (sum(x) for x in zip(*throughput)) if throughput else (0, 0.0)
    return {
        "test_accuracy": epoch_record.get("test_accuracy"),
        "test_epoch": epoch_record.get("epoch"),
        "best_test_accuracy": None if best is None else best["test_accuracy"],
        "best_epoch": None if best is None else best["epoch"],
        "train_loss": epoch_record.get("train_loss", math.nan),
        "train_accuracy": epoch_record.get("train_accuracy", math.nan),
        "epoch": step / steps_per_epoch,
        "step": step,
        "num_params": num_params,
        "images_per_s": images / seconds if seconds else math.nan,
        "wall_time_s": time.time() - wall_start,
        "interrupted": interrupted,
        "signal": signum,
        "workdir": workdir,
    }
