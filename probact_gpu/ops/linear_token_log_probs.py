"""Token log-probs (and entropy, lse, argmax) from hidden states: ``token_log_probs(input @
linear_weight.T + linear_bias, target)`` without ever holding the (tokens × V) logits.

Tokens are processed in chunks of ``C`` rows (``chunk_size``, or as many as fit
``memory_budget`` bytes of logits: ``tiling.choose_token_chunk``). With ``h`` (N, H), ``W``
(V, H), per chunk ``c``:

Forward (1 GEMM)::

    logits = h_c @ W.T (+ b)          torch matmul in the input's dtype, into one reused (C, V)
                                      buffer (fp32 accumulation inside cuBLAS, one rounding)
    logp, H, lse, argmax, stats       our token log-probs kernel: one read of the buffer

Backward (3 GEMMs), with the upstream ``g_logp`` / ``g_H`` per token (either may be absent)::

    logits = h_c @ W.T (+ b)          recomputed into the same buffer
    dz                                our backward kernel, written over the buffer (in place):
                                      g_logp·(onehot − p) − g_H·p·(z − Σp·z), then the
                                      transform's chain rule
    dh[c]  = dz @ W                   written straight into dh
    dW    += dz.T @ h_c               ``ops._common.LinearGrads``: fp32 addition, the weight's
                                      dtype between chunks (its docstring has the rounding)
    db    += Σ_rows dz                fp32 accumulator

4 GEMMs in all (forward logits, recomputed logits, dh, dW): the upstream gradients are only
known in the backward, so the forward cannot form dz (linear + cross-entropy's reduced loss can).

Memory beyond inputs and outputs: the (C, V) chunk buffer in the input's dtype (forward, then
again in the backward), the saved per-token statistics (N, 3) fp32 when a gradient will be
needed (nothing under ``torch.no_grad``), and in the backward dh (N, H), dW (V, H) in the
weight's dtype plus one (V_b, H) fp32 block, db (V,) fp32. Saved for the backward: ``input``,
``linear_weight``, ``linear_bias``, the targets and the statistics — never logits.
"""

from __future__ import annotations

import torch

from .._runtime import accum_dtype, check_runnable, empty
from ..options import CrossEntropyOptions, HeadTransform
from ._common import (
    LinearGrads,
    check_chunking,
    check_head_inputs,
    chunk_logits,
    flatten_head_input,
    no_second_derivative,
    token_chunk,
    token_chunks,
)
from .token_log_probs import TokenLogProbs, token_log_probs_bwd, token_log_probs_fwd

__all__ = ["LinearTokenLogProbsFunction", "linear_token_log_probs"]


def linear_token_log_probs_fwd(h, weight, bias, target, *, ignore_index, transform,
                               compute_entropy, compute_argmax, save_stats, chunk):
    """(logp, entropy | None, lse, argmax | None, stats | None) of 2-D ``h`` (N, H) and flat
    ``target``, one token chunk of logits at a time (module docstring)."""
    n_tokens, n_classes = h.shape[0], weight.shape[0]
    sdt, device = accum_dtype(h), h.device
    logp = empty((n_tokens,), sdt, device)
    lse = empty((n_tokens,), sdt, device)
    entropy = empty((n_tokens,), sdt, device) if compute_entropy else None
    arg = torch.empty(n_tokens, dtype=torch.int64, device=device) if compute_argmax else None
    stats = empty((n_tokens, 3), sdt, device) if save_stats else None
    buffer = torch.empty((min(chunk, n_tokens), n_classes), dtype=h.dtype, device=device)
    for start, end in token_chunks(n_tokens, chunk):
        logits = chunk_logits(h[start:end], weight, bias, buffer[: end - start])
        outs = token_log_probs_fwd(logits, target[start:end], ignore_index=ignore_index,
                                   transform=transform, compute_entropy=compute_entropy,
                                   compute_argmax=compute_argmax, save_stats=save_stats)
        for full, part in zip((logp, entropy, lse, arg, stats), outs, strict=True):
            if full is not None:
                full[start:end] = part
    return logp, entropy, lse, arg, stats


def linear_token_log_probs_bwd(h, weight, bias, target, stats, grad_logp, grad_entropy, *,
                               ignore_index, transform, chunk, need):
    """(dh, dW, db) — empty tensors where not in ``need`` — from the saved ``stats``, each
    chunk's logits recomputed and overwritten with their gradient (module docstring)."""
    n_tokens, n_classes = h.shape[0], weight.shape[0]
    grads = LinearGrads(h, weight, bias, need)
    if any(need) and n_tokens > 0:
        buffer = torch.empty((min(chunk, n_tokens), n_classes), dtype=h.dtype, device=h.device)
        for start, end in token_chunks(n_tokens, chunk):
            logits = chunk_logits(h[start:end], weight, bias, buffer[: end - start])
            dz = token_log_probs_bwd(
                logits, target[start:end], stats[start:end],
                None if grad_logp is None else grad_logp[start:end],
                None if grad_entropy is None else grad_entropy[start:end],
                ignore_index=ignore_index, transform=transform, out=logits)
            grads.add_chunk(start, end, dz, h[start:end], weight)
    return grads.results(h, weight, bias)


class LinearTokenLogProbsFunction(torch.autograd.Function):
    """Autograd of :func:`linear_token_log_probs` on 2-D ``h`` (N, H) and flat targets; returns
    (logp, entropy | None, lse, argmax | None), lse and argmax not differentiable."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, ignore_index, transform, compute_entropy,
                compute_argmax, chunk, needs_grad):
        logp, entropy, lse, arg, stats = linear_token_log_probs_fwd(
            h, weight, bias, target, ignore_index=ignore_index, transform=transform,
            compute_entropy=compute_entropy, compute_argmax=compute_argmax,
            save_stats=needs_grad, chunk=chunk)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(t for t in (lse, arg) if t is not None))
        if needs_grad:
            ctx.save_for_backward(h, weight, bias, target, stats)
        ctx.ignore_index, ctx.transform, ctx.chunk = ignore_index, transform, chunk
        return logp, entropy, lse, arg

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_lse, grad_arg):
        no_second_derivative("linear_token_log_probs")
        none = (None,) * 7
        if grad_logp is None and grad_entropy is None:
            return (None, None, None) + none
        h, weight, bias, target, stats = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        dh, dw, db = linear_token_log_probs_bwd(
            h, weight, bias, target, stats,
            None if grad_logp is None else grad_logp.contiguous(),
            None if grad_entropy is None else grad_entropy.contiguous(),
            ignore_index=ctx.ignore_index, transform=ctx.transform, chunk=ctx.chunk, need=need)
        return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None,
                *none)


def linear_token_log_probs(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    logit_divisor: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_lse: bool = False,
    return_argmax: bool = False,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
):
    """``token_log_probs(input @ linear_weight.T + linear_bias, target, ...)`` without holding
    the (tokens × V) logits (module docstring: chunks, 4 GEMMs with a gradient, memory).

    - ``input``: (…, H) hidden states; ``linear_weight``: (V, H) (``nn.Linear`` layout), the
      same dtype; ``linear_bias``: (V,) or None; ``target``: (…) int32/int64 class indices.
    - ``ignore_index``, ``logit_scale``, ``logit_divisor``, ``softcap``, ``temperature``,
      ``return_*``: as :func:`probact_gpu.token_log_probs` (the bias is added before the
      transform). Returns logp (fp32; fp64 for fp64 input) shaped like ``target``, or a
      :class:`TokenLogProbs` when a ``return_*`` flag is set.
    - ``chunk_size`` (tokens per chunk) or ``memory_budget`` (bytes of (C, V) logits per
      chunk; default ``tiling.LINEAR_CE_LOGITS_BUDGET``).

    Gradients flow to ``input``, ``linear_weight`` and ``linear_bias`` through logp and entropy;
    under ``torch.no_grad`` nothing is saved. Double backward is not supported.
    """
    options = CrossEntropyOptions.from_kwargs(
        ignore_index=ignore_index, logit_scale=logit_scale, logit_divisor=logit_divisor,
        softcap=softcap, temperature=temperature)
    check_head_inputs(input, linear_weight, target, linear_bias, options,
                      allow_probabilities=False)
    chunk_size, memory_budget, _ = check_chunking(chunk_size, memory_budget)
    if linear_weight.shape[0] == 0:
        raise ValueError(f"linear_weight must have at least one class (row), got shape "
                         f"{tuple(linear_weight.shape)}")
    h, batch_shape = flatten_head_input(input, linear_weight.shape[1])
    flat_target = target.reshape(-1)
    if h.shape[0] > 0:
        check_runnable(h, "input")
    transform: HeadTransform = options.transform
    chunk = token_chunk(h.shape[0], linear_weight.shape[0], h.element_size(), chunk_size,
                        memory_budget)
    logp, entropy, lse, arg = LinearTokenLogProbsFunction.apply(
        h, linear_weight, linear_bias, flat_target.contiguous(), options.ignore_index,
        transform, bool(return_entropy), bool(return_argmax), chunk,
        torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, linear_weight, linear_bias)))

    def shaped(t):
        return None if t is None else t.reshape(batch_shape)

    if not (return_entropy or return_lse or return_argmax):
        return shaped(logp)
    return TokenLogProbs(shaped(logp), shaped(entropy) if return_entropy else None,
                         shaped(lse) if return_lse else None,
                         shaped(arg) if return_argmax else None)
