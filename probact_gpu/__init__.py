"""probact_gpu: Triton kernels for the probability layer (softmax, sigmoid, cross-entropy,
fused linear + cross-entropy, token log-probs, distillation).

The public names below are imported on first use, so ``import probact_gpu`` does no work (no
torch, no triton): the command line can still choose Triton's interpreter
(``TRITON_INTERPRET=1``) on a machine without CUDA before any kernel is defined, and a module
that cannot be imported fails only when one of its names is used. Type checkers and IDEs see the
real signatures through the ``TYPE_CHECKING`` imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The one home of the version: pyproject.toml reads it (setuptools `dynamic`, statically, without
# importing the package) and `probact-gpu --version` prints it.
__version__ = "0.1.0"

# public name -> the module (relative to this package) that defines it
_EXPORTS: dict[str, str] = {
    # functions
    "softmax": "functional",
    "log_softmax": "functional",
    "sigmoid": "functional",
    "logsigmoid": "functional",
    "binary_cross_entropy_with_logits": "functional",
    "cross_entropy": "functional",
    "linear_cross_entropy": "functional",
    "token_log_probs": "ops.token_log_probs",
    "linear_token_log_probs": "ops.linear_token_log_probs",
    "distillation_loss": "ops.distillation",
    "linear_distillation_loss": "ops.linear_distillation",
    # result and option types
    "TokenLogProbs": "ops.token_log_probs",
    "TopKTeacher": "ops.distillation",
    "CrossEntropyOutput": "ops._common",
    "CrossEntropyOptions": "options",
    "DistillationOptions": "options",
    "HeadTransform": "options",
    # modules
    "Softmax": "nn",
    "LogSoftmax": "nn",
    "Sigmoid": "nn",
    "LogSigmoid": "nn",
    "BCEWithLogitsLoss": "nn",
    "CrossEntropyLoss": "nn",
    "LinearCrossEntropyLoss": "nn",
    "DistillationLoss": "nn",
    "LinearDistillationLoss": "nn",
}

__all__ = [
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "CrossEntropyOptions",
    "CrossEntropyOutput",
    "DistillationLoss",
    "DistillationOptions",
    "HeadTransform",
    "LinearCrossEntropyLoss",
    "LinearDistillationLoss",
    "LogSigmoid",
    "LogSoftmax",
    "Sigmoid",
    "Softmax",
    "TokenLogProbs",
    "TopKTeacher",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "distillation_loss",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_token_log_probs",
    "log_softmax",
    "logsigmoid",
    "sigmoid",
    "softmax",
    "token_log_probs",
]

if TYPE_CHECKING:
    from .functional import (
        binary_cross_entropy_with_logits,
        cross_entropy,
        linear_cross_entropy,
        log_softmax,
        logsigmoid,
        sigmoid,
        softmax,
    )
    from .nn import (
        BCEWithLogitsLoss,
        CrossEntropyLoss,
        DistillationLoss,
        LinearCrossEntropyLoss,
        LinearDistillationLoss,
        LogSigmoid,
        LogSoftmax,
        Sigmoid,
        Softmax,
    )
    from .ops._common import CrossEntropyOutput
    from .ops.distillation import TopKTeacher, distillation_loss
    from .ops.linear_distillation import linear_distillation_loss
    from .ops.linear_token_log_probs import linear_token_log_probs
    from .ops.token_log_probs import TokenLogProbs, token_log_probs
    from .options import CrossEntropyOptions, DistillationOptions, HeadTransform


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
