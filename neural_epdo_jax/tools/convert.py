"""Weights of the official PyTorch implementation in our networks, and back.

  python -m neural_epdo_jax.tools.convert --reference=model.npz \\
      --config=configs/mnist_rot_regular_gauss.py --workdir=runs/imported

reads a PyTorch ``state_dict`` of the official ``pdo_net`` saved as ``.npz`` (see the README
for the three lines of torch that write it), builds our network for ``--config`` and writes a
training workdir (``config.json`` and a checkpoint at step 0) that ``evaluate``, ``report``
and ``export`` read like any other. ``--direction=to_reference`` goes the other way: the
workdir's latest checkpoint as such a ``state_dict``.

How a reference module becomes ours
-----------------------------------
Both implementations write every equivariant layer as coefficients times a fixed basis, but
the bases differ (other solvers, other orderings), so coefficients cannot be copied. Instead
each convolution's kernel is expanded exactly as the reference does (``param x base``, or
taken from a stored ``<module>.kernel``), its channels are relabelled into our convention,
and the kernel is projected onto our basis by least squares, per pair of fields. The
projection is exact when the two spans agree; its relative residual is checked against
``max_residual`` (1e-3), and a layer whose residual is larger is refused by name: a residual
means the spans differ, i.e. the two implementations do not compute the same family of
layers, which no rounding should hide.

Relabelling. The reference's ``gauss`` and ``rbf-fd`` stencils list each order's derivatives
in reverse (d/dy first): as if x and y were swapped, a reflection s about the diagonal. Its
networks stay equivariant, but under the automorphism ``phi(g) = s g s`` of the group: its
fields turn the other way round (``phi(r) = r^-1``) and its mirror is ours composed with the
half turn (``phi(m) = r^(N/2) m``). A permutation representation indexed by cosets ``hH`` is
carried into ours by ``hH -> phi(h)H``; for a C_N regular field that is ``k -> -k``. Its ``fd``
stencils are ordered as ours, so nothing is relabelled there. Fields that the dihedral model
restricts to C_N before its last block inherit the relabelling of their D_N field.
Normalisations, pooling and the head are per field or invariant, and map one to one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.linalg

from neural_epdo_jax import layers, models
from neural_epdo_jax.core import bases, fields, groups
from neural_epdo_jax.runtime.host import setup_host

MAX_RESIDUAL = 1e-3
# Discretisations whose reference stencils list each order's derivatives in reverse.
REVERSED_IN_REFERENCE = frozenset({"gauss", "rbf-fd"})


class ConversionError(ValueError):
    """The weights do not fit the config, or a kernel lies outside our layer's span."""


# ------------------------------------------------------------------ relabelling channels


def _automorphism(group: groups.Group, g: groups.Element) -> groups.Element:
    """``phi(g) = s g s`` for the diagonal reflection s: r^k m^f -> r^(-k + f N/2) m^f."""
    f, k = group.check(g)
    if f and group.n % 2:
        raise ConversionError(
            f"{group.name}: the reference's reversed stencils map its mirror to the half turn "
            "times the mirror, which needs an even N."
        )
    return group.check((f, -k + f * (group.n // 2)))


def unit_permutation(group: groups.Group, unit: fields.Unit, reverse: bool) -> np.ndarray:
    """``perm`` with ``ours[c] = reference[perm[c]]`` for one field of type ``unit``.

    ``reverse``: the reference's fields turn the other way round (its gauss / rbf-fd
    networks), else the identity."""
    perm = []
    for name, mult in unit:
        rep = groups.representation(group, name)
        if reverse:
            one = [
                rep.perms[groups.element_index(group, _automorphism(group, h)), 0]
                for h in rep.coset_reps
            ]
        else:
            one = list(range(rep.dim))
        for _ in range(mult):
            perm.extend(len(perm) + np.asarray(one))
    return np.asarray(perm, dtype=np.int64)


def channel_permutation(
    ftype: fields.FieldType, reverse: bool, restricted_from: fields.FieldType | None = None
) -> np.ndarray:
    """``perm`` with ``ours[c] = reference[perm[c]]`` over all channels of ``ftype``.

    ``restricted_from``: ``ftype`` holds the C_N fields that `layers.restrict_dihedral`
    makes of these D_N fields; their labels follow from the D_N field's."""
    if restricted_from is None:
        one = unit_permutation(ftype.group, ftype.unit, reverse)
        d = ftype.field_size
        return np.concatenate([f * d + one for f in range(ftype.num_fields)])
    full = channel_permutation(restricted_from, reverse)
    ramp = np.arange(restricted_from.size, dtype=np.float32).reshape(1, 1, 1, -1)
    r = np.asarray(layers.restrict_dihedral(jnp.asarray(ramp), restricted_from)[0]).astype(int)
    r = r.reshape(-1)  # restricted[j] = dihedral[r[j]]
    r_inv = np.argsort(r)
    return r_inv[full[r]]


# ------------------------------------------------------------------ the layers, listed


@dataclasses.dataclass(frozen=True)
class Conv:
    """One equivariant convolution of the network, as both implementations name it.

    Attributes:
      ref: the reference module's name (``conv3.conv2``).
      ours: the path of our weight in ``params`` (``('NeuralEPDO_1', 'generator')``).
      basis: our basis [n, d_out, d_in, S, S].
      perm_out, perm_in: channel relabellings of one group's output and input channels,
        ``ours[c] = reference[perm[c]]`` (output channels: per field, d_out of them).
      groups: the reference conv's ``groups`` (the generator's ``s``).
    """

    ref: str
    ours: tuple[str, ...]
    basis: np.ndarray
    perm_out: np.ndarray
    perm_in: np.ndarray
    groups: int = 1


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the conversion maps, for one network (reference name, our module).

    Attributes:
      convs: the equivariant convolutions.
      batch_norms: (reference BatchNorm, our FieldBatchNorm), the head's last.
      group_norms: (reference ``convN.gn``, our ``NeuralEPDO_i``) of the generators.
      denses: (reference Linear, our TorchDense) of the head.
      block_perms: the relabelling of each block's output channels.
      restrict: the D_N field type restricted to C_N before the last block, if any.
    """

    convs: tuple[Conv, ...]
    batch_norms: tuple[tuple[str, str], ...]
    group_norms: tuple[tuple[str, str], ...]
    denses: tuple[tuple[str, str], ...]
    block_perms: tuple[np.ndarray, ...]
    restrict: fields.FieldType | None


def _neural_epdo_convs(
    model: models.NeuralEPDONet, i: int, blk: models.BlockPlan, p_in, p_out, reverse: bool
) -> list[Conv]:
    """The three convolutions of block ``i``'s Neural ePDO: hidden, generator, output."""
    ours = f"NeuralEPDO_{i - 1}"
    layer = layers.NeuralEPDO(
        blk.in_type,
        blk.out_type,
        model.order,
        model.reduction,
        model.g,
        model.s,
        model.discretisation,
        model.kernel_size,
    )
    hidden = fields.FieldType(blk.in_type.group, "regular", layer.hidden_fields())
    p_hidden = channel_permutation(hidden, reverse)
    gen = bases.generator_basis(
        blk.in_type.group, blk.in_type.unit, model.discretisation, model.order, model.kernel_size
    )
    # Generated operator j acts on input field j of every partition of g fields: its
    # components are labelled as those of input field j; its taps are positions.
    taps = model.kernel_size**2
    p_ops = p_in[: model.g * blk.in_type.field_size]
    p_gen = (p_ops[:, None] * taps + np.arange(taps)).reshape(-1)
    hidden_per_group = hidden.size // model.s
    return [
        Conv(
            f"conv{i + 1}.conv1",
            (ours, "hidden"),
            _linear_basis(blk.in_type, hidden),
            p_hidden,
            p_in,
        ),
        Conv(
            f"conv{i + 1}.conv2",
            (ours, "generator"),
            gen[..., None, None],
            p_gen,
            p_hidden[:hidden_per_group],
            model.s,
        ),
        Conv(
            f"conv{i + 1}.conv3",
            (ours, "output"),
            _linear_basis(blk.in_type, blk.out_type),
            p_out,
            p_in,
        ),
    ]


def plan(model: models.NeuralEPDONet, reverse: bool | None = None) -> Plan:
    """The convolutions, norms and channel relabellings of ``model``.

    ``reverse``: whether the reference's fields turn the other way round; None: as its
    stencils for ``model.discretisation`` make them (`REVERSED_IN_REFERENCE`)."""
    if not isinstance(model, models.NeuralEPDONet):
        raise ConversionError(
            f"only NeuralEPDONet models have a reference counterpart, got {type(model).__name__}."
        )
    if reverse is None:
        reverse = model.discretisation in REVERSED_IN_REFERENCE
    blocks = model.plan()
    convs, batch_norms, group_norms, perms = [], [], [], []
    restrict = None
    for i, blk in enumerate(blocks):
        if blk.restrict_before:
            restrict = blocks[i - 1].out_type
            p_in = channel_permutation(blk.in_type, reverse, restricted_from=restrict)
            p_out = channel_permutation(blk.out_type, reverse, restricted_from=blk.norm_type)
        else:
            p_in = perms[-1] if perms else np.zeros(1, np.int64)
            p_out = channel_permutation(blk.out_type, reverse)
        if i == 0 or model.g == -1:
            basis = bases.pdo_basis(
                blk.in_type.group,
                blk.in_type.unit,
                blk.out_type.unit,
                model.discretisation,
                model.order,
                model.kernel_size,
            )
            convs.append(Conv(f"conv{i + 1}", (f"PDOConv_{i}",), basis, p_out, p_in))
        else:
            convs += _neural_epdo_convs(model, i, blk, p_in, p_out, reverse)
            group_norms.append((f"conv{i + 1}.gn", f"NeuralEPDO_{i - 1}"))
        batch_norms.append((f"bn{i + 1}.bn", f"FieldBatchNorm_{i}"))
        perms.append(p_out)
    batch_norms.append(("fully_net.1", f"FieldBatchNorm_{len(blocks)}"))
    denses = (("fully_net.0", "TorchDense_0"), ("fully_net.3", "TorchDense_1"))
    return Plan(
        tuple(convs), tuple(batch_norms), tuple(group_norms), denses, tuple(perms), restrict
    )


def _linear_basis(t_in: fields.FieldType, t_out: fields.FieldType) -> np.ndarray:
    """The 1x1 basis as [n, d_out, d_in, 1, 1]."""
    return bases.linear_basis(t_in.group, t_in.unit, t_out.unit)[..., None, None]


# ------------------------------------------------------------------ projection


def project(kernel: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares coefficients of a kernel in a basis, per pair of fields.

    Args:
      kernel: [F_out, d_out, F_in, d_in, S, S] (our channel labels).
      basis: [n, d_out, d_in, S, S].
    Returns:
      ``(weight [F_in, F_out, n], residual)``: the residual is ``|kernel - weight . basis| /
      |kernel|`` (Frobenius, over the whole layer; 0 for a zero kernel).
    """
    f_out, d_out, f_in, d_in, s, _ = kernel.shape
    n = basis.shape[0]
    if basis.shape[1:] != (d_out, d_in, s, s):
        raise ConversionError(f"kernel {kernel.shape} does not fit basis {basis.shape}.")
    b = basis.reshape(n, -1).astype(np.float64).T  # [d_out d_in S S, n]
    t = np.transpose(kernel, (1, 3, 4, 5, 2, 0)).reshape(b.shape[0], f_in * f_out)
    t = t.astype(np.float64)
    # Normal equations in float64: the bases are well conditioned, and products (unlike a
    # QR of the tall basis) stay fast when BLAS threads share the cores with other work.
    w = scipy.linalg.cho_solve(scipy.linalg.cho_factor(b.T @ b), b.T @ t)  # [n, F_in F_out]
    norm = np.linalg.norm(t)
    residual = float(np.linalg.norm(t - b @ w) / norm) if norm > 0 else 0.0
    return np.transpose(w.reshape(n, f_in, f_out), (1, 2, 0)), residual


def _expand(weight: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """[F_in, F_out, n] x [n, d_out, d_in, S, S] -> [F_out, d_out, F_in, d_in, S, S]."""
    return np.einsum("iob,bpqhw->opiqhw", weight.astype(np.float64), basis.astype(np.float64))


# ------------------------------------------------------------------ reference files


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A reference ``state_dict`` from an ``.npz``: either its keys as they are (``np.savez``
    of ``net.state_dict()``), or grouped as ``state/<key>``, ``base/<key>`` with
    ``base_of/<key>`` naming the shared basis, and ``kernel/<module>`` for expanded kernels.
    """
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConversionError(
            f"cannot read {path}: {e}. Expected an .npz of a state_dict (see the README)."
        ) from None
    with z:
        keys = list(z.files)
        if not any(k.startswith("state/") for k in keys):
            return {k: z[k] for k in keys}
        sd = {k[len("state/") :]: z[k] for k in keys if k.startswith("state/")}
        for k in keys:
            if k.startswith("base_of/"):
                sd[k[len("base_of/") :]] = z["base/" + str(z[k])]
            elif k.startswith("kernel/"):
                sd[k[len("kernel/") :] + ".kernel"] = z[k]
    return sd


def _get(sd: Mapping[str, Any], key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if key not in sd:
        raise ConversionError(
            f"the state_dict has no {key!r}: is it a pdo_net of the same variant "
            "(flip, g, field type) as the config?"
        )
    a = np.asarray(sd[key])
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ConversionError(
            f"{key} has shape {tuple(a.shape)}, the config's model needs {tuple(shape)}: "
            "set the config's channels (and variant) to the reference model's."
        )
    return a


def reference_kernel(sd: Mapping[str, Any], conv: Conv, f_in: int, f_out: int) -> np.ndarray:
    """The reference conv's kernel as [F_out, d_out, F_in / groups, d_in, S, S], its labels.

    Expanded as the reference does, ``einsum('ijk,kmnpq->jminpq', param, base)``, or taken
    from ``<module>.kernel`` where the state_dict holds the expanded kernel instead."""
    n, d_out, d_in, s, _ = conv.basis.shape
    fi = f_in // conv.groups
    if conv.ref + ".kernel" in sd:
        k = _get(sd, conv.ref + ".kernel", (f_out * d_out, fi * d_in, s, s))
        return k.reshape(f_out, d_out, fi, d_in, s, s).astype(np.float64)
    base = _get(sd, conv.ref + ".base", (n, d_out, d_in, s, s))
    param = _get(sd, conv.ref + ".param", (fi, f_out, n))
    # einsum('ijk,kmnpq->jminpq', param, base), as one product
    k = param.reshape(fi * f_out, n).astype(np.float64) @ base.reshape(n, -1).astype(np.float64)
    k = k.reshape(fi, f_out, d_out, d_in, s, s)
    return np.transpose(k, (1, 2, 0, 3, 4, 5))


def _relabel(kernel: np.ndarray, perm_out: np.ndarray, perm_in: np.ndarray) -> np.ndarray:
    """Channels of a [F_out, d_out, F_in, d_in, S, S] kernel: ``new[c] = old[perm[c]]``
    on both sides (perms over all F * d channels)."""
    f_out, d_out, f_in, d_in, s, _ = kernel.shape
    flat = kernel.reshape(f_out * d_out, f_in * d_in, s, s)[perm_out][:, perm_in]
    return flat.reshape(kernel.shape)


# ------------------------------------------------------------------ reference -> ours


@dataclasses.dataclass(frozen=True)
class Imported:
    """The result of :func:`import_reference`.

    Attributes:
      model: our network for the config.
      variables: ``{'params', 'batch_stats'}`` holding the reference's weights.
      residuals: relative projection residual of every convolution, by reference name.
      plan: the mapping used (with the relabelling of every block's output channels).
    """

    model: models.NeuralEPDONet
    variables: dict[str, Any]
    residuals: dict[str, float]
    plan: Plan


def _abstract_variables(model: models.NeuralEPDONet) -> dict[str, Any]:
    x = jnp.zeros((1, 28, 28, 1), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def _signature(tree) -> list[tuple[str, tuple[int, ...], str]]:
    """(path, shape, dtype) of every leaf, in order."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(p), tuple(a.shape), str(a.dtype)) for p, a in leaves]


def _leaf(tree: Mapping[str, Any], path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def import_reference(
    state_dict: Mapping[str, Any],
    config: ml_collections.ConfigDict,
    *,
    max_residual: float = MAX_RESIDUAL,
    reverse: bool | None = None,
) -> Imported:
    """Builds our network for ``config`` holding the weights of a reference ``state_dict``.

    Args:
      state_dict: the official ``pdo_net``'s ``state_dict`` as numpy arrays
        (`load_state_dict`).
      config: a training config (like ``configs/mnist_rot_*.py``) for the same variant with
        the same channels.
      max_residual: refuse a kernel whose relative projection residual exceeds this.
      reverse: override the relabelling of `plan` (None: by the discretisation).
    Raises:
      ConversionError: a missing or misshapen entry, or a kernel outside our span (named).
    """
    from neural_epdo_jax.train.state import (
        create_model,  # config -> model; imported here, not at the top
    )

    model = create_model(config)
    mapping = plan(model, reverse)
    abstract = _abstract_variables(model)
    shape = lambda path: tuple(_leaf(abstract["params"], path).shape)
    params: dict[str, Any] = {}
    batch_stats: dict[str, Any] = {}
    residuals: dict[str, float] = {}
    for conv in mapping.convs:
        fi, f_out, _ = shape(conv.ours + ("weight",))
        kernel = reference_kernel(state_dict, conv, fi * conv.groups, f_out)
        weight, residuals[conv.ref] = project(
            _relabel(kernel, conv.perm_out, conv.perm_in), conv.basis
        )
        if not residuals[conv.ref] <= max_residual:
            raise ConversionError(
                f"{conv.ref}: the reference kernel lies {residuals[conv.ref]:.1e} (relative) "
                f"outside the span of our {'/'.join(conv.ours)} basis (limit {max_residual:g}): "
                "the two layers differ (discretisation, order, field type or relabelling)."
            )
        _set(params, conv.ours + ("weight",), _f32(weight))
    for ref, ours in mapping.group_norms:
        (m,) = shape((ours, "norm", "norm_scale"))
        per_field = lambda key, m=m: _get(state_dict, key, (1, m, 1, 1, 1)).reshape(m)
        params[ours]["norm"] = {
            "norm_scale": _f32(_get(state_dict, f"{ref}.bn.weight", (m,))),
            "norm_bias": _f32(_get(state_dict, f"{ref}.bn.bias", (m,))),
            "affine_scale": _f32(per_field(f"{ref}.weight")),
            "affine_bias": _f32(per_field(f"{ref}.bias")),
        }
    for ref, ours in mapping.batch_norms:
        (f,) = shape((ours, "scale"))
        params[ours] = {
            "scale": _f32(_get(state_dict, ref + ".weight", (f,))),
            "bias": _f32(_get(state_dict, ref + ".bias", (f,))),
        }
        batch_stats[ours] = {
            "mean": _f32(_get(state_dict, ref + ".running_mean", (f,))),
            "var": _f32(_get(state_dict, ref + ".running_var", (f,))),
        }
    for ref, ours in mapping.denses:
        f_in, f_out = shape((ours, "kernel"))
        params[ours] = {
            "kernel": _f32(_get(state_dict, ref + ".weight", (f_out, f_in)).T),
            "bias": _f32(_get(state_dict, ref + ".bias", (f_out,))),
        }
    if mapping.restrict is not None:
        want = restriction_matrix(mapping.restrict.group.n)
        got = _get(state_dict, "restrict.param", want.shape)
        if not np.array_equal(got, want):
            raise ConversionError(
                "restrict.param is not the reference's restriction of D_N to C_N fields "
                "(first N components kept, the second N reversed)."
            )
    variables = {"params": params, "batch_stats": batch_stats}
    if _signature(variables) != _signature(abstract):
        raise AssertionError("convert: the converted variables do not match the model's.")
    return Imported(model, variables, residuals, mapping)


def from_reference(
    state_dict: Mapping[str, Any], config: ml_collections.ConfigDict
) -> tuple[models.NeuralEPDONet, dict[str, Any]]:
    """``(model, variables)``: our network for ``config`` with a reference ``state_dict``'s
    weights (see :func:`import_reference`, which also returns the projection residuals)."""
    imported = import_reference(state_dict, config)
    return imported.model, imported.variables


def restriction_matrix(n: int) -> np.ndarray:
    """The reference's ``restrict.param`` [2N, 2N]: keeps the first N components of a D_N
    regular field and reverses the second N (`layers.restrict_dihedral`)."""
    a = np.zeros((2 * n, 2 * n), np.float32)
    a[np.arange(n), np.arange(n)] = 1.0
    a[n + np.arange(n), 2 * n - 1 - np.arange(n)] = 1.0
    return a


def _f32(a) -> jax.Array:
    return jnp.asarray(np.asarray(a), jnp.float32)


# ------------------------------------------------------------------ ours -> reference


def to_reference(
    model: models.NeuralEPDONet, variables: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """The reference ``pdo_net``'s ``state_dict`` (numpy) computing the same function.

    Each ``<conv>.base`` is our basis relabelled into the reference's channel order (it spans
    the same layers as the reference's own basis, which its ``load_state_dict`` accepts in
    place of it), and ``<conv>.param`` the coefficients of our kernel in it. After loading,
    call ``eval()`` on each of its ``conv`` modules: they cache their expanded kernel.
    """
    mapping = plan(model)
    params, stats = variables["params"], variables["batch_stats"]
    sd: dict[str, np.ndarray] = {}
    for conv in mapping.convs:
        weight = np.asarray(_leaf(params, conv.ours + ("weight",)), np.float64)
        # The reference basis: ours, relabelled as one field of the reference's (any basis of
        # the same span loads into the reference module in place of its own).
        d_out, d_in = conv.basis.shape[1:3]
        inv_out, inv_in = np.argsort(conv.perm_out[:d_out]), np.argsort(conv.perm_in[:d_in])
        base = conv.basis[:, inv_out][:, :, inv_in]
        kernel = _expand(weight, conv.basis)  # ours: [F_out, d_out, F_in / groups, d_in, S, S]
        kernel = _relabel(kernel, np.argsort(conv.perm_out), np.argsort(conv.perm_in))
        param, residual = project(kernel, base)
        if not residual <= MAX_RESIDUAL:
            raise AssertionError(f"convert: {conv.ref} left {residual:.1e} in its own span.")
        sd[conv.ref + ".param"] = param.astype(np.float32)
        sd[conv.ref + ".base"] = base.astype(np.float32)
    for ref, ours in mapping.group_norms:
        gn = {k: np.asarray(v, np.float32) for k, v in params[ours]["norm"].items()}
        sd[f"{ref}.weight"] = gn["affine_scale"].reshape(1, -1, 1, 1, 1)
        sd[f"{ref}.bias"] = gn["affine_bias"].reshape(1, -1, 1, 1, 1)
        sd[f"{ref}.bn.weight"] = gn["norm_scale"]
        sd[f"{ref}.bn.bias"] = gn["norm_bias"]
    for ref, ours in mapping.batch_norms:
        sd[ref + ".weight"] = np.asarray(params[ours]["scale"], np.float32)
        sd[ref + ".bias"] = np.asarray(params[ours]["bias"], np.float32)
        sd[ref + ".running_mean"] = np.asarray(stats[ours]["mean"], np.float32)
        sd[ref + ".running_var"] = np.asarray(stats[ours]["var"], np.float32)
        sd[ref + ".num_batches_tracked"] = np.zeros((), np.int64)
    for ref, ours in mapping.denses:
        sd[ref + ".weight"] = np.asarray(params[ours]["kernel"], np.float32).T.copy()
        sd[ref + ".bias"] = np.asarray(params[ours]["bias"], np.float32)
    if mapping.restrict is not None:
        sd["restrict.param"] = restriction_matrix(mapping.restrict.group.n)
    return sd


# ------------------------------------------------------------------ workdirs and the CLI


def write_workdir(
    model: models.NeuralEPDONet,
    variables: Mapping[str, Any],
    config: ml_collections.ConfigDict,
    workdir: str,
) -> None:
    """Writes ``config.json`` and a checkpoint at step 0 (a fresh optimizer) into a new
    ``workdir``: ``evaluate``, ``report`` and ``export`` read it, and ``train.py`` with the
    same config fine-tunes from it.

    Raises:
      ConversionError: ``workdir`` already holds checkpoints (nothing is overwritten).
    """
    from neural_epdo_jax.train import checkpointing
    from neural_epdo_jax.train.state import (
        create_learning_rate_schedule,
        create_optimizer,
        state_from_variables,
    )

    if checkpointing.all_steps(workdir):
        raise ConversionError(
            f"{workdir} already holds checkpoints; choose a new --workdir (nothing was written)."
        )
    checkpointing.check_and_save_config(config, workdir)
    tx = create_optimizer(config, create_learning_rate_schedule(config, 1))
    state = state_from_variables(model, tx, dict(variables))
    manager = checkpointing.create_manager(workdir)
    try:
        checkpointing.save(manager, 0, state, {})
    finally:
        manager.close()


def main(argv: list[str]) -> None:
    """Command-line entry point (flags below)."""
    from absl import app, flags
    from ml_collections import config_flags

    from neural_epdo_jax.tools import evaluate
    from neural_epdo_jax.train import checkpointing
    from neural_epdo_jax.train.state import ConfigError, create_model

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    setup_host()
    try:
        if values.direction == "to_reference":
            if not values.output:
                raise ConversionError("--direction=to_reference needs --output=FILE.npz.")
            config, state, step, which = evaluate.load_state(values.workdir, values.checkpoint)
            model = create_model(config)
            sd = to_reference(model, {"params": state.params, "batch_stats": state.batch_stats})
            np.savez(values.output, **sd)
            print(
                f"wrote {values.output}: {len(sd)} state_dict entries from {values.workdir} "
                f"({which} checkpoint, step {step})."
            )
            return
        if not values.reference:
            raise ConversionError("--reference=FILE.npz is required (or --direction=to_reference).")
        config = config_flags.get_config_filename(values["config"]) and values.config
        if config is None:
            raise ConversionError("--config=configs/<variant>.py is required.")
        imported = import_reference(
            load_state_dict(values.reference), config, max_residual=values.max_residual
        )
        write_workdir(imported.model, imported.variables, config, values.workdir)
    except (ConversionError, ConfigError, checkpointing.NoCheckpointError) as e:
        raise SystemExit(f"convert: error: {e}") from None
    worst = max(imported.residuals, key=imported.residuals.get)
    print(
        f"wrote {values.workdir}: {len(imported.residuals)} convolutions projected onto our "
        f"bases, largest relative residual {imported.residuals[worst]:.1e} ({worst}). "
        f"Evaluate: python -m neural_epdo_jax.tools.evaluate --workdir={values.workdir} "
        "--checkpoint=latest"
    )


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "The config of our model (same variant and channels).", lock_config=True
    )
    flags.DEFINE_enum(
        "direction",
        "from_reference",
        ["from_reference", "to_reference"],
        "from_reference: --reference npz -> a new --workdir; to_reference: --workdir -> --output.",
    )
    flags.DEFINE_string("reference", None, "The reference state_dict as .npz (README).")
    flags.DEFINE_string("workdir", None, "The workdir to write (or, to_reference, to read).")
    flags.DEFINE_string("output", None, "to_reference: the .npz to write.")
    flags.DEFINE_enum("checkpoint", "latest", ["best", "latest"], "to_reference: which one.")
    flags.DEFINE_float("max_residual", MAX_RESIDUAL, "Refuse kernels further from our span.")
    flags.mark_flag_as_required("workdir")
    app.run(main)
