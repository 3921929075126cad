"""The train and eval steps and their jitting, single- or multi-device.

``train_step`` / ``eval_step`` are pure and undecorated; `jit_steps` jits them (the state
donated to training).

Multi-device (data parallelism, `runtime.parallel`): with several local devices the batch is
split over a 'data' mesh axis, the state replicated, and the steps run per device
(``jax.shard_map``, `jit_data_parallel`); BatchNorm statistics are those of the whole
batch, the loss, the gradients and the metrics are summed over the devices and the random
draws made for the whole batch, so a step equals the one-device step up to float summation
order.
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
from collections.abc import Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from neural_epdo_jax.data import augment
from neural_epdo_jax.runtime import parallel
from neural_epdo_jax.runtime.host import release_free_memory
from neural_epdo_jax.train.state import TrainState, reset_adam_state

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


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
    `pipeline.data_mesh_sharding`) it runs per device: ``jax.shard_map`` splits the
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
    partition = jax.sharding.PartitionSpec

    def per_device(state, batch, *rest):
        # check_vma=False: the step sums over the axis itself (psum), and its psums of
        # per-device losses transpose to psums (the gradient of the sum of the parts).
        return jax.shard_map(
            functools.partial(step, axis_name=axis),
            mesh=mesh,
            in_specs=(partition(), partition(axis)) + (partition(),) * len(rest),
            out_specs=partition(),
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


def state_sharding(data_sharding: jax.sharding.NamedSharding | None) -> jax.sharding.Sharding:
    """Where the train state lives: replicated on the data mesh, else on the first device."""
    if data_sharding is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return replicated(data_sharding)


def replicated(sharding: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
    """The fully replicated sharding on ``sharding``'s mesh."""
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
