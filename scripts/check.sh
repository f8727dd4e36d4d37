#!/usr/bin/env bash
# The main job: every op against the NumPy float64 reference (small shapes through the
# interpreter without CUDA, large shapes on a GPU). Extra arguments go to `probact-gpu check`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec probact-gpu check "$@"
