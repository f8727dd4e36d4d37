"""Packaging: device code ships as probact_gpu.kernels (never a top-level `kernels`), the public
API is torch's, and importing the package does no work."""

import importlib.util
import subprocess
import sys

import probact_gpu


def test_kernels_are_a_subpackage_not_top_level():
    import probact_gpu.kernels.softmax as k

    assert k.__name__ == "probact_gpu.kernels.softmax"
    spec = importlib.util.find_spec("kernels")
    assert spec is None or "probact_gpu" not in (spec.origin or ""), spec


def test_import_is_lazy_and_does_not_import_triton():
    code = "import sys, probact_gpu; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_names_resolve():
    for name in probact_gpu.__all__:
        assert getattr(probact_gpu, name) is not None, name
