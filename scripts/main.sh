#!/usr/bin/env bash
# The main job: `probact-gpu check` (every op against the NumPy float64 reference, with torch
# eager's error beside ours), then `probact-gpu bench`: the quick benchmark with its table,
# JSON and plot in bench-out/ on a CUDA machine; without CUDA, the harness's untimed smoke pass.
# Small shapes through Triton's interpreter without CUDA; GPU-sized shapes with it. Runs on the
# Python scripts/install.sh installed into ($PYTHON, or ./.venv), never whatever is on the PATH.
# Arguments go to `probact-gpu check`.
set -euo pipefail
cd "$(dirname "$0")/.."
# The repository root is not put on sys.path (PYTHONSAFEPATH, Python >= 3.11): Python runs the
# installed package, and a folder here never shadows an installed module (kernels/: its
# __init__.py steps aside for Hugging Face's `kernels` on any Python).
export PYTHONSAFEPATH=1
PY=$(bash scripts/install.sh)
status=0
"$PY" -m probact_gpu check "$@" || status=$?
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$PY" -m probact_gpu bench --quick --out bench-out || status=$?
else
    "$PY" -m probact_gpu bench || status=$?
fi
exit $status
