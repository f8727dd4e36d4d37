"""Vocab-parallel cross-entropy: the loss of logits split along the vocabulary over the ranks of
a ``torch.distributed`` process group (tensor-parallel LM heads), without gathering the logits.

Rank ``r`` holds ``x_r`` (N, V_r), the columns of global classes ``[s_r, s_r + V_r)`` of the
same N rows; every rank holds the same targets (global class ids). With ``z`` the transformed
logits (the head transform of ``probact_gpu.options``, applied in fp32 inside the kernels), the
loss needs per row only

    M   = max_r m_r                                  m_r = max z over rank r's columns
    S   = Σ_r Σ_c∈r exp(z_c − M)                      lse = M + log S
    z_t = the target's logit (on exactly one rank; the others contribute 0)
    Σz  = Σ_r Σ_c∈r z_c                               (label smoothing only)

Forward, on every rank:

1. our split-row statistics kernel on the local shard (``cross_entropy_partial_stats`` with
   ``vocab_start = s_r``): per (row, chunk) partial max, Σexp, z_t, Σz;
2. ``all_reduce(MAX)`` of the local row max (N floats), then the local Σexp rescaled to the
   global max, z_t and Σz packed as (N, 3) and ``all_reduce(SUM)`` once;
3. our combine kernel on the global (N, 1, 4) statistics (``cross_entropy_combine`` with the
   global class count): per-row loss and lse, identical on every rank; then the reduction.

Backward is local: ``dx_r = g · (p − onehot(t) …)`` over rank r's columns, from the saved global
lse (``cross_entropy_grad`` with ``vocab_start = s_r``). No communication.

Communication: 4·N floats per rank and call (fp32; fp64 for fp64 logits) in two all_reduces —
never the logits (N·V). A ring all_reduce moves about twice its payload per rank, so ~32·N bytes
for fp32: for N = 8192 tokens, 256 KiB, against 2 GiB for all-gathering 128256-class bf16 logits.
The shard layout costs one more, tiny, collective unless both ``vocab_start_index`` and
``vocab_size`` are given (see :func:`vocab_parallel_cross_entropy`).

No host sync in forward or backward besides that layout exchange, which reads 4 integers per
rank on the host (``.tolist()``; a device sync on NCCL). Pass ``vocab_start_index`` and
``vocab_size`` in a training loop to skip it.

**Vocab-parallel linear + cross-entropy** (:func:`vocab_parallel_linear_cross_entropy`): rank
``r`` holds the hidden states ``h`` (N, H), replicated over the group, and its rows ``W_r``
(V_r, H) of the LM head (``b_r`` of the bias); the logits ``x_r = h @ W_r.T + b_r`` are never
held beyond one chunk of tokens. Forward: per token chunk (``tiling.choose_token_chunk``) the
chunk's local logits by cuBLAS into one reused (C, V_r) buffer, then the statistics kernel and
the local merge of its splits into (C, 4); after the last chunk the same two all_reduces as above
over the (N, 4) statistics of *all* tokens, and the combine. Saved: h, W_r, b_r, targets, lse.
Backward: the shard's classes are walked in blocks of V_b (``tiling.choose_vocab_chunk``, each
(N, V_b) block as large as a token chunk's buffer): the block's logits are recomputed for every
token, the gradient kernel overwrites them with dlogits (``vocab_start = s_r + v0``, global class
count, per-row grad_output), and

    dW_r[block] = dlogits.T @ h           one GEMM over every token, rounded once    (local)
    db_r[block] = Σ_rows dlogits          fp32                                        (local)
    dh_r       += dlogits @ W_r[block]    fp32 (N, H) accumulator: this rank's share of dh

then ``dh = Σ_r dh_r``: ONE ``all_reduce(SUM)`` of the (N, H) partial in the input's dtype — the
input-gradient reduction of any column-parallel linear (Megatron's ``f``/``g`` pair), N·H
elements per rank (~2·N·H on the wire for a ring: 2 × 64 MiB at 8192 × 4096 bf16). It runs only
when ``input`` requires grad. 4 matmuls in all (1 forward, 3 backward): the gradient needs the
global lse, known only once every chunk's statistics were reduced, so unlike the single-process
op the forward cannot form it. The layout exchange adds H (5 integers per rank).
"""

from __future__ import annotations

import torch

from .. import tiling
from .._runtime import (
    accum_dtype,
    autocast_fp32,
    autocast_linear,
    check_runnable,
    check_same_device,
)
from ..ops._autograd import forward_ad_possible, refuse_functorch
from ..ops._common import (
    ce_launch_options,
    check_chunking,
    check_head_inputs,
    flatten_head_input,
    logits_chunks,
    loss_divisors,
    no_second_derivative,
    reduce_rows,
    token_chunk,
)
from ..ops.cross_entropy import (
    cross_entropy,
    cross_entropy_combine,
    cross_entropy_grad,
    cross_entropy_partial_stats,
)
from ..ops.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_jvp,
    vocab_walk_bwd,
)
from ..options import (
    CrossEntropyOptions,
    fold_head_factor,
    scale_by_factor,
    split_tensor_factors,
)
from ..tiling import RowConfig
from ._layout import (
    _check_layout_args,
    _group_layout,
    _is_dtensor,
    _replicated_local,
    _unwrap_dtensor,
    _unwrap_head_dtensor,
    scale_shard,
)

__all__ = [
    "VocabParallelCrossEntropyFunction",
    "VocabParallelLinearCrossEntropyFunction",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]

# Why the vocab-parallel ops refuse torch.func (forward-mode AD through torch.autograd's
# forward_ad works: their jvp all_reduces the shards' tangents).
_COLLECTIVES = ("its forward and backward run collectives on this rank's tensors, which "
                "torch.func's wrapped tensors cannot take part in; use torch.autograd (backward "
                "or forward_ad)")


def _local_row_stats(stats: torch.Tensor) -> torch.Tensor:
    """Merge the (N, S, 4) split partials of each row (max, Σexp, z_t, Σz) into (N, 4), the
    Σexp rescaled to the row's local max (an all −inf row keeps max −inf and Σexp 0)."""
    row_max = stats[..., 0].amax(dim=1)
    # all −inf: exp(−inf) = 0; a +inf: Σ exp = +inf, lse +inf (the kernels' lse_shift)
    shift = torch.where(torch.isinf(row_max), 0.0, row_max)
    return torch.stack(
        [row_max, (stats[..., 1] * torch.exp(stats[..., 0] - shift[:, None])).sum(dim=1),
         stats[..., 2].sum(dim=1), stats[..., 3].sum(dim=1)], dim=1)


def _global_row_stats(local: torch.Tensor, group) -> torch.Tensor:
    """The rows' statistics over every rank's classes, from this rank's (N, 4) ``local`` ones:
    ``all_reduce(MAX)`` of the N maxima, then Σexp rescaled to the global max, z_t and Σz as
    (N, 3) and one ``all_reduce(SUM)``. Returns (N, 1, 4) for ``cross_entropy_combine`` (one
    "split" per row), identical on every rank. Communication: 4·N floats per rank."""
    import torch.distributed as dist

    row_max = local[:, 0].clone()
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(torch.isinf(row_max), 0.0, row_max)
    sums = local[:, 1:].clone()
    sums[:, 0] *= torch.exp(local[:, 0] - shift)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return torch.cat([row_max[:, None], sums], dim=1)[:, None, :]


def _stats_options(options: CrossEntropyOptions) -> dict:
    """``cross_entropy_partial_stats``'s keywords: per-class weights, smoothing, transform."""
    ce = ce_launch_options(options)
    del ce["ignore_index"], ce["z_loss"]
    return ce


def _combine_options(options: CrossEntropyOptions) -> dict:
    """``cross_entropy_combine``'s keywords."""
    return dict(weight=options.weight, ignore_index=options.ignore_index,
                label_smoothing=options.label_smoothing, z_loss=options.z_loss)


def _local_kwargs(options: CrossEntropyOptions) -> dict:
    """The public functions' keywords for ``options``, those at their defaults left out (the
    one-rank path calls the local op with them)."""
    defaults = CrossEntropyOptions().as_kwargs()
    return {k: v for k, v in options.as_kwargs().items()
            if isinstance(v, torch.Tensor) or (v is not None and v != defaults[k])}


def _global_loss(merged, target, vocab_size, options, sdt):
    """(loss rows reduced as the options say, lse, divisor, z_scale) from the (N, 1, 4) global
    stats."""
    # The targets are replicated: every rank computes the same divisors, no collective.
    divisor, z_scale = loss_divisors(options, target, vocab_size, sdt)
    rows, lse = cross_entropy_combine(merged, target, vocab_size, z_scale=z_scale,
                                      **_combine_options(options))
    return reduce_rows(rows, options, divisor), lse, divisor, z_scale


def _check_inputs(input, target, options) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not input.dtype.is_floating_point:
        raise TypeError(f"input (logits) must be a floating tensor, got dtype={input.dtype}")
    if input.ndim != 2:
        raise ValueError(f"input must be this rank's (N, V_local) logits, got shape "
                         f"{tuple(input.shape)}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int32, torch.int64) or tuple(target.shape) != (input.shape[0],):
        raise ValueError(f"target must hold global class ids as an int32/int64 tensor of shape "
                         f"({input.shape[0]},), got dtype={target.dtype}, "
                         f"shape={tuple(target.shape)}")
    normalizer = options.normalizer if isinstance(options.normalizer, torch.Tensor) else None
    check_same_device(input=input, target=target, weight=options.weight, normalizer=normalizer)
    options.refuse_weight_grad()
    refuse_functorch("vocab_parallel_cross_entropy", _COLLECTIVES)


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """The split path with its collectives, for any group size (world size 1 included: the GPU
    test runs NCCL through it on one device). ``options`` is a :class:`CrossEntropyOptions`
    (``weight`` the global (V,) vector); :func:`vocab_parallel_cross_entropy` validates its
    arguments and sends world size 1 to the local op instead."""

    @staticmethod
    def forward(ctx, input, target, group, vocab_start, vocab_size, options, config,
                loss_dtype=None):
        sdt = accum_dtype(input)
        target = target.contiguous()
        # 1. Local partials: (N, S, 4) = (max z, Σ exp(z − max), z_t or 0, Σ w·z) per chunk.
        if input.shape[1] == 0:  # an empty shard contributes nothing (and launches nothing)
            stats = torch.zeros((input.shape[0], 1, 4), dtype=sdt, device=input.device)
            stats[..., 0] = float("-inf")
        else:
            stats = cross_entropy_partial_stats(input, target, vocab_start=vocab_start,
                                                config=config, **_stats_options(options))
        # 2. Global max, then the sums rescaled to it: two all_reduces of N and 3·N floats.
        merged = _global_row_stats(_local_row_stats(stats), group)
        # 3. Loss and lse from the global statistics (one "split" per row), same on every rank.
        loss, lse, divisor, z_scale = _global_loss(merged, target, vocab_size, options, sdt)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input, target, lse, divisor, z_scale)
        if forward_ad_possible():
            ctx.save_for_forward(input, target, lse, divisor, z_scale)
        ctx.vocab_start, ctx.vocab_size, ctx.options, ctx.config = (vocab_start, vocab_size,
                                                                    options, config)
        ctx.group = group
        return loss.to(loss_dtype or input.dtype)

    @staticmethod
    def jvp(ctx, input_dot, *_):
        """Forward-mode rule: this shard's ``Σ_c (∂loss/∂x_c) · ẋ_c`` (the gradient kernel for
        grad_output 1, in the math dtype), summed over the ranks by one all_reduce of N floats
        (``none``) or one."""
        import torch.distributed as dist

        input, target, lse, divisor, z_scale = ctx.saved_tensors
        math = lse.dtype
        none = ctx.options.reduction == "none"
        g = torch.ones(target.shape if none else (), dtype=math, device=input.device)
        slope = cross_entropy_grad(
            input, target, lse, g, vocab_start=ctx.vocab_start, n_classes=ctx.vocab_size,
            divisor=divisor, z_scale=z_scale, config=ctx.config,
            out=torch.empty(input.shape, dtype=math, device=input.device),
            **ce_launch_options(ctx.options))
        terms = slope * input_dot.to(math)
        tangent = terms.sum(1) if none else terms.sum()
        dist.all_reduce(tangent, op=dist.ReduceOp.SUM, group=ctx.group)
        return tangent.to(input.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        no_second_derivative("vocab_parallel_cross_entropy")
        none = (None,) * 7
        if grad_loss is None:
            return (None,) + none
        input, target, lse, divisor, z_scale = ctx.saved_tensors
        dx = cross_entropy_grad(input, target, lse, grad_loss, vocab_start=ctx.vocab_start,
                                n_classes=ctx.vocab_size, divisor=divisor, z_scale=z_scale,
                                config=ctx.config, **ce_launch_options(ctx.options))
        return (dx,) + none


def vocab_parallel_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    vocab_start_index: int | None = None,
    vocab_size: int | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float | torch.Tensor = 1.0,
    logit_divisor: float | torch.Tensor = 1.0,
    temperature: float | torch.Tensor = 1.0,
    normalizer: float | torch.Tensor | None = None,
    config: RowConfig | None = None,
    batch_invariant: bool = False,
) -> torch.Tensor:
    """Cross-entropy of logits split along the vocabulary over the ranks of ``group`` (default:
    the world). Every rank calls it with its shard and gets the same loss: the value of
    ``probact_gpu.cross_entropy`` on the logits concatenated in vocabulary order, with the same
    options (``weight``: the *global* (V,) per-class weights, the same on every rank;
    ``ignore_index``, ``reduction``, ``label_smoothing``: torch's semantics; ``z_loss``,
    ``softcap``, ``logit_scale``, ``logit_divisor``, ``temperature``, ``normalizer``: as
    ``probact_gpu.cross_entropy``).

    - ``input``: this rank's (N, V_local) logits, any strides, any float dtype (the same on
      every rank); shards may be uneven (V not divisible by the world size) or empty.
    - ``target``: (N,) int32/int64 *global* class ids, the same on every rank.
    - ``vocab_start_index``: the first global class of this shard. None: shards are in rank
      order, and the starts are the prefix sums of the V_local sizes, learnt with one
      all_gather of 4 integers per rank (read on the host: a device sync on NCCL).
    - ``vocab_size``: the global class count. When it and ``vocab_start_index`` are both given
      no layout collective runs at all (nothing is checked across ranks either); otherwise the
      layout exchange also checks that every rank has the same N and dtype and that the shards
      tile ``[0, V)``, raising the same ValueError on every rank.
    - ``config``: a launch override for the statistics and gradient kernels (tests, tuning).
    - ``batch_invariant``: the loss rows and lse are the bits ``cross_entropy(...,
      batch_invariant=True)`` gives on one device, at any group size, for shards that start
      and end on multiples of 128 classes (``distributed.batch_invariant``, docs/rl.md; no
      label smoothing; ``config`` unused).

    Communication per call: two all_reduces of N and 3·N floats (fp32, fp64 for fp64 logits):
    O(N) per rank, independent of V. The backward communicates nothing: it returns the gradient
    of this rank's shard only (the gradients of the other shards live on their ranks). Second
    derivatives are not supported (a backward with ``create_graph=True`` raises).

    Without an initialized process group, or with a group of one rank, this is the local op
    ``probact_gpu.cross_entropy(input, target, ...)`` (vocab_start_index must then be 0 or None).

    A 0-d tensor ``logit_scale`` / ``logit_divisor`` / ``temperature`` multiplies the shard in
    torch, as in ``cross_entropy``; its gradient is the whole one on every rank (each shard's
    part, summed by one all_reduce of a scalar in the backward, so the factor's
    ``requires_grad`` must agree across ranks).

    ``input`` may also be a DTensor on a 1-D device mesh sharded on its class dim
    (``Shard(-1)``, torch.chunk's layout), as ``vocab_parallel_token_log_probs`` takes: it is
    unwrapped to the local shard (``to_local()``: the gradient comes back as a DTensor of that
    placement), the group is the mesh's and the layout comes from the mesh and the global shape
    (no layout collective; leave ``group``, ``vocab_start_index`` and ``vocab_size`` None). The
    target and ``weight`` may be replicated DTensors or plain tensors; the loss is a plain
    tensor, the same on every rank.
    """
    if _is_dtensor(input):
        input, target, group, vocab_start_index, vocab_size = _unwrap_dtensor(
            input, target, group, vocab_start_index, vocab_size)
        weight = _replicated_local(weight, "weight")
    factor, transform = split_tensor_factors(logit_scale=logit_scale,
                                             logit_divisor=logit_divisor, softcap=softcap,
                                             temperature=temperature)
    options = CrossEntropyOptions.from_kwargs(
        weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, normalizer=normalizer, **transform)
    _check_inputs(input, target, options)
    _check_layout_args(vocab_start_index, vocab_size)
    if vocab_size is not None:
        options.check_weight(vocab_size, input.device)
    if batch_invariant and options.label_smoothing > 0.0:
        raise ValueError("label_smoothing is not supported with batch_invariant=True")
    world, vocab_start, n_classes = _group_layout(
        input.shape[0], input.shape[1], input.dtype, input.device, group, vocab_start_index,
        vocab_size, invariant=bool(batch_invariant))
    input = scale_shard(input, factor, group, world)
    if world == 1:
        return cross_entropy(input, target, **_local_kwargs(options),
                             batch_invariant=bool(batch_invariant))
    if input.numel() > 0:
        check_runnable(input)
    options.check_weight(n_classes, input.device)
    # autocast runs cross-entropy in float32: a float32 loss (the kernels' math is anyway)
    loss_dtype = torch.float32 if autocast_fp32("cross_entropy", input) else input.dtype
    if batch_invariant:
        from ..ops._autograd import refuse_transforms
        from .batch_invariant import InvariantVocabParallelCrossEntropyFunction

        refuse_transforms("vocab_parallel_cross_entropy(batch_invariant=True)",
                          input)
        loss = InvariantVocabParallelCrossEntropyFunction.apply(
            input, target, group, vocab_start, n_classes, options, False)[0]
        return loss.to(loss_dtype)
    return VocabParallelCrossEntropyFunction.apply(
        input, target, group, vocab_start, n_classes, options, config, loss_dtype)


# --------------------------------------------------------------------------- linear + CE


class VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """Fused linear + cross-entropy over a vocab-parallel LM head, for any group size (world
    size 1 included: the GPU test runs NCCL through it on one device). ``h`` is 2-D (N, H),
    ``linear_weight`` this rank's (V_local, H) rows, ``linear_bias`` its (V_local,) entries or
    None, ``target`` (N,) global ids; ``options`` a :class:`CrossEntropyOptions` (``weight`` the
    global (V,) vector); ``chunking`` = (chunk_size, memory_budget, config), as built by
    :func:`vocab_parallel_linear_cross_entropy`."""

    @staticmethod
    def forward(ctx, h, linear_weight, linear_bias, target, group, vocab_start, vocab_size,
                options, chunking, loss_dtype=None):
        chunk_size, memory_budget, config = chunking
        n_tokens, v_local = h.shape[0], linear_weight.shape[0]
        sdt = accum_dtype(h)
        target = target.contiguous()
        chunk = token_chunk(n_tokens, v_local, h.element_size(), chunk_size, memory_budget)
        # 1. Per token chunk: local logits (cuBLAS, one reused buffer) → split statistics →
        #    merged per row into (C, 4). An empty shard contributes (−inf, 0, 0, 0).
        local = torch.empty((n_tokens, 4), dtype=sdt, device=h.device)
        if v_local == 0:
            local.zero_()
            local[:, 0] = float("-inf")
        else:
            stats_opts = _stats_options(options)
            for start, end, logits in logits_chunks(h, linear_weight, linear_bias, chunk):
                stats = cross_entropy_partial_stats(
                    logits, target[start:end], vocab_start=vocab_start, config=config,
                    **stats_opts)
                local[start:end] = _local_row_stats(stats)
        # 2. The two all_reduces (N and 3·N floats) over every token at once; 3. the combine.
        merged = _global_row_stats(local, group)
        loss, lse, divisor, z_scale = _global_loss(merged, target, vocab_size, options, sdt)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h, linear_weight, linear_bias, target, lse, divisor, z_scale)
        if forward_ad_possible():
            ctx.save_for_forward(h, linear_weight, linear_bias, target, lse)
        ctx.group, ctx.vocab_start, ctx.vocab_size = group, vocab_start, vocab_size
        ctx.options, ctx.chunk, ctx.config = options, chunk, config
        return loss.to(loss_dtype or h.dtype)

    @staticmethod
    def jvp(ctx, h_dot, w_dot, b_dot, *_):
        """Forward-mode rule: this shard's share of the tangent (``linear_cross_entropy_jvp``
        over its classes), summed over the ranks by one all_reduce (N floats, or one)."""
        import torch.distributed as dist

        h, weight, bias, target, lse = ctx.saved_tensors
        tangent = linear_cross_entropy_jvp(
            h, weight, target, bias, lse, h_dot, w_dot, b_dot, options=ctx.options,
            chunk=ctx.chunk, vocab_start=ctx.vocab_start, n_classes=ctx.vocab_size)
        dist.all_reduce(tangent, op=dist.ReduceOp.SUM, group=ctx.group)
        return tangent.to(h.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        import torch.distributed as dist

        no_second_derivative("vocab_parallel_linear_cross_entropy")
        none = (None,) * 7
        if grad_loss is None:
            return (None,) * 3 + none
        h, weight, bias, target, lse, divisor, z_scale = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])  # (dh, dW, db); db implies a bias
        n_tokens, v_local = h.shape[0], weight.shape[0]
        elem = h.element_size()
        # Blocks of the shard's classes as large as a token chunk's (C, V_local) buffer; an
        # empty shard walks no block (dh_r is then zeros) and launches nothing.
        vocab_chunk = tiling.choose_vocab_chunk(n_tokens, v_local, elem,
                                                max(1, ctx.chunk * v_local * elem))
        ce = dict(ce_launch_options(ctx.options), divisor=divisor, z_scale=z_scale,
                  config=ctx.config)
        dh, dw, db = vocab_walk_bwd(h, weight, target, bias, lse, grad_loss.to(lse.dtype), ce,
                                    vocab_chunk, need, vocab_start=ctx.vocab_start,
                                    n_classes=ctx.vocab_size)
        if need[0]:  # dh = Σ_r dlogits_r @ W_r: the column-parallel input-gradient reduction
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=ctx.group)
        return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None) + none


def vocab_parallel_linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    group=None,
    vocab_start_index: int | None = None,
    vocab_size: int | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float | torch.Tensor = 1.0,
    logit_divisor: float | torch.Tensor = 1.0,
    temperature: float | torch.Tensor = 1.0,
    normalizer: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    config: RowConfig | None = None,
    batch_invariant: bool = False,
    fp32_precision: str = "ieee",
) -> torch.Tensor:
    """``probact_gpu.linear_cross_entropy(input, W, target, linear_bias=b, ...)`` for an LM head
    ``W`` (V, H) split along the vocabulary over the ranks of ``group`` (default: the world),
    without gathering ``W`` or holding the logits. Every rank calls it and gets the same loss.

    - ``input``: (…, H) hidden states, the *same* on every rank (replicated over the
      tensor-parallel group; its ``requires_grad`` must agree across ranks, since the backward's
      input-gradient all_reduce runs only when it is set).
    - ``linear_weight``: this rank's (V_local, H) rows of ``W`` (``nn.Linear`` layout; shards
      may be uneven or empty), the same dtype as ``input``; ``linear_bias``: its (V_local,)
      entries or None.
    - ``target``: (…) int32/int64 *global* class ids, the same on every rank (class
      probabilities are not supported here).
    - ``vocab_start_index`` / ``vocab_size``: as in :func:`vocab_parallel_cross_entropy` (None:
      shards in rank order, learnt with one all_gather of 5 integers per rank that also checks
      N, dtype and H agree; both given: no layout collective, nothing checked across ranks).
    - ``weight``: the *global* (V,) per-class weights, the same on every rank; the other
      options as ``probact_gpu.linear_cross_entropy``.
    - ``chunk_size`` (tokens) or ``memory_budget`` (bytes of (C, V_local) logits per chunk):
      the token chunk, as ``linear_cross_entropy``; ``config``: a launch override for the
      statistics and gradient kernels (tests, tuning).
    - ``batch_invariant`` / ``fp32_precision``: the fused head on this rank's rows; the loss
      rows are the bits ``linear_cross_entropy(..., batch_invariant=True)`` gives on one device
      (shards on multiples of 128 classes; ``distributed.batch_invariant``, docs/rl.md); dW and
      db are this shard's rows of one device's; dh is the ranks' partials' sum.

    Communication per call: forward, two all_reduces of N and 3·N floats (fp32; fp64 for fp64
    input); backward, one all_reduce(SUM) of the (N, H) input gradient in the input's dtype
    (N·H elements per rank) when ``input`` requires grad. The weight and bias gradients are
    local: each rank gets those of its own shard. Memory: one (C, V_local) logits buffer, the
    (N, 4) statistics, lse (N,), and in the backward a (N, V_b) block of logits as large as
    that buffer, an fp32 (N, H) dh accumulator and dW itself (no (V_local, H) fp32 buffer; each
    block's dW rows come from one GEMM over every token, rounded once). Second derivatives are
    not supported (a backward with ``create_graph=True`` raises).

    A 0-d tensor ``logit_scale`` / ``logit_divisor`` / ``temperature`` is folded into the
    input and the bias shard, as in ``linear_cross_entropy``; its gradient is the whole one on
    every rank (through the all-reduced dh, and the bias shards' parts summed by one
    all_reduce of a scalar), so its ``requires_grad`` must agree across ranks.

    Without an initialized process group, or with a group of one rank, this is the local
    ``probact_gpu.linear_cross_entropy`` (vocab_start_index must then be 0 or None). Returns
    the loss in ``input``'s dtype (per token, shaped like ``target``, for ``"none"``).

    ``linear_weight`` may also be a DTensor on a 1-D device mesh sharded on its class dim
    (``Shard(0)``, torch.chunk's layout; ``linear_bias`` then sharded the same way): it is
    unwrapped to this rank's rows (the gradients come back as DTensors of that placement), the
    group and layout come from the mesh and the global shape (leave ``group``,
    ``vocab_start_index`` and ``vocab_size`` None); ``input``, ``target`` and ``weight`` may be
    replicated DTensors or plain tensors.
    """
    if _is_dtensor(linear_weight):
        (input, linear_weight, linear_bias, target, group, vocab_start_index,
         vocab_size) = _unwrap_head_dtensor(input, linear_weight, linear_bias, target, group,
                                            vocab_start_index, vocab_size)
        weight = _replicated_local(weight, "weight")
    factor, transform = split_tensor_factors(logit_scale=logit_scale,
                                             logit_divisor=logit_divisor, softcap=softcap,
                                             temperature=temperature)
    options = CrossEntropyOptions.from_kwargs(
        weight=weight, ignore_index=-100 if ignore_index is None else ignore_index,
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
        normalizer=normalizer, **transform)
    chunk_size, memory_budget, _ = check_chunking(chunk_size, memory_budget)
    _check_layout_args(vocab_start_index, vocab_size)
    # autocast: the head in the autocast dtype and a float32 loss, as F.linear + F.cross_entropy
    input, linear_weight, linear_bias = autocast_linear(input, linear_weight, linear_bias)
    n_weights = None if options.weight is None else (vocab_size or options.weight.shape[0])
    check_head_inputs(input, linear_weight, target, linear_bias, options,
                      allow_probabilities=False, n_classes=n_weights)
    options.refuse_weight_grad()
    refuse_functorch("vocab_parallel_linear_cross_entropy", _COLLECTIVES)
    h, batch_shape = flatten_head_input(input, linear_weight.shape[1])
    from ..ops.fused_head import check_fp32_precision

    check_fp32_precision(fp32_precision, batch_invariant)
    if batch_invariant and options.label_smoothing > 0.0:
        raise ValueError("label_smoothing is not supported with batch_invariant=True")
    world, vocab_start, n_classes = _group_layout(
        h.shape[0], linear_weight.shape[0], h.dtype, h.device, group, vocab_start_index,
        vocab_size, n_hidden=h.shape[1], invariant=bool(batch_invariant))
    if world == 1:
        input, linear_bias = fold_head_factor(input, linear_bias, factor)
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                    **_local_kwargs(options), chunk_size=chunk_size,
                                    memory_budget=memory_budget,
                                    batch_invariant=bool(batch_invariant),
                                    fp32_precision=fp32_precision)
    if h.shape[0] > 0:
        check_runnable(h)
    options.check_weight(n_classes, h.device)
    # a tensor factor: the replicated h times it (its dh is all-reduced in the backward, so the
    # factor's gradient through it is whole on every rank), the bias shard by scale_shard
    h = scale_by_factor(h, factor)
    linear_bias = scale_shard(linear_bias, factor, group, world, "linear_bias")
    loss_dtype = torch.float32 if autocast_fp32("cross_entropy", h) else h.dtype
    if batch_invariant:
        from ..ops._autograd import refuse_transforms
        from .batch_invariant import InvariantVocabParallelLinearCrossEntropyFunction

        refuse_transforms("vocab_parallel_linear_cross_entropy(batch_invariant=True)",
                          h, linear_weight, linear_bias)
        loss = InvariantVocabParallelLinearCrossEntropyFunction.apply(
            h, linear_weight, linear_bias, target.reshape(-1), group, vocab_start, n_classes,
            options, False, fp32_precision, chunk_size, memory_budget)[0].to(loss_dtype)
        return loss.reshape(batch_shape) if options.reduction == "none" else loss
    loss = VocabParallelLinearCrossEntropyFunction.apply(
        h, linear_weight, linear_bias, target.reshape(-1), group, vocab_start, n_classes,
        options, (chunk_size, memory_budget, config), loss_dtype)
    return loss.reshape(batch_shape) if options.reduction == "none" else loss
