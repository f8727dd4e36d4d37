"""``batch_invariant=True`` on the vocab-parallel forms: every rank's per-token outputs are the
bits a single device computes on the whole vocabulary, at any group size, for shards that start
and end on multiples of ``tiling.INVARIANT_TILE`` (128) classes (docs/rl.md).

Why they are the same bits: a shard aligned to the tiles holds whole tiles of the vocabulary,
and a tile's state is computed by the same operations wherever it sits
(``kernels/_invariant.py``); the rows' max is then exact under ``all_reduce(MAX)``, each
tile's share of Σexp and of τ is rounded once against that max (the same rounding on every
rank and on one device) and the shares are summed as int64 — exact, so ``all_reduce(SUM)``
gives the single device's sum in any order; the target's logit is one rank's value plus zeros;
the argmax the smallest index under ``all_reduce(MIN)``. The rows' outputs are then formed by
the same float64 code everywhere (``ops._invariant``).

Communication per call: one all_reduce(MAX) of N floats, one all_reduce(SUM) of 2·N int64 (4·N
for fp64), one of 2·N floats (the non-finite probe, z_t), and with argmax one all_reduce(MIN)
of N int64. The backward is local (the gradient of this rank's shard from the global
statistics), except the linear forms' one all_reduce(SUM) of dh (N, H) — that sum of the ranks'
partials is the column-parallel reduction and is not bitwise equal to one device's dh (dW and db
rows are: each is formed on its rank from the same dz).
"""

from __future__ import annotations

import torch

from .. import tiling
from .._runtime import accum_dtype
from ..ops._common import ce_grad_rows, no_second_derivative, reduce_ce_rows
from ..ops._invariant import (
    cross_entropy_rows,
    exact_rows,
    invariant_tile_stats,
    reduce_tile_states,
    token_rows,
)
from ..ops.batch_invariant import coef_bwd, token_coefficients
from ..ops.fused_head import (
    cross_entropy_coefficients,
    fused_head_bwd,
    fused_head_fwd,
    token_log_probs_coefficients,
)

__all__ = [
    "InvariantVocabParallelCrossEntropyFunction",
    "InvariantVocabParallelLinearCrossEntropyFunction",
    "InvariantVocabParallelLinearTokenLogProbsFunction",
    "InvariantVocabParallelTokenLogProbsFunction",
]


def _collective_group(group):
    """The process group the collectives run on: ``group``, or the world when None (the
    launchers below read None as "one device, no collective")."""
    import torch.distributed as dist

    return dist.group.WORLD if group is None else group


def _tile_start(vocab_start: int) -> int:
    return vocab_start // tiling.INVARIANT_TILE


def _logits_rows(x, target, group, vocab_start, transform, compute_entropy, compute_argmax,
                 dim=-1):
    """The global exact statistics of the rows of this rank's logits ``x``, and the argmax."""
    states = invariant_tile_stats(x, target, vocab_start=vocab_start, transform=transform,
                                  compute_entropy=compute_entropy,
                                  compute_argmax=compute_argmax, dim=dim)
    sums = reduce_tile_states(states, tile_start=_tile_start(vocab_start),
                              compute_entropy=compute_entropy, compute_argmax=compute_argmax,
                              group=_collective_group(group))
    return exact_rows(sums), sums.argmax


def _all_reduce_dh(dh, group):
    import torch.distributed as dist

    dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)


class InvariantVocabParallelTokenLogProbsFunction(torch.autograd.Function):
    """``x`` this rank's (N, V_local) logits, ``target`` (N,) global ids. Returns (logp,
    entropy | None, lse, argmax | None); lse and argmax not differentiable."""

    @staticmethod
    def forward(ctx, x, target, group, vocab_start, n_classes, ignore_index, transform,
                compute_entropy, compute_argmax):
        target = target.contiguous()
        rows, arg = _logits_rows(x, target, group, vocab_start, transform, compute_entropy,
                                 compute_argmax)
        logp, entropy, lse, stats = token_rows(
            rows, target.to(torch.int64), n_classes=n_classes, ignore_index=ignore_index,
            compute_entropy=compute_entropy, dtype=accum_dtype(x))
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(t for t in (lse, arg) if t is not None))
        ctx.save_for_backward(x, target, stats)
        ctx.opts = (vocab_start, n_classes, ignore_index, transform)
        return logp, entropy, lse, arg

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_lse, grad_arg):
        no_second_derivative("vocab_parallel_token_log_probs")
        none = (None,) * 8
        if grad_logp is None and grad_entropy is None:
            return (None,) + none
        x, target, stats = ctx.saved_tensors
        vocab_start, n_classes, ignore_index, transform = ctx.opts
        flat = target.to(torch.int64)[:, None]
        valid, in_range = flat != ignore_index, (flat >= 0) & (flat < n_classes)
        coef, coef_b = token_coefficients(
            None if grad_logp is None else grad_logp.reshape(-1, 1),
            None if grad_entropy is None else grad_entropy.reshape(-1), valid, in_range,
            flat.shape[0], stats.dtype, x.device)
        coef = torch.where(valid, coef, 0.0)
        dx = coef_bwd(x, flat, stats, coef, coef_b, transform=transform,
                      has_entropy_term=grad_entropy is not None, vocab_start=vocab_start)
        return (dx,) + none


class InvariantVocabParallelLinearTokenLogProbsFunction(torch.autograd.Function):
    """``h`` (N, H) replicated, ``weight`` this rank's (V_local, H) rows, ``bias`` its entries
    or None, ``target`` (N,) global ids: the fused head (``ops.fused_head``) on the shard."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, group, vocab_start, n_classes, ignore_index,
                transform, compute_entropy, compute_argmax, all_rows, fp32_precision,
                chunk_size, budget):
        target = target.contiguous()
        sums, computed = fused_head_fwd(
            h, weight, bias, target, ignore_index=ignore_index, transform=transform,
            compute_entropy=compute_entropy, compute_argmax=compute_argmax, all_rows=all_rows,
            vocab_start=vocab_start, fp32_precision=fp32_precision, chunk_size=chunk_size,
            budget=budget, group=_collective_group(group), n_classes_global=n_classes)
        logp, entropy, lse, stats = token_rows(
            exact_rows(sums), target.to(torch.int64), n_classes=n_classes,
            ignore_index=ignore_index, compute_entropy=compute_entropy,
            dtype=accum_dtype(h), computed=computed)
        arg = None if sums.argmax is None else torch.where(computed, sums.argmax, -1)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(t for t in (lse, arg) if t is not None))
        ctx.save_for_backward(h, weight, bias, target, stats)
        ctx.opts = (group, vocab_start, n_classes, ignore_index, transform, fp32_precision,
                    budget)
        return logp, entropy, lse, arg

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_lse, grad_arg):
        no_second_derivative("vocab_parallel_linear_token_log_probs")
        none = (None,) * 11
        if grad_logp is None and grad_entropy is None:
            return (None,) * 4 + none
        h, weight, bias, target, stats = ctx.saved_tensors
        group, vocab_start, n_classes, ignore_index, transform, precision, budget = ctx.opts
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        coef = token_log_probs_coefficients(
            None if grad_logp is None else grad_logp.contiguous(),
            None if grad_entropy is None else grad_entropy.contiguous(), target, n_classes,
            stats.dtype)
        dh, dw, db = fused_head_bwd(
            h, weight, bias, target, stats, coef, ignore_index=ignore_index,
            transform=transform, need=need, has_entropy_term=grad_entropy is not None,
            vocab_start=vocab_start, fp32_precision=precision, budget=budget)
        if need[0]:
            _all_reduce_dh(dh, group)
        return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None,
                None) + none


def _ce_forward(ctx, rows, target, options, n_classes, sdt, lse_mask=None):
    loss_rows, zl_rows, lse = cross_entropy_rows(
        rows, target, n_classes=n_classes, ignore_index=options.ignore_index,
        weight=options.weight, z_loss=options.z_loss, dtype=sdt)
    loss, zl = reduce_ce_rows(loss_rows, zl_rows, options, target, n_classes, sdt)
    stats = rows.stats(sdt)
    if lse_mask is not None:
        lse = torch.where(lse_mask, lse, float("nan"))
        stats = torch.where(lse_mask[:, None], stats, 0.0)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse, zl)
    return loss, lse, zl, stats


class InvariantVocabParallelCrossEntropyFunction(torch.autograd.Function):
    """``x`` this rank's (N, V_local) logits, ``target`` (N,) global class ids, ``options`` with
    the global class weights. Returns (loss, lse, z-loss term, argmax | None)."""

    @staticmethod
    def forward(ctx, x, target, group, vocab_start, n_classes, options, compute_argmax):
        target = target.contiguous().to(torch.int64)
        rows, arg = _logits_rows(x, target, group, vocab_start, options.transform, False,
                                 compute_argmax)
        loss, lse, zl, stats = _ce_forward(ctx, rows, target, options, n_classes,
                                           accum_dtype(x))
        if arg is not None:
            ctx.mark_non_differentiable(arg)
        ctx.save_for_backward(x, target, lse, stats)
        ctx.opts = (vocab_start, n_classes, options)
        return loss, lse, zl, arg

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_zl, grad_arg):
        none = (None,) * 6
        if grad_loss is None:
            return (None,) + none
        no_second_derivative("vocab_parallel_cross_entropy")
        x, target, lse, stats = ctx.saved_tensors
        vocab_start, n_classes, options = ctx.opts
        g, z_scale = ce_grad_rows(grad_loss, target, options, n_classes, stats.dtype)
        coef = cross_entropy_coefficients(g, target, lse, options, n_classes, stats.dtype,
                                          z_scale)
        dx = coef_bwd(x, target[:, None], stats, coef, coef[:, 1:2],
                      transform=options.transform, has_entropy_term=False,
                      vocab_start=vocab_start)
        return (dx,) + none


class InvariantVocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """The fused head's cross-entropy on this rank's rows of the head (``h`` replicated)."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, group, vocab_start, n_classes, options,
                compute_argmax, fp32_precision, chunk_size, budget):
        target = target.contiguous()
        sums, computed = fused_head_fwd(
            h, weight, bias, target, ignore_index=options.ignore_index,
            transform=options.transform, compute_entropy=False, compute_argmax=compute_argmax,
            all_rows=compute_argmax, vocab_start=vocab_start, fp32_precision=fp32_precision,
            chunk_size=chunk_size, budget=budget, group=_collective_group(group),
            n_classes_global=n_classes)
        t64 = target.to(torch.int64)
        loss, lse, zl, stats = _ce_forward(ctx, exact_rows(sums), t64, options, n_classes,
                                           accum_dtype(h), lse_mask=computed)
        arg = None if sums.argmax is None else torch.where(computed, sums.argmax, -1)
        if arg is not None:
            ctx.mark_non_differentiable(arg)
        ctx.save_for_backward(h, weight, bias, target, lse, stats)
        ctx.opts = (group, vocab_start, n_classes, options, fp32_precision, budget)
        return loss, lse, zl, arg

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_zl, grad_arg):
        none = (None,) * 8
        if grad_loss is None:
            return (None,) * 4 + none
        no_second_derivative("vocab_parallel_linear_cross_entropy")
        h, weight, bias, target, lse, stats = ctx.saved_tensors
        group, vocab_start, n_classes, options, precision, budget = ctx.opts
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        t64 = target.to(torch.int64)
        g, z_scale = ce_grad_rows(grad_loss, t64, options, n_classes, stats.dtype)
        coef = cross_entropy_coefficients(g, t64, lse, options, n_classes, stats.dtype,
                                          z_scale)
        dh, dw, db = fused_head_bwd(
            h, weight, bias, target, stats, coef, ignore_index=options.ignore_index,
            transform=options.transform, need=need, has_entropy_term=False,
            vocab_start=vocab_start, fp32_precision=precision, budget=budget)
        if need[0]:
            _all_reduce_dh(dh, group)
        return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None,
                None) + none
