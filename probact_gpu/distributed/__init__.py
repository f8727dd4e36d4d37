"""Vocab-parallel (tensor-parallel) forms of the LM-head ops: the loss, log-probs, entropy, lse
and argmax of logits split along the vocabulary over the ranks of a ``torch.distributed`` process
group, without gathering the logits; and the fused linear forms from each rank's rows of the
head's weight. One module a family, over one home for the shard layout:

- ``cross_entropy.py``: :func:`vocab_parallel_cross_entropy`,
  :func:`vocab_parallel_linear_cross_entropy` (the maths and communication in its docstring);
- ``token_log_probs.py``: :func:`vocab_parallel_token_log_probs`,
  :func:`vocab_parallel_linear_token_log_probs`;
- ``distillation.py``: :func:`vocab_parallel_distillation_loss`,
  :func:`vocab_parallel_linear_distillation_loss`;
- ``_layout.py``: the group, the shard's place in the vocabulary, DTensor unwrapping.
"""

from .cross_entropy import (
    VocabParallelCrossEntropyFunction,
    VocabParallelLinearCrossEntropyFunction,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)
from .distillation import (
    VocabParallelDistillationFunction,
    VocabParallelLinearDistillationFunction,
    vocab_parallel_distillation_loss,
    vocab_parallel_linear_distillation_loss,
)
from .token_log_probs import (
    VocabParallelLinearTokenLogProbsFunction,
    VocabParallelTokenLogProbsFunction,
    vocab_parallel_linear_token_log_probs,
    vocab_parallel_token_log_probs,
)

__all__ = [
    "VocabParallelCrossEntropyFunction",
    "VocabParallelDistillationFunction",
    "VocabParallelLinearDistillationFunction",
    "VocabParallelLinearCrossEntropyFunction",
    "VocabParallelLinearTokenLogProbsFunction",
    "VocabParallelTokenLogProbsFunction",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_distillation_loss",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_linear_distillation_loss",
    "vocab_parallel_linear_token_log_probs",
    "vocab_parallel_token_log_probs",
]
