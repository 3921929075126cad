"""Data benchmark: dataset build and read times, input-pipeline throughput with augmentation.

  bash run.sh bench data                        # bundled rotated_digits + pipeline
  bash run.sh bench data --mnist_rot_synthetic  # also a full-size synthetic MNIST-rot

Prints one table. The build is cold (a fresh temporary data_dir). "first read" goes through the
array_record data source and fills the .npy cache; "cached read" loads that cache. Pipeline
throughput: one epoch of 12,000 examples (the MNIST-rot train size: the 4,000 bundled train
digits three times) in batches of 64 through ``pipeline.epoch_batches`` (shuffled,
prefetched to device) and the jitted ``augment.augment``, timed after a warm-up epoch that
compiles. The synthetic MNIST-rot has the real files' shape (12,000 and 50,000 rows of 785
numbers, 80% zeros) with random values, to time parsing and preparation at full size.
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from neural_epdo_jax.data import augment, pipeline, sources  # noqa: E402
from neural_epdo_jax.runtime.host import setup_host  # noqa: E402

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Pipeline batch size.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 12_000, "Examples per pipeline epoch.")
_MNIST_ROT = flags.DEFINE_bool(
    "mnist_rot_synthetic", False, "Also time parsing/preparing a full-size synthetic MNIST-rot."
)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _pipeline_rate(images, labels, method: str, batch_size: int) -> float:
    """Examples/s of one shuffled epoch through epoch_batches and the jitted augmentation."""
    augment_fn = jax.jit(augment.augment, static_argnames="method")
    key = jax.random.key(0)

    def epoch(e: int) -> None:
        out = None
        batches = pipeline.epoch_batches(images, labels, batch_size, shuffle=True, epoch=e)
        for step, batch in enumerate(batches):
            out = augment_fn(jax.random.fold_in(key, step), batch["image"], method)
        jax.block_until_ready(out)

    epoch(0)  # compile
    _, seconds = _timed(lambda: epoch(1))
    return images.shape[0] / seconds


def _synthetic_mnist_rot(directory: str) -> None:
    rng = np.random.default_rng(0)
    for split, rows in sources.MNIST_ROT_NUM_ROWS.items():
        pixels = rng.random((rows, 784))
        pixels[pixels < 0.8] = 0.0
        table = np.concatenate([pixels, rng.integers(0, 10, (rows, 1))], axis=1)
        np.savetxt(os.path.join(directory, sources.MNIST_ROT_FILES[split]), table, fmt="%.9g")


def main(argv):
    del argv
    setup_host()
    rows = []
    with tempfile.TemporaryDirectory() as data_dir:
        _, seconds = _timed(lambda: sources.prepare("rotated_digits", data_dir=data_dir))
        rows.append(("rotated_digits: build (cold, 5,000 rotations + array_record)", seconds, "s"))
        for split in ("train", "test"):
            for kind in ("first read", "cached read"):
                (images, _), seconds = _timed(
                    lambda split=split: sources.load("rotated_digits", split, data_dir=data_dir)
                )
                rows.append((f"rotated_digits: {kind} {split} ({len(images)})", seconds, "s"))

        images, labels = sources.load("rotated_digits", "train", data_dir=data_dir)
        reps = -(-_NUM_EXAMPLES.value // images.shape[0])
        images = np.concatenate([images] * reps)[: _NUM_EXAMPLES.value]
        labels = np.concatenate([labels] * reps)[: _NUM_EXAMPLES.value]
        for method in ("none", "bilinear", "reference"):
            rate = _pipeline_rate(images, labels, method, _BATCH_SIZE.value)
            label = f"pipeline, batch {_BATCH_SIZE.value}, augment '{method}'"
            rows.append((label, rate, "examples/s"))

        if _MNIST_ROT.value:
            source = os.path.join(data_dir, "amat")
            os.makedirs(source)
            _synthetic_mnist_rot(source)
            for split, name in sources.MNIST_ROT_FILES.items():
                data = open(os.path.join(source, name), "rb").read()
                _, seconds = _timed(lambda data=data, name=name: sources.parse_amat(data, name))
                rows.append((f"mnist_rot (synthetic): parse {split} .amat", seconds, "s"))
            _, seconds = _timed(
                lambda: sources.prepare("mnist_rot", data_dir=data_dir, manual_dir=source)
            )
            rows.append(("mnist_rot (synthetic): build (parse both + array_record)", seconds, "s"))
            for kind in ("first read", "cached read"):
                _, seconds = _timed(lambda: sources.load("mnist_rot", "test", data_dir=data_dir))
                rows.append((f"mnist_rot (synthetic): {kind} test (50000)", seconds, "s"))

    device = jax.devices()[0]
    print(f"\ndevice: {device.platform} ({device.device_kind}), host CPUs: {os.cpu_count()}")
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'value':>10}  unit")
    for name, value, unit in rows:
        print(f"{name:<{width}}  {value:>10.2f}  {unit}")


if __name__ == "__main__":
    app.run(main)
