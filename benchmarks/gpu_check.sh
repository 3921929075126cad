#!/usr/bin/env bash
# GPU check: one script for a GPU machine with jax[cuda] installed.
#  1. the exact equivariance tests of layers and models, on the GPU, with full-precision
#     matmuls (TF32 would exceed the 1e-4 tolerances);
#  2. train/eval throughput of the four paper variants, float32 and bfloat16, batch 64 and
#     256 (eval 256 and 1024), and the projected wall time of the paper's protocol; for
#     R-gauss float32 also larger evaluation batches, where the steps' GPU time goes (per
#     layer and per XLA op) and the dense formulation (gpu_bench.py --focus).
# It keeps going when a part fails and prints a summary. Usage: bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import jax; print('jax', jax.__version__, 'backend:', jax.default_backend(), jax.devices())"
if [ "$("$PY" -c 'import jax; print(jax.default_backend())')" != "gpu" ]; then
  echo "gpu_check: no GPU backend found (install jax[cuda]); running on $("$PY" -c 'import jax; print(jax.default_backend())') anyway."
fi
t0=$(date +%s)
JAX_DEFAULT_MATMUL_PRECISION=highest timeout ${TEST_TIMEOUT:-200} "$PY" -m pytest -q -p no:cacheprovider \
  tests/layers/layers_test.py tests/models_test.py 2>&1 | tail -n 15
tests_rc=${PIPESTATUS[0]}
t1=$(date +%s)
timeout ${BENCH_TIMEOUT:-330} "$PY" benchmarks/gpu_bench.py --budget_s=${BENCH_BUDGET:-240}
bench_rc=$?
t2=$(date +%s)
echo "summary: equivariance tests rc=$tests_rc ($((t1 - t0)) s); benchmark rc=$bench_rc ($((t2 - t1)) s)"
