"""Training and evaluation of the MNIST-rot networks: the logic behind train.py.

The protocol (optimizer, schedule, augmentation) is in docs/design.md, "Training protocol".

``train_and_evaluate(config, workdir)`` trains, evaluates, checkpoints and resumes.
``train_step`` / ``eval_step`` are pure and undecorated; they are jitted here, at the call
site, with the state donated.

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
import ctypes
import ctypes.util
import functools
import inspect
import itertools
import json
import math
import os
import signal
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from flax.training import train_state
from jax.experimental import multihost_utils

from neural_epdo_jax import (
    augment,
    checkpointing,
    cnn,
    datasets,
    input_pipeline,
    models,
    parallel,
    workdir_lock,
)

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"
AUGMENTATIONS = augment.METHODS
DTYPES = ("float32", "bfloat16")
MODELS: Mapping[str, Callable[..., nn.Module]] = {
    "NeuralEPDONet": models.NeuralEPDONet,
    "CNN": cnn.CNN,
}

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


class ConfigError(ValueError):
    """An invalid training config (found before any data is read or anything compiled)."""


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


class TrainState(train_state.TrainState):
    """Parameters, optimizer state and the BatchNorm running statistics."""

    batch_stats: Any = None


# ----------------------------------------------------------------------------- config


def create_model(config: ml_collections.ConfigDict, axis_name: str | None = None) -> nn.Module:
    """The model of ``config.model_name`` built from ``config.model`` and ``config.dtype``;
    ``axis_name``: the data-parallel axis the training step runs over (`parallel`), if any.

    Raises:
      ValueError: unknown model name or constructor argument, or an invalid combination of
        arguments (the model's own checks).
    """
    if config.model_name not in MODELS:
        raise ValueError(
            f"unknown config.model_name {config.model_name!r}; known: {sorted(MODELS)}."
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.items()}
    cls = MODELS[config.model_name]
    if axis_name is not None:
        kwargs["axis_name"] = axis_name
    try:
        return cls(**kwargs, dtype=config.dtype)
    except TypeError as e:  # An argument the model does not take.
        raise ValueError(f"config.model does not fit {config.model_name}: {e}") from e


def validate_config(config: ml_collections.ConfigDict) -> nn.Module:
    """Checks ``config`` without touching data or compiling; returns the model.

    Raises:
      ConfigError: naming every invalid value found.
    """
    problems = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    check(
        config.dataset in datasets.KNOWN_DATASETS,
        f"unknown dataset {config.dataset!r}; known: {list(datasets.KNOWN_DATASETS)}",
    )
    check(
        config.augmentation in AUGMENTATIONS,
        f"unknown augmentation {config.augmentation!r}; known: {list(AUGMENTATIONS)}",
    )
    check(config.dtype in DTYPES, f"unknown dtype {config.dtype!r}; known: {list(DTYPES)}")
    for key in (
        "batch_size",
        "eval_batch_size",
        "num_epochs",
        "eval_every_epochs",
        "eval_from_epoch",
        "log_every_steps",
        "checkpoint_every_epochs",
    ):
        check(config[key] >= 1, f"{key} must be >= 1, got {config[key]}")
    for key in ("num_train_examples", "num_test_examples"):
        check(
            config[key] == -1 or config[key] >= 1,
            f"{key} must be -1 (all) or >= 1, got {config[key]}",
        )
    boundaries, scales = tuple(config.lr_boundaries_epochs), tuple(config.lr_scales)
    check(
        len(boundaries) == len(scales),
        f"lr_boundaries_epochs {boundaries} and lr_scales {scales} differ in length",
    )
    check(
        all(b >= 1 for b in boundaries) and all(a < b for a, b in zip(boundaries, boundaries[1:])),
        f"lr_boundaries_epochs {boundaries} must be increasing epochs counted from 1",
    )
    try:
        model = create_model(config)
    except ValueError as e:
        problems.append(f"model: {e}")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return model


# -------------------------------------------------------------------- optimisation


def create_learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
    """Piecewise constant LR: epoch ``b`` of ``lr_boundaries_epochs`` (counted from 1) is the
    first epoch at the rate scaled by the matching ``lr_scales`` entry (scales accumulate).

    The reference's ``for epoch in range(1, 200): if epoch == 60: lr *= 0.1 ...`` is
    boundaries (60, 120, 150, 180) with scales (0.1, 0.5, 0.5, 0.5): 2e-3 for epochs 1-59,
    2e-4 for 60-119, 1e-4 for 120-149, 5e-5 for 150-179, 2.5e-5 from 180.
    """
    boundaries_and_scales = {
        (int(b) - 1) * steps_per_epoch: float(s)
        for b, s in zip(config.lr_boundaries_epochs, config.lr_scales)
    }
    return optax.piecewise_constant_schedule(config.learning_rate, boundaries_and_scales)


def create_optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule, *, flat: bool = True
) -> optax.GradientTransformation:
    """Adam with L2 added to the gradient before the moments (PyTorch ``Adam(weight_decay)``,
    i.e. coupled, not AdamW), then the learning rate.

    ``flat`` (the default): the update runs on all parameters concatenated into one vector
    (``optax.flatten``), so the Adam moments are two flat vectors. Elementwise it is the same
    update (float32 round-off apart), but XLA's CPU backend compiles one fused kernel for it
    instead of several per parameter array, which compiles faster at the same step time
    (docs/performance.md, "Compilation"). ``flat=False`` is the per-array state of older
    checkpoints (`restore_train_state` converts).
    """
    tx = optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps),
        optax.scale_by_learning_rate(schedule),
    )
    return optax.flatten(tx) if flat else tx


def flatten_opt_state(opt_state: optax.OptState, params: Any) -> optax.OptState:
    """The per-array optimizer state of ``create_optimizer(..., flat=False)`` as the flat
    optimizer's: every subtree shaped like ``params`` (the Adam moments) becomes the
    concatenation of its leaves, in ``optax.flatten``'s order."""
    params_def = jax.tree.structure(params)

    def like_params(s) -> bool:
        return jax.tree.structure(s) == params_def

    def ravel(s):
        if not like_params(s):
            return s
        return jnp.concatenate([jnp.reshape(x, (-1,)) for x in jax.tree.leaves(s)])

    return jax.tree.map(ravel, opt_state, is_leaf=like_params)


def reset_adam_state(opt_state: optax.OptState, reset: jax.Array) -> optax.OptState:
    """Zeroes every Adam state (moments and count) in ``opt_state`` where ``reset`` is true:
    a freshly created Adam, as the reference's per-epoch optimizer. The schedule's own step
    count is kept."""

    def maybe_reset(s):
        if isinstance(s, optax.ScaleByAdamState):
            return jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), s)
        return s

    return jax.tree.map(
        maybe_reset, opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState)
    )


def state_from_variables(
    model: nn.Module, tx: optax.GradientTransformation, variables: dict
) -> TrainState:
    """A fresh TrainState (step 0, new optimizer state) holding ``variables``."""
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=tx,
    )
    # A strongly typed step counter, as a restored one is.
    return state.replace(step=jnp.zeros((), jnp.int32))


def create_train_state(
    rng: jax.Array,
    model: nn.Module,
    tx: optax.GradientTransformation,
    image_shape: tuple[int, ...],
) -> TrainState:
    """Initialises the model's variables on one ``[1, *image_shape]`` input
    (`models.init_variables`: compiled once, cheaply) and the optimizer state."""
    return state_from_variables(model, tx, models.init_variables(model, rng, image_shape))


def abstract_train_state(
    model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...]
) -> TrainState:
    """The shapes and dtypes of :func:`create_train_state`'s result, computing nothing."""

    def init(rng):
        x = jnp.zeros((1, *image_shape), jnp.float32)
        return state_from_variables(model, tx, model.init(rng, x, train=False))

    return jax.eval_shape(init, jax.random.key(0))


# ----------------------------------------------------------------------- the steps


def metric_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> Metrics:
    """Masked sums: cross-entropy ``loss``, ``correct`` predictions and example ``count``."""
    logits = logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return {
        "loss": jnp.sum(losses * mask),
        "correct": jnp.sum(correct * mask),
        "count": jnp.sum(mask),
    }


def _takes_mask(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "mask" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _mask_kwargs(apply_fn: Callable, mask: jax.Array) -> dict:
    """``{'mask': mask}`` when the model's ``__call__`` (or a plain ``apply_fn``) takes a
    ``mask`` (padding rows then stay out of its batch statistics); otherwise ``{}`` and a
    warning (once per model, at trace time): its BatchNorms see the padding of an epoch's
    last batch."""
    module = getattr(apply_fn, "__self__", None)
    if isinstance(module, nn.Module):
        fn, name = type(module).__call__, type(module).__name__
    else:
        fn, name = apply_fn, getattr(apply_fn, "__name__", "apply_fn")
    if _takes_mask(fn):
        return {"mask": mask}
    _warn_no_mask(name)
    return {}


@functools.cache
def _warn_no_mask(name: str) -> None:
    warnings.warn(
        f"{name} takes no `mask`: the zero padding of an epoch's last "
        "batch enters its batch statistics. Accept `mask` ([batch], 0 for padding) and pass "
        "it to its BatchNorms (e.g. flax's `nn.BatchNorm(...)(x, mask=...)`).",
        stacklevel=3,
    )


def _check_axis_name(apply_fn: Callable, axis_name: str) -> None:
    module = getattr(apply_fn, "__self__", None)
    if not isinstance(module, nn.Module):
        return
    built = getattr(module, "axis_name", None)
    if built != axis_name:
        raise ValueError(
            f"train_step(axis_name={axis_name!r}): the model was built with axis_name="
            f"{built!r}, so its BatchNorm statistics would be per device, not over the whole "
            f"batch; build it with training.create_model(config, axis_name={axis_name!r})."
        )


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    augmentation: str = "none",
    adam_reset_every_steps: int = 0,
    axis_name: str | None = None,
) -> tuple[TrainState, Metrics]:
    """One optimizer step on the masked mean cross-entropy of an augmented batch.

    Args:
      state: the train state.
      batch: ``image`` [B, H, W, 1] float32, ``label`` [B] int32, ``mask`` [B] float32 (0 for
        padding, which then counts nothing in the loss, gradient and metrics, nor -- passed
        to the model as ``mask`` when its ``__call__`` takes one -- in the batch statistics:
        without dropout and augmentation, a padded batch makes the step of its real
        examples; with them, its random draws are those of the padded shape).
      rng: the run's training key; this step uses ``fold_in(rng, state.step)``.
      augmentation: an ``augment.augment`` method.
      adam_reset_every_steps: if > 0, Adam restarts at steps divisible by it (one epoch:
        the reference's per-epoch optimizer).
      axis_name: set when the step runs per device with the batch split over this axis
        (`jit_data_parallel`); the model must be built with the same ``axis_name``. The
        result is then the one-device step's, up to float summation order.

    Returns:
      The new state and the step's metric sums (see :func:`metric_sums`) plus ``finite``:
      whether the loss and the new parameters are finite.
    """
    if axis_name is not None:
        _check_axis_name(state.apply_fn, axis_name)
    step_rng = jax.random.fold_in(rng, state.step)
    augment_rng, dropout_rng = jax.random.split(step_rng)
    images = augment.augment(augment_rng, batch["image"], augmentation, axis_name=axis_name)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            rngs={"dropout": dropout_rng},
            mutable=["batch_stats"],
            **_mask_kwargs(state.apply_fn, batch["mask"]),
        )
        sums = metric_sums(logits, batch["label"], batch["mask"])
        count = parallel.total(sums["count"], axis_name)
        # Each device's part of the global mean: the parts' gradients sum to its gradient.
        return sums["loss"] / jnp.maximum(count, 1.0), (sums, updates)

    (_, (sums, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads, sums = parallel.total((grads, sums), axis_name)
    loss = sums["loss"] / jnp.maximum(sums["count"], 1.0)
    if adam_reset_every_steps > 0:
        reset = state.step % adam_reset_every_steps == 0
        state = state.replace(opt_state=reset_adam_state(state.opt_state, reset))
    new_state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
    sums["finite"] = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(new_state.params))
    return new_state, sums


def eval_step(state: TrainState, batch: Batch, *, axis_name: str | None = None) -> Metrics:
    """Masked metric sums of the model in inference mode (running BatchNorm statistics);
    with ``axis_name`` (per device, see `jit_data_parallel`) summed over its devices."""
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False
    )
    return parallel.total(metric_sums(logits, batch["label"], batch["mask"]), axis_name)


def default_compilation_cache_dir() -> str:
    """``$XDG_CACHE_HOME/neural_epdo_jax/xla`` (default ``~/.cache/...``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "neural_epdo_jax", "xla")


def use_compilation_cache(path: str | None = None) -> str | None:
    """Keeps compiled steps on disk (JAX's persistent compilation cache), so that a rerun of
    the same model and shapes -- resuming, evaluating, the next run of a sweep -- loads its
    steps instead of compiling them again (see docs/performance.md, "Compilation").
    Compilations under a second are not kept. Entries are a few MB each and never expire
    (JAX's size limit needs the ``filelock`` package); deleting the directory at any time is
    safe.

    Args:
      path: the cache directory; None: `default_compilation_cache_dir`; '': keep none. A
        directory set already (``JAX_COMPILATION_CACHE_DIR``, ``jax.config``) wins.
    Returns:
      The directory in use, or None.
    """
    current = jax.config.jax_compilation_cache_dir
    if path is None:
        path = default_compilation_cache_dir()
    if current or not path:
        return current or None
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    return jax.config.jax_compilation_cache_dir


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def release_free_memory() -> None:
    """Hands the C heap's free pages back to the OS (glibc's ``malloc_trim``; a no-op
    elsewhere). Call it after compiling: XLA frees the memory its compiler used, but glibc
    keeps it mapped, so it would add to the peak RSS of the steps that follow."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def evaluate(
    eval_fn: Callable[[TrainState, Batch], Metrics],
    state: TrainState,
    batches: Iterable[Batch],
) -> dict[str, float]:
    """Mean ``loss`` and ``accuracy`` of ``eval_fn`` (a jitted :func:`eval_step`) over
    ``batches``; the sums stay on device until the end."""
    total = None
    for batch in batches:
        sums = eval_fn(state, batch)
        if total is None:
            release_free_memory()  # after a (first) compilation
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    total = jax.device_get(total)
    count = max(float(total["count"]), 1.0)
    return {"loss": float(total["loss"]) / count, "accuracy": float(total["correct"]) / count}


# XLA compiles the steps for CPU at backend (LLVM) optimisation level 1, not its default: the
# steps spend their time in the matmul library and the C++ kernel, which this does not touch,
# so they run as fast and compile faster, with gradients equal up to float32 round-off
# (docs/performance.md, "Compilation").
CPU_STEP_COMPILER_OPTIONS: Mapping[str, int] = types.MappingProxyType(
    {"xla_backend_optimization_level": 1}
)


def step_compiler_options(platform: str | None = None) -> dict[str, int | bool]:
    """XLA compiler options for the jitted steps on ``platform`` (default: JAX's default
    backend): on CPU `CPU_STEP_COMPILER_OPTIONS` and `parallel.CPU_CODEGEN_OPTIONS`, none
    elsewhere."""
    platform = platform or jax.default_backend()
    if platform != "cpu":
        return {}
    return parallel.compiler_options(platform, **CPU_STEP_COMPILER_OPTIONS)


def jit_data_parallel(
    step: Callable,
    sharding: jax.sharding.NamedSharding | None,
    *,
    donate_state: bool = False,
) -> Callable:
    """``step(state, batch, *rest)`` jitted. With a data mesh (``sharding``, from
    `input_pipeline.data_mesh_sharding`) it runs per device: ``jax.shard_map`` splits the
    batch (every array of ``batch`` along its first axis) over the mesh, replicates
    ``state`` and ``rest``, and calls ``step(..., axis_name=<the mesh axis>)``, which must sum
    its outputs over that axis (as `train_step` and `eval_step` do); the outputs are
    replicated. ``donate_state``: ``state``'s buffers are reused for the outputs. Compiled
    with `step_compiler_options` for the mesh's platform (or the default backend's)."""
    donate = (0,) if donate_state else ()
    if sharding is None:
        return jax.jit(step, donate_argnums=donate, compiler_options=step_compiler_options())
    mesh = sharding.mesh
    (axis,) = mesh.axis_names
    spec = jax.sharding.PartitionSpec

    def per_device(state, batch, *rest):
        # check_vma=False: the step sums over the axis itself (psum), and its psums of
        # per-device losses transpose to psums (the gradient of the sum of the parts).
        return jax.shard_map(
            functools.partial(step, axis_name=axis),
            mesh=mesh,
            in_specs=(spec(), spec(axis)) + (spec(),) * len(rest),
            out_specs=spec(),
            check_vma=False,
        )(state, batch, *rest)

    return jax.jit(
        per_device,
        donate_argnums=donate,
        out_shardings=replicated(sharding),
        compiler_options=step_compiler_options(mesh.devices.flat[0].platform),
    )


def jit_steps(
    config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    sharding: jax.sharding.NamedSharding | None,
    *,
    stop_flag: bool = False,
) -> tuple[Callable, Callable]:
    """``train_step`` and ``eval_step`` jitted for ``config`` (state donated to training),
    data-parallel over ``sharding``'s mesh if given (`jit_data_parallel`; the state's model
    must then be built with that mesh's axis name). ``stop_flag``: the train step takes a
    ``stop`` [B] entry in the batch and returns its maximum over all rows as ``stop``."""
    train_fn = functools.partial(
        train_step,
        augmentation=config.augmentation,
        adam_reset_every_steps=steps_per_epoch if config.reset_adam_every_epoch else 0,
    )
    if stop_flag:
        train_fn = functools.partial(_train_step_with_stop_flag, train_fn)
    return (
        jit_data_parallel(train_fn, sharding, donate_state=True),
        jit_data_parallel(eval_step, sharding),
    )


def _train_step_with_stop_flag(step, state, batch, rng, axis_name=None):
    """``step`` on ``batch`` without its ``stop`` entry; the metrics get its maximum over
    every device's rows: a stop requested on any process, seen by all."""
    batch = dict(batch)
    stop = jnp.max(batch.pop("stop"))
    state, sums = step(state, batch, rng, axis_name=axis_name)
    sums["stop"] = stop if axis_name is None else jax.lax.pmax(stop, axis_name)
    return state, sums


def _state_sharding(data_sharding: jax.sharding.NamedSharding | None) -> jax.sharding.Sharding:
    if data_sharding is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return replicated(data_sharding)


def replicated(sharding: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
    """The fully replicated sharding on ``sharding``'s mesh."""
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())


def restore_train_state(
    manager,
    step: int,
    model: nn.Module,
    config: ml_collections.ConfigDict,
    schedule: optax.Schedule,
    image_shape: tuple[int, ...],
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[TrainState, dict]:
    """``(state, progress)`` of checkpoint ``step``, every array placed with ``sharding``
    (default: the first local device).

    Checkpoints written before the optimizer state became flat (`create_optimizer`) hold
    per-array Adam moments; they are read as such and converted (`flatten_opt_state`), so
    older runs still resume and evaluate.
    """
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(flat: bool) -> TrainState:
        tx = create_optimizer(config, schedule, flat=flat)
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
            abstract_train_state(model, tx, image_shape),
        )

    current = target(True)
    try:
        return checkpointing.restore(manager, step, current)
    except ValueError as err:
        try:
            state, progress = checkpointing.restore(manager, step, target(False))
        except ValueError:
            raise err from None
    opt_state = jax.device_put(flatten_opt_state(state.opt_state, state.params), sharding)
    return state.replace(tx=current.tx, opt_state=opt_state), progress


# -------------------------------------------------------------------------- the loop


def load_split(
    config: ml_collections.ConfigDict, split: str, limit: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of a split of ``config.dataset``; with ``limit`` != -1 a fixed
    subset of ``limit`` examples (the same on every run: seed 0, in the split's order; splits
    may be sorted by class, so not simply the first ones)."""
    images, labels = datasets.load(
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


def _read_metrics(path: str, max_step: int) -> list[dict[str, Any]]:
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


class _MetricsWriter:
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
        sharding = input_pipeline.data_mesh_sharding((config.batch_size, config.eval_batch_size))
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
    steps_per_epoch = input_pipeline.num_batches(len(train_images), config.batch_size)
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
        state = jax.device_put(state, _state_sharding(sharding))
        progress = {}
        step = 0
    else:
        manager, _, (state, progress) = _restore_newest_readable(
            manager,
            workdir,
            lambda s: restore_train_state(
                manager, s, model, config, schedule, image_shape, _state_sharding(sharding)
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
    records = _read_metrics(metrics_path, step)
    writer = _MetricsWriter(metrics_path)
    multiprocess = jax.process_count() > 1
    train_fn, eval_fn = jit_steps(config, steps_per_epoch, sharding, stop_flag=multiprocess)
    stop_rows = input_pipeline.local_rows(sharding, config.batch_size)

    def test_batches():
        return input_pipeline.epoch_batches(
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

                batches = input_pipeline.epoch_batches(
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
                _log(_format_epoch(epoch_record, config.num_epochs))
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


def _format_epoch(record: Mapping[str, Any], num_epochs: int) -> str:
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
