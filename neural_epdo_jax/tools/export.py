"""Freezing a trained network into plain arrays, and serialising it with `jax.export`.

`freeze` folds every basis expansion of a `models.NeuralEPDONet` into ordinary arrays:

* linear ePDO convolutions -> plain [S, S, C_in, C_out] conv kernels
  (`layers.expand_pdo_kernel`);
* equivariant 1x1 maps -> dense [C_in, C_out] matrices, the Neural ePDO generator ->
  a grouped [s, I, O] matrix (`layers.expand_linear_kernel`), with its ``/ 5`` folded in;
* BatchNorm (inference mode, running statistics) -> a per-channel scale and shift; the
  head's BatchNorm1d is folded into the first dense layer;
* the D_N -> C_N restriction before block 6 -> a permutation of the preceding layer's
  output channels (no op left at run time).

The result is a `FrozenModel`: a static tuple of `Op` descriptions and one dict of arrays
per op. ``frozen.fn(frozen.arrays, images)`` is a pure function of arrays (plain `jnp` and
`jax.lax`; no bases, no group code, no Flax) that equals ``model.apply(variables, images,
train=False)`` up to float32 rounding. Equivariance is inherited, not re-imposed: the frozen
kernels are the model's kernels, so they still satisfy the constraints the bases were solved
for -- ``K(g q) = rho_out(g) K(q) rho_in(g)^-1`` for a conv kernel (q the stencil offset),
``rho_out(g) A = A rho_in(g)`` for a 1x1 map, exactly for the grid elements g -- and the
frozen network is invariant under quarter turns exactly when the model is.

`save` writes the frozen network as a serialised `jax.export.Exported` (StableHLO, weights
embedded as constants), with a symbolic batch dimension by default; `load` (or
``jax.export.deserialize`` in a process that never imports this package) reads it back::

    frozen = export.freeze(model, variables)
    export.save(frozen, "model.jax")          # [batch, 28, 28, 1] -> [batch, 10]
    # elsewhere, with jax only:
    exp = jax.export.deserialize(bytearray(open("model.jax", "rb").read()))
    logits = exp.call(images)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from neural_epdo_jax import layers, models
from neural_epdo_jax.core import bases, fields, groups
from neural_epdo_jax.layers.norm import BATCH_NORM_EPS, GROUP_NORM_EPS
from neural_epdo_jax.runtime import parallel
from neural_epdo_jax.runtime.host import setup_host

Arrays = tuple[dict[str, jax.Array], ...]


class FreezeError(ValueError):
    """The model or its variables cannot be frozen (unsupported module, missing entries)."""


# ----------------------------------------------------------------------------------------
# The frozen program: a static sequence of ops, each with its arrays.


@dataclasses.dataclass(frozen=True)
class Op:
    """One step of a frozen network (static, hashable).

    Kinds and the arrays they read (shapes for C_in / C_out channels):

    * ``'conv'``: ``kernel`` [S, S, C_in, C_out]; SAME cross-correlation, stride 1.
    * ``'affine'``: ``scale``, ``shift`` [C]; ``x * scale + shift`` (a folded BatchNorm).
    * ``'relu'``, ``'max_pool'`` (2x2, stride 2, VALID), ``'global_max'`` (over H, W).
    * ``'group_pool'``: max over each field's ``field_size`` components: [..., F*d] -> [..., F].
    * ``'nlpdo'``: a Neural ePDO layer (docs/design.md, "Layers"): ``hidden`` [C_in, M*|G|];
      ``norm_scale``, ``norm_shift`` [M] (group norm with both affines folded);
      ``generator`` [s, M*|G|/s, g*d*S*S/s] (``/ 5`` folded in); ``output`` [C_in, C_out].
      Static: ``g`` operators, field size ``field_size`` (d), ``kernel_size`` (S), hidden field
      size ``hidden_field_size`` (|G|).
    * ``'dense'``: ``kernel`` [C_in, C_out], ``bias`` [C_out].
    """

    kind: str
    field_size: int = 0
    g: int = 0
    kernel_size: int = 0
    hidden_field_size: int = 0
    block: int = -1  # the model's block (0..5) this op belongs to; -1 for the head


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenModel:
    """A network folded into plain arrays.

    Attributes:
      ops: the static program (see `Op`).
      arrays: one dict of float32 arrays per op (empty for parameter-free ops).
      num_classes: size of the logits.
      source: a description of the model it was frozen from.
    """

    ops: tuple[Op, ...]
    arrays: Arrays
    num_classes: int
    source: str = ""

    @property
    def fn(self) -> Callable[[Arrays, jax.Array], jax.Array]:
        """The pure inference function ``fn(arrays, images [B, H, W, 1]) -> logits [B, K]``."""
        return functools.partial(apply, self.ops)

    @functools.cached_property
    def _jitted(self) -> Callable[[Arrays, jax.Array], jax.Array]:
        return jax.jit(self.fn, compiler_options=parallel.compiler_options())

    def __call__(self, images: jax.Array) -> jax.Array:
        """Logits [B, num_classes] of images [B, H, W, 1] (jitted)."""
        return self._jitted(self.arrays, images)

    def num_arrays(self) -> int:
        """Total number of array entries (the frozen network's size)."""
        return int(sum(a.size for d in self.arrays for a in d.values()))


def apply(ops: Sequence[Op], arrays: Arrays, images: jax.Array) -> jax.Array:
    """Runs a frozen program: images [B, H, W, 1] -> logits [B, K], float32.

    Pure `jnp` / `jax.lax` on the given arrays (jittable, exportable).
    """
    if len(ops) != len(arrays):
        raise ValueError(f"{len(ops)} ops but {len(arrays)} array dicts.")
    if images.ndim != 4:
        raise ValueError(
            f"expected images of shape [batch, height, width, channels], got {images.shape}."
        )
    x = jnp.asarray(images, jnp.float32)
    for op, a in zip(ops, arrays):
        x = _OPS[op.kind](op, a, x)
    return x


def _conv(op: Op, a: dict, x: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, a["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _max_pool(op: Op, a: dict, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]  # VALID: odd sizes drop the last row/column
    return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def _group_pool(op: Op, a: dict, x: jax.Array) -> jax.Array:
    return jnp.max(x.reshape(x.shape[:-1] + (-1, op.field_size)), axis=-1)


def _nlpdo(op: Op, a: dict, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    # Generator: 1x1 map, per-sample group norm (one group per regular field), ReLU.
    hid = jnp.dot(x, a["hidden"])  # [B, H, W, M*|G|]
    hf = hid.reshape(b, h, w, -1, op.hidden_field_size)  # [B, H, W, M, |G|]
    mean = jnp.mean(hf, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(hf - mean), axis=(1, 2, 4), keepdims=True)
    hf = (hf - mean) * jax.lax.rsqrt(var + GROUP_NORM_EPS)
    hf = hf * a["norm_scale"][:, None] + a["norm_shift"][:, None]
    hid = jax.nn.relu(hf.reshape(b, h, w, -1))
    # Operators: grouped 1x1 map, then per-pixel L1 normalisation of each operator.
    gen = a["generator"]  # [s, I, O]
    s, i, _ = gen.shape
    ops = jnp.einsum("bhwsi,sio->bhwso", hid.reshape(b, h, w, s, i), gen)
    taps = op.kernel_size**2
    ops = ops.reshape(b, h, w, op.g, op.field_size * taps)
    ops = ops / (jnp.sum(jnp.abs(ops), axis=-1, keepdims=True) + 0.01)
    ops = ops.reshape(b, h, w, op.g, op.field_size, taps)
    xs = x.reshape(b, h, w, c // op.field_size, op.field_size)
    out = layers.apply_spatially_varying(xs, ops, op.g, op.kernel_size).reshape(b, h, w, c)
    return jnp.dot(out, a["output"])


_OPS: dict[str, Callable[[Op, dict, jax.Array], jax.Array]] = {
    "conv": _conv,
    "affine": lambda op, a, x: x * a["scale"] + a["shift"],
    "relu": lambda op, a, x: jax.nn.relu(x),
    "max_pool": _max_pool,
    "group_pool": _group_pool,
    "global_max": lambda op, a, x: jnp.max(x, axis=(1, 2)),
    "nlpdo": _nlpdo,
    "dense": lambda op, a, x: jnp.dot(x, a["kernel"]) + a["bias"],
}


# ----------------------------------------------------------------------------------------
# Freezing.


class _Reader:
    """Reads entries of a variables tree by path, with clear errors, and tracks which were
    used so that left-over entries (variables of another model) are reported too."""

    def __init__(self, variables: Mapping[str, Any]):
        if not isinstance(variables, Mapping):
            raise FreezeError(
                f"variables must be a mapping {{'params': ..., 'batch_stats': ...}}, got "
                f"{type(variables).__name__}."
            )
        self.variables = variables
        self.used: set[tuple[str, ...]] = set()

    def __call__(self, *path: str, shape: tuple[int, ...]) -> jax.Array:
        node = self.variables
        for i, key in enumerate(path):
            if not isinstance(node, Mapping) or key not in node:
                where = "/".join(path[:i]) or "<root>"
                have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
                raise FreezeError(
                    f"variables are missing {'/'.join(path)} (no {key!r} under {where}; it "
                    f"holds {have}). Pass the variables of this model, e.g. "
                    "{'params': state.params, 'batch_stats': state.batch_stats}."
                )
            node = node[key]
        if isinstance(node, Mapping):
            raise FreezeError(
                f"variables entry {'/'.join(path)} is a collection ({sorted(node)}), expected "
                f"an array of shape {tuple(shape)}."
            )
        arr = jnp.asarray(node, jnp.float32)
        if tuple(arr.shape) != tuple(shape):
            raise FreezeError(
                f"variables entry {'/'.join(path)} has shape {tuple(arr.shape)}, but this model "
                f"expects {tuple(shape)}: the variables belong to another configuration."
            )
        self.used.add(tuple(path))
        return arr

    def check_all_used(self) -> None:
        def leaves(node, prefix):
            if isinstance(node, Mapping):
                for k, v in node.items():
                    yield from leaves(v, prefix + (str(k),))
            else:
                yield prefix

        extra = [p for p in leaves(self.variables, ()) if p not in self.used]
        if extra:
            names = ", ".join("/".join(p) for p in extra[:8])
            more = f" (and {len(extra) - 8} more)" if len(extra) > 8 else ""
            raise FreezeError(
                f"variables hold entries that freeze does not know how to fold: {names}{more}. "
                "They belong to a different or modified model; freeze supports "
                "models.NeuralEPDONet as defined in neural_epdo_jax.models."
            )


def _fold_bn(read: _Reader, name: str, ftype: fields.FieldType) -> dict[str, jax.Array]:
    """FieldBatchNorm in inference mode -> per-channel ``scale``, ``shift`` [F * d]."""
    f, d = ftype.num_fields, ftype.field_size
    mean = read("batch_stats", name, "mean", shape=(f,))
    var = read("batch_stats", name, "var", shape=(f,))
    gamma = read("params", name, "scale", shape=(f,))
    beta = read("params", name, "bias", shape=(f,))
    a = gamma * jax.lax.rsqrt(var + BATCH_NORM_EPS)
    return {"scale": jnp.repeat(a, d), "shift": jnp.repeat(beta - mean * a, d)}


def _weight(read: _Reader, path: tuple[str, ...], shape: tuple[int, ...]) -> jax.Array:
    return read("params", *path, "weight", shape=shape)


def _fold_pdo_conv(
    read: _Reader, name: str, model: models.NeuralEPDONet, blk: models.BlockPlan
) -> dict[str, jax.Array]:
    basis = bases.pdo_basis(
        blk.in_type.group,
        blk.in_type.unit,
        blk.out_type.unit,
        model.discretisation,
        model.order,
        model.kernel_size,
    )
    shape = (blk.in_type.num_fields, blk.out_type.num_fields, basis.shape[0])
    return {"kernel": layers.expand_pdo_kernel(_weight(read, (name,), shape), basis)}


def _fold_linear(read, path, basis, f_in, f_out, s=1) -> jax.Array:
    """Grouped equivariant 1x1 map -> [s, I, O] (``[I, O]`` when s == 1)."""
    w = _weight(read, path, (f_in // s, f_out, basis.shape[0]))
    kernel = layers.expand_linear_kernel(w, basis, s)
    return kernel[0] if s == 1 else kernel


def _fold_nlpdo(
    read: _Reader, name: str, model: models.NeuralEPDONet, blk: models.BlockPlan, block: int
) -> tuple[Op, dict[str, jax.Array]]:
    t_in, t_out = blk.in_type, blk.out_type
    group = t_in.group
    m = int(t_in.size // (model.reduction * group.order))
    hidden = fields.FieldType(group, "regular", m)
    a = {
        "hidden": _fold_linear(
            read,
            (name, "hidden"),
            bases.linear_basis(group, t_in.unit, hidden.unit),
            t_in.num_fields,
            m,
        )
    }
    norm = {k: read("params", name, "norm", k, shape=(m,)) for k in _GN_PARAMS}
    # y * s1 + b1, then * s2 + b2  ==  y * (s1 s2) + (b1 s2 + b2).
    a["norm_scale"] = norm["norm_scale"] * norm["affine_scale"]
    a["norm_shift"] = norm["norm_bias"] * norm["affine_scale"] + norm["affine_bias"]
    gen_basis = bases.generator_basis(
        group, t_in.unit, model.discretisation, model.order, model.kernel_size
    )
    gen = _fold_linear(read, (name, "generator"), gen_basis, m, model.g, model.s)
    a["generator"] = (gen if gen.ndim == 3 else gen[None]) / 5.0
    a["output"] = _fold_linear(
        read,
        (name, "output"),
        bases.linear_basis(group, t_in.unit, t_out.unit),
        t_in.num_fields,
        t_out.num_fields,
    )
    op = Op(
        "nlpdo",
        field_size=t_in.field_size,
        g=model.g,
        kernel_size=model.kernel_size,
        hidden_field_size=group.order,
        block=block,
    )
    return op, a


_GN_PARAMS = ("norm_scale", "norm_bias", "affine_scale", "affine_bias")


def _permute_outputs(
    ops: list[Op], arrays: list[dict[str, jax.Array]], perm: np.ndarray, upto: int
) -> None:
    """Permutes the output channels of the last linear map and affine before ``upto``, so
    that its output comes out already permuted (everything in between is per-channel)."""
    p = jnp.asarray(perm)
    for i in range(upto - 1, -1, -1):
        kind = ops[i].kind
        if kind == "affine":
            arrays[i] = {k: v[p] for k, v in arrays[i].items()}
        elif kind in ("conv", "nlpdo"):
            key = "kernel" if kind == "conv" else "output"
            arrays[i] = dict(arrays[i], **{key: arrays[i][key][..., p]})
            return
        elif kind != "relu":
            raise FreezeError(f"cannot fold a channel permutation through a {kind!r} op.")
    raise FreezeError("no linear map to fold the channel permutation into.")


def freeze(model: models.NeuralEPDONet, variables: Mapping[str, Any]) -> FrozenModel:
    """Folds a `models.NeuralEPDONet` and its variables into a `FrozenModel`.

    Args:
      model: the network (any configuration: C_N / D_N, any field type, ``g = -1``
        baseline, any discretisation, order and kernel size). Its ``dtype`` is ignored: the
        frozen network computes in float32.
      variables: ``{'params': ..., 'batch_stats': ...}`` as made by ``model.init`` (or a
        TrainState's ``params`` / ``batch_stats``).

    Returns:
      A `FrozenModel` with ``frozen(images) == model.apply(variables, images,
      train=False)`` up to float32 rounding, for images [B, H, W, 1].

    Raises:
      FreezeError: a model class other than `models.NeuralEPDONet` (subclasses included:
        their forward pass may differ), variables with missing, misshapen or extra entries.
    """
    if type(model) is not models.NeuralEPDONet:
        raise FreezeError(
            f"freeze supports neural_epdo_jax.models.NeuralEPDONet only, got "
            f"{type(model).__module__}.{type(model).__qualname__}: its forward pass is not "
            "known to freeze. For a custom network, fold its layers with "
            "layers.expand_pdo_kernel / layers.expand_linear_kernel and run them with "
            "export.apply's ops."
        )
    _Reader(variables)  # type check before tracing
    program: list[tuple[Op, ...]] = []

    def fold(v):
        ops, arrays = _fold(model, v)
        program.append(ops)
        return arrays

    # One compilation for all the expansions (eagerly, each einsum would compile on its own);
    # it runs once, so backend optimisations are not worth their compile time.
    options = parallel.compiler_options(xla_backend_optimization_level=0)
    arrays = jax.jit(fold, compiler_options=options)(variables)
    return FrozenModel(program[0], arrays, model.num_classes, source=_describe(model))


def _fold(model: models.NeuralEPDONet, variables) -> tuple[tuple[Op, ...], Arrays]:
    """The program of ``model`` and its folded arrays (traceable)."""
    read = _Reader(variables)
    plan = model.plan()
    ops: list[Op] = []
    arrays: list[dict[str, jax.Array]] = []

    def emit(op: Op, a: dict | None = None) -> None:
        ops.append(op)
        arrays.append(a or {})

    counts = {"PDOConv": 0, "NeuralEPDO": 0}
    for i, blk in enumerate(plan):
        if blk.restrict_before:
            ftype = plan[i - 1].out_type
            n = ftype.group.n
            unit_perm = np.concatenate([np.arange(n), 2 * n - 1 - np.arange(n)])
            perm = (np.arange(ftype.num_fields)[:, None] * 2 * n + unit_perm).reshape(-1)
            _permute_outputs(ops, arrays, perm, len(ops))
        if i == 0 or model.g == -1:
            name = f"PDOConv_{counts['PDOConv']}"
            counts["PDOConv"] += 1
            emit(Op("conv", block=i), _fold_pdo_conv(read, name, model, blk))
        else:
            name = f"NeuralEPDO_{counts['NeuralEPDO']}"
            counts["NeuralEPDO"] += 1
            emit(*_fold_nlpdo(read, name, model, blk, i))
        emit(Op("affine", block=i), _fold_bn(read, f"FieldBatchNorm_{i}", blk.norm_type))
        emit(Op("relu", block=i))
        if i in (1, 3):
            emit(Op("max_pool", block=i))
    emit(Op("group_pool", field_size=plan[-1].out_type.field_size))
    emit(Op("global_max"))
    f_last = plan[-1].out_type.num_fields
    kernel = read("params", "TorchDense_0", "kernel", shape=(f_last, 64))
    bias = read("params", "TorchDense_0", "bias", shape=(64,))
    head_bn = _fold_bn(read, "FieldBatchNorm_6", fields.FieldType(groups.Group(1), "trivial", 64))
    # Dense then BatchNorm1d: (x K + b) * a + c == x (K a) + (b a + c).
    emit(
        Op("dense"),
        {"kernel": kernel * head_bn["scale"], "bias": bias * head_bn["scale"] + head_bn["shift"]},
    )
    emit(Op("relu"))
    k = model.num_classes
    emit(
        Op("dense"),
        {
            "kernel": read("params", "TorchDense_1", "kernel", shape=(64, k)),
            "bias": read("params", "TorchDense_1", "bias", shape=(k,)),
        },
    )
    read.check_all_used()
    return tuple(ops), tuple(arrays)


def _describe(model: models.NeuralEPDONet) -> str:
    group = f"{'D' if model.flip else 'C'}{model.n}"
    return (
        f"NeuralEPDONet({group}, {model.field_type}, channels={model.channels}, g={model.g}, "
        f"s={model.s}, reduction={model.reduction}, {model.discretisation}, "
        f"order={model.order}, kernel_size={model.kernel_size})"
    )


# ----------------------------------------------------------------------------------------
# Serialisation (jax.export / StableHLO).


def export(
    frozen: FrozenModel,
    *,
    batch_size: int | None = None,
    image_shape: tuple[int, int, int] = (28, 28, 1),
    platforms: Sequence[str] | None = None,
) -> jax.export.Exported:
    """The frozen network as a `jax.export.Exported`, weights embedded as constants.

    Args:
      frozen: from `freeze`.
      batch_size: None for a symbolic batch dimension (any batch size at call time), else a
        fixed one.
      image_shape: (H, W, 1) of the inputs (fixed).
      platforms: lowering platforms, e.g. ('cpu', 'cuda'); default the current backend.

    Returns:
      An Exported with ``in_avals = ([B, H, W, 1] float32,)`` and logits [B, K] float32.
    """
    if batch_size is None:
        (batch,) = jax.export.symbolic_shape("batch")
    elif isinstance(batch_size, (int, np.integer)) and batch_size >= 1:
        batch = int(batch_size)
    else:
        raise ValueError(f"batch_size must be None (symbolic) or an integer >= 1, got {batch_size}")
    images_shape = jax.ShapeDtypeStruct((batch, *tuple(image_shape)), jnp.float32)
    arrays, fn = frozen.arrays, frozen.fn
    kwargs = {} if platforms is None else {"platforms": tuple(platforms)}
    return jax.export.export(jax.jit(lambda images: fn(arrays, images)), **kwargs)(images_shape)


def save(
    frozen: FrozenModel,
    path: str | os.PathLike,
    *,
    batch_size: int | None = None,
    image_shape: tuple[int, int, int] = (28, 28, 1),
    platforms: Sequence[str] | None = None,
) -> jax.export.Exported:
    """Serialises the frozen network (see `export`) to ``path``; returns the Exported.

    Read it back with `load`, or with jax alone:
    ``jax.export.deserialize(bytearray(open(path, 'rb').read())).call(images)``.
    """
    exported = export(frozen, batch_size=batch_size, image_shape=image_shape, platforms=platforms)
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(exported.serialize())
    os.replace(tmp, path)
    return exported


def load(path: str | os.PathLike) -> Callable[[jax.Array], jax.Array]:
    """A callable ``images [B, H, W, 1] -> logits [B, K]`` from a file written by `save`."""
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    return exported.call


def export_checkpoint(
    workdir: str,
    path: str | os.PathLike,
    *,
    checkpoint: str = "best",
    batch_size: int | None = None,
    platforms: Sequence[str] | None = None,
) -> FrozenModel:
    """Freezes a training workdir's best (or latest) checkpoint and saves it to ``path``.

    The model is rebuilt from the workdir's config (`evaluate.load_state`); returns the
    `FrozenModel`.

    Raises:
      checkpointing.NoCheckpointError: no config.json or no checkpoint in ``workdir``.
      FreezeError: the config's model is not a `models.NeuralEPDONet`.
    """
    from neural_epdo_jax.tools import evaluate
    from neural_epdo_jax.train.state import create_model  # the training stack, only when needed

    config, state, step, which = evaluate.load_state(workdir, checkpoint)
    model = create_model(config)
    frozen = freeze(model, {"params": state.params, "batch_stats": state.batch_stats})
    frozen = dataclasses.replace(
        frozen, source=f"{frozen.source} [{workdir}: {which}, step {step}]"
    )
    save(frozen, path, batch_size=batch_size, platforms=platforms)
    return frozen


def main(argv: list[str]) -> None:
    """Command-line entry point:
    ``python -m neural_epdo_jax.tools.export --workdir=DIR --output=F``."""
    from absl import app, flags

    from neural_epdo_jax.train import checkpointing

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    setup_host()
    try:
        frozen = export_checkpoint(
            values.workdir,
            values.output,
            checkpoint=values.checkpoint,
            batch_size=values.batch_size,
        )
    except (checkpointing.NoCheckpointError, ValueError) as e:
        raise SystemExit(f"export: error: {e}") from None
    batch = "B" if values.batch_size is None else str(values.batch_size)
    print(
        f"wrote {values.output}: {frozen.source}, {frozen.num_arrays():,} array entries; "
        f"images [{batch}, 28, 28, 1] -> logits [{batch}, {frozen.num_classes}]"
        + (" for any B" if values.batch_size is None else "")
        + ". Load with jax alone: jax.export.deserialize(bytearray(open(path, 'rb').read()))"
        ".call(images)."
    )


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
    flags.DEFINE_string("output", None, "File to write (serialised jax.export.Exported).")
    flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to export.")
    flags.DEFINE_integer("batch_size", None, "Fixed batch size (default: symbolic, any).")
    flags.mark_flags_as_required(["workdir", "output"])
    app.run(main)
