"""probact_gpu: Triton kernels for the probability layer (softmax, sigmoid, cross-entropy).

The public names below are imported on first use, so ``import probact_gpu`` does no work: the
command line can still choose Triton's interpreter (``TRITON_INTERPRET=1``) on a machine without
CUDA before any kernel is defined.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # functions
    "softmax": "functional",
    "log_softmax": "functional",
    "sigmoid": "functional",
    "logsigmoid": "functional",
    "binary_cross_entropy_with_logits": "functional",
    "cross_entropy": "functional",
    "linear_cross_entropy": "functional",
    # modules
    "Softmax": "nn",
    "LogSoftmax": "nn",
    "Sigmoid": "nn",
    "LogSigmoid": "nn",
    "BCEWithLogitsLoss": "nn",
    "CrossEntropyLoss": "nn",
    "LinearCrossEntropyLoss": "nn",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
