#!/usr/bin/env bash
# Installs probact_gpu and what its commands need, on a fresh machine or one that already has
# torch (the GPU image: no network, torch and triton preinstalled). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
    # Pin first: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
    "$PY" -m pip install -q "torch==2.13.0"
fi
if "$PY" -c "import triton, numpy, pytest" 2>/dev/null; then
    # Everything is there (the GPU image has no network): install our package only.
    "$PY" -m pip install -q --no-deps --no-build-isolation -e .
else
    "$PY" -m pip install -q -e ".[test,bench]"
fi
