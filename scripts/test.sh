#!/usr/bin/env bash
# The test suite. On a machine without CUDA, the Triton kernels run on the CPU through the
# interpreter (tests/conftest.py sets TRITON_INTERPRET=1); `gpu` tests are reported as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
