#!/usr/bin/env bash
# The Hugging Face adapter's tests once more on the oldest transformers the `transformers` extra
# allows (its lower bound in pyproject.toml: 5.0.0), so that neither end of the range can break
# main unseen: the suite itself runs on the newest release the extra allows. A virtual
# environment of its own, resolved as a fresh install with that pin resolves (a venv over the
# installed packages would keep what the newest transformers pulled in, such as Hugging Face's
# `kernels`, which 5.0 then imports and fails on): torch==2.13.0 as scripts/install.sh installs
# it, then the package, editable, with `.[test,transformers]` and transformers pinned. PYTHON
# (default python3) is the base interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONSAFEPATH=1
PY=${PYTHON:-python3}
VENV=${TRANSFORMERS_OLDEST_VENV:-/tmp/probact-transformers-oldest}
oldest=$(sed -nE 's/.*"transformers>=([0-9][0-9.]*),.*/\1/p' pyproject.toml)
if [[ -z $oldest ]]; then
    echo "test_transformers_oldest: no 'transformers>=X,' bound in pyproject.toml" >&2
    exit 1
fi
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
NET=(--retries 1 --timeout 20)
if ! { "$VENV/bin/python" -c "import torch" 2> /dev/null \
       || "$VENV/bin/python" -m pip install -q "${NET[@]}" "torch==2.13.0"; } \
   || ! "$VENV/bin/python" -m pip install -q "${NET[@]}" -e ".[test,transformers]" \
        "transformers==$oldest"; then
    echo "test_transformers_oldest: SKIPPED, transformers==$oldest could not be installed (no registry?)"
    exit 0
fi
"$VENV/bin/python" - "$oldest" <<'PYEOF'
import sys
from packaging.version import Version

import probact_gpu
import transformers

assert Version(transformers.__version__) == Version(sys.argv[1]), transformers.__version__
print("test_transformers_oldest: transformers", transformers.__version__,
      "probact_gpu", probact_gpu.__version__)
PYEOF
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_integrations_transformers.py \
    tests/test_perf_scripts.py "$@"
