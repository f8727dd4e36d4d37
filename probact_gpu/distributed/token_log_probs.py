"""Vocab-parallel token log-probs: the LM head's per-token log-prob, entropy, lse and argmax
when its logits (or its weight) are split along the vocabulary over the ranks of a
``torch.distributed`` process group, without gathering the logits. Exported by
``probact_gpu.distributed``.

Rank ``r`` holds the columns of global classes ``[s_r, s_r + V_r)`` of the same N rows, and
every rank holds the same targets (global class ids). Per row the outputs need only, with ``z``
the transformed logits (``kernels/_head.py``) and everything kept around a max::

    m_r = max z over rank r's columns          M = max_r m_r
    s_r = Σ exp(z − m_r)                        S = Σ_r exp(m_r − M) · s_r
    τ_r = Σ exp(z − m_r) · (z − m_r)            T = Σ_r exp(m_r − M) · (τ_r + (m_r − M) · s_r)
    z_t (on the rank holding t, else 0)         Z = Σ_r z_t,r
    argmax: the smallest global index among the ranks whose m_r = M

    lse = M + log S,  logp = (Z − M) − log S,  H = log S − T / S

Forward, on every rank:

1. our partial-statistics kernel on the local shard (``token_log_probs_partial`` with
   ``vocab_start = s_r``), its chunks merged into per-row ``(m_r, s_r, τ_r, z_t,r)``;
2. ``all_reduce(MAX)`` of the N local maxima, then ``(s, τ, z_t)`` rescaled to the global max
   as (N, 3) and one ``all_reduce(SUM)`` — and, only with ``return_argmax``, one
   ``all_reduce(MIN)`` of N int64 candidate indices;
3. logp, H, lse and the backward's statistics ``(M, log S, T / S)`` from the global sums, the
   same on every rank.

Communication: 4·N floats (fp32; fp64 for fp64 logits) in two all_reduces, plus N int64 for the
argmax — O(N), never the logits (N·V). The shard layout costs one more, tiny, all_gather unless
both ``vocab_start_index`` and ``vocab_size`` are given (as ``vocab_parallel_cross_entropy``).

Backward is local: ``dx_r = g_logp·(onehot − p) − g_H·p·(z − Σp·z)`` over rank r's columns from
the global statistics (``token_log_probs_bwd`` with ``vocab_start = s_r``): the entropy's
gradient needs the *global* Σp·z, which the forward computed. No communication, except the
fused linear form's one ``all_reduce(SUM)`` of the (N, H) input gradient.

**DTensor logits.** :func:`vocab_parallel_token_log_probs` also takes a
``torch.distributed.tensor.DTensor`` on a 1-D device mesh sharded on its class dim
(``Shard(-1)``, torch.chunk's layout): it is unwrapped to the local shard (``to_local``, through
which the gradient flows back as a DTensor of the same placement), the group is the mesh's,
and ``vocab_start`` / ``vocab_size`` come from the mesh and the global shape (no layout
collective). The target may be a replicated DTensor or a plain tensor. The outputs are plain
tensors (per-token values, identical on every rank).
"""

from __future__ import annotations

import torch

from .._runtime import (
    accum_dtype,
    autocast_linear,
    check_float,
    check_runnable,
    check_same_device,
)
from ..ops._autograd import forward_ad_possible, refuse_functorch
from ..ops._common import (
    check_chunking,
    check_head_inputs,
    flatten_head_input,
    logits_chunks,
    no_second_derivative,
    token_chunk,
)
from ..ops.linear_token_log_probs import (
    linear_token_log_probs,
    linear_token_log_probs_bwd,
    linear_token_log_probs_jvp,
)
from ..ops.token_log_probs import (
    NO_INDEX,
    check_target,
    decode_argmax,
    finish_rows,
    merge_partials,
    pack_outputs,
    token_log_probs,
    token_log_probs_bwd,
    token_log_probs_partial,
)
from ..options import (
    CrossEntropyOptions,
    HeadTransform,
    as_index,
    fold_head_factor,
    scale_by_factor,
    split_tensor_factors,
)
from ..tiling import RowConfig
from ._layout import (
    _check_layout_args,
    _group_layout,
    _is_dtensor,
    _unwrap_dtensor,
    _unwrap_head_dtensor,
    scale_shard,
)

# Why these ops refuse torch.func (forward-mode AD through torch.autograd's forward_ad works:
# their jvp all_reduces the shards' tangents).
_COLLECTIVES = ("its forward and backward run collectives on this rank's tensors, which "
                "torch.func's wrapped tensors cannot take part in; use torch.autograd (backward "
                "or forward_ad)")

__all__ = [
    "VocabParallelLinearTokenLogProbsFunction",
    "VocabParallelTokenLogProbsFunction",
    "vocab_parallel_linear_token_log_probs",
    "vocab_parallel_token_log_probs",
]


# --------------------------------------------------------------------------- statistics


def _empty_shard_stats(n_rows: int, dtype: torch.dtype, device: torch.device,
                       compute_argmax: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a shard of no classes contributes: (−inf, 0, 0, 0) a row, no argmax candidate."""
    local = torch.zeros((n_rows, 4), dtype=dtype, device=device)
    local[:, 0] = float("-inf")
    arg = (torch.full((n_rows,), NO_INDEX, dtype=torch.int64, device=device)
           if compute_argmax else None)
    return local, arg


def _local_stats(logits, target, vocab_start, transform, compute_entropy, compute_argmax,
                 config):
    """This shard's per-row (N, 4) ``(m_r, s_r, τ_r, z_t,r)`` and (N,) argmax candidates."""
    if logits.shape[1] == 0:
        return _empty_shard_stats(logits.shape[0], accum_dtype(logits), logits.device,
                                  compute_argmax)
    partials, arg = token_log_probs_partial(
        logits, target, vocab_start=vocab_start, transform=transform,
        compute_entropy=compute_entropy, compute_argmax=compute_argmax, config=config)
    return merge_partials(partials, arg, decode=False)


def _global_stats(local: torch.Tensor, arg: torch.Tensor | None, group
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, 4) ``(M, S, T, Z)`` over every rank's classes (and the global argmax) from this
    rank's (N, 4) ``local`` statistics: ``all_reduce(MAX)`` of N floats, one
    ``all_reduce(SUM)`` of 3·N, and with ``arg`` one ``all_reduce(MIN)`` of N int64."""
    import torch.distributed as dist

    part_max = local[:, 0]
    row_max = part_max.clone()
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(torch.isinf(row_max), 0.0, row_max)  # the kernels' lse_shift
    alpha = torch.exp(part_max - shift)
    d = torch.where(part_max == float("-inf"), 0.0, part_max - shift)
    part_sum = local[:, 1]
    sums = torch.stack([alpha * part_sum, alpha * (local[:, 2] + d * part_sum), local[:, 3]],
                       dim=1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    best = None
    if arg is not None:
        # a NaN's column is encoded negative (decode_argmax): the MIN takes the first NaN
        best = torch.where((part_max == row_max) | (arg < 0), arg, NO_INDEX)
        dist.all_reduce(best, op=dist.ReduceOp.MIN, group=group)
        best = decode_argmax(best)
    return torch.cat([row_max[:, None], sums], dim=1), best


def _finish_forward(ctx, local, arg, target, group, saved, needs_grad, *, compute_entropy,
                    **opts):
    """The end of both Functions' forwards: the global statistics from this shard's
    (``_global_stats``), the outputs from them (``finish_rows``), and the context for the
    backward — ``saved`` tensors then the target and the statistics when a gradient will be
    needed, ``opts`` (vocab_start, n_classes, ignore_index, transform, config) for
    ``token_log_probs_bwd``. Returns (logp, entropy | None, lse, argmax | None)."""
    merged, arg = _global_stats(local, arg, group)
    logp, entropy, lse, stats = finish_rows(merged, target.to(torch.int64), opts["n_classes"],
                                            opts["ignore_index"], compute_entropy)
    ctx.set_materialize_grads(False)  # no zero gradient for an unused output
    ctx.mark_non_differentiable(*(t for t in (lse, arg) if t is not None))
    if needs_grad:
        ctx.save_for_backward(*saved, target, stats)
    if forward_ad_possible():
        ctx.save_for_forward(*saved, target, stats)
    ctx.opts = opts
    ctx.group, ctx.entropy = group, compute_entropy
    return logp, entropy, lse, arg


def _all_reduced(group, *tangents):
    """The shards' tangents summed over the ranks, one all_reduce each."""
    import torch.distributed as dist

    for t in tangents:
        if t is not None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return tangents


def _contiguous(*grads):
    return tuple(None if g is None else g.contiguous() for g in grads)


# --------------------------------------------------------------------------- logits


class VocabParallelTokenLogProbsFunction(torch.autograd.Function):
    """Autograd of the vocab-parallel op for any group size (one included): ``x`` this rank's
    (N, V_local) logits, ``target`` (N,) global ids. Returns (logp, entropy | None, lse,
    argmax | None); lse and argmax not differentiable."""

    @staticmethod
    def forward(ctx, x, target, group, vocab_start, vocab_size, ignore_index, transform,
                compute_entropy, compute_argmax, config, needs_grad):
        target = target.contiguous()
        local, arg = _local_stats(x, target, vocab_start, transform, compute_entropy,
                                  compute_argmax, config)
        return _finish_forward(ctx, local, arg, target, group, (x,), needs_grad,
                               vocab_start=vocab_start, n_classes=vocab_size,
                               ignore_index=ignore_index, transform=transform, config=config,
                               compute_entropy=compute_entropy)

    @staticmethod
    def jvp(ctx, x_dot, *_):
        """Forward-mode rule: this shard's ``Σ_c (∂out/∂x_c) · ẋ_c`` for logp and the entropy
        (the backward kernel for an upstream 1, in the math dtype), all_reduced over the
        ranks."""
        x, target, stats = ctx.saved_tensors
        math = stats.dtype
        ones = torch.ones(target.shape, dtype=math, device=x.device)
        tangents = []
        for wanted, grads in ((True, (ones, None)), (ctx.entropy, (None, ones))):
            if not wanted:
                tangents.append(None)
                continue
            slope = token_log_probs_bwd(x, target, stats, *grads, **ctx.opts,
                                        out=torch.empty(x.shape, dtype=math, device=x.device))
            tangents.append((slope * x_dot.to(math)).sum(1))
        return (*_all_reduced(ctx.group, *tangents), None, None)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_lse, grad_arg):
        no_second_derivative("vocab_parallel_token_log_probs")
        none = (None,) * 10
        if grad_logp is None and grad_entropy is None:
            return (None,) + none
        x, target, stats = ctx.saved_tensors
        dx = token_log_probs_bwd(x, target, stats, *_contiguous(grad_logp, grad_entropy),
                                 **ctx.opts)
        return (dx,) + none


def vocab_parallel_token_log_probs(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    vocab_start_index: int | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    logit_scale: float | torch.Tensor = 1.0,
    logit_divisor: float | torch.Tensor = 1.0,
    softcap: float | None = None,
    temperature: float | torch.Tensor = 1.0,
    return_entropy: bool = False,
    return_lse: bool = False,
    return_argmax: bool = False,
    config: RowConfig | None = None,
    batch_invariant: bool = False,
):
    """:func:`probact_gpu.token_log_probs` of logits split along the vocabulary over the ranks
    of ``group`` (default: the world). Every rank calls it with its shard and gets the same
    per-token outputs: those of ``token_log_probs`` on the logits concatenated in vocabulary
    order, with the same options and return conventions.

    - ``input``: this rank's (N, V_local) logits, any strides and float dtype (the same on every
      rank); shards may be uneven or empty. Or a DTensor sharded on its class dim (module
      docstring): then ``group``, ``vocab_start_index`` and ``vocab_size`` must be None.
    - ``target``: (N,) int32/int64 *global* class ids, the same on every rank.
    - ``vocab_start_index`` / ``vocab_size``: as ``vocab_parallel_cross_entropy`` (None: shards
      in rank order, learnt with one all_gather of 4 integers per rank, read on the host; both
      given: no layout collective, nothing checked across ranks).
    - ``config``: a launch override for the statistics and gradient kernels (tests, tuning).
    - ``batch_invariant``: every output is the bits ``token_log_probs(...,
      batch_invariant=True)`` gives on one device, at any group size, for shards that start
      and end on multiples of 128 classes (``distributed.batch_invariant``, docs/rl.md;
      ``config`` unused).

    Communication: 4·N floats in two all_reduces (+ N int64 with ``return_argmax``); the
    backward communicates nothing and returns the gradient of this rank's shard only. Without
    an initialized process group, or with one rank, this is the local ``token_log_probs``.

    A 0-d tensor ``logit_scale`` / ``logit_divisor`` / ``temperature`` multiplies the shard in
    torch, as in ``token_log_probs``; its gradient is the whole one on every rank (the shards'
    parts summed by one all_reduce of a scalar in the backward: its ``requires_grad`` must
    agree across ranks).
    """
    if _is_dtensor(input):
        input, target, group, vocab_start_index, vocab_size = _unwrap_dtensor(
            input, target, group, vocab_start_index, vocab_size)
    check_float("input", input)
    refuse_functorch("vocab_parallel_token_log_probs", _COLLECTIVES)
    if input.ndim != 2:
        raise ValueError(f"input must be this rank's (N, V_local) logits, got shape "
                         f"{tuple(input.shape)}")
    check_target(input, target, "input")
    check_same_device(input=input, target=target)
    _check_layout_args(vocab_start_index, vocab_size)
    ignore_index = as_index("ignore_index", ignore_index)
    factor, kwargs = split_tensor_factors(logit_scale=logit_scale,
                                          logit_divisor=logit_divisor, softcap=softcap,
                                          temperature=temperature)
    transform = HeadTransform(**kwargs)
    flags = dict(return_entropy=return_entropy, return_lse=return_lse,
                 return_argmax=return_argmax)
    world, vocab_start, n_classes = _group_layout(
        input.shape[0], input.shape[1], input.dtype, input.device, group, vocab_start_index,
        vocab_size, invariant=bool(batch_invariant))
    input = scale_shard(input, factor, group, world)
    if world == 1:
        return token_log_probs(input, target, ignore_index=ignore_index, **kwargs,
                               batch_invariant=bool(batch_invariant), **flags)
    if input.numel() > 0:
        check_runnable(input)
    if batch_invariant:
        from ..ops._autograd import refuse_transforms
        from .batch_invariant import InvariantVocabParallelTokenLogProbsFunction

        refuse_transforms("vocab_parallel_token_log_probs(batch_invariant=True)",
                          input)
        outs = InvariantVocabParallelTokenLogProbsFunction.apply(
            input, target, group, vocab_start, n_classes, ignore_index, transform,
            bool(return_entropy), bool(return_argmax))
        return pack_outputs(*outs, **flags)
    needs_grad = torch.is_grad_enabled() and input.requires_grad
    logp, entropy, lse, arg = VocabParallelTokenLogProbsFunction.apply(
        input, target, group, vocab_start, n_classes, ignore_index, transform,
        bool(return_entropy), bool(return_argmax), config, needs_grad)
    return pack_outputs(logp, entropy, lse, arg, **flags)


# --------------------------------------------------------------------------- linear


class VocabParallelLinearTokenLogProbsFunction(torch.autograd.Function):
    """Autograd of the vocab-parallel fused linear op for any group size: ``h`` (N, H)
    replicated, ``weight`` this rank's (V_local, H) rows, ``bias`` its (V_local,) entries or
    None, ``target`` (N,) global ids."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, group, vocab_start, vocab_size, ignore_index,
                transform, compute_entropy, compute_argmax, chunk, config, needs_grad):
        n_tokens, v_local = h.shape[0], weight.shape[0]
        target = target.contiguous()
        # 1. Per token chunk: local logits (one reused buffer) → this shard's row statistics.
        if v_local == 0:
            local, arg = _empty_shard_stats(n_tokens, accum_dtype(h), h.device, compute_argmax)
        else:
            local = torch.empty((n_tokens, 4), dtype=accum_dtype(h), device=h.device)
            arg = (torch.empty(n_tokens, dtype=torch.int64, device=h.device)
                   if compute_argmax else None)
            for start, end, logits in logits_chunks(h, weight, bias, chunk):
                local[start:end], part_arg = _local_stats(
                    logits, target[start:end], vocab_start, transform, compute_entropy,
                    compute_argmax, config)
                if arg is not None:
                    arg[start:end] = part_arg
        # 2. The collectives over every token at once; 3. the outputs.
        ctx.group, ctx.chunk = group, chunk
        return _finish_forward(ctx, local, arg, target, group, (h, weight, bias), needs_grad,
                               vocab_start=vocab_start, n_classes=vocab_size,
                               ignore_index=ignore_index, transform=transform, config=config,
                               compute_entropy=compute_entropy)

    @staticmethod
    def jvp(ctx, h_dot, w_dot, b_dot, *_):
        """Forward-mode rule: this shard's share (``linear_token_log_probs_jvp`` over its
        classes) of logp's and the entropy's tangents, all_reduced over the ranks."""
        h, weight, bias, target, stats = ctx.saved_tensors
        logp, entropy = linear_token_log_probs_jvp(
            h, weight, bias, target, stats, h_dot, w_dot, b_dot, chunk=ctx.chunk,
            compute_entropy=ctx.entropy, **ctx.opts)
        return (*_all_reduced(ctx.group, logp, entropy), None, None)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_lse, grad_arg):
        import torch.distributed as dist

        no_second_derivative("vocab_parallel_linear_token_log_probs")
        none = (None,) * 11
        if grad_logp is None and grad_entropy is None:
            return (None, None, None) + none
        h, weight, bias, target, stats = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        dh, dw, db = linear_token_log_probs_bwd(
            h, weight, bias, target, stats, *_contiguous(grad_logp, grad_entropy),
            chunk=ctx.chunk, need=need, **ctx.opts)
        if need[0]:  # dh = Σ_r dz_r @ W_r: the column-parallel input-gradient reduction
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=ctx.group)
        return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None,
                *none)


def vocab_parallel_linear_token_log_probs(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    group=None,
    vocab_start_index: int | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    logit_scale: float | torch.Tensor = 1.0,
    logit_divisor: float | torch.Tensor = 1.0,
    softcap: float | None = None,
    temperature: float | torch.Tensor = 1.0,
    return_entropy: bool = False,
    return_lse: bool = False,
    return_argmax: bool = False,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    config: RowConfig | None = None,
    batch_invariant: bool = False,
    fp32_precision: str = "ieee",
):
    """:func:`probact_gpu.linear_token_log_probs` for an LM head ``W`` (V, H) split along the
    vocabulary over the ranks of ``group``, without gathering ``W`` or holding the logits.

    - ``input``: (…, H) hidden states, the *same* on every rank (replicated over the group; its
      ``requires_grad`` must agree across ranks: the backward all-reduces dh only when set).
    - ``linear_weight``: this rank's (V_local, H) rows (uneven or empty shards allowed), the
      input's dtype; ``linear_bias``: its (V_local,) entries or None.
    - ``target``: (…) int32/int64 global class ids, the same on every rank.
    - ``vocab_start_index`` / ``vocab_size`` / ``config``: as
      :func:`vocab_parallel_token_log_probs` (the layout exchange also checks H agrees);
      ``chunk_size`` / ``memory_budget``: tokens per chunk, as ``linear_token_log_probs``
      (bytes of (C, V_local) logits).
    - ``batch_invariant`` / ``fp32_precision``: the fused head on this rank's rows; every
      per-token output is the bits ``linear_token_log_probs(..., batch_invariant=True)`` gives
      on one device (shards on multiples of 128 classes; ``distributed.batch_invariant``,
      docs/rl.md); dW and db are this shard's rows of one device's; dh is the ranks' partials'
      sum.

    Per token chunk, forward: local logits (1 GEMM), the partial-statistics kernel; after the
    last chunk the collectives of :func:`vocab_parallel_token_log_probs` over all N tokens at
    once. Backward: per chunk the local logits recomputed, overwritten with dz by the gradient
    kernel (global statistics), ``dh_r = dz @ W_r``, ``dW_r += dz.T @ h``, ``db_r += Σ dz``
    (3 GEMMs), then one ``all_reduce(SUM)`` of dh (N·H elements in the input's dtype). dW and
    db are local (this shard's). Without a process group, or with one rank, this is the local
    ``linear_token_log_probs``. A 0-d tensor ``logit_scale`` / ``logit_divisor`` /
    ``temperature`` is folded into the input and the bias shard, as
    ``vocab_parallel_linear_cross_entropy`` folds it (whole gradient on every rank).

    ``linear_weight`` may also be a DTensor sharded on its class dim (``Shard(0)``; the bias
    sharded the same way), as :func:`vocab_parallel_linear_cross_entropy` takes it.
    """
    if _is_dtensor(linear_weight):
        (input, linear_weight, linear_bias, target, group, vocab_start_index,
         vocab_size) = _unwrap_head_dtensor(input, linear_weight, linear_bias, target, group,
                                            vocab_start_index, vocab_size)
    factor, kwargs = split_tensor_factors(logit_scale=logit_scale,
                                          logit_divisor=logit_divisor, softcap=softcap,
                                          temperature=temperature)
    options = CrossEntropyOptions.from_kwargs(ignore_index=ignore_index, **kwargs)
    input, linear_weight, linear_bias = autocast_linear(input, linear_weight, linear_bias)
    check_head_inputs(input, linear_weight, target, linear_bias, options,
                      allow_probabilities=False)
    refuse_functorch("vocab_parallel_linear_token_log_probs", _COLLECTIVES)
    chunk_size, memory_budget, _ = check_chunking(chunk_size, memory_budget)
    _check_layout_args(vocab_start_index, vocab_size)
    flags = dict(return_entropy=return_entropy, return_lse=return_lse,
                 return_argmax=return_argmax)
    h, batch_shape = flatten_head_input(input, linear_weight.shape[1])
    from ..ops.fused_head import check_fp32_precision

    check_fp32_precision(fp32_precision, batch_invariant)
    world, vocab_start, n_classes = _group_layout(
        h.shape[0], linear_weight.shape[0], h.dtype, h.device, group, vocab_start_index,
        vocab_size, n_hidden=h.shape[1], invariant=bool(batch_invariant))
    if world == 1:
        input, linear_bias = fold_head_factor(input, linear_bias, factor)
        return linear_token_log_probs(
            input, linear_weight, target, linear_bias=linear_bias, ignore_index=ignore_index,
            chunk_size=chunk_size, memory_budget=memory_budget, **kwargs,
            batch_invariant=bool(batch_invariant), fp32_precision=fp32_precision, **flags)
    if h.shape[0] > 0:
        check_runnable(h, "input")
    # a tensor factor: h times it (dh is all-reduced), the bias shard by scale_shard
    h = scale_by_factor(h, factor)
    linear_bias = scale_shard(linear_bias, factor, group, world, "linear_bias")
    if batch_invariant:
        from ..ops._autograd import refuse_transforms
        from .batch_invariant import InvariantVocabParallelLinearTokenLogProbsFunction

        refuse_transforms("vocab_parallel_linear_token_log_probs(batch_invariant=True)",
                          h, linear_weight, linear_bias)
        outs = InvariantVocabParallelLinearTokenLogProbsFunction.apply(
            h, linear_weight, linear_bias, target.reshape(-1), group, vocab_start, n_classes,
            options.ignore_index, options.transform, bool(return_entropy),
            bool(return_argmax), bool(return_lse or return_argmax), fp32_precision,
            chunk_size, memory_budget)
        return pack_outputs(*outs, shape=batch_shape, **flags)
    chunk = token_chunk(h.shape[0], max(1, linear_weight.shape[0]), h.element_size(),
                        chunk_size, memory_budget)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (h, linear_weight, linear_bias))
    logp, entropy, lse, arg = VocabParallelLinearTokenLogProbsFunction.apply(
        h, linear_weight, linear_bias, target.reshape(-1), group, vocab_start, n_classes,
        options.ignore_index, options.transform, bool(return_entropy), bool(return_argmax),
        chunk, config, needs_grad)
    return pack_outputs(logp, entropy, lse, arg, shape=batch_shape, **flags)
