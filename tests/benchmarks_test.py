"""The benchmarks' helpers: the GPU benchmark's timing (benchmarks/gpu_bench.py `throughput`) on a
scripted clock, and the CPU description in bench_model.py's table header."""

import importlib.util
import os

import jax.numpy as jnp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    module_spec = importlib.util.spec_from_file_location(
        name, os.path.join(REPO, "benchmarks", f"{name}.py")
    )
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
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


# --- gpu_bench's profile: where a step's device time goes ----------------------------------


class _Event:
    def __init__(self, name, start, end, **stats):
        self.name, self.start_ns, self.end_ns = name, start, end
        self.stats = list(stats.items())


class _Line:
    def __init__(self, name, events):
        self.name, self.events = name, events


class _Plane:
    def __init__(self, name, lines):
        self.name, self.lines = name, lines


class _Profile:
    def __init__(self, *planes):
        self.planes = list(planes)


def test_op_times_counts_nested_ops_once(gpu_bench):
    # A CPU trace: a while loop's event encloses its body's ops; a thread-pool wait inside an
    # op (no hlo_op) stays part of that op.
    host = _Plane(
        "/host:CPU",
        [
            _Line(
                "tf_XLAPjRtCpuClient/1",
                [
                    _Event("while.3", 0, 100, hlo_op="while.3"),
                    _Event("fusion.1", 10, 40, hlo_op="fusion.1"),
                    _Event("Await", 20, 30),
                    _Event("ynn_fusion", 50, 90, hlo_op="ynn_fusion"),
                    _Event("fusion.1", 120, 130, hlo_op="fusion.1"),
                ],
            ),
            _Line("python", [_Event("train_once", 0, 200)]),
        ],
    )
    where, times = gpu_bench.op_times(_Profile(host))
    assert where == "host CPU threads"
    assert times == {"while.3": 30, "fusion.1": 40, "ynn_fusion": 40}
    assert sum(times.values()) == 110  # the while's 100 ns and the last op's 10, once each


def test_op_times_prefers_the_accelerator(gpu_bench):
    # With a device plane the host's op events (the launches) are not the ops' time: only the
    # kernels count, by their hlo_op annotation, else by kernel name; module lines are skipped.
    host = _Plane("/host:CPU", [_Line("t", [_Event("fusion.1", 0, 1000, hlo_op="fusion.1")])])
    gpu = _Plane(
        "/device:GPU:0",
        [
            _Line("XLA Modules", [_Event("jit_train_step", 0, 100)]),
            _Line(
                "Stream #7(Compute)",
                [
                    _Event("loop_add_fusion_kernel", 0, 5, hlo_op="%fusion.1 = f32[4] fusion()"),
                    _Event("cutlass_gemm", 5, 25),
                    _Event("loop_add_fusion_kernel", 30, 36, hlo_op="fusion.1"),
                ],
            ),
        ],
    )
    where, times = gpu_bench.op_times(_Profile(host, gpu))
    assert where == "/device:GPU:0"
    assert times == {"fusion.1": 11, "cutlass_gemm": 20}
    # An "XLA Ops" line, where the trace has one, is the per-op view: the streams would count
    # the same time twice.
    gpu.lines.append(_Line("XLA Ops", [_Event("fusion.1", 0, 11), _Event("gemm.2", 12, 32)]))
    assert gpu_bench.op_times(_Profile(host, gpu))[1] == {"fusion.1": 11, "gemm.2": 20}


@pytest.mark.parametrize(
    "op_name, want",
    [
        (
            "jit(step)/jvp(Net)/Net._forward/NeuralEPDO_0/NeuralEPDO_0._fourier/dot_general",
            "forward NeuralEPDO_0",
        ),
        (
            "jit(step)/transpose(jvp(Net))/Net._forward/FieldBatchNorm_2/mul",
            "backward FieldBatchNorm_2",
        ),
        (
            "jit(step)/Net._forward/Net.conv_norm_relu/PDOConv_0/conv_general_dilated",
            "forward PDOConv_0",
        ),
        ("jit(step)/transpose(jvp(Sequential))/layers_2/reduce_sum", "backward layers_2"),
        ("jit(step)/add", "other"),
        ("", "other"),
    ],
)
def test_layer_of(gpu_bench, op_name, want):
    assert gpu_bench.layer_of(op_name) == want


def test_op_profile_of_a_real_step(gpu_bench):
    # A jitted training step of a two-layer Flax model on this machine: the profile finds
    # its ops, names their layers from the compiled module's metadata, and the per-op times
    # add up to the total.
    import flax.linen as nn
    import jax

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(256)(nn.relu(nn.Dense(256)(x)))

    model = Net()
    x = jnp.ones((512, 256))
    params = model.init(jax.random.PRNGKey(0), x)
    step = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply(p, x) ** 2)))
    hlo = step.lower(params, x).compile().as_text()
    p = gpu_bench.op_profile(lambda: step(params, x)["params"]["Dense_0"]["kernel"], 3, hlo)
    assert p["where"] == "host CPU threads" and p["ops"] > 0 and p["wall_ms"] > 0
    assert p["op_ms"] == pytest.approx(sum(v for _, v, _ in p["by_op"]))
    assert p["op_ms"] == pytest.approx(sum(v for _, v in p["by_layer"]))
    layers = {k for k, _ in p["by_layer"]}
    assert {"forward Dense_0", "backward Dense_0", "backward Dense_1"} <= layers, layers
    assert all(scope for _, _, scope in p["by_op"][:3])  # the largest ops have scopes
