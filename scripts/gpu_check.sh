#!/usr/bin/env bash
# The GPU check: one command for a CUDA machine with no network, under 8 minutes in all.
#
#   OUT=/some/dir bash scripts/gpu_check.sh        # from the repository root
#
# Stages (each capped with `timeout`; a failing stage does not stop the later ones, but the
# script exits non-zero if any failed):
#   1. install the package (no network); wheels in .whl/ (Liger-Kernel) go to /tmp/site, which
#      is put on PYTHONPATH
#   2. nvidia-smi header
#   3. the whole test suite, `gpu` tests included
#   4. probact-gpu check --large
#   5. probact-gpu bench --quick --out $OUT/results
#   6. compute-sanitizer --tool memcheck over scripts/memcheck_smoke.py (when the tool exists)
#   7. a summary, printed last
# Files (few, at most two folders deep): $OUT/gpu_check.log (every stage's output, in order),
# $OUT/summary.txt, $OUT/results/<gpu>/<date>.{md,json,png}.
set -uo pipefail
cd "$(dirname "$0")/.."
# The repository root is not put on sys.path (PYTHONSAFEPATH, Python >= 3.11): Python runs the
# installed package, and a folder here never shadows an installed module (kernels/: its
# __init__.py steps aside for Hugging Face's `kernels` on any Python).
export PYTHONSAFEPATH=1
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
PY=${PYTHON:-python3}
: > "$LOG"
: > "$SUMMARY"

BUDGET=465          # seconds for all stages together (the check must end within 480)
T0=$(date +%s)
FAILED=0

stage() {  # stage NAME CAP_SECONDS CMD...: run CMD under timeout, log it, record the result
    local name=$1 cap=$2
    shift 2
    local left=$(( BUDGET - ($(date +%s) - T0) ))
    if (( left < 15 )); then
        printf '%-10s SKIPPED (time budget spent)\n' "$name" >> "$SUMMARY"
        FAILED=1
        return
    fi
    (( cap > left )) && cap=$left
    local start=$(date +%s) first_line=$(( $(wc -l < "$LOG") + 1 ))
    echo "===== [$name] cap ${cap}s: $*" >> "$LOG"
    echo "[gpu_check] $name (cap ${cap}s) ..."
    timeout --kill-after=10 "$cap" "$@" >> "$LOG" 2>&1
    local rc=$?
    local took=$(( $(date +%s) - start ))
    local verdict=PASS
    if (( rc == 124 || rc == 137 )); then verdict="FAIL (timed out)"; FAILED=1
    elif (( rc != 0 )); then verdict="FAIL (exit $rc)"; FAILED=1; fi
    echo "===== [$name] exit $rc after ${took}s" >> "$LOG"
    printf '%-10s %-18s %4ss\n' "$name" "$verdict" "$took" >> "$SUMMARY"
    if [[ $verdict != PASS ]]; then
        { echo "----- last lines of [$name]:"; tail -n "+$first_line" "$LOG" | tail -n 25; } \
            >> "$OUT/.tails"
    fi
}

do_install() {
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || return 1
    if compgen -G ".whl/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || return 1
    fi
    "$PY" -c "import probact_gpu, torch, triton; print('probact_gpu', probact_gpu.__version__, \
'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
}

if [[ -d .whl ]]; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

export PY
export -f do_install
stage install 45 bash -c do_install
stage nvidia-smi 10 nvidia-smi
TIMEOUT_ARGS=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then TIMEOUT_ARGS=(--timeout 120); fi
# Most of the suite's time on a GPU is Triton compiling a few hundred kernel specialisations,
# one at a time per process (about 0.5 s each for sm_90 on this code): spread the test files
# over 8 processes when pytest-xdist is there (the GPU image has it; they share Triton's cache).
XDIST_ARGS=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST_ARGS=(-n 8 --dist loadfile); fi
stage tests 170 "$PY" -m pytest -q -x "${TIMEOUT_ARGS[@]}" "${XDIST_ARGS[@]}" tests
stage check 50 "$PY" -m probact_gpu check --large
stage bench 140 "$PY" -m probact_gpu bench --quick --out "$OUT/results"
if command -v compute-sanitizer > /dev/null; then
    # Caching allocator off: an out-of-bounds access then falls outside every allocation.
    stage memcheck 50 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" scripts/memcheck_smoke.py
else
    printf '%-10s %-18s\n' memcheck "SKIPPED (no compute-sanitizer)" >> "$SUMMARY"
fi

{
    echo
    echo "total $(( $(date +%s) - T0 ))s; log: $LOG"
    find "$OUT/results" -type f 2>/dev/null | sort | sed 's/^/bench result: /'
} >> "$SUMMARY"

# Pass/fail lines of the test suite and check, and the bench table's probact rows.
{
    echo "===== highlights"
    grep -E "^[0-9]+ (passed|failed)|passed|failed" "$LOG" | grep -E "in [0-9.]+s|passed, " \
        | tail -n 4
    md=$(find "$OUT/results" -name '*.md' 2>/dev/null | sort | tail -n 1)
    if [[ -n $md ]]; then
        grep -E "copy rate|^### |\| probact" "$md" | cut -c1-160
    fi
} > "$OUT/.highlights" 2>/dev/null
cat "$OUT/.highlights" >> "$LOG"
[[ -f $OUT/.tails ]] && cat "$OUT/.tails"
cat "$OUT/.highlights"
rm -f "$OUT/.highlights" "$OUT/.tails"
echo
echo "===== gpu_check summary"
cat "$SUMMARY"
if (( FAILED )); then echo "gpu_check: FAILED"; exit 1; fi
echo "gpu_check: all stages passed"
