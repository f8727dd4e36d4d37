#!/usr/bin/env bash
# The main job: `probact-gpu check` (every op against the NumPy float64 reference, with torch
# eager's error beside ours), then `probact-gpu bench`: the quick benchmark with its table,
# JSON and plot in bench-out/ on a CUDA machine; without CUDA, the harness's untimed smoke pass.
# Small shapes through Triton's interpreter without CUDA; GPU-sized shapes with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
status=0
probact-gpu check "$@" || status=$?
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    probact-gpu bench --quick --out bench-out || status=$?
else
    probact-gpu bench || status=$?
fi
exit $status
