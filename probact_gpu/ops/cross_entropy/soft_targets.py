"""Softmax cross-entropy with class-probability targets, composed from torch ops and probact's
log_softmax (the simple path: correctness first)."""

from __future__ import annotations

import torch

from ..._runtime import accum_dtype
from ...options import CrossEntropyOptions


def _soft_target_ce(input: torch.Tensor, target: torch.Tensor, opts: CrossEntropyOptions,
                    loss_dtype: torch.dtype | None = None):
    """Class-probability targets, composed from torch ops and probact's log_softmax (the simple
    path: correctness first). loss_row = −Σ_c w_c t'_c log p_c + z_loss · lse², with
    t' = (1 − ε) t + ε / C over the transformed logits (``HeadTransform.apply``); mean divides
    by the number of rows, as torch; sum by the normalizer when one is given. The loss in
    ``loss_dtype`` (default: the input's)."""
    from ..softmax import log_softmax

    math_dtype = accum_dtype(input)
    z = opts.transform.apply(input.to(math_dtype))
    dim = 1 if input.ndim >= 2 else 0
    n_classes = input.shape[dim]
    t = target.to(math_dtype)
    if opts.label_smoothing > 0.0:
        t = t * (1.0 - opts.label_smoothing) + opts.label_smoothing / n_classes
    if opts.weight is not None:
        shape = [1] * input.ndim
        shape[dim] = n_classes
        t = t * opts.weight.to(math_dtype).view(shape)
    logp = log_softmax(z, dim)
    lse = torch.logsumexp(z, dim)
    rows = -(t * logp).sum(dim)
    if opts.z_loss:
        rows = rows + opts.z_loss * lse * lse
    if opts.reduction == "none":
        loss = rows
    elif opts.reduction == "sum":
        loss = rows.sum()
        if opts.normalizer is not None:
            loss = loss / opts.normalizer
    else:
        loss = rows.sum() / (input.numel() // max(n_classes, 1))
    return loss.to(loss_dtype or input.dtype), lse.detach().to(math_dtype)
