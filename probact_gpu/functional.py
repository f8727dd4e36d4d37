"""torch-style functions (torch's names, signatures and defaults)."""

from .ops.softmax import log_softmax, softmax

__all__ = [
    "log_softmax",
    "softmax",
]
