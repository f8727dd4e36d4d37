"""torch-style functions (torch's names, signatures and defaults)."""

from .ops.bce import binary_cross_entropy_with_logits
from .ops.cross_entropy import cross_entropy
from .ops.linear_cross_entropy import linear_cross_entropy
from .ops.sigmoid import logsigmoid, sigmoid
from .ops.softmax import log_softmax, softmax

__all__ = [
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "linear_cross_entropy",
    "logsigmoid",
    "sigmoid",
    "log_softmax",
    "softmax",
]
