"""GPU throughput of the four paper variants and the projected wall time of the paper's
protocol (used by benchmarks/gpu_check.sh; runs on CPU too, slowly).

Self-contained on purpose (jax, flax, optax and the model only), so that it runs on a GPU
machine without the data stack. The step is the training step's computation: forward,
cross-entropy, backward, coupled-L2 Adam update; eval is a forward pass in eval mode.

A GPU step takes milliseconds, so a few steps timed once measure the clocks and the first
calls as much as the step (a variant timed first in its process can come out several
times slower than it is). So the device is first kept busy for ``--warmup_s``, every step runs a few
untimed times after compiling, and the rate is the median over windows of ``--steps``
calls, timed until at least 3 windows and ``--min_time_s`` seconds (`throughput`).

The focus variant (``--focus``, R-gauss) runs first, and its float32 batch-64 steps are also
timed at larger evaluation batches (the protocol is about half evaluation), profiled (device
time per layer and per XLA op, against the wall time: a device that idles between kernels
shows there) and compared with ``impl='dense'``. Each row's projected protocol uses its
fastest evaluation batch measured.

  python benchmarks/gpu_bench.py [--budget_s=300] [--variants=R-gauss,...] [--focus=R-gauss]
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from neural_epdo_jax import models  # noqa: E402
from neural_epdo_jax.runtime.host import setup_host  # noqa: E402

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


class Bench:
    """One variant's training and evaluation steps at one dtype and training batch, compiled
    once: training and evaluation rates (any evaluation batch), and where the steps' device
    time goes (`op_profile`)."""

    def __init__(self, name: str, dtype: str, batch: int, impl: str | None = None):
        kw = dict(VARIANTS[name], dtype=dtype)
        if impl:
            kw["impl"] = impl
        model = models.NeuralEPDONet(**kw)
        self.name, self.dtype, self.batch, self.impl = name, dtype, batch, model.impl
        key = jax.random.PRNGKey(0)
        self.x = jax.random.uniform(key, (batch, 28, 28, 1))
        self.y = jax.random.randint(key, (batch,), 0, 10)
        variables = jax.jit(functools.partial(model.init, train=False))(key, self.x[:2])
        # Flat Adam state, as train.py (`train.state.create_optimizer`).
        tx = optax.flatten(
            optax.chain(optax.add_decayed_weights(1e-4), optax.scale_by_adam(), optax.scale(-2e-3))
        )
        params, stats = variables["params"], variables["batch_stats"]

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

        self._train_step = train_step
        self._eval_step = jax.jit(
            lambda p, s, x: model.apply({"params": p, "batch_stats": s}, x, train=False)
        )
        self._eval_x: dict[int, jax.Array] = {}
        t0 = time.perf_counter()
        self.carry = train_step(
            params, stats, tx.init(params), jnp.zeros((), jnp.int32), self.x, self.y
        )
        self.carry[-1].block_until_ready()
        self.compile_s = time.perf_counter() - t0
        self.eval_ips: dict[int, float] = {}

    def train_once(self) -> jax.Array:
        self.carry = self._train_step(*self.carry[:4], self.x, self.y)
        return self.carry[-1]

    def eval_once(self, eval_batch: int) -> jax.Array:
        if eval_batch not in self._eval_x:
            self._eval_x[eval_batch] = jax.random.uniform(
                jax.random.PRNGKey(1), (eval_batch, 28, 28, 1)
            )
        return self._eval_step(self.carry[0], self.carry[1], self._eval_x[eval_batch])

    def train_rate(self, steps: int, min_time_s: float) -> float:
        self.train_ips, _ = throughput(self.train_once, self.batch, steps, min_time_s)
        return self.train_ips

    def eval_rate(self, eval_batch: int, steps: int, min_time_s: float) -> float:
        rate, _ = throughput(lambda: self.eval_once(eval_batch), eval_batch, steps, min_time_s)
        self.eval_ips[eval_batch] = rate
        return rate

    def protocol_min(self) -> tuple[float, int]:
        """Projected minutes of the paper's protocol with the training rate and the fastest
        evaluation batch measured, and that batch: 199 epochs x 12,000 training images; the
        reference evaluates the 50,000 test images at every epoch from 60 on (140 times)."""
        eval_batch = max(self.eval_ips, key=self.eval_ips.get)
        return (
            199 * 12_000 / self.train_ips + 140 * 50_000 / self.eval_ips[eval_batch]
        ) / 60, eval_batch

    def profile(self, what: str, calls: int, eval_batch: int = 0) -> dict:
        """`op_profile` of ``calls`` training steps (what='train') or evaluations."""
        if what == "train":
            run = self.train_once
            hlo = self._train_step.lower(*self.carry[:4], self.x, self.y).compile().as_text()
        else:
            run = functools.partial(self.eval_once, eval_batch)
            xe = self._eval_x[eval_batch]
            hlo = self._eval_step.lower(self.carry[0], self.carry[1], xe).compile().as_text()
        return op_profile(run, calls, hlo)


# --- Where a step's device time goes -------------------------------------------------------


def _stat(event, key: str):
    for k, v in event.stats:
        if k == key:
            return v
    return None


def op_times(profile) -> tuple[str, dict[str, float]]:
    """Nanoseconds per XLA op (HLO instruction name) in a `ProfileData`: the kernels on the
    accelerator's planes where there are any, else the CPU runtime's op events (each op's
    time without the ops nested in it, such as a while loop's body). Kernels without an
    ``hlo_op`` annotation count under their own name. Returns (where, times)."""
    device = [p for p in profile.planes if p.name.startswith("/device:")]
    planes = device or [p for p in profile.planes if p.name.startswith("/host:CPU")]
    times: collections.Counter = collections.Counter()
    for plane in planes:
        lines = list(plane.lines)
        if device and any(line.name == "XLA Ops" for line in lines):
            lines = [line for line in lines if line.name == "XLA Ops"]
        for line in lines:
            if line.name in ("XLA Modules", "Steps", "XLA TraceMe"):
                continue
            events = []
            for e in line.events:
                op = _stat(e, "hlo_op")
                if op is None and device:
                    op = e.name  # a kernel, or an "XLA Ops" line's op
                if op is not None:
                    events.append((e.start_ns, e.end_ns, str(op).lstrip("%").split(" ")[0]))
            events.sort(key=lambda t: (t[0], -t[1]))
            stack: list = []
            for start, end, op in events:
                while stack and stack[-1][1] <= start:
                    stack.pop()
                times[op] += end - start
                if stack:
                    times[stack[-1][2]] -= end - start
                stack.append((start, end, op))
    return (device[0].name if device else "host CPU threads"), dict(times)


def hlo_scopes(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the JAX scope its metadata names (``op_name``), for the
    instructions of a compiled module's text."""
    scopes = {}
    for m in re.finditer(
        r"^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", hlo_text, re.M
    ):
        scopes[m.group(1)] = m.group(2)
    return scopes


def layer_of(op_name: str) -> str:
    """'forward NeuralEPDO_0', 'backward FieldBatchNorm_2', ... for an op's JAX scope: its
    pass (the backward pass's scopes are transposes of the forward's) and its first Flax
    module; 'other' for the loss, the optimizer and what names no module."""
    parts = op_name.split("/")[1:]
    module = next((p for p in parts if re.fullmatch(r"[A-Za-z]\w*_\d+", p)), None)
    if module is None:
        return "other"
    return ("backward " if "transpose(" in op_name else "forward ") + module


def op_profile(run: Callable[[], jax.Array], calls: int, hlo_text: str) -> dict:
    """Profiles ``calls`` calls of ``run`` (compiled and warmed up first) and returns the
    device time per call: in all (``op_ms``; against ``wall_ms``, the calls' wall time per
    call: a device idle between kernels shows as op_ms well below wall_ms), per layer and per
    op, with the ops' scopes from the compiled module's text ``hlo_text``."""
    from jax._src.lib import _profile_data

    jax.block_until_ready(run())
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            t0 = time.perf_counter()
            for _ in range(calls):
                out = run()
            jax.block_until_ready(out)
            wall = time.perf_counter() - t0
        paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        where, times = op_times(_profile_data.ProfileData.from_file(paths[0]))
    scopes = hlo_scopes(hlo_text)
    per_layer: collections.Counter = collections.Counter()
    for op, ns in times.items():
        per_layer[layer_of(scopes.get(op, ""))] += ns
    ms = 1e-6 / calls
    return dict(
        where=where,
        wall_ms=wall * 1e3 / calls,
        op_ms=sum(times.values()) * ms,
        ops=len(times),
        by_layer=[(k, v * ms) for k, v in per_layer.most_common()],
        by_op=[
            (op, v * ms, scopes.get(op, "")) for op, v in collections.Counter(times).most_common()
        ],
    )


def print_profile(title: str, p: dict, top: int = 12) -> None:
    print(
        f"{title}: {p['op_ms']:.2f} ms of op time per call ({p['where']}), {p['wall_ms']:.2f} "
        f"ms wall per call, {p['ops']} distinct ops"
    )
    total = max(p["op_ms"], 1e-12)
    print(
        "  by layer: "
        + ", ".join(f"{k} {v:.2f} ({100 * v / total:.0f}%)" for k, v in p["by_layer"][:top])
    )
    for op, v, scope in p["by_op"][:top]:
        print(f"  {v:8.3f} ms {100 * v / total:5.1f}%  {op[:40]:40} {scope[-90:]}")


def _row(b: Bench) -> str:
    minutes, eval_batch = b.protocol_min()
    return (
        f"{b.name:9} {b.impl:7} {b.dtype:8} {b.batch:>5} {b.compile_s:>9.1f} "
        f"{b.train_ips:>11.0f} "
        + " ".join(f"{k}:{v:.0f}" for k, v in sorted(b.eval_ips.items())).rjust(22)
        + f" {minutes:>9.1f} (eval {eval_batch})"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget_s", type=float, default=300.0)
    ap.add_argument("--steps", type=int, default=10, help="calls per timed window")
    ap.add_argument("--min_time_s", type=float, default=2.0, help="timed seconds per rate")
    ap.add_argument("--warmup_s", type=float, default=3.0, help="device warm-up first")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument(
        "--focus",
        default="R-gauss",
        help="variant (in --variants) whose float32 batch-64 steps are also run at larger "
        "evaluation batches, profiled, and compared with impl='dense'; '' = none",
    )
    ap.add_argument("--eval_batches", default="1024,4096", help="--focus's extra eval batches")
    ap.add_argument("--profile_calls", type=int, default=10)
    args = ap.parse_args()
    setup_host(quiet=False)
    print(f"jax {jax.__version__} backend={jax.default_backend()} devices={jax.devices()}")
    keep_busy(args.warmup_s)
    start = time.perf_counter()
    names = args.variants.split(",")
    names.sort(key=lambda n: n != args.focus)  # the focus first: the budget may cut the tail
    print(
        f"{'variant':9} {'impl':7} {'dtype':8} {'batch':>5} {'compile s':>9} {'train img/s':>11} "
        f"{'eval img/s (batch:rate)':>22} {'protocol min (eval batch)':>9}"
    )

    def spent() -> bool:
        return time.perf_counter() - start > args.budget_s

    def row(name: str, dtype: str, batch: int, eval_batch: int, impl: str | None = None):
        if spent():
            skipped = f"{name} {impl or ''} {dtype} {batch}"
            print(f"(budget of {args.budget_s:.0f} s spent: skipped {skipped})")
            return None
        try:
            b = Bench(name, dtype, batch, impl)
            b.train_rate(args.steps, args.min_time_s)
            b.eval_rate(eval_batch, args.steps, args.min_time_s)
        except Exception as e:  # keep going: report what failed
            print(
                f"{name:9} {impl or '':7} {dtype:8} {batch:>5} FAILED: {type(e).__name__}: {e}"[
                    :300
                ]
            )
            return None
        print(_row(b), flush=True)
        return b

    for dtype, batch, eval_batch in SETTINGS:
        for name in names:
            b = row(name, dtype, batch, eval_batch)
            if b is None or (name, dtype, batch) != (args.focus, "float32", 64):
                continue
            try:
                focus_extras(b, args)
            except Exception as e:
                print(f"{name} extras FAILED: {type(e).__name__}: {e}"[:300])
            row(name, dtype, batch, eval_batch, impl="dense")
    print(f"total {time.perf_counter() - start:.0f} s")


def focus_extras(b: Bench, args) -> None:
    """The focus variant: larger evaluation batches (the protocol is half evaluation), then
    where its training and evaluation steps' device time goes."""
    for eb in (int(v) for v in args.eval_batches.split(",") if v):
        b.eval_rate(eb, args.steps, args.min_time_s)
    print(_row(b) + "  <- larger evaluation batches", flush=True)
    print_profile(
        f"{b.name} {b.dtype} train step, batch {b.batch}", b.profile("train", args.profile_calls)
    )
    best = max(b.eval_ips, key=b.eval_ips.get)
    print_profile(
        f"{b.name} {b.dtype} evaluation, batch {best}", b.profile("eval", args.profile_calls, best)
    )


if __name__ == "__main__":
    main()
