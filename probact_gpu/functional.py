"""torch-style functions (torch's names, signatures and defaults), plus the LM-head functions
of the cross-entropy family (fused linear + CE, token log-probs)."""

from .ops.bce import binary_cross_entropy_with_logits
from .ops.cross_entropy import cross_entropy
from .ops.linear_cross_entropy import linear_cross_entropy
from .ops.linear_token_log_probs import linear_token_log_probs
from .ops.sigmoid import logsigmoid, sigmoid
from .ops.softmax import log_softmax, softmax
from .ops.token_log_probs import token_log_probs

__all__ = [
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "linear_cross_entropy",
    "linear_token_log_probs",
    "log_softmax",
    "logsigmoid",
    "sigmoid",
    "softmax",
    "token_log_probs",
]
