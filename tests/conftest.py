"""Test set-up. Decides where kernels run *before* anything imports triton: on a machine without
CUDA, TRITON_INTERPRET=1 makes Triton run the real kernels on CPU tensors; with CUDA, tests run
on the GPU. ``PROBACT_TEST_DEVICE=cpu`` forces the interpreter even where CUDA exists."""

import os
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
    """On CPU every test must run the interpreter, never a fallback; and in every test each
    launcher's outputs start as NaN, so an element a kernel does not write fails the comparison."""
    from probact_gpu._runtime import interpreting, poison_outputs

    if DEVICE == "cpu":
        assert interpreting(), "TRITON_INTERPRET was not honoured: kernels are not interpreted"
    with poison_outputs():
        yield
