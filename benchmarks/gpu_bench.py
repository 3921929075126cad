"""GPU throughput of the four paper variants and the projected wall time of the paper's
protocol (used by benchmarks/gpu_check.sh; runs on CPU too, slowly).

Self-contained on purpose (jax, flax, optax and the model only), so that it runs on a GPU
machine without the data stack. The step is the training step's computation: forward,
cross-entropy, backward, coupled-L2 Adam update; eval is a forward pass in eval mode.

A GPU step takes milliseconds, so a few steps timed once measure the clocks and the first
calls as much as the step (the first GPU run's first variant, R-fd, came out 3-4x slower
than R-gauss, and its bfloat16 run, later in the same process, faster than R-gauss's
float32). So the device is first kept busy for ``--warmup_s``, every step runs a few
untimed times after compiling, and the rate is the median over windows of ``--steps``
calls, timed until at least 3 windows and ``--min_time_s`` seconds (`throughput`).

  python benchmarks/gpu_bench.py [--budget_s=300] [--variants=R-gauss,...]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from neural_epdo_jax import models  # noqa: E402

VARIANTS = {k: v for k, v in models.PAPER_VARIANTS.items() if k != "PDO-eConv"}
# (dtype, train batch, eval batch), most important first: the budget may cut the tail.
SETTINGS = [
    ("float32", 64, 256),
    ("bfloat16", 64, 256),
    ("float32", 256, 1024),
    ("bfloat16", 256, 1024),
]


def throughput(
    run: Callable[[], jax.Array],
    items_per_call: int,
    calls_per_window: int,
    min_time_s: float,
    *,
    warmup: int = 3,
    min_windows: int = 3,
    max_windows: int = 1000,
) -> tuple[float, int]:
    """Items per second of ``run()`` (which returns an array to wait for): ``warmup`` untimed
    calls, then windows of ``calls_per_window`` calls, each waited for, until at least
    ``min_windows`` windows and ``min_time_s`` seconds (or ``max_windows``) are timed.
    Returns the median window's rate and the number of windows: a stall or a slow first
    window (clocks still rising) moves the median less than it would a single timing."""
    if calls_per_window < 1 or min_windows < 1:
        raise ValueError("throughput: calls_per_window and min_windows must be >= 1.")
    for _ in range(warmup):
        out = run()
    if warmup:
        jax.block_until_ready(out)
    rates, total = [], 0.0
    while len(rates) < max_windows and (len(rates) < min_windows or total < min_time_s):
        t0 = time.perf_counter()
        for _ in range(calls_per_window):
            out = run()
        jax.block_until_ready(out)
        dt = time.perf_counter() - t0
        total += dt
        rates.append(calls_per_window * items_per_call / dt)
    return statistics.median(rates), len(rates)


def keep_busy(seconds: float) -> None:
    """Large matmuls on the default device for about ``seconds``, so that its clocks are up
    before the first measurement."""
    a = jax.random.normal(jax.random.PRNGKey(0), (4096, 4096))
    f = jax.jit(lambda a: (a @ a) * 1e-3)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        f(a).block_until_ready()


def measure(
    name: str, dtype: str, batch: int, eval_batch: int, steps: int, min_time_s: float
) -> dict:
    model = models.NeuralEPDONet(**VARIANTS[name], dtype=dtype)
    key = jax.random.PRNGKey(0)
    x = jax.random.uniform(key, (batch, 28, 28, 1))
    y = jax.random.randint(key, (batch,), 0, 10)
    variables = jax.jit(functools.partial(model.init, train=False))(key, x[:2])
    # Flat Adam state, as train.py (`training.create_optimizer`).
    tx = optax.flatten(
        optax.chain(optax.add_decayed_weights(1e-4), optax.scale_by_adam(), optax.scale(-2e-3))
    )
    params, stats = variables["params"], variables["batch_stats"]
    opt = tx.init(params)

    def loss_fn(p, s, x, y, rng):
        logits, upd = model.apply(
            {"params": p, "batch_stats": s},
            x,
            train=True,
            rngs={"dropout": rng},
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2, 3))
    def train_step(p, s, o, i, x, y):  # i: the step's number, kept on the device
        rng = jax.random.fold_in(key, i)
        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s, x, y, rng)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), upd["batch_stats"], o, i + 1, loss

    @jax.jit
    def eval_step(p, s, x):
        return model.apply({"params": p, "batch_stats": s}, x, train=False)

    t0 = time.perf_counter()
    carry = train_step(params, stats, opt, jnp.zeros((), jnp.int32), x, y)
    carry[-1].block_until_ready()
    compile_s = time.perf_counter() - t0

    def train_once() -> jax.Array:
        nonlocal carry
        carry = train_step(*carry[:4], x, y)
        return carry[-1]

    train_ips, _ = throughput(train_once, batch, steps, min_time_s)
    xe = jax.random.uniform(key, (eval_batch, 28, 28, 1))
    params, stats, *_, loss = carry
    eval_ips, _ = throughput(lambda: eval_step(params, stats, xe), eval_batch, steps, min_time_s)
    # Paper protocol: 199 epochs x 12,000 training images; the reference evaluates the 50,000
    # test images at every epoch from 60 on (140 evaluations).
    proj_min = (199 * 12_000 / train_ips + 140 * 50_000 / eval_ips) / 60
    return dict(
        variant=name,
        dtype=dtype,
        batch=batch,
        compile_s=compile_s,
        train_ips=train_ips,
        eval_batch=eval_batch,
        eval_ips=eval_ips,
        protocol_min=proj_min,
        loss=float(loss),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget_s", type=float, default=300.0)
    ap.add_argument("--steps", type=int, default=10, help="calls per timed window")
    ap.add_argument("--min_time_s", type=float, default=2.0, help="timed seconds per rate")
    ap.add_argument("--warmup_s", type=float, default=3.0, help="device warm-up first")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    print(f"jax {jax.__version__} backend={jax.default_backend()} devices={jax.devices()}")
    keep_busy(args.warmup_s)
    start = time.perf_counter()
    rows = []
    header = (
        f"{'variant':9} {'dtype':8} {'batch':>5} {'compile s':>9} {'train img/s':>11} "
        f"{'eval bs':>7} {'eval img/s':>10} {'protocol min':>12}"
    )
    print(header)
    for dtype, batch, eval_batch in SETTINGS:
        for name in args.variants.split(","):
            if time.perf_counter() - start > args.budget_s:
                print(f"(budget of {args.budget_s:.0f} s spent: skipped {name} {dtype} {batch})")
                continue
            try:
                r = measure(name, dtype, batch, eval_batch, args.steps, args.min_time_s)
            except Exception as e:  # keep going: report what failed
                print(f"{name:9} {dtype:8} {batch:>5} FAILED: {type(e).__name__}: {e}"[:300])
                continue
            rows.append(r)
            print(
                f"{r['variant']:9} {r['dtype']:8} {r['batch']:>5} {r['compile_s']:>9.1f} "
                f"{r['train_ips']:>11.0f} {r['eval_batch']:>7} {r['eval_ips']:>10.0f} "
                f"{r['protocol_min']:>12.1f}",
                flush=True,
            )
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
