#!/usr/bin/env bash
# The README's GPU rows in one command (benchmarks/gpu_suite.py says what it measures):
#   benchmarks/gpu_suite.sh [--out=suite.json]   # one H100/H200, about 8 minutes
#   benchmarks/gpu_suite.sh --smoke              # the same code paths, tiny models, CPU
# Environment: PYTHON (python3), XLA_PYTHON_CLIENT_MEM_FRACTION (0.95: the suite looks for the
# largest batch that fits), JAX_COMPILATION_CACHE_DIR (/tmp/gpu_suite_cache: a rerun on the
# same machine loads its compiled steps instead of compiling again).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# The checkout's package, installed or not (a device image without internet cannot pip install).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/gpu_suite_cache}"
for arg in "$@"; do
  if [[ "$arg" == "--smoke" ]]; then
    export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
  fi
done
exec "${PYTHON:-python3}" benchmarks/gpu_suite.py "$@"
