"""torch-style functions (torch's names, signatures and defaults)."""

from .ops.bce import binary_cross_entropy_with_logits
from .ops.sigmoid import logsigmoid, sigmoid
from .ops.softmax import log_softmax, softmax

__all__ = [
    "binary_cross_entropy_with_logits",
    "logsigmoid",
    "sigmoid",
    "log_softmax",
    "softmax",
]
