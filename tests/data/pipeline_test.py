"""Tests for neural_epdo_jax.data.pipeline: epochs, padding, seeding, prefetch, sharding."""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from neural_epdo_jax.data import pipeline


def numbered_dataset(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose pixel [0, 0] holds the example's index; label = index % 10."""
    images = np.zeros((n, 28, 28, 1), np.float32)
    images[:, 0, 0, 0] = np.arange(n)
    return images, (np.arange(n) % 10).astype(np.int32)


def seen_indices(batches) -> list[int]:
    out = []
    for batch in batches:
        mask = np.asarray(batch["mask"]).astype(bool)
        ids = np.asarray(batch["image"])[:, 0, 0, 0][mask].astype(int)
        np.testing.assert_array_equal(np.asarray(batch["label"])[mask], ids % 10)
        out.extend(ids.tolist())
    return out


@pytest.mark.parametrize(
    "num_examples, batch_size, expected",
    [(0, 64, 0), (1, 64, 1), (64, 64, 1), (65, 64, 2), (12_000, 64, 188), (50_000, 1000, 50)],
)
def test_num_batches(num_examples, batch_size, expected):
    assert pipeline.num_batches(num_examples, batch_size) == expected


def test_num_batches_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size must be positive"):
        pipeline.num_batches(10, 0)


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_example_once_with_padding(shuffle):
    images, labels = numbered_dataset(103)
    batches = list(pipeline.epoch_batches(images, labels, 16, shuffle=shuffle, seed=1, epoch=2))
    assert len(batches) == pipeline.num_batches(103, 16) == 7
    for batch in batches:
        arrays = [batch["image"], batch["label"], batch["mask"]]
        chex.assert_shape(arrays, [(16, 28, 28, 1), (16,), (16,)])
        chex.assert_type(arrays, [jnp.float32, jnp.int32, jnp.float32])
    seen = seen_indices(batches)
    assert sorted(seen) == list(range(103))
    last = batches[-1]
    np.testing.assert_array_equal(np.asarray(last["mask"]), [1.0] * 7 + [0.0] * 9)
    assert not np.asarray(last["image"])[7:].any() and not np.asarray(last["label"])[7:].any()
    assert float(sum(np.asarray(b["mask"]).sum() for b in batches)) == 103


def test_order_is_the_seeded_permutation():
    images, labels = numbered_dataset(50)

    def order(**kwargs):
        return seen_indices(pipeline.epoch_batches(images, labels, 8, **kwargs))

    assert order(shuffle=False) == list(range(50))
    expected = np.random.default_rng((7, 3)).permutation(50).tolist()
    assert order(shuffle=True, seed=7, epoch=3) == expected
    assert order(shuffle=True, seed=7, epoch=3) == expected  # reproducible
    assert order(shuffle=True, seed=7, epoch=4) != expected  # a new order each epoch
    assert order(shuffle=True, seed=8, epoch=3) != expected


def test_jitted_step_never_retraces():
    images, labels = numbered_dataset(70)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def masked_sum(batch):
        return jnp.sum(batch["image"][:, 0, 0, 0] * batch["mask"])

    total = 0.0
    for epoch in range(2):
        for batch in pipeline.epoch_batches(images, labels, 32, shuffle=True, epoch=epoch):
            total += float(masked_sum(batch))
    assert total == 2 * sum(range(70))


def test_prefetches_one_batch_ahead(monkeypatch):
    puts = []
    real_put = jax.device_put

    def recording_put(x, *args, **kwargs):
        puts.append(int(np.asarray(x["image"])[0, 0, 0, 0]))
        return real_put(x, *args, **kwargs)

    monkeypatch.setattr(jax, "device_put", recording_put)
    images, labels = numbered_dataset(40)
    batches = pipeline.epoch_batches(images, labels, 10, shuffle=False)
    first = next(batches)
    # Batch 1 was already sent to the device when batch 0 was handed out.
    assert puts == [0, 10]
    assert isinstance(first["image"], jax.Array)
    assert seen_indices([first, *batches]) == list(range(40))
    assert puts == [0, 10, 20, 30]


def test_single_device_sharding_and_default():
    assert jax.local_device_count() > 1 or pipeline.data_mesh_sharding() is None
    mesh = Mesh(np.asarray(jax.local_devices()[:1]), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    images, labels = numbered_dataset(5)
    (batch,) = pipeline.epoch_batches(images, labels, 8, shuffle=False, sharding=sharding)
    assert batch["image"].sharding == sharding and batch["mask"].sharding == sharding


def test_mismatched_lengths():
    images, labels = numbered_dataset(5)
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        next(pipeline.epoch_batches(images, labels[:4], 2, shuffle=False))


def test_uint8_images_are_refused():
    images, labels = numbered_dataset(4)
    with pytest.raises(ValueError, match=r"images are uint8, not float: scale them to \[0, 1\]"):
        next(pipeline.epoch_batches(images.astype(np.uint8), labels, 2, shuffle=False))


def test_two_device_mesh():
    """On 2 forced host devices: batches split over 'data'; an odd batch size is refused."""
    script = textwrap.dedent(
        """
        import jax, numpy as np
        from neural_epdo_jax.data import pipeline
        sharding = pipeline.data_mesh_sharding()
        assert sharding is not None and sharding.mesh.axis_names == ("data",)
        assert sharding.mesh.size == 2, sharding.mesh
        images = np.arange(10 * 28 * 28, dtype=np.float32).reshape(10, 28, 28, 1)
        labels = np.arange(10, dtype=np.int32)
        batches = list(pipeline.epoch_batches(images, labels, 4, shuffle=False,
                                                    sharding=sharding))
        assert len(batches) == 3
        shards = batches[0]["image"].addressable_shards
        assert sorted(s.data.shape[0] for s in shards) == [2, 2], shards
        np.testing.assert_array_equal(np.asarray(batches[2]["mask"]), [1, 1, 0, 0])
        try:
            next(pipeline.epoch_batches(images, labels, 5, shuffle=False,
                                              sharding=sharding))
        except ValueError as e:
            assert "not divisible by the 2 devices" in str(e), e
        else:
            raise AssertionError("batch size 5 was accepted on 2 devices")
        print("OK")
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
