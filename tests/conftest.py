"""Test set-up. Decides where kernels run *before* anything imports triton: on a machine without
CUDA, TRITON_INTERPRET=1 makes Triton run the real kernels on CPU tensors; with CUDA, tests run
on the GPU. ``PROBACT_TEST_DEVICE=cpu`` forces the interpreter even where CUDA exists."""

import os
import subprocess
import sys
import zlib

import torch

_FORCED = os.environ.get("PROBACT_TEST_DEVICE")
DEVICE = _FORCED or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_report_header(config):
    interpret = os.environ.get("TRITON_INTERPRET", "0")
    return f"probact_gpu tests on {DEVICE} (TRITON_INTERPRET={interpret})"


def pytest_collection_modifyitems(config, items):
    if DEVICE == "cuda":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (runs in scripts/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return torch.device(DEVICE)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _interpreted_and_poisoned():
    """On CPU every test must run the interpreter, never a fallback, with its float conversions
    rounding as the GPU's (installed here too, so a test that launches a kernel directly, before
    any launcher ran, sees the same conversions); and in every test each launcher's outputs start
    as NaN, so an element a kernel does not write fails the comparison."""
    from probact_gpu import _interpreter
    from probact_gpu._runtime import interpreting, poison_outputs

    if DEVICE == "cpu":
        assert interpreting(), "TRITON_INTERPRET was not honoured: kernels are not interpreted"
        _interpreter.install()
    with poison_outputs():
        yield


_PROBE = """
import torch
from probact_gpu.ops.softmax import softmax_fwd
from probact_gpu.tiling import RowConfig
softmax_fwd(torch.randn(2, 40), config=RowConfig("multi", 16, 1))
"""


@pytest.fixture(scope="session")
def interpreter_subprocess():
    """For tests whose child processes run kernels through the interpreter (gloo ranks, the
    sweep's smoke). On a CUDA machine this triton's interpreter may not run our kernels — triton
    3.6's cannot run a loop with a runtime bound under NumPy >= 2.4 — and the main process does
    not need it there: skip with that reason. Without CUDA the suite itself runs on the
    interpreter, so a failure must fail the tests, never skip them."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                           text=True, timeout=120)
    if probe.returncode != 0 and DEVICE == "cuda":
        import numpy
        import triton

        last = (probe.stderr.strip().splitlines() or ["?"])[-1][:200]
        pytest.skip(f"triton {triton.__version__}'s interpreter cannot run the kernels here "
                    f"(NumPy {numpy.__version__}): {last}; these tests run in CI on the CPU")


def _load_gloo():
    """tests/_gloo.py, loaded by path (the importlib import mode puts no test dir on sys.path)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_gloo", Path(__file__).with_name("_gloo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def gloo_spawn(interpreter_subprocess):
    """``spawn(test_file, world, out_dir, timeout_s) -> [rank results]``: the distributed tests'
    multi-rank runs (tests/_gloo.py)."""
    return _load_gloo().spawn


@pytest.fixture
def world_of_one(tmp_path, device):
    """An initialized process group of this process alone (gloo on CPU, NCCL on CUDA)."""
    with _load_gloo().world_of_one(tmp_path / "store", device):
        yield
