"""The GPU benchmark's timing (benchmarks/gpu_bench.py `throughput`), on a scripted clock."""

import importlib.util
import os

import jax.numpy as jnp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location(
        "gpu_bench", os.path.join(REPO, "benchmarks", "gpu_bench.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scripted(monkeypatch, module, costs):
    """A ``run`` whose k-th call takes ``costs[k]`` seconds of the module's clock."""
    clock, calls = [0.0], []

    def run():
        clock[0] += costs[len(calls)]
        calls.append(clock[0])
        return jnp.zeros(())

    monkeypatch.setattr(module.time, "perf_counter", lambda: clock[0])
    return run, calls


def test_throughput_is_the_median_window(gpu_bench, monkeypatch):
    # 3 warm-up calls, then a slow first window (clocks still rising), then fast ones.
    costs = [5.0] * 3 + [1.0] * 2 + [0.1] * 100
    run, calls = scripted(monkeypatch, gpu_bench, costs)
    rate, windows = gpu_bench.throughput(run, 10, 2, min_time_s=0.5)
    assert (windows, len(calls)) == (3, 3 + 3 * 2)  # 3 windows already pass 0.5 s
    assert rate == pytest.approx(2 * 10 / 0.2)  # the fast windows', not the slow one's
    # Control: one timed window, the way the benchmark used to time, reports the slow rate.
    run, _ = scripted(monkeypatch, gpu_bench, costs)
    rate, _ = gpu_bench.throughput(run, 10, 2, min_time_s=0.0, min_windows=1)
    assert rate == pytest.approx(2 * 10 / 2.0)


def test_throughput_times_at_least_min_time(gpu_bench, monkeypatch):
    run, calls = scripted(monkeypatch, gpu_bench, [0.125] * 100)  # exact in binary
    _, windows = gpu_bench.throughput(run, 1, 2, min_time_s=1.0, warmup=0)
    assert windows == 4 and len(calls) == 8  # 0.25 s per window
    run, _ = scripted(monkeypatch, gpu_bench, [0.125] * 100)
    assert gpu_bench.throughput(run, 1, 2, min_time_s=1.0, warmup=0, max_windows=2)[1] == 2
    with pytest.raises(ValueError, match="calls_per_window"):
        gpu_bench.throughput(run, 1, 0, min_time_s=1.0)
