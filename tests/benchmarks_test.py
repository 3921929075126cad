"""The benchmarks' helpers: the GPU benchmark's timing (benchmarks/gpu_bench.py `throughput`) on a
scripted clock, and the CPU description in bench_model.py's table header."""

import importlib.util
import os

import jax.numpy as jnp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(REPO, "benchmarks", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_bench():
    return _load("gpu_bench")


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


@pytest.fixture(scope="module")
def bench_model():
    return _load("bench_model")  # defines its absl flags: loaded once per process


@pytest.mark.parametrize(
    "cpuinfo, want",
    [
        (
            "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse avx2 "
            "avx512f avx512dq\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\n",
            "Intel(R) Xeon(R) Processor, AVX-512",
        ),
        ("model name : AMD EPYC 7B13\nflags : fpu sse fma avx2 bmi2\n", "AMD EPYC 7B13, AVX2"),
        ("processor : 0\nFeatures : fp asimd evtstrm\n", "unknown CPU, NEON"),
        ("model name : Old CPU\nflags : fpu sse sse2\n", "Old CPU"),
        ("", "unknown CPU"),
    ],
)
def test_describe_cpu_names_the_model_and_vector_extension(bench_model, cpuinfo, want):
    # The benchmark's table header names the host: its numbers depend on it (AVX-512 doubles
    # the C++ kernel's vector width).
    assert bench_model.describe_cpu(cpuinfo) == want
