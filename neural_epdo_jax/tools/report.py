"""Equivariance and rotation-robustness report of a trained checkpoint.

  python -m neural_epdo_jax.tools.report --workdir=runs/default [--checkpoint=best]
      [--num_images=500] [--num_equivariance_images=4] [--angle_step_degrees=15]

For the workdir's best (or latest) checkpoint, restored with the config it was trained with:

1. Per layer (each block's output feature map, after BatchNorm and ReLU, and the logits):
   the relative equivariance error ``|f(g.x) - g.f(x)| / |g.f(x)|`` for every rotation
   ``r^k`` of the layer's group -- exact for multiples of 90 degrees
   (`testing.equivariance_errors`, ``jnp.rot90``), measured with bilinear interpolation and a
   centre-disc mask for the others (`testing.equivariance_error_at_angle`) -- and for the
   mirrors of D_N layers (exact). A negative control (quarter turn of space only, fibres not
   permuted) shows what a non-equivariant answer looks like.
2. Test accuracy as a function of the input rotation angle (bilinear, `augment.rotate`, on a
   fixed subset of the test split).
3. Invariance of the logits over those angles: the mean and max relative change
   ``|f(R x) - f(x)| / |f(x)|`` and the agreement of predictions with the unrotated ones.

Prints tables, writes ``report.json``, ``report_equivariance.png`` and
``report_rotation.png`` into the workdir. Exact errors are float32 rounding (~1e-7); the
interpolated ones include the interpolation error of rotating both sides, so compare them
between layers and models, not with zero.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from neural_epdo_jax import layers, models, testing
from neural_epdo_jax.core import fields
from neural_epdo_jax.data import pipeline
from neural_epdo_jax.runtime import parallel
from neural_epdo_jax.runtime.host import setup_host
from neural_epdo_jax.tools import evaluate
from neural_epdo_jax.train import checkpointing
from neural_epdo_jax.train.loop import load_split
from neural_epdo_jax.train.state import create_model

REPORT_JSON = "report.json"
EQUIVARIANCE_PNG = "report_equivariance.png"
ROTATION_PNG = "report_rotation.png"


class _CachedFeatures:
    """All block outputs and the logits of one input, computed once per distinct input.

    The equivariance helpers call ``fn(x)`` and ``fn(g.x)`` for every layer; the input and
    its rotations are the same arrays (by value) for every layer, so one network pass per
    distinct input serves all layers.
    """

    def __init__(self, fn: Callable[[jax.Array], tuple[jax.Array, ...]], size: int = 4):
        self.fn = fn
        self.size = size
        self.cache: collections.OrderedDict[tuple, tuple[jax.Array, ...]] = (
            collections.OrderedDict()
        )
        self.calls = 0

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        host = np.asarray(x)
        key = (host.shape, str(host.dtype), hashlib.sha1(host.tobytes()).hexdigest())
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        self.calls += 1
        out = self.fn(jnp.asarray(host))
        self.cache[key] = out
        if len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return out

    def layer(self, i: int) -> Callable[[jax.Array], jax.Array]:
        return lambda x: self(x)[i]


def block_outputs_fn(
    model: models.NeuralEPDONet, variables: dict[str, Any]
) -> Callable[[jax.Array], tuple[jax.Array, ...]]:
    """A jitted ``images [B, H, W, 1] -> (block_1, ..., block_6, logits)`` in inference mode.

    Block i's output is ReLU(BatchNorm(conv_i(...))) (before dropout and pooling), a feature
    map [B, H_i, W_i, plan[i].out_type.size]; the logits are [B, num_classes].
    """
    is_bn = lambda module, method: isinstance(module, layers.FieldBatchNorm)

    # Called on a handful of small batches: compile time dominates, so no backend
    # optimisations (several times faster to compile on CPU). The variables are an argument,
    # not constants folded into the executable.
    @functools.partial(
        jax.jit, compiler_options=parallel.compiler_options(xla_backend_optimization_level=0)
    )
    def fn(variables, images):
        logits, state = model.apply(
            variables, images, train=False, capture_intermediates=is_bn, mutable=["intermediates"]
        )
        inter = state["intermediates"]
        bn_out = (layers.to_nhwc(inter[f"FieldBatchNorm_{i}"]["__call__"][0]) for i in range(6))
        blocks = tuple(jax.nn.relu(x) for x in bn_out)
        return blocks + (logits,)

    return functools.partial(fn, variables)


def _layer_types(model: models.NeuralEPDONet) -> list[tuple[str, fields.FieldType | None]]:
    plan = model.plan()
    out = [(f"block{i + 1}", blk.out_type) for i, blk in enumerate(plan)]
    return out + [("logits", None)]


def equivariance_table(
    model: models.NeuralEPDONet,
    variables: dict[str, Any],
    images: jax.Array,
    *,
    radius_fraction: float = 0.8,
) -> list[dict[str, Any]]:
    """Equivariance errors of every layer of ``model`` on ``images`` [B, H, W, 1].

    Returns:
      One dict per layer (blocks 1-6, then the logits): ``layer``, ``group``, ``type``,
      ``shape``; ``rotations``: a list of {``k``, ``angle_degrees``, ``exact``, ``error``} for
      every rotation r^k, k = 1..N-1, of the layer's group; ``mirrors``: {``element``,
      ``angle_degrees``, ``error``} for the grid mirrors of a D_N layer (else empty);
      ``space_only_control``: the error at the quarter turn when the fibres are not permuted
      (None for invariant outputs or when N is not a multiple of 4).
    """
    features = _CachedFeatures(block_outputs_fn(model, variables))
    rows = []
    for index, (name, ftype) in enumerate(_layer_types(model)):
        group = ftype.group if ftype is not None else model.plan()[-1].out_type.group
        in_type = fields.FieldType(group, "trivial", 1)
        spatial = ftype is not None
        fn = features.layer(index)
        kwargs = dict(group=group, spatial_output=spatial)
        grid = set(group.grid_elements())
        rotations = []
        for k in range(1, group.n):
            exact = (0, k) in grid
            if exact:
                err = testing.equivariance_errors(
                    fn, images, in_type, ftype, elements=[(0, k)], **kwargs
                )[(0, k)]
            else:
                err = testing.equivariance_error_at_angle(
                    fn, images, in_type, ftype, k, radius_fraction=radius_fraction, **kwargs
                )
            rotations.append(
                {"k": k, "angle_degrees": 360.0 * k / group.n, "exact": exact, "error": err}
            )
        mirrors = []
        for g in sorted(e for e in grid if e[0] == 1):
            err = testing.equivariance_errors(fn, images, in_type, ftype, elements=[g], **kwargs)
            mirrors.append(
                {"element": list(g), "angle_degrees": 360.0 * g[1] / group.n, "error": err[g]}
            )
        control = None
        if spatial and group.n % 4 == 0:
            q = group.quarter_turn()
            control = testing.equivariance_errors(
                fn, images, in_type, ftype, elements=[q], fibres=False, **kwargs
            )[q]
        shape = fn(images).shape[1:]
        rows.append(
            {
                "layer": name,
                "group": group.name,
                "type": "invariant" if ftype is None else f"{ftype.num_fields} x {ftype.unit_name}",
                "shape": [int(s) for s in shape],
                "rotations": rotations,
                "mirrors": mirrors,
                "space_only_control": control,
            }
        )
    return rows


def rotation_robustness(
    logits_fn: Callable[[Any, jax.Array], jax.Array],
    variables: Any,
    images: np.ndarray,
    labels: np.ndarray,
    angles_degrees: np.ndarray,
    *,
    batch_size: int = 250,
) -> dict[str, list[float]]:
    """Accuracy and invariance of the logits under input rotations.

    Args:
      logits_fn: ``(variables, images [B, H, W, 1]) -> logits [B, K]`` (traceable; it is
        jitted together with the rotation (`evaluate.rotated_runs`) and called with batches
        of ``min(batch_size, N)`` rows, the last one padded), e.g.
        ``functools.partial(model.apply, train=False)``.
      variables: its first argument.
      images, labels: [N, H, W, 1] and [N].
      angles_degrees: rotations (counter-clockwise, bilinear, zero fill, about the centre;
        `evaluate.rotated_runs`, as `evaluate.rotation_sweep`).
      batch_size: rows per call.

    Returns:
      Lists over the angles: ``accuracy``; ``agreement`` (fraction of predictions equal to
      the unrotated ones); ``logit_change_mean`` / ``logit_change_max`` (per image
      ``|f(R x) - f(x)| / |f(x)|``, L2 over the logits).
    """
    pipeline.check_images(images)
    n = len(images)
    batch_size = min(batch_size, n)

    def logits_step(variables, batch, axis_name=None):
        return logits_fn(variables, batch["image"])

    def all_logits(fn, batches) -> np.ndarray:
        rows = [np.asarray(fn(variables, b))[np.asarray(b["mask"]) > 0] for b in batches]
        return np.concatenate(rows).astype(np.float64)

    runs = evaluate.rotated_runs(
        logits_step, variables, images, labels, [0.0, *angles_degrees], batch_size=batch_size
    )
    reference = all_logits(*next(runs))
    ref_pred = reference.argmax(-1)
    ref_norm = np.maximum(np.linalg.norm(reference, axis=-1), 1e-30)
    result = collections.defaultdict(list)
    for angle, run in zip(angles_degrees, runs):
        logits = reference if angle == 0 else all_logits(*run)
        pred = logits.argmax(-1)
        change = np.linalg.norm(logits - reference, axis=-1) / ref_norm
        result["accuracy"].append(float(np.mean(pred == labels)))
        result["agreement"].append(float(np.mean(pred == ref_pred)))
        result["logit_change_mean"].append(float(np.mean(change)))
        result["logit_change_max"].append(float(np.max(change)))
    return dict(result)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def format_tables(report: dict[str, Any]) -> str:
    """The report's tables as text."""
    lines = [
        f"{report['workdir']}: {report['checkpoint']} checkpoint (step {report['step']}), "
        f"{report['model']}",
        "",
        f"Equivariance error per layer (relative L2 over {report['num_equivariance_images']} "
        "test images): exact = multiples of 90 deg (jnp.rot90); interpolated = the other "
        f"rotations (bilinear both sides, centre disc r={report['radius_fraction']}); mirror = "
        "D_N grid mirrors; control = quarter turn of space only (fibres not permuted).",
    ]
    header = (
        f"{'layer':<8} {'group':<6} {'type':<22} {'shape':<14} {'exact max':>10} "
        f"{'interp mean':>11} {'interp max':>10} {'mirror max':>10} {'control':>9}"
    )
    lines += [header, "-" * len(header)]
    for row in report["equivariance"]:
        exact = [r["error"] for r in row["rotations"] if r["exact"]]
        interp = [r["error"] for r in row["rotations"] if not r["exact"]]
        mirror = [r["error"] for r in row["mirrors"]]
        lines.append(
            f"{row['layer']:<8} {row['group']:<6} {row['type']:<22} "
            f"{'x'.join(map(str, row['shape'])):<14} "
            f"{_fmt(max(exact) if exact else None):>10} "
            f"{_fmt(float(np.mean(interp)) if interp else None):>11} "
            f"{_fmt(max(interp) if interp else None):>10} "
            f"{_fmt(max(mirror) if mirror else None):>10} {_fmt(row['space_only_control']):>9}"
        )
    rot = report["rotation"]
    lines += [
        "",
        f"Rotated test images ({report['num_images']} of '{report['split']}', bilinear): "
        "accuracy, agreement with the unrotated predictions, relative change of the logits.",
    ]
    header = (
        f"{'angle':>7} {'accuracy':>9} {'agreement':>10} {'change mean':>12} {'change max':>11}"
    )
    lines += [header, "-" * len(header)]
    for i, angle in enumerate(rot["angles_degrees"]):
        lines.append(
            f"{angle:7.1f} {rot['accuracy'][i]:9.4f} {rot['agreement'][i]:10.4f} "
            f"{rot['logit_change_mean'][i]:12.2e} {rot['logit_change_max'][i]:11.2e}"
        )
    worst = int(np.argmin(rot["accuracy"]))
    lines.append(
        f"mean accuracy over angles {np.mean(rot['accuracy']):.4f} (min "
        f"{rot['accuracy'][worst]:.4f} at {rot['angles_degrees'][worst]:g} deg)"
    )
    return "\n".join(lines)


def plot_report(report: dict[str, Any], workdir: str) -> list[str]:
    """Writes the two PNGs into ``workdir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [os.path.join(workdir, EQUIVARIANCE_PNG), os.path.join(workdir, ROTATION_PNG)]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for row in report["equivariance"]:
        angles = [r["angle_degrees"] for r in row["rotations"]]
        errs = [max(r["error"], 1e-12) for r in row["rotations"]]
        (line,) = ax.plot(angles, errs, "o-", ms=3, label=f"{row['layer']} ({row['group']})")
        for m in row["mirrors"]:
            ax.plot(m["angle_degrees"], max(m["error"], 1e-12), "x", color=line.get_color())
    ax.set(
        xlabel="rotation r^k (degrees); x: mirrors r^k m",
        ylabel="relative equivariance error",
        yscale="log",
        title="equivariance per layer (multiples of 90 deg exact, others interpolated)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1.0), loc="upper left")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    rot = report["rotation"]
    fig, (ax_acc, ax_chg) = plt.subplots(1, 2, figsize=(11, 4))
    ax_acc.plot(rot["angles_degrees"], rot["accuracy"], "o-", ms=3, label="accuracy")
    ax_acc.plot(rot["angles_degrees"], rot["agreement"], "s-", ms=3, label="agreement with 0 deg")
    ax_acc.set(xlabel="rotation of the test images (degrees)", ylim=(0, 1.02))
    ax_acc.legend()
    ax_chg.plot(rot["angles_degrees"], rot["logit_change_mean"], "o-", ms=3, label="mean")
    ax_chg.plot(rot["angles_degrees"], rot["logit_change_max"], "s-", ms=3, label="max")
    ax_chg.set(xlabel="rotation (degrees)", ylabel="|f(Rx) - f(x)| / |f(x)|")
    ax_chg.legend()
    for ax in (ax_acc, ax_chg):
        ax.set_xticks(np.arange(0, 361, 45))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def make_report(
    workdir: str,
    *,
    checkpoint: str = "best",
    num_images: int | None = None,
    num_equivariance_images: int = 4,
    angle_step_degrees: float = 15.0,
    batch_size: int | None = None,
    radius_fraction: float = 0.8,
    write: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Equivariance and robustness report of a training workdir's checkpoint.

    Args:
      workdir: a training workdir (``config.json`` and ``checkpoints/``).
      checkpoint: 'best' (by test accuracy) or 'latest'.
      num_images: test images for the rotation sweep (a fixed, seeded subset of the test
        split); None for the config's ``num_test_examples``, the images `evaluate` uses, so
        that the 0-degree accuracy is the test accuracy.
      num_equivariance_images: how many of them the per-layer errors use.
      angle_step_degrees: spacing of the rotation sweep (0 to 360 degrees).
      batch_size: rows per forward pass of the sweep (default the config's eval batch size).
      radius_fraction: centre-disc radius for the interpolated errors (fraction of half the
        map size).
      write: write ``report.json`` and the PNGs into the workdir.
      verbose: print the tables.

    Returns:
      The json-able report: ``equivariance`` (see `equivariance_table`), ``rotation`` (see
      `rotation_robustness`, plus ``angles_degrees``) and metadata.

    Raises:
      checkpointing.NoCheckpointError: the workdir has no config.json or no checkpoint.
      ValueError: a bad option.
    """
    if num_images is not None and num_images < 1:
        raise ValueError(f"num_images must be >= 1 or None, got {num_images}")
    if num_equivariance_images < 1:
        raise ValueError(f"num_equivariance_images must be >= 1, got {num_equivariance_images}")
    angles = evaluate.sweep_angles(angle_step_degrees)
    if not os.path.isdir(workdir):
        raise checkpointing.NoCheckpointError(f"{workdir!r} does not exist: no run to report on.")
    config, state, step, which = evaluate.load_state(workdir, checkpoint)
    model = create_model(config)
    if not isinstance(model, models.NeuralEPDONet):
        raise ValueError(f"report supports NeuralEPDONet models, the config has {type(model)}.")
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    limit = config.num_test_examples if num_images is None else num_images
    images, labels = load_split(config, config.test_split, limit)
    eq_images = jnp.asarray(images[: min(num_equivariance_images, len(images))])

    equivariance = equivariance_table(model, variables, eq_images, radius_fraction=radius_fraction)
    rotation = rotation_robustness(
        functools.partial(model.apply, train=False),
        variables,
        images,
        labels,
        angles,
        batch_size=batch_size or config.eval_batch_size,
    )
    rotation = {"angles_degrees": [float(a) for a in angles], **rotation}
    report = {
        "workdir": os.path.abspath(workdir),
        "checkpoint": which,
        "step": int(step),
        "model": f"{config.model_name}({', '.join(f'{k}={v}' for k, v in config.model.items())})",
        "dataset": config.dataset,
        "split": config.test_split,
        "num_images": int(len(images)),
        "num_equivariance_images": int(eq_images.shape[0]),
        "radius_fraction": radius_fraction,
        "equivariance": equivariance,
        "rotation": rotation,
    }
    if verbose:
        print(format_tables(report), flush=True)
    if write and jax.process_index() == 0:
        path = os.path.join(workdir, REPORT_JSON)
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(path + ".tmp", path)
        report_paths = plot_report(report, workdir)
        if verbose:
            print(f"wrote {path}, {', '.join(report_paths)}")
    return report


def main(argv: list[str]) -> None:
    """Command-line entry point (flags below)."""
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    setup_host()
    try:
        make_report(
            values.workdir,
            checkpoint=values.checkpoint,
            num_images=values.num_images,
            num_equivariance_images=values.num_equivariance_images,
            angle_step_degrees=values.angle_step_degrees,
            batch_size=values.batch_size,
        )
    except (checkpointing.NoCheckpointError, ValueError) as e:
        raise SystemExit(f"report: error: {e}") from None


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
    flags.DEFINE_enum("checkpoint", "best", list(evaluate.CHECKPOINTS), "Which checkpoint.")
    flags.DEFINE_integer(
        "num_images", None, "Test images of the rotation sweep (default: the run's test set)."
    )
    flags.DEFINE_integer(
        "num_equivariance_images", 4, "Test images of the per-layer equivariance errors."
    )
    flags.DEFINE_float("angle_step_degrees", 15.0, "Spacing of the rotation sweep.")
    flags.DEFINE_integer("batch_size", None, "Batch size of the sweep (default: the config's).")
    flags.mark_flag_as_required("workdir")
    app.run(main)
