#!/usr/bin/env bash
# The test suite, on the Python scripts/install.sh installed into ($PYTHON, or ./.venv where the
# system Python is externally managed). Arguments go to pytest, e.g. `-k cross_entropy`.
# On a machine without CUDA the Triton kernels run on the CPU through the interpreter
# (tests/conftest.py sets TRITON_INTERPRET=1); `gpu` tests are reported as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
# The repository root is not put on sys.path (PYTHONSAFEPATH, Python >= 3.11): Python runs the
# installed package, and a folder here never shadows an installed module (kernels/: its
# __init__.py steps aside for Hugging Face's `kernels` on any Python).
export PYTHONSAFEPATH=1
PY=$(bash scripts/install.sh)
# The test files spread over the cores (pytest-xdist, from the test extra; a file's tests stay
# in one process, which runs its multi-rank spawns once): PROBACT_TEST_WORKERS=0 runs one.
XDIST=()
if "$PY" -c "import xdist" 2> /dev/null; then
    XDIST=(-n "${PROBACT_TEST_WORKERS:-auto}" --dist loadfile)
fi
exec "$PY" -m pytest -q "${XDIST[@]}" "$@"
