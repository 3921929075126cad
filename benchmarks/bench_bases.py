"""Bases benchmark: time to build every basis each paper network needs, cold, per network.

  bash run.sh bench bases
  python benchmarks/bench_bases.py --variants=D-gauss --impl=dense

Each network runs in a fresh subprocess (empty memoisation caches). Imports, and JAX's own
first-trace overheads (a tiny warm-up network), are excluded. The network is traced with
``jax.eval_shape(model.init, ...)`` twice: the first trace builds the bases the layers ask
for, the second finds them cached; "bases" is the difference, "trace" the second. The
breakdown lists the memoised functions of `neural_epdo_jax.core.bases` that were called.
"""

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
    "variants", ["R-fd", "R-gauss", "Q-gauss", "D-gauss", "PDO-eConv"], f"Any of {list(VARIANTS)}."
)
_IMPL = flags.DEFINE_string("impl", "", "Model `impl` ('fourier' or 'dense'); '' = default.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Cold subprocesses per network (median).")
_CHILD = flags.DEFINE_string("child", "", "Internal: time one network and print JSON.")


def run_child(name: str) -> dict:
    import functools

    import jax
    import jax.numpy as jnp

    from neural_epdo_jax import models
    from neural_epdo_jax.core import bases

    kwargs = dict(VARIANTS[name])
    if _IMPL.value:
        kwargs["impl"] = _IMPL.value
    x = jnp.zeros((1, 28, 28, 1), jnp.float32)
    key = jax.random.PRNGKey(0)

    def trace(model) -> float:
        start = time.perf_counter()
        jax.eval_shape(functools.partial(model.init, train=False), key, x)
        return time.perf_counter() - start

    tiny = dict(n=2, channels=(2, 2, 2, 2, 2, 2), g=2, s=1, reduction=1)
    trace(models.NeuralEPDONet(**tiny))  # JAX's first-trace overheads
    memoised = {n: f for n, f in vars(bases).items() if callable(getattr(f, "cache_info", None))}
    for f in memoised.values():
        f.cache_clear()
    model = models.NeuralEPDONet(**kwargs)
    cold = trace(model)
    warm = trace(model)
    calls = {n: f.cache_info().misses for n, f in memoised.items() if f.cache_info().misses}
    return {
        "variant": name,
        "cold_s": cold,
        "trace_s": warm,
        "bases_s": cold - warm,
        "calls": calls,
    }


def main(argv):
    del argv
    from neural_epdo_jax.runtime.host import setup_host

    setup_host()
    if _CHILD.value:
        print("RESULT " + json.dumps(run_child(_CHILD.value)), flush=True)
        return
    passthrough = [a for a in sys.argv[1:] if a.startswith("--impl")]
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}, {os.cpu_count()} CPUs")
    print("| network | bases s (median) | all runs s | trace s | memoised functions called |")
    print("|---|---|---|---|---|")
    for name in _VARIANTS.value:
        runs = []
        for _ in range(_REPEATS.value):
            cmd = [sys.executable, os.path.abspath(__file__), f"--child={name}", *passthrough]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                runs = [{"error": tail[0][:200]}]
                break
            runs.append(json.loads(lines[-1][len("RESULT ") :]))
        if "error" in runs[0]:
            print(f"| {name} | failed: {runs[0]['error']} | | | |")
            continue
        times = [r["bases_s"] for r in runs]
        calls = ", ".join(f"{k} x{v}" for k, v in sorted(runs[0]["calls"].items()))
        print(
            f"| {name} | {statistics.median(times):.2f} | "
            f"{' '.join(f'{t:.2f}' for t in times)} | "
            f"{statistics.median(r['trace_s'] for r in runs):.2f} | {calls} |",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
