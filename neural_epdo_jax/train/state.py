"""Config -> model, optimizer and train state: what a run trains and how it is restored.

The protocol (optimizer, schedule, augmentation) is in docs/design.md, "Training protocol".

Reference choice kept as a switch: ``reset_adam_every_epoch`` re-creates the Adam moments
(and bias correction) at every epoch start, as the reference's per-epoch ``torch.optim.Adam``
does (`reset_adam_state`, applied in the train step); off by default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from neural_epdo_jax import cnn, models
from neural_epdo_jax.data import augment, sources
from neural_epdo_jax.train import checkpointing

AUGMENTATIONS = augment.METHODS
DTYPES = ("float32", "bfloat16")
MODELS: Mapping[str, Callable[..., nn.Module]] = {
    "NeuralEPDONet": models.NeuralEPDONet,
    "CNN": cnn.CNN,
}


class ConfigError(ValueError):
    """An invalid training config (found before any data is read or anything compiled)."""


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
        config.dataset in sources.KNOWN_DATASETS,
        f"unknown dataset {config.dataset!r}; known: {list(sources.KNOWN_DATASETS)}",
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
    (docs/performance.md, "Compilation"). ``flat=False``: the same update with the state per
    parameter array.
    """
    tx = optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps),
        optax.scale_by_learning_rate(schedule),
    )
    return optax.flatten(tx) if flat else tx


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
    (default: the first local device)."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        abstract_train_state(model, create_optimizer(config, schedule), image_shape),
    )
    return checkpointing.restore(manager, step, target)
