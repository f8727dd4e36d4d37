"""Vocab-parallel distillation: :func:`probact_gpu.distillation_loss` when the student's and the
teacher's logits (or both heads' weights) are split the same way along the vocabulary over the
ranks of a ``torch.distributed`` process group, without gathering either. Exported by
``probact_gpu.distributed``.

Rank ``r`` holds the columns of global classes ``[s_r, s_r + V_r)`` of the same N rows of both
heads; every rank holds the same targets (the mask, and the hard term's global class ids). With
the notation of ``kernels/distillation.py``, a row's divergence needs, around the global maxima
``M_s, M_t``, the sums ``S = Σ exp(z − M_s)``, ``T = Σ exp(w − M_t)`` and, for KL / reverse
KL, the online cross term ``W``; each is a sum over classes, so each rank's partial (taken
around its own maxima by ``distillation_partial`` with ``vocab_start = s_r``) is rescaled to the
global maxima (``rescale_partials``: ``α = exp(m_r − M)``, ``W' = α (W + (d_own − d_other)
s_own)``) and summed:

1. ``all_reduce(MAX)`` of the N × 3 local maxima (student, teacher, the hard head);
2. one ``all_reduce(SUM)`` of the rescaled (N, 5) ``(S, T, W, S_h, z_h[t])``;
3. JSD and TVD only: each rank sums its columns' terms from the global statistics
   (``distillation_terms``) and one ``all_reduce(SUM)`` of (N, 2).

Communication: 8·N floats (10·N for JSD / TVD; fp32, fp64 for fp64 logits) in two (three)
all_reduces — O(N), never the logits. The shard layout is learnt with one all_gather of a few
integers unless ``vocab_start_index`` and ``vocab_size`` are both given (``_layout``). The
backward is local: each rank's columns of the student's gradient from the global statistics
(``distillation_bwd`` with ``vocab_start = s_r``); the fused linear form adds one
``all_reduce(SUM)`` of the (N, H_s) input gradient.

**Fused linear** (:func:`vocab_parallel_linear_distillation_loss`): both heads' hidden states
replicated, each rank holding its rows of both weights. Forward: per token chunk the chunk's
local logits of both heads (2 GEMMs) and their partial statistics; after the last chunk the
collectives above over all N tokens at once; JSD and TVD recompute each chunk's logits (2 more
GEMMs) for their terms. Backward: per chunk both logits recomputed (2 GEMMs), the gradient
kernel writes dz over the student's, ``dh_r = dz @ W_s,r`` and ``dW_s,r += dz.T @ h_s`` (2
GEMMs), then ``all_reduce(SUM)`` of dh. (The chunk count may differ between ranks of uneven
shards: no collective runs per chunk.)

**DTensor logits.** :func:`vocab_parallel_distillation_loss` also takes both logits as DTensors
sharded on their class dim (``Shard(-1)``) over the same 1-D mesh; they are unwrapped to their
local shards (the student's gradient flows back as a DTensor of its placement), the group and
layout come from the mesh and the global shape.

Vocabularies of different sizes (``shared_vocab``) and sparse top-k teachers have no
vocab-parallel form: every rank's student and teacher shards must hold the same classes.
"""

from __future__ import annotations

import torch

from .. import tiling
from .._runtime import accum_dtype, check_float, check_runnable, check_same_device
from ..ops._common import (
    LinearGrads,
    check_chunking,
    chunk_logits,
    flatten_head_input,
    no_second_derivative,
    token_chunks,
)
from ..ops.distillation import (
    JSD,
    N_STATS,
    TVD,
    check_math_dtypes,
    check_pair,
    check_target_mask,
    check_teacher_no_grad,
    distillation_bwd,
    distillation_loss,
    distillation_partial,
    distillation_terms,
    finish_rows,
    merge_partials,
    merged_stats,
    reduce_loss_rows,
    rescale_partials,
)
from ..ops.linear_distillation import _check_head, linear_distillation_loss
from ..options import (
    DistillationOptions,
    fold_head_factor,
    scale_by_factor,
    split_student_factors,
)
from ..tiling import RowConfig
from ._layout import _check_layout_args, _group_layout, _unwrap_dtensor, scale_shard

__all__ = [
    "VocabParallelDistillationFunction",
    "VocabParallelLinearDistillationFunction",
    "vocab_parallel_distillation_loss",
    "vocab_parallel_linear_distillation_loss",
]


# --------------------------------------------------------------------------- statistics


def _local_stats(student, teacher, target, vocab_start, options, config) -> torch.Tensor:
    """This shard's (N, 8) partial statistics, its splits merged (a shard of no classes:
    −inf maxima, zero sums)."""
    kind, _ = options.kernel_divergence
    parts = distillation_partial(student, teacher, target, options=options,
                                 n_cols=student.shape[1], vocab_start=vocab_start,
                                 config=config)
    return merge_partials(parts, kind)


def _global_stats(local: torch.Tensor, options: DistillationOptions, group) -> torch.Tensor:
    """(N, 8) statistics (``merged_stats``) over every rank's classes: ``all_reduce(MAX)`` of
    N × 3 maxima, one ``all_reduce(SUM)`` of N × 5 rescaled sums."""
    import torch.distributed as dist

    kind, _ = options.kernel_divergence
    maxima = local[:, [0, 2, 5]].contiguous()
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    sums = rescale_partials(local, maxima, kind).contiguous()
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    merged = torch.stack([maxima[:, 0], sums[:, 0], maxima[:, 1], sums[:, 1], sums[:, 2],
                          maxima[:, 2], sums[:, 3], sums[:, 4]], dim=1)
    return merged_stats(merged, kind)


def _finish(stats, terms, target, options, vocab_size, group):
    """Loss rows and saved statistics, the JSD / TVD terms summed over the ranks first."""
    import torch.distributed as dist

    if terms is not None:
        terms = terms.contiguous()
        dist.all_reduce(terms, op=dist.ReduceOp.SUM, group=group)
    return finish_rows(stats, terms, target, options, vocab_size)


class VocabParallelDistillationFunction(torch.autograd.Function):
    """Autograd of the vocab-parallel op: ``student`` / ``teacher`` this rank's (N, V_local)
    shards, ``target`` (N,) global ids or None. Returns the (N,) loss rows, the same on every
    rank."""

    @staticmethod
    def forward(ctx, student, teacher, target, group, vocab_start, vocab_size, options, config,
                needs_grad):
        kind, _ = options.kernel_divergence
        stats = _global_stats(_local_stats(student, teacher, target, vocab_start, options,
                                           config), options, group)
        terms = None
        if kind in (JSD, TVD):
            terms = distillation_terms(student, teacher, stats, options=options,
                                       n_cols=student.shape[1], config=config).sum(dim=1)
        rows, stats = _finish(stats, terms, target, options, vocab_size, group)
        if needs_grad:
            ctx.save_for_backward(student, teacher, target, stats)
        ctx.opts = dict(options=options, n_cols=student.shape[1], vocab_start=vocab_start,
                        n_classes=vocab_size, config=config)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        no_second_derivative("vocab_parallel_distillation_loss")
        none = (None,) * 8
        if grad_rows is None:
            return (None,) + none
        student, teacher, target, stats = ctx.saved_tensors
        return (distillation_bwd(student, teacher, target, stats, grad_rows, **ctx.opts),
                *none)


_TRANSFORMS = ("temperature", "student_logit_scale", "student_logit_divisor", "student_softcap",
               "teacher_logit_scale", "teacher_logit_divisor", "teacher_softcap")


def _options(**kwargs) -> tuple[torch.Tensor | None, DistillationOptions, dict]:
    """(the student's tensor factor or None, the options, the keywords with the folded tensor
    options at 1.0): ``options.split_student_factors``."""
    factor, transforms = split_student_factors(
        **{name: kwargs.pop(name) for name in _TRANSFORMS if name in kwargs})
    kwargs.update(transforms)
    return factor, DistillationOptions.from_kwargs(**kwargs), kwargs


def _unwrap_pair(student, teacher, target, group, vocab_start_index, vocab_size):
    """Both DTensors unwrapped to their local shards (the same mesh and placement)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(teacher, DTensor):
        raise ValueError("student_logits is a DTensor: teacher_logits must be one too, on the "
                         "same mesh and placement")
    if teacher.device_mesh != student.device_mesh or teacher.placements != student.placements \
            or tuple(teacher.shape) != tuple(student.shape):
        raise ValueError(f"teacher_logits ({tuple(teacher.shape)}, {teacher.placements}) must "
                         f"be sharded as student_logits ({tuple(student.shape)}, "
                         f"{student.placements}), on the same mesh")
    student, target, group, start, vocab = _unwrap_dtensor(student, target, group,
                                                           vocab_start_index, vocab_size)
    return student, teacher.to_local(), target, group, start, vocab


def vocab_parallel_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    group=None,
    vocab_start_index: int | None = None,
    vocab_size: int | None = None,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    hard_weight: float = 0.0,
    temperature_squared: bool = False,
    student_logit_scale: float | torch.Tensor = 1.0,
    student_logit_divisor: float | torch.Tensor = 1.0,
    student_softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_logit_divisor: float = 1.0,
    teacher_softcap: float | None = None,
    config: RowConfig | None = None,
) -> torch.Tensor:
    """:func:`probact_gpu.distillation_loss` of logits split along the vocabulary over the ranks
    of ``group`` (default: the world). Every rank calls it with its shards and gets the same
    loss: that of ``distillation_loss`` on the logits concatenated in vocabulary order, with the
    same options.

    - ``student_logits`` / ``teacher_logits``: this rank's (N, V_local) shards of the same
      classes (the same shape on a rank; shards may be uneven or empty across ranks); or both
      DTensors sharded on their class dim over one 1-D mesh (module docstring: then ``group``,
      ``vocab_start_index`` and ``vocab_size`` are None).
    - ``target``: (N,) int32/int64 or None, the same on every rank: the mask, and the hard
      term's *global* class ids.
    - ``vocab_start_index`` / ``vocab_size`` / ``config``: as
      :func:`vocab_parallel_token_log_probs`.

    Communication: 8·N floats in two all_reduces (10·N in three for JSD / TVD); the backward
    communicates nothing and returns the gradient of this rank's student shard only. The
    teacher gets no gradient. Without an initialized process group, or with one rank, this is
    the local ``distillation_loss``. A 0-d tensor ``student_logit_scale`` /
    ``student_logit_divisor`` multiplies the student shard in torch and gets the whole gradient
    on every rank (one all_reduce of a scalar in the backward; its ``requires_grad`` must agree
    across ranks); tensor teacher options and temperature as ``distillation_loss``.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(student_logits, DTensor):
        student_logits, teacher_logits, target, group, vocab_start_index, vocab_size = \
            _unwrap_pair(student_logits, teacher_logits, target, group, vocab_start_index,
                         vocab_size)
    kw = dict(divergence=divergence, beta=beta, temperature=temperature,
              ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
              hard_weight=hard_weight, temperature_squared=temperature_squared,
              student_logit_scale=student_logit_scale,
              student_logit_divisor=student_logit_divisor, student_softcap=student_softcap,
              teacher_logit_scale=teacher_logit_scale,
              teacher_logit_divisor=teacher_logit_divisor, teacher_softcap=teacher_softcap)
    factor, options, kw = _options(**kw)
    if getattr(student_logits, "ndim", None) != 2 or getattr(teacher_logits, "ndim", None) != 2:
        raise ValueError("student_logits and teacher_logits must be this rank's (N, V_local) "
                         "shards")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must be shards of the same classes")
    n_rows, v_local = student_logits.shape
    if v_local:
        check_pair(student_logits, teacher_logits, options)
    else:  # an empty shard: only the dtypes to check
        check_float("student_logits", student_logits)
        check_float("teacher_logits", teacher_logits)
        check_math_dtypes(student_logits, teacher_logits, ("student_logits", "teacher_logits"))
    check_target_mask(target, (n_rows,), options)
    norm = options.normalizer if isinstance(options.normalizer, torch.Tensor) else None
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits,
                      target=target, normalizer=norm)
    check_teacher_no_grad(teacher_logits=teacher_logits)
    _check_layout_args(vocab_start_index, vocab_size)
    world, vocab_start, n_classes = _group_layout(
        n_rows, v_local, student_logits.dtype, student_logits.device, group,
        vocab_start_index, vocab_size)
    student_logits = scale_shard(student_logits, factor, group, world, "student_logits")
    if world == 1:
        return distillation_loss(student_logits, teacher_logits, target, **kw)
    if student_logits.numel() > 0:
        check_runnable(student_logits, "student_logits")
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    rows = VocabParallelDistillationFunction.apply(
        student_logits, teacher_logits, None if target is None else target.contiguous(), group,
        vocab_start, n_classes, options, config, needs_grad)
    return reduce_loss_rows(rows, target, options, (n_rows,), student_logits.dtype)


# --------------------------------------------------------------------------- linear


class VocabParallelLinearDistillationFunction(torch.autograd.Function):
    """Autograd of the vocab-parallel fused linear op: ``h_s`` (N, H_s) and ``h_t`` (N, H_t)
    replicated, ``w_s`` / ``w_t`` this rank's (V_local, H) rows of each head (``b_s`` / ``b_t``
    their entries or None), ``target`` (N,) or None. Returns the (N,) loss rows."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, target, group, vocab_start, vocab_size,
                options, chunk, config, needs_grad):
        kind, _ = options.kernel_divergence
        n_tokens = h_s.shape[0]
        bufs = (torch.empty((min(chunk, n_tokens), w_s.shape[0]), dtype=h_s.dtype,
                            device=h_s.device),
                torch.empty((min(chunk, n_tokens), w_t.shape[0]), dtype=h_t.dtype,
                            device=h_t.device))

        def chunks():
            for start, end in token_chunks(n_tokens, chunk):
                yield start, end, (chunk_logits(h_s[start:end], w_s, b_s, bufs[0][:end - start]),
                                   chunk_logits(h_t[start:end], w_t, b_t, bufs[1][:end - start]))

        local = torch.empty((n_tokens, N_STATS), dtype=accum_dtype(h_s), device=h_s.device)
        for start, end, (s, t) in chunks():
            local[start:end] = _local_stats(s, t, None if target is None else target[start:end],
                                            vocab_start, options, config)
        stats = _global_stats(local, options, group)
        terms = None
        if kind in (JSD, TVD):  # their terms need the global statistics: a second pass
            terms = torch.empty((n_tokens, 2), dtype=stats.dtype, device=stats.device)
            for start, end, (s, t) in chunks():
                terms[start:end] = distillation_terms(
                    s, t, stats[start:end], options=options, n_cols=w_s.shape[0],
                    config=config).sum(dim=1)
        rows, stats = _finish(stats, terms, target, options, vocab_size, group)
        if needs_grad:
            ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, target, stats)
        ctx.group, ctx.chunk = group, chunk
        ctx.opts = dict(options=options, n_cols=w_s.shape[0], vocab_start=vocab_start,
                        n_classes=vocab_size, config=config)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        import torch.distributed as dist

        no_second_derivative("vocab_parallel_linear_distillation_loss")
        none = (None,) * 11
        if grad_rows is None:
            return (None,) * 3 + none
        h_s, w_s, b_s, h_t, w_t, b_t, target, stats = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                b_s is not None and ctx.needs_input_grad[2])
        grads = LinearGrads(h_s, w_s, b_s, need)
        grad_rows = grad_rows.contiguous()
        n_tokens = h_s.shape[0]
        if n_tokens:
            s_buf = torch.empty((min(ctx.chunk, n_tokens), w_s.shape[0]), dtype=h_s.dtype,
                                device=h_s.device)
            t_buf = torch.empty((min(ctx.chunk, n_tokens), w_t.shape[0]), dtype=h_t.dtype,
                                device=h_t.device)
            for start, end in token_chunks(n_tokens, ctx.chunk):
                s = chunk_logits(h_s[start:end], w_s, b_s, s_buf[:end - start])
                t = chunk_logits(h_t[start:end], w_t, b_t, t_buf[:end - start])
                dz = distillation_bwd(s, t, None if target is None else target[start:end],
                                      stats[start:end], grad_rows[start:end], out=s,
                                      **ctx.opts)
                grads.add_chunk(start, end, dz, h_s[start:end], w_s)
        dh, dw, db = grads.results(h_s, w_s, b_s)
        if need[0]:  # dh = Σ_r dz_r @ W_s,r: the column-parallel input-gradient reduction
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=ctx.group)
        return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None,
                *none)


def vocab_parallel_linear_distillation_loss(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    group=None,
    vocab_start_index: int | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    config: RowConfig | None = None,
    **options,
) -> torch.Tensor:
    """:func:`probact_gpu.linear_distillation_loss` for two LM heads split the same way along
    the vocabulary over the ranks of ``group``, without gathering a weight or holding logits.

    - ``student_input`` (…, H_s) and ``teacher_input`` (…, H_t): the *same* on every rank
      (replicated; ``student_input.requires_grad`` must agree across ranks: the backward
      all-reduces dh only when set); ``student_weight`` / ``teacher_weight``: this rank's
      (V_local, H) rows of each head — the same classes — with their biases' entries.
    - ``target``, every distillation keyword (``**options``: divergence, beta, temperature,
      ignore_index, reduction, normalizer, hard_weight, temperature_squared and the heads'
      transforms), ``chunk_size`` / ``memory_budget``: as ``linear_distillation_loss``;
      ``vocab_start_index`` / ``vocab_size`` / ``config``: as
      :func:`vocab_parallel_distillation_loss`.

    GEMMs per token chunk: 2 in the forward (4 for JSD / TVD, which recompute the chunk for
    their terms), 4 in the backward; communication: the logits op's, plus one
    ``all_reduce(SUM)`` of the (N, H_s) input gradient. Without a process group, or with one
    rank, this is the local ``linear_distillation_loss``.
    """
    factor, opts, options = _options(**options)
    if opts.shared_vocab is not None:
        raise ValueError("shared_vocab has no vocab-parallel form: shard both heads the same "
                         "way")
    chunk_size, memory_budget, _ = check_chunking(chunk_size, memory_budget)
    _check_head("student_input", "student_weight", "student_bias", student_input,
                student_weight, student_bias)
    _check_head("teacher_input", "teacher_weight", "teacher_bias", teacher_input,
                teacher_weight, teacher_bias)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student_weight ({student_weight.shape[0]} rows) and teacher_weight "
                         f"({teacher_weight.shape[0]}) must hold the same classes on a rank")
    batch = tuple(student_input.shape[:-1])
    if tuple(teacher_input.shape[:-1]) != batch:
        raise ValueError(f"student_input {tuple(student_input.shape)} and teacher_input "
                         f"{tuple(teacher_input.shape)} must have the same leading (token) dims")
    check_target_mask(target, batch, opts)
    norm = opts.normalizer if isinstance(opts.normalizer, torch.Tensor) else None
    check_same_device(student_input=student_input, student_weight=student_weight,
                      teacher_input=teacher_input, teacher_weight=teacher_weight,
                      target=target, normalizer=norm)
    check_teacher_no_grad(teacher_input=teacher_input, teacher_weight=teacher_weight,
                          teacher_bias=teacher_bias)
    _check_layout_args(vocab_start_index, vocab_size)
    h_s, _ = flatten_head_input(student_input, student_weight.shape[1])
    h_t, _ = flatten_head_input(teacher_input, teacher_weight.shape[1])
    world, vocab_start, n_classes = _group_layout(
        h_s.shape[0], student_weight.shape[0], h_s.dtype, h_s.device, group,
        vocab_start_index, vocab_size, n_hidden=h_s.shape[1])
    if world == 1:
        student_input, student_bias = fold_head_factor(student_input, student_bias, factor)
        return linear_distillation_loss(
            student_input, student_weight, teacher_input, teacher_weight, target,
            student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=chunk_size,
            memory_budget=memory_budget, **options)
    if h_s.shape[0] > 0:
        check_runnable(h_s, "student_input")
    # a student tensor factor: h_s times it (dh is all-reduced), the bias shard by scale_shard
    h_s = scale_by_factor(h_s, factor, "student_input")
    student_bias = scale_shard(student_bias, factor, group, world, "student_bias")
    per_token = max(1, student_weight.shape[0]) * (h_s.element_size() + h_t.element_size())
    chunk = chunk_size or tiling.choose_distillation_token_chunk(h_s.shape[0], per_token,
                                                                 memory_budget)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (h_s, student_weight, student_bias))
    flat = None if target is None else target.reshape(-1).contiguous()
    rows = VocabParallelLinearDistillationFunction.apply(
        h_s, student_weight, student_bias, h_t, teacher_weight, teacher_bias, flat, group,
        vocab_start, n_classes, opts, chunk, config, needs_grad)
    return reduce_loss_rows(rows, flat, opts, batch, student_input.dtype)
