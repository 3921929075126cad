"""The MNIST-rot networks of the paper (the reference's ``pdo_net``; docs/design.md)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from neural_epdo_jax import layers, variants
from neural_epdo_jax.core import fields, groups, stencils
from neural_epdo_jax.runtime import parallel


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Static description of one of the six blocks."""

    in_type: fields.FieldType
    out_type: fields.FieldType
    norm_type: fields.FieldType  # the BN's field type (D-gauss block 6: the D_N type)
    restrict_before: bool = False


PAPER_VARIANTS = variants.PAPER_VARIANTS


class NeuralEPDONet(nn.Module):
    """Six equivariant blocks, group pooling, global max pooling and an MLP head.

    conv1 = linear ePDO trivial -> c1 fields; blocks 2-6 Neural ePDOs (or linear ePDOs with
    ``g = -1``: the PDO-eConv baseline); each followed by per-field BN and ReLU; 2x2 max pool
    after blocks 2 and 4; channel Dropout2d after blocks 3-6; with ``flip`` (D_N), the fields
    are restricted to C_N before block 6 (channel counts of blocks 5->6 doubled).

    Attributes: see the README's model section; ``channels`` counts fields per block.
    ``impl`` picks the Neural ePDO layers' computation ('fourier', the default, or 'dense':
    same parameters, same outputs up to round-off) and ``chunk`` how many images they
    process at a time (None: per backend and mode, `layers.default_chunk`); see
    `layers.NeuralEPDO`. ``eval_chunk``: in inference (``train=False``) the whole network
    runs on this many images at a time, a loop over the batch (its largest divisor up to
    ``eval_chunk``), so that their activations stay in cache (None: `layers.default_eval_chunk`,
    8 on CPU, the whole batch elsewhere; 0: the whole batch). Nothing couples the images in
    inference, so the logits are the same. Not while initialising or capturing
    intermediates. ``axis_name``: the data-parallel axis when the batch is split over
    devices (`parallel`): BatchNorm statistics and dropout masks are then those of the whole
    batch (training mode only; None for one device).

    Layout: with ``impl='fourier'`` (and ``g != -1``) the activations are channel-major,
    [B, d, F, H, W], the Neural ePDO layers' own layout, from block 1's conv on in inference
    and from its ReLU on in training; intermediates captured with ``capture_intermediates``
    are then in that layout (everything of the other models NHWC; `layers.to_nhwc`
    converts).
    """

    n: int = 16
    flip: bool = False
    field_type: str = "regular"
    channels: Sequence[int] = (16, 24, 32, 32, 48, 64)
    order: int = 4
    g: int = 4
    s: int = 4
    reduction: int = 1
    discretisation: str = "fd"
    kernel_size: int = 5
    dropout: float = 0.1
    dropout_per_field: bool = False
    num_classes: int = 10
    dtype: str = "float32"
    impl: str = "fourier"
    chunk: int | None = None
    eval_chunk: int | None = None
    axis_name: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        super().__post_init__()
        self.plan()  # validates every combination before anything is traced

    def plan(self) -> tuple[BlockPlan, ...]:
        """Validated static plan of the six blocks (raises ValueError on a bad combination)."""
        if len(self.channels) != 6 or any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be 6 positive field counts, got {self.channels}.")
        if self.discretisation not in stencils.discretisations():
            raise ValueError(
                f"unknown discretisation {self.discretisation!r}; known: "
                f"{', '.join(stencils.discretisations())}."
            )
        # Builds (and caches) the stencils: a size the order cannot use, or a registered
        # discretisation returning bad stencils, fails here rather than at the first trace.
        stencils.stencils(self.discretisation, self.order, self.kernel_size)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.g != -1 and self.g < 1:
            raise ValueError(
                f"g must be >= 1 (fields per partition) or -1 (linear ePDOs), got {self.g}."
            )
        layers.as_dtype(self.dtype)
        layers.check_impl(self.impl)
        group = groups.Group(self.n, self.flip)
        unit = fields.parse_unit(self.field_type)
        if self.flip and any(name != "regular" for name, _ in unit):
            raise ValueError(
                f"field_type {self.field_type!r} with flip=True: the dihedral model supports only "
                "'regular' fields (quotients of D_N are not implemented)."
            )
        types = [fields.FieldType(group, unit, c) for c in self.channels]
        plan = [BlockPlan(fields.FieldType(group, "trivial", 1), types[0], types[0])]
        for i in range(1, 6):
            t_in, t_out, t_norm = types[i - 1], types[i], types[i]
            restrict = self.flip and i == 5
            if restrict:
                c_n = groups.Group(self.n, False)
                t_in = fields.FieldType(c_n, unit, 2 * self.channels[4])
                t_out = fields.FieldType(c_n, unit, 2 * self.channels[5])
            if self.g != -1:
                layers.validate_nlpdo(t_in, self.reduction, self.g, self.s)
            plan.append(BlockPlan(t_in, t_out, t_norm, restrict))
        return tuple(plan)

    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        """[B, H, W, 1] images -> [B, num_classes] float32 logits (invariant).

        ``mask`` [B] (training): 0 marks padding rows, which then do not enter the batch
        statistics (`layers.FieldBatchNorm`); `train.steps.train_step` passes the batch's mask.
        """
        if x.ndim != 4 or x.shape[-1] != 1:
            raise ValueError(
                "NeuralEPDONet expects images of shape [batch, height, width, 1], got "
                f"{tuple(x.shape)}."
            )
        if x.shape[1] != x.shape[2] or x.shape[1] % 4:
            warnings.warn(
                f"input size {x.shape[1]}x{x.shape[2]}: exact quarter-turn invariance needs square "
                "inputs with a side divisible by 4 (two 2x2 poolings).",
                stacklevel=2,
            )
        n = self._inference_chunk(x.shape[0]) if not train else 0
        if n:
            # Inference: nothing couples the images (running statistics, no dropout), so the
            # whole network runs on n images at a time and their activations stay in cache.
            b = x.shape[0]
            body = nn.scan(
                lambda mdl, carry, xc: (carry, mdl._forward(xc, train=False, mask=None)),
                variable_broadcast=["params", "batch_stats"],
                split_rngs={"params": False},
            )
            _, logits = body(self, None, x.reshape((b // n, n) + x.shape[1:]))
            return logits.reshape(b, -1)
        return self._forward(x, train=train, mask=mask)

    def _inference_chunk(self, batch: int) -> int:
        """Images per step of the inference loop (0: none): ``eval_chunk``'s largest divisor of
        the batch; none while initialising or capturing intermediates (whose layout the loop
        would change)."""
        n = layers.default_eval_chunk() if self.eval_chunk is None else self.eval_chunk
        if n <= 0 or batch <= n or self.is_initializing():
            return 0
        if self.is_mutable_collection("intermediates"):
            return 0
        return max(c for c in range(1, n + 1) if batch % c == 0)

    @nn.compact
    def _forward(self, x: jax.Array, *, train: bool, mask: jax.Array | None) -> jax.Array:
        dt = self.dtype
        common = dict(discretisation=self.discretisation, kernel_size=self.kernel_size, dtype=dt)
        plan = self.plan()
        chunk = self.chunk if self.chunk is not None or train else layers.default_chunk(False)
        x = x.astype(jnp.dtype(dt))
        # Between Neural ePDO blocks the activations stay channel-major, [B, d, F, H, W]:
        # the layers' own layout, so no block transposes its input or output (faster, and
        # less temporary memory). The baseline (linear ePDOs, g = -1) stays NHWC.
        cm = self.impl == "fourier" and self.g != -1
        for i, blk in enumerate(plan):
            if blk.restrict_before:
                x, _ = layers.restrict_dihedral(x, plan[i - 1].out_type, channel_major=cm)

            # Block 1 (a linear ePDO conv) goes channel-major at its conv's output in inference
            # (the input's patches times the kernel: no transpose), but in training after its
            # ReLU (one transpose): there the conv's output channel-major costs XLA more
            # temporary memory for no speed.
            cm_from_conv = cm and (i > 0 or not train)

            def conv_norm_relu(_module, x, mask, i=i, blk=blk, cm_from_conv=cm_from_conv):
                # (nn.remat's signature)
                if i == 0 or self.g == -1:
                    conv = layers.PDOConv(
                        blk.in_type,
                        blk.out_type,
                        max_order=self.order,
                        channel_major_out=cm_from_conv,
                        **common,
                    )
                else:
                    conv = layers.NeuralEPDO(
                        blk.in_type,
                        blk.out_type,
                        self.order,
                        self.reduction,
                        self.g,
                        self.s,
                        impl=self.impl,
                        chunk=chunk,
                        channel_major=cm,
                        **common,
                    )
                x = conv(x)
                bn = layers.FieldBatchNorm(
                    blk.norm_type, axis_name=self.axis_name, channel_major=cm_from_conv
                )
                x = nn.relu(bn(x, train=train, mask=mask))
                return layers.to_channel_major(x, blk.out_type) if cm != cm_from_conv else x

            # Block 1 (one input channel: a cheap conv) is recomputed in the backward pass
            # rather than keeping its conv's output, the size of its ReLU's (a lower peak).
            x = (nn.remat(conv_norm_relu) if i == 0 else conv_norm_relu)(self, x, mask)
            if i >= 2:
                x = layers.ChannelDropout(
                    self.dropout,
                    blk.out_type,
                    self.dropout_per_field,
                    self.axis_name,
                    channel_major=cm,
                )(x, train=train)
            if i in (1, 3):
                x = layers.max_pool_2x2(x, channel_major=cm)
        # [B, (F,) H, W(, F)]; elementwise maxima in inference only (see `layers.group_pool`)
        x = layers.group_pool(x, plan[-1].out_type, channel_major=cm, elementwise=not train)
        x = jnp.max(x, axis=(2, 3) if cm else (1, 2)).astype(jnp.float32)  # [B, F]
        x = layers.TorchDense(64)(x)
        head = fields.FieldType(groups.Group(1), "trivial", 64)  # plain BatchNorm1d
        x = layers.FieldBatchNorm(head, axis_name=self.axis_name)(x, train=train, mask=mask)
        x = nn.relu(x)
        return layers.TorchDense(self.num_classes)(x)


def count_params(params) -> int:
    """Number of trainable parameters."""
    return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))


# Compiler options for code that runs once (initialisers): no backend optimisation.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def init_variables(
    model: nn.Module, rng: jax.Array, image_shape: tuple[int, ...] = (28, 28, 1)
) -> dict:
    """``model.init`` jitted on one zero image of ``image_shape``: the parameters and batch
    statistics (whose shapes do not depend on the input size) without running the network
    op by op.

    It runs once, so it is compiled without backend optimisations (`INIT_COMPILER_OPTIONS`,
    with `parallel.compiler_options`): the random initialisers' unrolled loops otherwise take
    seconds to tens of seconds to compile on CPU (the values are the same).
    ``jax.eval_shape(model.init, ...)`` gives the shapes alone without compiling anything.
    """
    x = jnp.zeros((1, *image_shape), jnp.float32)
    options = parallel.compiler_options(**INIT_COMPILER_OPTIONS)
    init = jax.jit(lambda r: model.init(r, x, train=False), compiler_options=options)
    return init(rng)
