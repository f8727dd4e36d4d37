#!/usr/bin/env bash
# The GPU image runs triton 3.6; CI and the test suite run triton 3.9. This runs the kernel
# tests (through the interpreter) and the sm_90 compile check once more on triton 3.6, installed
# into a separate folder put first on PYTHONPATH (the same interpreter, torch and package), so an
# API or compiler difference between the two shows up here rather than on the GPU. triton 3.6's
# interpreter needs NumPy < 2.4. Run after scripts/install.sh (CI: after scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# The repository root is not put on sys.path (PYTHONSAFEPATH, Python >= 3.11): Python runs the
# installed package, and a folder here never shadows an installed module (kernels/: its
# __init__.py steps aside for Hugging Face's `kernels` on any Python).
export PYTHONSAFEPATH=1
PY=${PYTHON:-python3}
SITE=${TRITON36_SITE:-/tmp/probact-triton36}
if ! "$PY" -m pip install -q --upgrade --target "$SITE" "triton==3.6.0" "numpy<2.4"; then
    echo "test_triton36: SKIPPED, triton 3.6.0 could not be installed (no registry?)"
    exit 0
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import triton; assert triton.__version__.startswith('3.6'), triton.__version__"
XDIST=()
if "$PY" -c "import xdist" 2> /dev/null; then
    XDIST=(-n "${PROBACT_TEST_WORKERS:-auto}" --dist loadfile)
fi
exec "$PY" -m pytest -q -p no:cacheprovider -W "ignore::DeprecationWarning" "${XDIST[@]}" \
    -m "not slow" \
    tests/test_interpreter.py tests/test_softmax.py tests/test_sigmoid.py tests/test_bce.py \
    tests/test_cross_entropy.py tests/test_token_log_probs.py tests/test_distillation.py \
    tests/test_compile.py tests/test_sm90_compile.py "$@"
