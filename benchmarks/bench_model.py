"""Model benchmark: parameters, compile time, train/eval throughput, peak RSS, FLOP rate.

  bash run.sh bench model                                   # the four paper variants
  python benchmarks/bench_model.py --variants=R-gauss --steps=10 --impl=dense
  python benchmarks/bench_model.py --dtype=bfloat16 --batch=256 --eval_batch=1024

Each variant runs in a fresh subprocess (so its peak RSS is its own) that builds the bases,
initialises the model (jitted, on one small input), compiles the training step
(``train.steps.train_step``: forward + backward + Adam update, no augmentation) and the eval step,
times ``--steps`` steps after one warm-up step each and reports medians. Like train.py it
splits a CPU host into one JAX device per core and runs the steps data-parallel
(``--cpu_devices=1``: one device). "GFLOP/s" is XLA's cost analysis of the straightforward
formulation of the step (``impl='dense'``, expanded kernels; lowered with ``chunk=0`` and
``eval_chunk=0`` because XLA counts a loop body once; in brackets the formulation that runs)
divided by the median step time, next to the rate of one large float32 matmul measured in the
same subprocess afterwards: the fraction shows how far the step is from the machine's
dense-matmul speed. Peak RSS is VmHWM after training (train) and after evaluation (+eval);
after each compilation the benchmark, like train.py, returns the compiler's freed heap to the
OS (`runtime.host.release_free_memory`). Timings on a shared machine are noisy: the load average is
printed with the table. The persistent compilation cache is off in the subprocesses, so compile
times and peaks are cold. On CPU the Neural ePDO layers use the fused C++ kernel of
`neural_epdo_jax.layers.ops.cpu_kernel`;
``NEURAL_EPDO_JAX_CPU_KERNELS=0 python benchmarks/bench_model.py`` measures the XLA
formulation instead."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from neural_epdo_jax import variants  # noqa: E402  (plain data, no JAX)

VARIANTS = variants.PAPER_VARIANTS

_VARIANTS = flags.DEFINE_list(
    "variants", ["R-fd", "R-gauss", "Q-gauss", "D-gauss"], f"Any of {list(VARIANTS)}."
)
_BATCH = flags.DEFINE_integer("batch", 64, "Training batch size.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 256, "Evaluation batch size (0: skip eval).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after one warm-up step).")
_IMPL = flags.DEFINE_string("impl", "", "Model `impl` ('fourier' or 'dense'); '' = default.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Activation dtype.")
_CHUNK = flags.DEFINE_integer("chunk", -1, "Model `chunk` (images at a time); -1 = default.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "CPU devices (data parallel) as train.py: 0 = one per core.", lower_bound=0
)
_MATMUL = flags.DEFINE_integer("matmul_size", 2048, "Side of the reference float32 matmul.")
_JSON = flags.DEFINE_string("json", "", "Also write the results (a JSON list) to this file.")
_CHILD = flags.DEFINE_string("child", "", "Internal: run one variant and print JSON.")


def _vm_hwm_mb() -> float:
    """Peak resident set size of this process (VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def describe_cpu(cpuinfo: str) -> str:
    """The CPU's model name and widest float vector extension (AVX-512, AVX2, NEON), from the
    text of /proc/cpuinfo: the table's numbers depend on both (the project has run on AVX2
    and AVX-512 hosts, and the C++ kernel's vectors are twice as wide on AVX-512)."""
    model, features = "", []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not features:
            features = value.split()
    isa = next(
        (
            name
            for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("asimd", "NEON"))
            if flag in features
        ),
        "",
    )
    return ", ".join(part for part in (model or "unknown CPU", isa) if part)


def _host() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return describe_cpu(f.read())
    except OSError:
        import platform

        return platform.processor() or platform.machine() or "unknown CPU"


def _flops(lowered_or_compiled) -> float:
    cost = lowered_or_compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def _time_steps(fn, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _matmul_gflops(n: int) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: jnp.dot(a, b, precision="highest"))
    f(a, b).block_until_ready()
    times = _time_steps(lambda: f(a, b).block_until_ready(), 5)
    return 2 * n**3 / statistics.median(times) / 1e9


def run_child(name: str) -> dict:
    """Benchmarks one variant in this process; returns a JSON-able dict."""
    t_import = time.perf_counter()
    import jax
    import jax.numpy as jnp

    from configs import default as default_config
    from neural_epdo_jax import models
    from neural_epdo_jax.data import pipeline
    from neural_epdo_jax.runtime.host import release_free_memory, setup_host
    from neural_epdo_jax.train.state import (
        create_learning_rate_schedule,
        create_optimizer,
        create_train_state,
    )
    from neural_epdo_jax.train.steps import eval_step, jit_data_parallel, replicated, train_step

    setup_host(cpu_devices=_CPU_DEVICES.value, compilation_cache="")  # as train.py does
    # Cold compiles: a persistent cache (run.sh sets one) would hand back steps compiled by
    # an earlier run, and the compiler's memory peak with them.
    jax.config.update("jax_enable_compilation_cache", False)
    res = {"variant": name, "backend": jax.default_backend(), "device": str(jax.devices()[0])}
    res["import_s"] = time.perf_counter() - t_import
    batches = (_BATCH.value,) + ((_EVAL_BATCH.value,) if _EVAL_BATCH.value > 0 else ())
    sharding = pipeline.data_mesh_sharding(batches)
    res["devices"] = 1 if sharding is None else sharding.mesh.size
    kwargs = dict(VARIANTS[name], dtype=_DTYPE.value)
    if _IMPL.value:
        kwargs["impl"] = _IMPL.value
    if _CHUNK.value >= 0:
        kwargs["chunk"] = _CHUNK.value
    axis = None if sharding is None else sharding.mesh.axis_names[0]
    model = models.NeuralEPDONet(**kwargs, axis_name=axis)
    # The FLOP rate counts the straightforward formulation (impl='dense': expanded kernels)
    # and, separately, the one that runs. XLA's cost analysis counts a loop body once, so
    # both come from the step lowered (not compiled) on one device with the whole batch at
    # once (chunk=0; same parameters, same math).
    flops_models = {
        "train_flops": models.NeuralEPDONet(**dict(kwargs, impl="dense", chunk=0, eval_chunk=0)),
        "train_flops_run": models.NeuralEPDONet(**dict(kwargs, chunk=0, eval_chunk=0)),
    }

    # train.py's optimizer (configs/default.py's settings; flat Adam state).
    config = default_config.get_config()
    tx = create_optimizer(config, create_learning_rate_schedule(config, 188))
    t0 = time.perf_counter()
    state = create_train_state(jax.random.key(0), model, tx, (28, 28, 1))
    if sharding is not None:
        state = jax.device_put(state, replicated(sharding))
    jax.block_until_ready(state)
    res["init_s"] = time.perf_counter() - t0
    res["params"] = models.count_params(state.params)

    def batch_of(n: int, seed: int) -> dict:
        k1, k2 = jax.random.split(jax.random.key(seed))
        return {
            "image": jax.random.uniform(k1, (n, 28, 28, 1), jnp.float32),
            "label": jax.random.randint(k2, (n,), 0, 10, jnp.int32),
            "mask": jnp.ones((n,), jnp.float32),
        }

    rng = jax.random.key(1)
    batch = jax.device_put(batch_of(_BATCH.value, 0), sharding)

    def step_fn(state, batch, rng, axis_name=None):
        return train_step(state, batch, rng, augmentation="none", axis_name=axis_name)

    def flops(fn, *args, key):
        one = jax.devices()[0]
        args = jax.device_put(args, one)
        return {
            k.replace("train", key): _flops(
                jax.jit(fn).lower(args[0].replace(apply_fn=m.apply), *args[1:])
            )
            for k, m in flops_models.items()
        }

    t0 = time.perf_counter()
    step = jit_data_parallel(step_fn, sharding, donate_state=True)
    compiled = step.lower(state, batch, rng).compile()
    res["compile_train_s"] = time.perf_counter() - t0
    release_free_memory()  # as train.py does after compiling

    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], batch, rng)
        jax.block_until_ready(metrics)

    one_step()  # warm-up
    times = _time_steps(one_step, _STEPS.value)
    res["train_step_s"] = statistics.median(times)
    res["train_step_all_s"] = times
    res["train_img_s"] = _BATCH.value / res["train_step_s"]
    res["rss_train_mb"] = _vm_hwm_mb()

    if _EVAL_BATCH.value > 0:
        ebatch = jax.device_put(batch_of(_EVAL_BATCH.value, 1), sharding)
        t0 = time.perf_counter()
        ecompiled = jit_data_parallel(eval_step, sharding).lower(holder["state"], ebatch).compile()
        res["compile_eval_s"] = time.perf_counter() - t0
        release_free_memory()
        run_eval = lambda: jax.block_until_ready(ecompiled(holder["state"], ebatch))
        run_eval()
        etimes = _time_steps(run_eval, max(2, _STEPS.value))
        res["eval_step_s"] = statistics.median(etimes)
        res["eval_step_all_s"] = etimes
        res["eval_img_s"] = _EVAL_BATCH.value / res["eval_step_s"]
        res["rss_eval_mb"] = _vm_hwm_mb()
    # After the peak-RSS readings: lowering the straightforward formulation has its own.
    res.update(flops(step_fn, holder["state"], batch, rng, key="train"))
    if _EVAL_BATCH.value > 0:
        res.update(flops(eval_step, holder["state"], ebatch, key="eval"))
    for key in ("train", "eval"):
        if f"{key}_step_s" in res:
            for run in ("", "_run"):
                rate = res[f"{key}_flops{run}"] / res[f"{key}_step_s"] / 1e9
                res[f"{key}_gflop_s{run}"] = rate
    res["matmul_gflop_s"] = _matmul_gflops(_MATMUL.value)
    return res


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _row(r: dict) -> str:
    if "error" in r:
        return f"| {r['variant']} | failed: {r['error']} |"
    ev = r.get("eval_img_s")
    per_img = r["train_flops"] / _BATCH.value / 1e9, r["train_flops_run"] / _BATCH.value / 1e9
    eval_rate = f"{r['eval_gflop_s']:.1f} ({r['eval_gflop_s_run']:.1f})" if ev is not None else "-"
    return (
        f"| {r['variant']} | {r['params']:,} | {r['init_s']:.1f} | {r['compile_train_s']:.1f} | "
        f"{r['train_step_s']:.3f} | {r['train_img_s']:.1f} | "
        + (f"{ev:.1f}" if ev is not None else "-")
        + f" | {r['rss_train_mb']:.0f} / {r.get('rss_eval_mb', float('nan')):.0f} | "
        f"{per_img[0]:.2f} ({per_img[1]:.2f}) | {r['train_gflop_s']:.1f} "
        f"({r['train_gflop_s_run']:.1f}) | {eval_rate} | {r['matmul_gflop_s']:.0f} |"
    )


def main(argv):
    del argv
    from neural_epdo_jax.runtime.host import setup_host

    # Huge pages as train.py; the variants' subprocesses inherit them.
    setup_host(compilation_cache="")
    if _CHILD.value:
        print("RESULT " + json.dumps(run_child(_CHILD.value)), flush=True)
        return
    unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
    if unknown:
        raise app.UsageError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    passthrough = [a for a in sys.argv[1:] if not a.startswith(("--variants", "--json"))]
    results = []
    for name in _VARIANTS.value:
        load = _load()
        cmd = [sys.executable, os.path.abspath(__file__), f"--child={name}", *passthrough]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            res = {"variant": name, "error": tail[0][:200]}
        else:
            res = json.loads(lines[-1][len("RESULT ") :])
        res["load_before"] = load
        results.append(res)
        print(f"{name}: done (load {load})", file=sys.stderr, flush=True)
    host = _host()
    for r in results:
        r["host"] = host
    ok = [r for r in results if "error" not in r]
    dev = ok[0]["device"] if ok else "?"
    ndev = ok[0]["devices"] if ok else "?"
    print(
        f"\nbatch {_BATCH.value} (train), {_EVAL_BATCH.value} (eval), {_DTYPE.value}, "
        f"impl={_IMPL.value or 'default'}, {ndev} x {dev} (data parallel), {os.cpu_count()} "
        f"CPUs ({host}), load average now {_load()}; medians of {_STEPS.value} steps. GFLOP: "
        "XLA's count of the straightforward formulation (impl='dense'), in brackets of the one "
        "that ran.\n"
    )
    print(
        "| variant | params | init s | compile train s | train step s | train img/s | "
        "eval img/s | peak RSS MiB train / +eval | train GFLOP/img | train GFLOP/s | "
        "eval GFLOP/s | f32 matmul GFLOP/s |"
    )
    print("|" + "---|" * 12)
    for r in results:
        print(_row(r))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
