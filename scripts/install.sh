#!/usr/bin/env bash
# Installs probact_gpu (editable) and what its tests and commands need, then prints the path of
# the Python it installed into as the last line on stdout (progress goes to stderr):
#
#   PY=$(bash scripts/install.sh)       # scripts/test.sh and scripts/main.sh do exactly this
#
# Which Python: $PYTHON when set, else ./.venv/bin/python when an earlier run made it, else
# python3. An externally managed Python (PEP 668: an EXTERNALLY-MANAGED file in its stdlib
# folder, or pip refusing with `externally-managed-environment`), e.g. Debian's or Ubuntu's
# /usr/bin/python3, is never installed into: a virtual environment is made in ./.venv
# (--system-site-packages, so a torch and triton already installed there are reused) and used.
#
# What: torch==2.13.0 first when torch is missing; then, when a package registry is reachable,
# the package with the extras the tests use, `.[test,bench,transformers]` (transformers only
# when pyproject.toml declares that extra). Where everything is already installed, or where no
# registry answers but torch, triton, numpy and pytest are there (the GPU image: no network),
# the package alone (--no-deps --no-build-isolation). Idempotent.
set -euo pipefail
exec 3>&1 1>&2                          # stdout is the answer; everything else on stderr
cd "$(dirname "$0")/.."

note() { echo "install.sh: $*"; }

# Short network timeouts: without a registry, fail in seconds rather than minutes.
PIP_NET=(--retries 1 --timeout 20)

externally_managed() {  # the interpreter refuses pip installs (PEP 668) and is not a venv
    "$1" - <<'EOF'
import os, sys, sysconfig
in_venv = sys.prefix != getattr(sys, "base_prefix", sys.prefix)
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if not in_venv and os.path.isfile(marker) else 1)
EOF
}

make_venv() {  # make_venv BASE_PYTHON: ./.venv from BASE_PYTHON, and use it
    if [[ ! -x .venv/bin/python ]]; then
        note "$1 is externally managed (PEP 668): creating a virtual environment in .venv"
        if ! "$1" -m venv --system-site-packages .venv; then
            note "could not create .venv with '$1 -m venv' (Debian/Ubuntu: apt-get install" \
                 "python3-venv), or set PYTHON to a Python you may install into"
            exit 1
        fi
    fi
    PY=$PWD/.venv/bin/python
}

if [[ -n ${PYTHON:-} ]]; then
    PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    PY=$PWD/.venv/bin/python
else
    PY=python3
fi
if ! command -v "$PY" > /dev/null; then
    note "no Python found at '$PY' (set PYTHON to one, 3.10 or newer)"
    exit 1
fi
if externally_managed "$PY"; then
    make_venv "$PY"
fi

pip_install() {  # pip_install ARGS...: pip, falling back to .venv once if pip refuses (PEP 668)
    local log
    log=$(mktemp)
    if "$PY" -m pip install -q "$@" 2> "$log"; then
        cat "$log"
        rm -f "$log"
        return 0
    fi
    cat "$log"
    if grep -q "externally-managed-environment" "$log" && [[ $PY != "$PWD/.venv/bin/python" ]]
    then
        rm -f "$log"
        make_venv "$PY"
        "$PY" -m pip install -q "$@"
        return
    fi
    rm -f "$log"
    return 1
}

have() {  # have MODULE...: every module imports
    local m
    for m in "$@"; do
        "$PY" -c "import $m" 2> /dev/null || return 1
    done
}

extras=test,bench
modules=(pytest xdist matplotlib tqdm) # what the extras install, by import name
if grep -Eq '^[[:space:]]*transformers[[:space:]]*=' pyproject.toml; then
    extras+=,transformers
    modules+=(transformers accelerate)
fi

if ! have torch; then
    # Pinned: the version the suite runs on. (A CPU-only machine may point pip at CPU wheels
    # first, e.g. PIP_FIND_LINKS or PIP_EXTRA_INDEX_URL; the default wheel is the CUDA build.)
    note "installing torch==2.13.0 into $PY"
    pip_install "${PIP_NET[@]}" "torch==2.13.0"
fi

install_package_only() {
    # --no-build-isolation builds with the interpreter's own setuptools: make sure it is there
    # and new enough for an editable install (>= 64, and >= 70.1 unless `wheel` is installed).
    if ! "$PY" - <<'EOF' 2> /dev/null
import sys
import setuptools
v = tuple(int(p) for p in setuptools.__version__.split(".")[:2])
if v < (70, 1):
    import wheel  # noqa: F401  (setuptools < 70.1 needs it for editable wheels)
sys.exit(0 if v >= (64, 0) else 1)
EOF
    then
        note "installing setuptools>=70.1 (needed to build without isolation)"
        pip_install "${PIP_NET[@]}" "setuptools>=70.1"
    fi
    pip_install --no-deps --no-build-isolation -e .
}

if have triton numpy "${modules[@]}"; then
    install_package_only                      # everything is there: no registry needed
elif pip_install "${PIP_NET[@]}" -e ".[$extras]"; then
    :
elif have triton numpy pytest; then
    note "no registry reachable: installing the package alone; missing extras of" \
         ".[$extras] mean some tests skip"
    install_package_only
else
    note "could not install .[$extras] and torch/triton/numpy/pytest are not all present"
    exit 1
fi

PY=$("$PY" -c "import sys; print(sys.executable)")
if [[ $PY == "$PWD/.venv/bin/python" ]]; then
    note "installed into .venv: run 'source .venv/bin/activate' for probact-gpu on the PATH"
fi
echo "$PY" >&3
