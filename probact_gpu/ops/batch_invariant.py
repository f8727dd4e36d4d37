"""``batch_invariant=True`` on given logits: token log-probs and cross-entropy whose every
per-token output is the same bits whatever the batch, the launch or the split of the
vocabulary (docs/rl.md). The forward reduces each row in fixed tiles merged exactly
(``ops._invariant``: one read of the logits, the tile states (12 B a row and tile) written and
read once); the backward is elementwise from the rows' saved statistics
(``kernels/_invariant.py``'s ``invariant_bwd_kernel``: one read, one write of the logits).

Read top-down: the launchers (``coef_bwd``, ``target_logits``, reused by the ``(…, K)`` index
of ``token_log_probs`` and the vocab-parallel forms), the ``probact_gpu::invariant_token_log_
probs``, ``probact_gpu::invariant_cross_entropy`` and ``probact_gpu::coef_bwd`` torch.library
ops with fake implementations, and their autograd. The public functions are
``token_log_probs`` and ``cross_entropy`` with ``batch_invariant=True``.
"""

from __future__ import annotations

import torch

from .. import tiling
from .._runtime import accum_dtype, check_runnable, empty, launch, row_view
from ..kernels._invariant import invariant_bwd_kernel, target_logits_kernel
from ..options import CrossEntropyOptions, HeadTransform
from ._common import ce_grad_rows, no_second_derivative, reduce_ce_rows
from ._invariant import (
    cross_entropy_rows,
    exact_rows,
    invariant_tile_stats,
    reduce_tile_states,
    token_rows,
)

__all__ = ["coef_bwd", "target_logits"]

# Rows × columns a program of the elementwise backward writes (any tile gives the same bits):
# 8 × 512 is 16 values a thread at 8 warps (108 registers at sm_90 for bf16); fp64 halves the
# columns (8 × 512 took 255 registers and a 32 B stack).
_BWD_ROWS, _BWD_BLOCK = 8, 512


# --------------------------------------------------------------------------- launchers


def target_logits(logits: torch.Tensor, target: torch.Tensor, transform: HeadTransform, *,
                  dim: int = -1) -> torch.Tensor:
    """The transformed logit at each target: ``logits`` rows along ``dim``, ``target`` (rows,
    K) global ids; (rows, K) in the math dtype, 0 where a target is outside the row."""
    xv = row_view(logits, dim % logits.ndim)
    n_targets = target.shape[1]
    out = empty((xv.n_rows, n_targets), accum_dtype(logits), logits.device)
    if out.numel() == 0:
        return out
    block = 256
    launch(target_logits_kernel, (tiling.cdiv(out.numel(), block),),
           (xv.tensor, target, out, xv.n_rows, xv.n_cols, xv.n_inner, n_targets,
            target.stride(0), *xv.strides, *transform.kernel_factors),
           path="invariant", num_warps=4, BLOCK=block, HEAD=transform.kernel_mode)
    return out


def coef_bwd(logits: torch.Tensor, target: torch.Tensor, stats: torch.Tensor,
             coef: torch.Tensor, coef_b: torch.Tensor, *, transform: HeadTransform,
             has_entropy_term: bool, vocab_start: int = 0, dim: int = -1) -> torch.Tensor:
    """dlogits = chain(A·p − Σ_k B_k·[c = t_k] − D·p·(z − shift − μ)) of ``logits`` (rows
    along ``dim``) from the rows' ``stats`` (N, 3), ``coef`` (N, 3) = (A, ·, D), ``coef_b``
    (N, K) and ``target`` (N, K) global ids; a new tensor shaped like ``logits``."""
    out = empty(logits.shape, logits.dtype, logits.device)
    dim = dim % logits.ndim
    xv, dxv = row_view(logits, dim), row_view(out, dim)
    if xv.n_rows == 0 or xv.n_cols == 0:
        return out
    block = _BWD_BLOCK // 2 if logits.dtype == torch.float64 else _BWD_BLOCK
    grid = (tiling.cdiv(xv.n_rows, _BWD_ROWS), tiling.cdiv(xv.n_cols, block))
    launch(invariant_bwd_kernel, grid,
           (xv.tensor, target, stats, coef, coef_b, dxv.tensor, xv.n_rows, xv.n_cols,
            xv.n_inner, vocab_start, target.shape[1], target.stride(0), coef_b.stride(0),
            *xv.strides, *dxv.strides, *transform.kernel_factors),
           path="invariant", num_warps=8, ROWS=_BWD_ROWS, BLOCK_N=block,
           HEAD=transform.kernel_mode, HAS_ENTROPY_TERM=has_entropy_term)
    return out


def _rows(logits, flat_target, transform, compute_entropy, compute_argmax, dim=-1):
    """The exact statistics (``ops._invariant.ExactRows``) and argmax of every row."""
    states = invariant_tile_stats(logits, flat_target, transform=transform,
                                  compute_entropy=compute_entropy,
                                  compute_argmax=compute_argmax, dim=dim)
    sums = reduce_tile_states(states, compute_entropy=compute_entropy,
                              compute_argmax=compute_argmax)
    return exact_rows(sums), sums.argmax


def _transform(logit_scale, logit_divisor, softcap, temperature) -> HeadTransform:
    return HeadTransform(logit_scale, logit_divisor, softcap, temperature)


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1).contiguous()


# --------------------------------------------------------------------------- the shared backward


@torch.library.custom_op("probact_gpu::coef_bwd", mutates_args=())
def _coef_bwd_op(
    logits: torch.Tensor, target: torch.Tensor, stats: torch.Tensor, coef: torch.Tensor,
    coef_b: torch.Tensor, logit_scale: float, logit_divisor: float, softcap: float | None,
    temperature: float, has_entropy_term: bool, dim: int,
) -> torch.Tensor:
    """:func:`coef_bwd` as an op (the backward of the batch-invariant and indexed ops)."""
    return coef_bwd(logits, target, stats, coef, coef_b,
                    transform=_transform(logit_scale, logit_divisor, softcap, temperature),
                    has_entropy_term=has_entropy_term, dim=dim)


@_coef_bwd_op.register_fake
def _(logits, target, stats, coef, coef_b, *args):
    return logits.new_empty(logits.shape)


def token_coefficients(grad_logp, grad_entropy, valid, in_range, n_rows, dtype, device):
    """(coef (N, 3), coef_b (N, K)) of ``d(Σ g_logp·logp + Σ g_H·H)/dz`` with ``grad_logp``
    (N, K) or None: A = −Σ_k g_k, B_k = −g_k (0 for an ignored entry, NaN for one outside the
    vocabulary), D = g_H; ``valid`` / ``in_range`` (N, K)."""
    coef = torch.zeros((n_rows, 3), dtype=dtype, device=device)
    if grad_logp is None:
        coef_b = torch.zeros((n_rows, valid.shape[1]), dtype=dtype, device=device)
    else:
        g = torch.where(in_range, grad_logp.to(dtype), float("nan"))
        g = torch.where(valid, g, 0.0)
        coef[:, 0] = -g.sum(dim=1)
        coef_b = -g
    if grad_entropy is not None:
        coef[:, 2] = grad_entropy.to(dtype)
    return coef, coef_b


# --------------------------------------------------------------------------- token log-probs


@torch.library.custom_op("probact_gpu::invariant_token_log_probs", mutates_args=())
def _itlp_op(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, logit_scale: float,
    logit_divisor: float, softcap: float | None, temperature: float, compute_entropy: bool,
    compute_argmax: bool, save_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse, argmax, stats) shaped like ``target`` ((N, 3) for stats); an output
    not asked for is an empty (0,) tensor (as ``probact_gpu::token_log_probs``)."""
    from .token_log_probs import absent_as_empty

    if logits.numel() > 0:
        check_runnable(logits, "logits")
    flat = _flat(target)
    rows, arg = _rows(logits, flat, _transform(logit_scale, logit_divisor, softcap, temperature),
                      compute_entropy, compute_argmax)
    logp, entropy, lse, stats = token_rows(
        rows, flat, n_classes=logits.shape[-1], ignore_index=ignore_index,
        compute_entropy=compute_entropy, dtype=accum_dtype(logits))
    return absent_as_empty(logits, logp, entropy, lse, arg, stats if save_stats else None,
                           shape=target.shape)


@_itlp_op.register_fake
def _(logits, target, ignore_index, logit_scale, logit_divisor, softcap, temperature,
      compute_entropy, compute_argmax, save_stats):
    from .token_log_probs import fake_outputs

    return fake_outputs(logits, target.shape, compute_entropy, compute_argmax, save_stats)


def _itlp_setup_context(ctx, inputs, output):
    logits, target = inputs[:2]
    _, _, lse, arg, stats = output
    ctx.mark_non_differentiable(lse, arg, stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, target, stats)
    ctx.fwd_args = inputs[2:]


def _itlp_backward(ctx, grad_logp, grad_entropy, grad_lse, grad_arg, grad_stats):
    no_second_derivative("token_log_probs")
    none = (None,) * 9
    if grad_logp is None and grad_entropy is None:
        return (None,) + none
    logits, target, stats = ctx.saved_tensors
    ignore_index, scale, divisor, softcap, temperature = ctx.fwd_args[:5]
    if stats.ndim == 1:
        stats = _itlp_op(logits, target, ignore_index, scale, divisor, softcap, temperature,
                         grad_entropy is not None, False, True)[-1]
    flat = _flat(target)[:, None]
    valid, in_range = flat != ignore_index, (flat >= 0) & (flat < logits.shape[-1])
    coef, coef_b = token_coefficients(
        None if grad_logp is None else grad_logp.reshape(-1, 1), _flat(grad_entropy), valid,
        in_range, flat.shape[0], stats.dtype, logits.device)
    coef = torch.where(valid, coef, 0.0)  # an ignored row gets no gradient at all
    dx = _coef_bwd_op(logits, flat, stats, coef, coef_b, scale, divisor, softcap, temperature,
                      grad_entropy is not None, -1)
    return (dx,) + none


torch.library.register_autograd("probact_gpu::invariant_token_log_probs", _itlp_backward,
                                setup_context=_itlp_setup_context)


def invariant_token_log_probs(logits, target, *, ignore_index, transform, compute_entropy,
                              compute_argmax, needs_grad):
    """The op for validated arguments: (logp, entropy, lse, argmax, stats)."""
    return _itlp_op(logits, target, ignore_index, transform.logit_scale,
                    transform.logit_divisor, transform.softcap, transform.temperature,
                    compute_entropy, compute_argmax, needs_grad)


# --------------------------------------------------------------------------- cross-entropy


@torch.library.custom_op("probact_gpu::invariant_cross_entropy", mutates_args=())
def _ice_op(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
    reduction: str, label_smoothing: float, z_loss: float, logit_scale: float,
    logit_divisor: float, softcap: float | None, temperature: float,
    normalizer: torch.Tensor | None, normalizer_value: float | None, compute_argmax: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, z-loss term, argmax, stats) of class-index ``input`` (N, C, …) (class dim 1;
    target (N, …)): loss and the z-loss term reduced as ``reduction`` says, lse and argmax per
    row (argmax an empty (0,) tensor unless asked), stats (rows, 3)."""
    opts = CrossEntropyOptions.from_schema(weight, ignore_index, reduction, label_smoothing,
                                           z_loss, logit_scale, logit_divisor, softcap,
                                           temperature, normalizer, normalizer_value)
    if input.numel() > 0:
        check_runnable(input)
    flat = _flat(target)
    sdt = accum_dtype(input)
    rows, arg = _rows(input, flat, opts.transform, False, compute_argmax, dim=1)
    loss_rows, zl_rows, lse = cross_entropy_rows(
        rows, flat, n_classes=input.shape[1], ignore_index=ignore_index, weight=weight,
        z_loss=z_loss, dtype=sdt)
    loss, zl = reduce_ce_rows(loss_rows, zl_rows, opts, flat, input.shape[1], sdt)
    if reduction == "none":
        loss, zl = loss.reshape(target.shape), zl.reshape(target.shape)
    arg = input.new_empty(0, dtype=torch.int64) if arg is None else arg.reshape(target.shape)
    return loss, lse.reshape(target.shape), zl, arg, rows.stats(sdt)


@_ice_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, logit_scale,
      logit_divisor, softcap, temperature, normalizer, normalizer_value, compute_argmax):
    sdt = accum_dtype(input)
    n = target.numel()
    loss_shape = target.shape if reduction == "none" else ()
    return (input.new_empty(loss_shape, dtype=sdt), input.new_empty(target.shape, dtype=sdt),
            input.new_empty(loss_shape, dtype=sdt),
            input.new_empty(target.shape if compute_argmax else (0,), dtype=torch.int64),
            input.new_empty((n, 3), dtype=sdt))


@torch.library.custom_op("probact_gpu::invariant_cross_entropy_bwd", mutates_args=())
def _ice_bwd_op(
    input: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, stats: torch.Tensor,
    grad_output: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
    reduction: str, label_smoothing: float, z_loss: float, logit_scale: float,
    logit_divisor: float, softcap: float | None, temperature: float,
    normalizer: torch.Tensor | None, normalizer_value: float | None,
) -> torch.Tensor:
    """dinput of the loss for ``grad_output`` (0-d, or the rows' shape for ``"none"``): the
    per-row coefficients (the mean's divisor or the normalizer applied), then the elementwise
    kernel."""
    from .fused_head import cross_entropy_coefficients

    opts = CrossEntropyOptions.from_schema(weight, ignore_index, reduction, label_smoothing,
                                           z_loss, logit_scale, logit_divisor, softcap,
                                           temperature, normalizer, normalizer_value)
    flat = _flat(target)
    sdt = stats.dtype
    g, z_scale = ce_grad_rows(grad_output, flat, opts, input.shape[1], sdt)
    coef = cross_entropy_coefficients(g, flat, _flat(lse), opts, input.shape[1], sdt, z_scale)
    return coef_bwd(input, flat[:, None], stats, coef, coef[:, 1:2], transform=opts.transform,
                    has_entropy_term=False, dim=1)


@_ice_bwd_op.register_fake
def _(input, target, lse, stats, grad_output, *schema):
    return input.new_empty(input.shape)


def _ice_setup_context(ctx, inputs, output):
    input, target = inputs[:2]
    _, lse, zl, arg, stats = output
    ctx.mark_non_differentiable(lse, zl, arg, stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, target, lse, stats, inputs[2], inputs[11])
    ctx.fwd_args = inputs[2:]


def _ice_backward(ctx, grad_loss, grad_lse, grad_zl, grad_arg, grad_stats):
    none = (None,) * 13
    if grad_loss is None:
        return (None,) + none
    no_second_derivative("cross_entropy")
    input, target, lse, stats, weight, normalizer = ctx.saved_tensors
    scalars = ctx.fwd_args[1:9]
    dx = _ice_bwd_op(input, target, lse, stats, grad_loss, weight, *scalars, normalizer,
                     ctx.fwd_args[10])
    return (dx,) + none


torch.library.register_autograd("probact_gpu::invariant_cross_entropy", _ice_backward,
                                setup_context=_ice_setup_context)


def invariant_cross_entropy(input, target, opts: CrossEntropyOptions, *, compute_argmax):
    """The op for validated class-index arguments (class dim 1): (loss, lse, z-loss term,
    argmax, stats)."""
    if opts.label_smoothing > 0.0:
        raise ValueError("label_smoothing is not supported with batch_invariant=True (its "
                         "Σ_c w_c·z_c would need a third exact sum); use label_smoothing=0")
    return _ice_op(input, target, *opts.schema_args(), compute_argmax)
