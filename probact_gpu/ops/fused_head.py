"""The fused LM head of the batch-invariant mode: token log-probs (and entropy, lse, argmax) and
cross-entropy of ``input @ linear_weight.T + linear_bias`` from one Triton GEMM kernel that
consumes each (tokens × 128 classes) tile of logits on chip (``kernels/head_gemm.py``) — the
logits are never rounded to the input's dtype and never stored, not even a chunk of them.

Read top-down: launchers (``fused_head_fwd`` / ``fused_head_bwd``, also one rank's shard of the
vocab-parallel forms, with ``vocab_start`` and a process group), the per-token gradient
coefficients, the ``probact_gpu::fused_token_log_probs`` and ``probact_gpu::fused_linear_
cross_entropy`` torch.library ops with fake implementations (``torch.compile(fullgraph=True)``
traces them) and their autograd. The public functions are ``linear_token_log_probs`` and
``linear_cross_entropy`` with ``batch_invariant=True``; docs/rl.md has the contract.

**Forward** (1 GEMM): the tokens that need a row are put first (``active_order``: a stable sort
of ``target == ignore_index`` on the device, so ignored tokens cost no GEMM work and no host
sync finds them), then per chunk of tokens the GEMM kernel writes each token's tile states
(12 B a token and tile) and target logit, ``ops._invariant`` merges the tiles exactly and
forms the outputs in float64. With ``lse`` or ``argmax`` asked for every row, every token is
computed.

**Backward** (3 GEMMs), over the shard's classes in chunks of ``V_c`` (``tiling.fused_head_
vocab_chunk``): dz of every active token over the chunk (the logits recomputed, bit for bit),
written in the input's dtype; ``dh += dz @ W[chunk]`` tile by tile in fp32, carried between
chunks; ``dW[chunk] = dz.T @ h`` over every active token in one fixed order, rounded once;
``db`` likewise. No atomics: every gradient is the same bits for any chunking, run after run.

**Memory** beyond inputs, outputs and gradients: the (C, tiles, 3) fp32 tile states of a token
chunk and the (N, V_c) dz block (both within ``memory_budget``, default
``tiling.FUSED_HEAD_BUDGET``), an (N, H) fp32 dh carry when there is more than one vocabulary
chunk, and O(N) per-token vectors. Never a (tokens × V) buffer.

**fp32 inputs** (``fp32_precision``): ``"ieee"`` multiplies in IEEE fp32 (CUDA-core fmas);
``"bf16x3"`` splits each operand into bf16 hi + lo and sums three tensor-core products
(hi·hi + hi·lo + lo·hi): fp32 master weights at tensor-core speed, its error against float64
measured in docs/rl.md. Never tf32.
"""

from __future__ import annotations

import torch

from .. import tiling
from .._runtime import accum_dtype, check_runnable, empty, launch
from ..kernels.head_gemm import (
    SPLIT_BF16X3,
    SPLIT_BF16X6,
    SPLIT_NONE,
    head_gemm_bwd_dh_kernel,
    head_gemm_bwd_dw_kernel,
    head_gemm_bwd_dz_kernel,
    head_gemm_fwd_kernel,
)
from ..options import CrossEntropyOptions, HeadTransform
from ._common import fake_linear_grads, no_second_derivative
from ._invariant import (
    RowSums,
    concat_sums,
    empty_states,
    finish_rows,
    n_stats,
    permute_rows,
    reduce_tile_states,
)

__all__ = [
    "FP32_PRECISIONS",
    "active_order",
    "check_fp32_precision",
    "cross_entropy_coefficients",
    "fused_head_bwd",
    "fused_head_fwd",
    "fused_head_rows",
    "token_log_probs_coefficients",
]

FP32_PRECISIONS = ("ieee", "bf16x3", "bf16x6")


def check_fp32_precision(value, batch_invariant: bool = True) -> str:
    """``fp32_precision`` validated: one of ``FP32_PRECISIONS``, a split only with the fused
    head (``batch_invariant=True``; the default path multiplies with torch's matmul)."""
    if not isinstance(value, str) or value not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {value!r}")
    if value != "ieee" and not batch_invariant:
        raise ValueError(f"fp32_precision={value!r} applies to the fused head: pass "
                         "batch_invariant=True with it")
    return value


def _split(h: torch.Tensor, fp32_precision: str) -> int:
    """The kernels' SPLIT constexpr: a bf16 split for fp32 inputs when asked."""
    if h.dtype != torch.float32:
        return SPLIT_NONE
    return {"ieee": SPLIT_NONE, "bf16x3": SPLIT_BF16X3, "bf16x6": SPLIT_BF16X6}[fp32_precision]


def _unit_stride(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias as the kernels read it (element c at ``bias_ptr + c``): a strided view is
    copied (V elements)."""
    return bias if bias is None or bias.stride(0) == 1 else bias.contiguous()


# --------------------------------------------------------------------------- launchers


def active_order(target: torch.Tensor, ignore_index: int, all_rows: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, count): the token rows in slot order, the tokens whose target is not
    ``ignore_index`` first (a stable sort, on the device), and how many those are, a (1,) int64
    device tensor. With ``all_rows`` every token is active (order is 0..N−1)."""
    n = target.shape[0]
    if all_rows:
        order = torch.arange(n, dtype=torch.int64, device=target.device)
        return order, torch.full((1,), n, dtype=torch.int64, device=target.device)
    skip = target == ignore_index
    order = torch.argsort(skip.to(torch.uint8), stable=True)
    return order, (n - skip.sum(dtype=torch.int64)).reshape(1)


def fused_head_fwd(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   target: torch.Tensor, *, ignore_index: int, transform: HeadTransform,
                   compute_entropy: bool, compute_argmax: bool, all_rows: bool,
                   vocab_start: int = 0, fp32_precision: str = "ieee",
                   chunk_size: int | None = None, budget: int | None = None, group=None,
                   n_classes_global: int | None = None) -> tuple[RowSums, torch.Tensor]:
    """The rows' exact sums (``ops._invariant.RowSums``, in token order) of the logits ``h @
    weight.T (+ bias)`` of 2-D ``h`` (N, H) and flat global ``target``, and the bool (N,) of
    tokens computed. ``weight`` holds global classes ``[vocab_start, vocab_start + V_local)``;
    with ``group`` the sums are every rank's (``reduce_tile_states``); ``n_classes_global``
    (the whole vocabulary) sizes the token chunks so that every rank runs the same number of
    collectives."""
    n_tokens, n_hidden = h.shape
    v_local = weight.shape[0]
    cfg = tiling.head_gemm_config(h.element_size())
    sdt, device = accum_dtype(h), h.device
    bias = _unit_stride(bias)
    order, count = active_order(target, ignore_index, all_rows)
    computed = (torch.ones_like(target, dtype=torch.bool) if all_rows
                else target != ignore_index)
    n_tiles = tiling.invariant_tiles(v_local)
    sizing_tiles = tiling.invariant_tiles(n_classes_global or v_local)
    chunk = tiling.fused_head_token_chunk(n_tokens, sizing_tiles, n_stats(compute_entropy),
                                          cfg.block_m, budget)
    if chunk_size is not None:
        chunk = tiling.cdiv(chunk_size, cfg.block_m) * cfg.block_m
    parts = []
    for start in range(0, max(n_tokens, 1), chunk):
        n_slots = min(chunk, n_tokens - start)
        states = empty_states(n_slots, n_tiles, sdt, device, compute_entropy, compute_argmax)
        if n_slots > 0 and n_tiles > 0:
            grid = (tiling.cdiv(n_slots, cfg.block_m) * n_tiles,)
            launch(head_gemm_fwd_kernel, grid,
                   (h, weight, weight if bias is None else bias, target, order, count,
                    states.stats, states.stats if states.arg is None else states.arg,
                    states.z_t, start, n_slots, n_hidden, v_local, vocab_start, *h.stride(),
                    *weight.stride(), *transform.kernel_factors),
                   path="fused", num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                   BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, GROUP_M=tiling.HEAD_GEMM_GROUP_M,
                   HEAD=transform.kernel_mode, HAS_BIAS=bias is not None,
                   SPLIT=_split(h, fp32_precision), N_STATS=n_stats(compute_entropy),
                   COMPUTE_ENTROPY=compute_entropy, COMPUTE_ARGMAX=compute_argmax)
        parts.append(reduce_tile_states(states, tile_start=vocab_start // tiling.INVARIANT_TILE,
                                        compute_entropy=compute_entropy,
                                        compute_argmax=compute_argmax, group=group))
    return permute_rows(concat_sums(parts), order), computed


def fused_head_rows(sums: RowSums, computed: torch.Tensor, target: torch.Tensor, *,
                    n_classes: int, ignore_index: int, compute_entropy: bool,
                    dtype: torch.dtype):
    """(logp, entropy | None, lse, argmax | None, stats) of the rows from ``fused_head_fwd``'s
    sums (``ops._invariant.finish_rows``; tokens not computed: lse NaN, argmax −1)."""
    logp, entropy, lse, stats = finish_rows(
        sums, target.to(torch.int64), n_classes=n_classes, ignore_index=ignore_index,
        compute_entropy=compute_entropy, dtype=dtype, computed=computed)
    arg = sums.argmax
    if arg is not None:
        arg = torch.where(computed, arg, -1)
    return logp, entropy, lse, arg, stats


def fused_head_bwd(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   target: torch.Tensor, stats: torch.Tensor, coef: torch.Tensor, *,
                   ignore_index: int,
                   transform: HeadTransform, need: tuple[bool, bool, bool],
                   has_entropy_term: bool, vocab_start: int = 0, fp32_precision: str = "ieee",
                   budget: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dW, db) — empty tensors where not in ``need`` — of the head for per-token
    coefficients ``coef`` (N, 3) = (A, B, D) and statistics ``stats`` (N, 3) (module
    docstring). Tokens whose target is ``ignore_index`` cost nothing and get dh = 0. dh is this
    shard's part when ``weight`` is one rank's rows (the caller reduces it)."""
    n_tokens, n_hidden = h.shape
    v_local = weight.shape[0]
    need_dh, need_dw, need_db = need
    dh = empty(h.shape, h.dtype, h.device) if need_dh else h.new_empty(0)
    # dW is written (V_local, H) contiguous: its row stride is H
    dw = empty(weight.shape, weight.dtype, weight.device) if need_dw else weight.new_empty(0)
    db = empty(bias.shape, bias.dtype, bias.device) if need_db else weight.new_empty(0)
    if not any(need):
        return dh, dw, db
    if n_tokens == 0 or v_local == 0:
        for g, on in ((dh, need_dh), (dw, need_dw), (db, need_db)):
            if on:
                g.zero_()
        return dh, dw, db
    cfg = tiling.head_gemm_config(h.element_size())
    split = _split(h, fp32_precision)
    bias = _unit_stride(bias)
    order, count = active_order(target, ignore_index, all_rows=False)
    chunk = tiling.fused_head_vocab_chunk(n_tokens, v_local, h.element_size(), budget)
    dz = torch.empty((n_tokens, min(chunk, v_local)), dtype=h.dtype, device=h.device)
    many = chunk < v_local
    carry = (torch.empty((n_tokens, n_hidden), dtype=accum_dtype(h), device=h.device)
             if need_dh and many else dz)
    for c0 in range(0, v_local, chunk):
        cols = min(chunk, v_local - c0)
        tiles = tiling.invariant_tiles(cols)
        launch(head_gemm_bwd_dz_kernel, (tiling.cdiv(n_tokens, cfg.block_m) * tiles,),
               (h, weight, weight if bias is None else bias, target, order, count, stats, coef,
                dz, n_tokens, n_hidden, v_local, vocab_start, c0, cols, *h.stride(),
                *weight.stride(), dz.stride(0), *transform.kernel_factors),
               path="fused", num_warps=cfg.num_warps, num_stages=cfg.num_stages,
               BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, GROUP_M=tiling.HEAD_GEMM_GROUP_M,
               HEAD=transform.kernel_mode, HAS_BIAS=bias is not None, SPLIT=split,
               HAS_ENTROPY_TERM=has_entropy_term)
        if need_dh and n_hidden:
            grid = (tiling.cdiv(n_tokens, cfg.block_m), tiling.cdiv(n_hidden, cfg.block_h))
            launch(head_gemm_bwd_dh_kernel, grid,
                   (dz, weight, order, count, carry, dh, n_tokens, n_hidden, v_local, c0, cols,
                    dz.stride(0), *weight.stride(), dh.stride(0)),
                   path="fused", num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                   BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_H=cfg.block_h, SPLIT=split,
                   FIRST=c0 == 0, LAST=c0 + cols == v_local)
        if need_dw or need_db:
            # at least one hidden block: db is formed by block 0 even when H is 0
            grid = (tiles, max(1, tiling.cdiv(n_hidden, cfg.block_h)) if need_dw else 1)
            launch(head_gemm_bwd_dw_kernel, grid,
                   (dz, h, order, count, dw if need_dw else dz, db if need_db else dz,
                    n_tokens, n_hidden, v_local, c0, cols, dz.stride(0), *h.stride(),
                    n_hidden),
                   path="fused", num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                   BLOCK_M=cfg.block_m, BLOCK_H=cfg.block_h, SPLIT=split,
                   HAS_WEIGHT_GRAD=need_dw, HAS_BIAS_GRAD=need_db)
    return dh, dw, db


# --------------------------------------------------------------------------- coefficients
# dz_c = A·p_c − B·[c = t] − D·p_c·(z_c − shift − μ) per token (kernels/head_gemm.py).


def token_log_probs_coefficients(grad_logp, grad_entropy, target, n_classes, dtype):
    """(N, 3) coefficients (A, B, D) of ``d(Σ g_logp·logp + Σ g_H·H)/dz``: A = B = −g_logp
    (NaN for a target outside [0, n_classes): its log-prob is NaN), D = g_H."""
    coef = torch.zeros((target.shape[0], 3), dtype=dtype, device=target.device)
    if grad_logp is not None:
        in_range = (target >= 0) & (target < n_classes)
        g = torch.where(in_range, grad_logp.to(dtype), float("nan"))
        coef[:, 0] = -g
        coef[:, 1] = -g
    if grad_entropy is not None:
        coef[:, 2] = grad_entropy.to(dtype)
    return coef


def cross_entropy_coefficients(grad_rows, target, lse, options: CrossEntropyOptions, n_classes,
                               dtype, z_scale=None):
    """(N, 3) coefficients (A, B, D) of ``d(Σ g_row·loss_row)/dz`` for ``loss_row =
    w_t·(lse − z_t) + λ·lse²``: A = g·(w_t + 2λ·lse), B = g·w_t (NaN for a target outside
    [0, n_classes)), D = 0; ``grad_rows`` (N,) the per-row upstream gradient (already divided
    by a mean's divisor); ``z_scale`` scales λ (a weighted mean's, ``ce_grad_rows``)."""
    valid = target != options.ignore_index
    in_range = (target >= 0) & (target < n_classes)
    safe = torch.where(in_range, target, 0)
    w_t = (options.weight.to(dtype)[safe] if options.weight is not None
           else torch.ones_like(lse, dtype=dtype))
    w_t = torch.where(in_range, w_t, float("nan"))
    g = torch.where(valid, grad_rows.to(dtype), 0.0)
    coef = torch.zeros((target.shape[0], 3), dtype=dtype, device=target.device)
    zeta = options.z_loss if z_scale is None else options.z_loss * z_scale.to(dtype)
    coef[:, 0] = g * (w_t + 2.0 * zeta * lse.to(dtype))
    coef[:, 1] = g * w_t
    return torch.where(valid[:, None], coef, 0.0)


# --------------------------------------------------------------------------- custom ops
# The transform crosses the torch.library boundary as its four numbers; outputs not asked for
# are empty (0,) tensors (schemas have no optional outputs), as the other token log-probs ops.


def _transform(logit_scale, logit_divisor, softcap, temperature) -> HeadTransform:
    return HeadTransform(logit_scale, logit_divisor, softcap, temperature)


@torch.library.custom_op("probact_gpu::fused_token_log_probs", mutates_args=())
def _ftlp_op(
    h: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
    linear_bias: torch.Tensor | None, ignore_index: int, logit_scale: float,
    logit_divisor: float, softcap: float | None, temperature: float, compute_entropy: bool,
    compute_argmax: bool, all_rows: bool, save_stats: bool, fp32_precision: str,
    chunk_size: int | None, budget: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse, argmax, stats) of 2-D ``h`` (N, H) and flat ``target`` (N,) by the
    fused head (module docstring); an output not asked for is an empty (0,) tensor."""
    from .token_log_probs import absent_as_empty

    if h.shape[0] > 0:
        check_runnable(h, "input")
    sums, computed = fused_head_fwd(
        h, linear_weight, linear_bias, target, ignore_index=ignore_index,
        transform=_transform(logit_scale, logit_divisor, softcap, temperature),
        compute_entropy=compute_entropy, compute_argmax=compute_argmax, all_rows=all_rows,
        fp32_precision=fp32_precision, chunk_size=chunk_size, budget=budget)
    logp, entropy, lse, arg, stats = fused_head_rows(
        sums, computed, target, n_classes=linear_weight.shape[0], ignore_index=ignore_index,
        compute_entropy=compute_entropy, dtype=accum_dtype(h))
    return absent_as_empty(h, logp, entropy, lse, arg, stats if save_stats else None)


@_ftlp_op.register_fake
def _(h, linear_weight, target, linear_bias, ignore_index, logit_scale, logit_divisor, softcap,
      temperature, compute_entropy, compute_argmax, all_rows, save_stats, fp32_precision,
      chunk_size, budget):
    from .token_log_probs import fake_outputs

    return fake_outputs(h, h.shape[:1], compute_entropy, compute_argmax, save_stats)


@torch.library.custom_op("probact_gpu::fused_token_log_probs_bwd", mutates_args=())
def _ftlp_bwd_op(
    h: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
    linear_bias: torch.Tensor | None, stats: torch.Tensor, grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None, ignore_index: int, logit_scale: float,
    logit_divisor: float, softcap: float | None, temperature: float, fp32_precision: str,
    budget: int | None, need_grads: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dW, db), an empty tensor for each not in ``need_grads``."""
    coef = token_log_probs_coefficients(grad_logp, grad_entropy, target,
                                        linear_weight.shape[0], stats.dtype)
    return fused_head_bwd(
        h, linear_weight, linear_bias, target, stats, coef, ignore_index=ignore_index,
        transform=_transform(logit_scale, logit_divisor, softcap, temperature),
        need=tuple(need_grads), has_entropy_term=grad_entropy is not None,
        fp32_precision=fp32_precision, budget=budget)


@_ftlp_bwd_op.register_fake
def _(h, linear_weight, target, linear_bias, stats, grad_logp, grad_entropy, *args):
    return fake_linear_grads(h, linear_weight, linear_bias, args[-1])


def _ftlp_setup_context(ctx, inputs, output):
    h, weight, target, bias = inputs[:4]
    _, _, lse, arg, stats = output
    ctx.mark_non_differentiable(lse, arg, stats)
    ctx.set_materialize_grads(False)  # lse and argmax never get a zero-filled gradient
    ctx.save_for_backward(h, weight, bias, target, stats)
    ctx.fwd_args = inputs[4:]


def _ftlp_backward(ctx, grad_logp, grad_entropy, grad_lse, grad_arg, grad_stats):
    no_second_derivative("linear_token_log_probs")
    none = (None,) * 12
    if grad_logp is None and grad_entropy is None:
        return (None,) * 4 + none
    h, weight, bias, target, stats = ctx.saved_tensors
    (ignore_index, logit_scale, logit_divisor, softcap, temperature, compute_entropy,
     compute_argmax, all_rows, save_stats, fp32_precision, chunk_size, budget) = ctx.fwd_args
    if stats.ndim == 1:  # the op ran with save_stats=False: recompute the statistics
        stats = _ftlp_op(h, weight, target, bias, ignore_index, logit_scale, logit_divisor,
                         softcap, temperature, grad_entropy is not None, False, False, True,
                         fp32_precision, chunk_size, budget)[-1]
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[3]]
    dh, dw, db = _ftlp_bwd_op(
        h, weight, target, bias, stats, None if grad_logp is None else grad_logp.contiguous(),
        None if grad_entropy is None else grad_entropy.contiguous(), ignore_index,
        logit_scale, logit_divisor, softcap, temperature, fp32_precision, budget, need)
    return (dh if need[0] else None, dw if need[1] else None, None,
            db if need[2] else None) + none


torch.library.register_autograd("probact_gpu::fused_token_log_probs", _ftlp_backward,
                                setup_context=_ftlp_setup_context)


def fused_token_log_probs(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                          bias: torch.Tensor | None, *, ignore_index: int,
                          transform: HeadTransform, compute_entropy: bool, compute_argmax: bool,
                          all_rows: bool, needs_grad: bool, fp32_precision: str,
                          chunk_size: int | None, budget: int | None):
    """The op for validated 2-D ``h`` and flat contiguous ``target``: (logp, entropy, lse,
    argmax, stats) as ``linear_token_log_probs(batch_invariant=True)`` returns them."""
    return _ftlp_op(h, weight, target, bias, ignore_index, transform.logit_scale,
                    transform.logit_divisor, transform.softcap, transform.temperature,
                    compute_entropy, compute_argmax, all_rows, needs_grad, fp32_precision,
                    chunk_size, budget)


# --------------------------------------------------------------------------- cross-entropy


@torch.library.custom_op("probact_gpu::fused_linear_cross_entropy", mutates_args=())
def _flce_op(
    h: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
    linear_bias: torch.Tensor | None, weight: torch.Tensor | None, ignore_index: int,
    reduction: str, label_smoothing: float, z_loss: float, logit_scale: float,
    logit_divisor: float, softcap: float | None, temperature: float,
    normalizer: torch.Tensor | None, normalizer_value: float | None, compute_argmax: bool,
    fp32_precision: str, chunk_size: int | None, budget: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, z-loss term, argmax, stats) of class-index cross-entropy of the fused head:
    loss and z-loss term reduced as ``reduction`` says, lse (N,) (NaN on ignored tokens unless
    ``compute_argmax``, which computes every token), argmax (N,) or an empty (0,) tensor,
    stats (N, 3) for the backward."""
    from ._common import reduce_ce_rows
    from ._invariant import cross_entropy_rows, exact_rows

    opts = CrossEntropyOptions.from_schema(weight, ignore_index, reduction, label_smoothing,
                                           z_loss, logit_scale, logit_divisor, softcap,
                                           temperature, normalizer, normalizer_value)
    if h.shape[0] > 0:
        check_runnable(h, "input")
    n_classes = linear_weight.shape[0]
    sdt = accum_dtype(h)
    sums, computed = fused_head_fwd(
        h, linear_weight, linear_bias, target, ignore_index=ignore_index,
        transform=opts.transform, compute_entropy=False, compute_argmax=compute_argmax,
        all_rows=compute_argmax, fp32_precision=fp32_precision, chunk_size=chunk_size,
        budget=budget)
    rows = exact_rows(sums)
    loss_rows, zl_rows, lse = cross_entropy_rows(
        rows, target, n_classes=n_classes, ignore_index=ignore_index, weight=weight,
        z_loss=z_loss, dtype=sdt)
    loss, zl = reduce_ce_rows(loss_rows, zl_rows, opts, target, n_classes, sdt)
    lse = torch.where(computed, lse, float("nan"))
    stats = torch.where(computed[:, None], rows.stats(sdt), 0.0)
    arg = (torch.where(computed, sums.argmax, -1) if compute_argmax
           else h.new_empty(0, dtype=torch.int64))
    return loss, lse, zl, arg, stats


@_flce_op.register_fake
def _(h, linear_weight, target, linear_bias, weight, ignore_index, reduction, *args):
    compute_argmax = args[-4]
    sdt = accum_dtype(h)
    n = h.shape[0]
    loss_shape = (n,) if reduction == "none" else ()
    return (h.new_empty(loss_shape, dtype=sdt), h.new_empty((n,), dtype=sdt),
            h.new_empty(loss_shape, dtype=sdt),
            h.new_empty((n,) if compute_argmax else (0,), dtype=torch.int64),
            h.new_empty((n, 3), dtype=sdt))


@torch.library.custom_op("probact_gpu::fused_linear_cross_entropy_bwd", mutates_args=())
def _flce_bwd_op(
    h: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
    linear_bias: torch.Tensor | None, lse: torch.Tensor, stats: torch.Tensor,
    grad_output: torch.Tensor, weight: torch.Tensor | None, ignore_index: int, reduction: str,
    label_smoothing: float, z_loss: float, logit_scale: float, logit_divisor: float,
    softcap: float | None, temperature: float, normalizer: torch.Tensor | None,
    normalizer_value: float | None, fp32_precision: str, budget: int | None,
    need_grads: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dW, db) of the loss for ``grad_output`` (0-d, or (N,) for ``reduction="none"``),
    an empty tensor for each not in ``need_grads``."""
    from ._common import ce_grad_rows

    opts = CrossEntropyOptions.from_schema(weight, ignore_index, reduction, label_smoothing,
                                           z_loss, logit_scale, logit_divisor, softcap,
                                           temperature, normalizer, normalizer_value)
    sdt = stats.dtype
    g, z_scale = ce_grad_rows(grad_output, target, opts, linear_weight.shape[0], sdt)
    coef = cross_entropy_coefficients(g, target, lse, opts, linear_weight.shape[0], sdt,
                                      z_scale)
    return fused_head_bwd(
        h, linear_weight, linear_bias, target, stats, coef, ignore_index=ignore_index,
        transform=opts.transform, need=tuple(need_grads), has_entropy_term=False,
        fp32_precision=fp32_precision, budget=budget)


@_flce_bwd_op.register_fake
def _(h, linear_weight, target, linear_bias, *args):
    return fake_linear_grads(h, linear_weight, linear_bias, args[-1])


def _flce_setup_context(ctx, inputs, output):
    h, weight, target, bias = inputs[:4]
    _, lse, zl, arg, stats = output
    ctx.mark_non_differentiable(lse, zl, arg, stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h, weight, target, bias, lse, stats, inputs[4], inputs[13])
    ctx.fwd_args = inputs[4:]


def _flce_backward(ctx, grad_loss, grad_lse, grad_zl, grad_arg, grad_stats):
    no_second_derivative("linear_cross_entropy")
    none = (None,) * 15
    if grad_loss is None:
        return (None,) * 4 + none
    h, weight, target, bias, lse, stats, class_weight, normalizer = ctx.saved_tensors
    (_, ignore_index, reduction, label_smoothing, z_loss, scale, divisor, softcap, temperature,
     _, normalizer_value, _, fp32_precision, _, budget) = ctx.fwd_args
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[3]]
    dh, dw, db = _flce_bwd_op(
        h, weight, target, bias, lse, stats, grad_loss, class_weight, ignore_index, reduction,
        label_smoothing, z_loss, scale, divisor, softcap, temperature, normalizer,
        normalizer_value, fp32_precision, budget, need)
    return (dh if need[0] else None, dw if need[1] else None, None,
            db if need[2] else None) + none


torch.library.register_autograd("probact_gpu::fused_linear_cross_entropy", _flce_backward,
                                setup_context=_flce_setup_context)


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None, options: CrossEntropyOptions, *,
                               compute_argmax: bool, fp32_precision: str,
                               chunk_size: int | None, budget: int | None):
    """The op for validated 2-D ``h`` and flat contiguous class-index ``target``: (loss, lse,
    z-loss term, argmax, stats) as ``linear_cross_entropy(batch_invariant=True)`` uses them."""
    if options.label_smoothing > 0.0:
        raise ValueError("label_smoothing is not supported with batch_invariant=True (its "
                         "Σ_c w_c·z_c would need a third exact sum); use label_smoothing=0")
    return _flce_op(h, weight, target, bias, *options.schema_args(), compute_argmax,
                    fp32_precision, chunk_size, budget)
