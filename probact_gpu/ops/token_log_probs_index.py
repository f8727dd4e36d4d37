"""``token_log_probs`` with a ``(…, K)`` index: the log-probabilities of K given tokens per row
(TRL's ``selective_log_softmax`` with an index of K columns), with the row's entropy, lse and
argmax, in one reduction of the row and one read of K elements.

Forward: the row's statistics ``(shift, log s, μ)`` by the token log-probs forward (or, with
``batch_invariant``, the exact tile reduction of ``ops._invariant``), then the transformed logit
at each index (``kernels/_invariant.py``'s ``target_logits_kernel``) and ``logp_k = (z_k −
shift) − log s`` (≤ 0). Backward: ``dz = Σ_k g_k·([c = t_k] − p) − g_H·p·(z − Σp·z)``, the
elementwise coefficient kernel of ``ops.batch_invariant`` (``A = −Σ_k g_k``, ``B_k = −g_k``).

``ignore_index`` applies per entry (log-prob 0, no gradient); a row whose K entries are all
``ignore_index`` has entropy 0 and no entropy gradient (so K = 1 is the plain op's convention);
an entry outside ``[0, V)`` gives NaN. An index repeated in a row counts once per occurrence.
"""

from __future__ import annotations

import torch

from .._runtime import accum_dtype, check_runnable
from ..options import HeadTransform
from ._common import no_second_derivative
from ._invariant import exact_rows, invariant_tile_stats, reduce_tile_states
from .batch_invariant import _coef_bwd_op, target_logits, token_coefficients
from .token_log_probs import token_log_probs_fwd

__all__ = ["token_log_probs_index"]


def _row_targets(index: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per row of ``index`` (N, K): its first entry that is not ``ignore_index`` (so the row
    pass computes the entropy), or ``ignore_index`` when there is none."""
    valid = index != ignore_index
    first = torch.argmax(valid.to(torch.int8), dim=1, keepdim=True)
    picked = torch.gather(index, 1, first)[:, 0]
    return torch.where(valid.any(dim=1), picked, ignore_index)


def _transform(logit_scale, logit_divisor, softcap, temperature) -> HeadTransform:
    return HeadTransform(logit_scale, logit_divisor, softcap, temperature)


@torch.library.custom_op("probact_gpu::token_log_probs_index", mutates_args=())
def _tlpi_op(
    logits: torch.Tensor, index: torch.Tensor, ignore_index: int, logit_scale: float,
    logit_divisor: float, softcap: float | None, temperature: float, compute_entropy: bool,
    compute_argmax: bool, batch_invariant: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp (…, K), entropy (…), lse (…), argmax (…), stats (N, 3)) of ``logits`` (…, V) and
    ``index`` (…, K); entropy and argmax empty (0,) tensors unless asked."""
    if logits.numel() > 0:
        check_runnable(logits, "logits")
    n_targets = index.shape[-1]
    flat = index.reshape(-1, n_targets)
    flat = flat if flat.is_contiguous() else flat.contiguous()
    rows_target = _row_targets(flat, ignore_index)
    transform = _transform(logit_scale, logit_divisor, softcap, temperature)
    sdt, lead = accum_dtype(logits), index.shape[:-1]
    if batch_invariant:
        states = invariant_tile_stats(logits, rows_target, transform=transform,
                                      compute_entropy=True, compute_argmax=compute_argmax)
        sums = reduce_tile_states(states, compute_entropy=True, compute_argmax=compute_argmax)
        rows = exact_rows(sums)
        shift, log_sum, arg, lse = rows.shift, rows.log_sum, sums.argmax, rows.lse.to(sdt)
        entropy = (rows.log_sum - rows.mu).to(sdt)
        stats = rows.stats(sdt)
    else:
        _, entropy, lse, arg, stats = token_log_probs_fwd(
            logits, rows_target, ignore_index=ignore_index, transform=transform,
            compute_entropy=True, compute_argmax=compute_argmax, save_stats=True)
        shift, log_sum = stats[:, 0], stats[:, 1]
    row_valid = rows_target != ignore_index
    z = target_logits(logits, flat, transform).to(shift.dtype)
    logp = torch.clamp((z - shift[:, None]) - log_sum[:, None], max=0.0)
    valid = flat != ignore_index
    in_range = (flat >= 0) & (flat < logits.shape[-1])
    logp = torch.where(valid, torch.where(in_range, logp, float("nan")), 0.0).to(sdt)
    empty = logits.new_empty(0, dtype=sdt)
    entropy = torch.where(row_valid, entropy, 0.0).reshape(lead) if compute_entropy else empty
    arg = arg.reshape(lead) if compute_argmax else logits.new_empty(0, dtype=torch.int64)
    return logp.reshape(index.shape), entropy, lse.reshape(lead), arg, stats


@_tlpi_op.register_fake
def _(logits, index, ignore_index, logit_scale, logit_divisor, softcap, temperature,
      compute_entropy, compute_argmax, batch_invariant):
    sdt = accum_dtype(logits)
    lead = index.shape[:-1]
    n = 1
    for d in lead:
        n *= d
    return (logits.new_empty(index.shape, dtype=sdt),
            logits.new_empty(lead if compute_entropy else (0,), dtype=sdt),
            logits.new_empty(lead, dtype=sdt),
            logits.new_empty(lead if compute_argmax else (0,), dtype=torch.int64),
            logits.new_empty((n, 3), dtype=sdt))


def _setup_context(ctx, inputs, output):
    logits, index = inputs[:2]
    _, _, lse, arg, stats = output
    ctx.mark_non_differentiable(lse, arg, stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, index, stats)
    ctx.fwd_args = inputs[2:7]


def _backward(ctx, grad_logp, grad_entropy, grad_lse, grad_arg, grad_stats):
    no_second_derivative("token_log_probs")
    none = (None,) * 9
    if grad_logp is None and grad_entropy is None:
        return (None,) + none
    logits, index, stats = ctx.saved_tensors
    ignore_index, scale, divisor, softcap, temperature = ctx.fwd_args
    n_targets = index.shape[-1]
    flat = index.reshape(-1, n_targets).contiguous()
    valid = flat != ignore_index
    in_range = (flat >= 0) & (flat < logits.shape[-1])
    g = None if grad_logp is None else grad_logp.reshape(-1, n_targets)
    gh = None if grad_entropy is None else grad_entropy.reshape(-1)
    coef, coef_b = token_coefficients(g, gh, valid, in_range, flat.shape[0], stats.dtype,
                                      logits.device)
    coef = torch.where(valid.any(dim=1, keepdim=True), coef, 0.0)
    dx = _coef_bwd_op(logits, flat, stats, coef, coef_b.contiguous(), scale, divisor, softcap,
                      temperature, grad_entropy is not None, -1)
    return (dx,) + none


torch.library.register_autograd("probact_gpu::token_log_probs_index", _backward,
                                setup_context=_setup_context)


def token_log_probs_index(logits, index, *, ignore_index, transform, compute_entropy,
                          compute_argmax, batch_invariant):
    """The op for validated arguments: (logp (…, K), entropy, lse, argmax, stats)."""
    return _tlpi_op(logits, index, ignore_index, transform.logit_scale,
                    transform.logit_divisor, transform.softcap, transform.temperature,
                    compute_entropy, compute_argmax, batch_invariant)
