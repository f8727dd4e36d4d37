"""Token log-probs of an LM head's logits: the log-probability of each chosen token, the entropy
of each row's distribution, lse and argmax — launchers, the registered custom ops, autograd and
the public function.

Read top-down: the launchers run the kernels of ``probact_gpu.kernels.token_log_probs`` (whose
docstring has the maths and the bytes); ``probact_gpu::token_log_probs`` and
``probact_gpu::token_log_probs_bwd`` wrap them as torch.library ops with fake implementations,
so ``torch.compile(fullgraph=True)`` traces them; autograd is registered on the forward op;
:func:`token_log_probs` is the public function.

Launchers meant for reuse (the fused linear op, the vocab-parallel ops); no host sync in any:

``token_log_probs_fwd(logits, target, *, ignore_index=-100, transform=HeadTransform(),
compute_entropy=False, compute_argmax=False, save_stats=False, config=None)
-> (logp, entropy | None, lse, argmax | None, stats | None)``
    ``logits`` (N, V) of any strides (or (…, V): rows are the leading dims), ``target`` (N,)
    int32/int64. Per-row outputs are (N,) fp32 (fp64 for fp64 logits), argmax int64; ``stats``
    (N, 3) = (shift, log s, μ_rel) for the backward. Paths: single tile, multi tile (one read
    of the logits either way) and split (few long rows: partials, merged on the device by
    :func:`merge_partials` and :func:`finish_rows`).

``token_log_probs_partial(logits, target, *, vocab_start=0, transform, compute_entropy,
compute_argmax, config=None) -> (partials (N, S, 4), argmax (N, S) | None)``
    Per (row, chunk) ``(max z, s, τ, z_t or 0)`` of a shard holding global classes
    ``[vocab_start, vocab_start + V_local)``.

``token_log_probs_bwd(logits, target, stats, grad_logp, grad_entropy, *, vocab_start=0,
n_classes=None, ignore_index=-100, transform, out=None, config=None) -> dlogits``
    ``grad_logp`` / ``grad_entropy``: (N,) device tensors or None. ``out`` may be ``logits``
    itself (each element is read before it is written).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import tiling
from .._runtime import (
    accum_dtype,
    check_float,
    check_runnable,
    check_same_device,
    empty,
    launch,
    row_view,
    sm_count,
)
from ..kernels.token_log_probs import (
    token_log_probs_bwd_kernel,
    token_log_probs_fwd_kernel,
    token_log_probs_fwd_loop_kernel,
    token_log_probs_partial_kernel,
)
from ..options import HeadTransform, as_index, scale_by_factor, split_tensor_factors
from ..tiling import RowConfig
from ._autograd import differentiable_op, kernel_backward, register_vmap_loop, terminal_op

__all__ = [
    "TokenLogProbs",
    "absent_as_empty",
    "decode_argmax",
    "fake_outputs",
    "finish_rows",
    "merge_partials",
    "pack_outputs",
    "token_log_probs",
    "token_log_probs_bwd",
    "token_log_probs_fwd",
    "token_log_probs_partial",
]

_INT_DTYPES = (torch.int32, torch.int64)
NO_INDEX = 2**62  # the partial argmax of an empty chunk (kernels/token_log_probs.py)
IDENTITY = HeadTransform()


class TokenLogProbs(NamedTuple):
    """What :func:`token_log_probs` returns when any ``return_*`` flag is set; a field not
    asked for is None. ``logprobs``, ``entropy`` and ``lse`` are fp32 (fp64 for fp64 logits),
    ``argmax`` int64, all shaped like the target."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    lse: torch.Tensor | None
    argmax: torch.Tensor | None


# --------------------------------------------------------------------------- launchers


def _config(n_rows: int, n_cols: int, t: torch.Tensor, config: RowConfig | None) -> RowConfig:
    if config is None:
        return tiling.choose_cross_entropy_config(n_rows, n_cols, t.element_size(),
                                                  sm_count(t.device))
    config.validate_for(n_cols)
    if config.n_programs:
        raise ValueError(f"config.n_programs={config.n_programs}: the token log-probs kernels "
                         "run one program per row")
    return config


def token_log_probs_partial(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    vocab_start: int = 0,
    transform: HeadTransform = IDENTITY,
    compute_entropy: bool = False,
    compute_argmax: bool = False,
    config: RowConfig | None = None,
    _view=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per (row, chunk) partial statistics of ``logits`` (N, V_local ≥ 1), which hold global
    classes ``[vocab_start, vocab_start + V_local)``: ((N, S, 4) fp32 (fp64 for fp64 logits),
    (N, S) int64 global argmax or None)."""
    xv = _view or row_view(logits, logits.ndim - 1)
    cfg = config or tiling.choose_cross_entropy_config(
        xv.n_rows, xv.n_cols, logits.element_size(), sm_count(logits.device))
    if cfg.path != "split":
        block_n = min(cfg.block_n, tiling.loop_block(logits.element_size()))
        cfg = RowConfig("split", block_n, cfg.num_warps, n_splits=1)
    chunk = tiling.split_chunk(xv.n_cols, cfg)
    stats = empty((xv.n_rows, cfg.n_splits, 4), accum_dtype(logits), logits.device)
    arg = (torch.empty((xv.n_rows, cfg.n_splits), dtype=torch.int64, device=logits.device)
           if compute_argmax else None)
    if xv.n_rows == 0:
        return stats, arg
    grid = (xv.n_rows, cfg.n_splits)
    launch(token_log_probs_partial_kernel, grid,
           (xv.tensor, target, stats, stats if arg is None else arg, xv.n_cols, xv.n_inner,
            chunk, vocab_start, *xv.strides, *transform.kernel_factors),
           path="split", num_warps=cfg.num_warps, BLOCK_N=cfg.block_n,
           HEAD=transform.kernel_mode, COMPUTE_ENTROPY=compute_entropy,
           COMPUTE_ARGMAX=compute_argmax)
    return stats, arg


def decode_argmax(arg: torch.Tensor) -> torch.Tensor:
    """Columns from argmax candidates in which a NaN's column ``c`` is encoded as ``c − 2^62``
    (the partial kernel's, ``kernels/token_log_probs._nan_arg``): negative, so the smallest
    candidate of a row is its first NaN when it has one, as torch.argmax."""
    return torch.where(arg < 0, arg + NO_INDEX, arg)


def merge_partials(stats: torch.Tensor, arg: torch.Tensor | None, *, decode: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge (N, K, 4) partials ``(m, s, τ, z_t)`` (and (N, K) argmax) over K into (N, 4) (and
    (N,)), in torch ops on the device: ``M = max m``, ``s = Σ α s``, ``τ = Σ α (τ + d s)``
    with ``α = exp(m − M)``, ``d = m − M`` (0 where m = −inf), ``z_t = Σ z_t`` (M shifts by 0
    where ±inf, as the kernels' ``lse_shift``); the argmax is the smallest index among the
    partials whose max is M, or the first NaN's (still encoded unless ``decode``)."""
    part_max = stats[..., 0]
    row_max = part_max.amax(dim=1)
    shift = torch.where(torch.isinf(row_max), 0.0, row_max)[:, None]
    alpha = torch.exp(part_max - shift)
    d = torch.where(part_max == float("-inf"), 0.0, part_max - shift)
    part_sum = stats[..., 1]
    merged = torch.stack([row_max, (alpha * part_sum).sum(dim=1),
                          (alpha * (stats[..., 2] + d * part_sum)).sum(dim=1),
                          stats[..., 3].sum(dim=1)], dim=1)
    if arg is None:
        return merged, None
    best = torch.where((part_max == row_max[:, None]) | (arg < 0), arg, NO_INDEX).amin(dim=1)
    return merged, decode_argmax(best) if decode else best


def finish_rows(merged: torch.Tensor, target: torch.Tensor, n_classes: int, ignore_index: int,
                compute_entropy: bool) -> tuple[torch.Tensor, ...]:
    """(logp, entropy | None, lse, stats (N, 3)) of rows from their merged (N, 4) statistics
    ``(max, s, τ, z_t)`` around the row max (torch ops on the device; the kernels' formulas,
    a +inf row's included: lse +inf, logp, entropy and saved log s NaN)."""
    row_max, row_sum, tau, z_t = merged.unbind(dim=1)
    shift = torch.where(torch.isinf(row_max), 0.0, row_max)
    log_sum = torch.log(row_sum)
    blown = row_sum == float("inf")
    valid = target != ignore_index
    in_range = (target >= 0) & (target < n_classes)
    logp = torch.where(blown, float("nan"), (z_t - shift) - log_sum)
    logp = torch.where(valid, torch.where(in_range, logp, float("nan")), 0.0)
    mu_rel = tau / row_sum
    entropy = None
    if compute_entropy:
        entropy = torch.where(valid, torch.where(blown, float("nan"), log_sum - mu_rel), 0.0)
    lse = shift + log_sum
    stats = torch.stack([shift, torch.where(blown, float("nan"), log_sum), mu_rel], dim=1)
    return logp, entropy, lse, stats


def token_log_probs_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    transform: HeadTransform = IDENTITY,
    compute_entropy: bool = False,
    compute_argmax: bool = False,
    save_stats: bool = False,
    config: RowConfig | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Per-row (logp, entropy, lse, argmax, stats) of ``logits`` (rows along the last dim, any
    strides) and flat int32/int64 ``target``; entropy, argmax and stats are None unless asked
    (module docstring). One read of the logits on the single- and multi-tile paths."""
    xv = row_view(logits, logits.ndim - 1)
    n_rows, n_cols = xv.n_rows, xv.n_cols
    sdt, device = accum_dtype(logits), logits.device
    if n_rows == 0:
        z = torch.empty(0, dtype=sdt, device=device)
        return (z, z.clone() if compute_entropy else None, z.clone(),
                torch.empty(0, dtype=torch.int64, device=device) if compute_argmax else None,
                torch.empty((0, 3), dtype=sdt, device=device) if save_stats else None)
    cfg = _config(n_rows, n_cols, logits, config)
    if cfg.path == "split":
        partials, part_arg = token_log_probs_partial(
            logits, target, transform=transform, compute_entropy=compute_entropy,
            compute_argmax=compute_argmax, config=cfg, _view=xv)
        merged, arg = merge_partials(partials, part_arg)
        logp, entropy, lse, stats = finish_rows(merged, target.to(torch.int64), n_cols,
                                                ignore_index, compute_entropy)
        return logp, entropy, lse, arg, stats if save_stats else None
    logp = empty((n_rows,), sdt, device)
    lse = empty((n_rows,), sdt, device)
    entropy = empty((n_rows,), sdt, device) if compute_entropy else None
    arg = torch.empty(n_rows, dtype=torch.int64, device=device) if compute_argmax else None
    stats = empty((n_rows, 3), sdt, device) if save_stats else None
    ptrs = (xv.tensor, target, logp, logp if entropy is None else entropy, lse,
            logp if arg is None else arg, logp if stats is None else stats)
    flags = dict(HEAD=transform.kernel_mode, COMPUTE_ENTROPY=compute_entropy,
                 COMPUTE_ARGMAX=compute_argmax, SAVE_STATS=save_stats)
    if cfg.path == "single":
        grid = (tiling.cdiv(n_rows, cfg.block_m),)
        launch(token_log_probs_fwd_kernel, grid,
               (*ptrs, n_rows, n_cols, xv.n_inner, ignore_index, *xv.strides,
                *transform.kernel_factors),
               path="single", num_warps=cfg.num_warps, BLOCK_M=cfg.block_m,
               BLOCK_N=cfg.block_n, **flags)
    else:
        launch(token_log_probs_fwd_loop_kernel, (n_rows,),
               (*ptrs, n_cols, xv.n_inner, ignore_index, *xv.strides,
                *transform.kernel_factors),
               path="multi", num_warps=cfg.num_warps, BLOCK_N=cfg.block_n, **flags)
    return logp, entropy, lse, arg, stats


def token_log_probs_bwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    stats: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    *,
    vocab_start: int = 0,
    n_classes: int | None = None,
    ignore_index: int = -100,
    transform: HeadTransform = IDENTITY,
    out: torch.Tensor | None = None,
    config: RowConfig | None = None,
) -> torch.Tensor:
    """dlogits = d(Σ g_logp·logp + Σ g_H·H)/dlogits from the forward's (N, 3) ``stats``; the
    upstream gradients are flat (N,) tensors or None (not both). One read of ``logits``, one
    write of ``out`` (a new contiguous tensor like ``logits`` when None; may be ``logits``)."""
    if out is None:
        out = empty(logits.shape, logits.dtype, logits.device)
    xv, dxv = row_view(logits, logits.ndim - 1), row_view(out, out.ndim - 1)
    if dxv.tensor is not out:
        raise ValueError("out must be addressable as rows along its last dim without a copy")
    n_classes = xv.n_cols if n_classes is None else n_classes
    if tuple(stats.shape) != (xv.n_rows, 3):
        raise ValueError(f"stats must be the forward's ({xv.n_rows}, 3) statistics (saved with "
                         f"save_stats=True), got shape {tuple(stats.shape)}")
    if xv.n_rows == 0 or xv.n_cols == 0:
        return out
    cfg = _config(xv.n_rows, xv.n_cols, logits, config)
    if cfg.path == "split":
        n_splits, chunk = cfg.n_splits, tiling.split_chunk(xv.n_cols, cfg)
    else:
        n_splits, chunk = 1, xv.n_cols
    block_n = min(cfg.block_n, tiling.next_power_of_2(chunk))
    grid = (xv.n_rows, n_splits)
    dummy = stats
    launch(token_log_probs_bwd_kernel, grid,
           (xv.tensor, target, stats, dummy if grad_logp is None else grad_logp,
            dummy if grad_entropy is None else grad_entropy, dxv.tensor,
            xv.n_cols, xv.n_inner, chunk, vocab_start, n_classes, ignore_index,
            *xv.strides, *dxv.strides, *transform.kernel_factors),
           path=cfg.path, num_warps=cfg.num_warps, BLOCK_N=block_n,
           HEAD=transform.kernel_mode, HAS_GRAD_LOGP=grad_logp is not None,
           HAS_GRAD_ENTROPY=grad_entropy is not None)
    return out


# --------------------------------------------------------------------------- custom ops
# The forward ops' five outputs (this op's and the fused linear op's): (logp, entropy, lse,
# argmax, stats), per-token ones shaped like the target, stats (N, 3); an output not asked for
# is an empty (0,) tensor (schemas have no optional outputs).


def absent_as_empty(like: torch.Tensor, logp, entropy, lse, arg, stats, *, shape=None):
    """The launchers' (logp, entropy | None, lse, argmax | None, stats | None) as the ops'
    outputs: per-token ones reshaped to ``shape`` (when given), a fresh empty tensor for each
    None."""
    def per_token(t, dtype):
        if t is None:
            return like.new_empty(0, dtype=dtype)
        return t if shape is None else t.reshape(shape)

    return (per_token(logp, logp.dtype), per_token(entropy, logp.dtype),
            per_token(lse, logp.dtype), per_token(arg, torch.int64),
            like.new_empty(0, dtype=logp.dtype) if stats is None else stats)


def fake_outputs(like: torch.Tensor, shape, compute_entropy: bool, compute_argmax: bool,
                 save_stats: bool):
    """The forward ops' outputs as fake tensors, per-token ones of ``shape``."""
    sdt = accum_dtype(like)
    n_rows = math.prod(shape)
    return (like.new_empty(shape, dtype=sdt),
            like.new_empty(shape if compute_entropy else (0,), dtype=sdt),
            like.new_empty(shape, dtype=sdt),
            like.new_empty(shape if compute_argmax else (0,), dtype=torch.int64),
            like.new_empty((n_rows, 3) if save_stats else (0,), dtype=sdt))


def _transform(logit_scale, logit_divisor, softcap, temperature) -> HeadTransform:
    return HeadTransform(logit_scale, logit_divisor, softcap, temperature)


@torch.library.custom_op("probact_gpu::token_log_probs", mutates_args=())
def _tlp_op(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, logit_scale: float,
    logit_divisor: float, softcap: float | None, temperature: float, compute_entropy: bool,
    compute_argmax: bool, save_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse, argmax, stats) shaped like ``target`` ((N, 3) for stats); an output
    not asked for is an empty (0,) tensor."""
    if logits.numel() > 0:
        check_runnable(logits, "logits")
    flat = target.reshape(-1)
    outs = token_log_probs_fwd(
        logits, flat if flat.is_contiguous() else flat.contiguous(), ignore_index=ignore_index,
        transform=_transform(logit_scale, logit_divisor, softcap, temperature),
        compute_entropy=compute_entropy, compute_argmax=compute_argmax, save_stats=save_stats)
    return absent_as_empty(logits, *outs, shape=target.shape)


@_tlp_op.register_fake
def _(logits, target, ignore_index, logit_scale, logit_divisor, softcap, temperature,
      compute_entropy, compute_argmax, save_stats):
    return fake_outputs(logits, target.shape, compute_entropy, compute_argmax, save_stats)


@torch.library.custom_op("probact_gpu::token_log_probs_bwd", mutates_args=())
def _tlp_bwd_op(
    logits: torch.Tensor, target: torch.Tensor, stats: torch.Tensor,
    grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None, ignore_index: int,
    logit_scale: float, logit_divisor: float, softcap: float | None, temperature: float,
) -> torch.Tensor:
    """dlogits (a new contiguous tensor like ``logits``) from the saved stats and the upstream
    gradients (shaped like ``target``; at least one given)."""
    def flat(t):
        return None if t is None else t.reshape(-1).contiguous()

    return token_log_probs_bwd(
        logits, flat(target), stats, flat(grad_logp), flat(grad_entropy),
        ignore_index=ignore_index,
        transform=_transform(logit_scale, logit_divisor, softcap, temperature))


@_tlp_bwd_op.register_fake
def _(logits, target, stats, grad_logp, grad_entropy, ignore_index, logit_scale, logit_divisor,
      softcap, temperature):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    (logits, target, ignore_index, logit_scale, logit_divisor, softcap, temperature,
     compute_entropy, compute_argmax, save_stats) = inputs
    _, entropy, lse, arg, stats = output
    # (the entropy too when not asked for: an empty placeholder; forward-mode AD trips on a
    # differentiable output left without a tangent)
    ctx.mark_non_differentiable(lse, arg, stats, *(() if compute_entropy else (entropy,)))
    ctx.set_materialize_grads(False)  # lse and argmax never get a zero-filled gradient
    ctx.save_for_backward(logits, target, stats)
    ctx.opts = (ignore_index, logit_scale, logit_divisor, softcap, temperature)
    ctx.entropy = compute_entropy


@kernel_backward("probact_gpu.token_log_probs")
def _backward(ctx, grad_logp, grad_entropy, grad_lse, grad_arg, grad_stats):
    none = (None,) * 9
    if grad_logp is None and grad_entropy is None:
        return (None,) + none
    logits, target, stats = ctx.saved_tensors
    if stats.ndim == 1:  # the op was called with save_stats=False: recompute the statistics
        stats = _tlp_stats(logits, target, *ctx.opts, grad_entropy is not None, False, True)[-1]
    dx = _tlp_bwd(logits, target, stats, grad_logp, grad_entropy, *ctx.opts)
    return (dx,) + none


def _jvp(ctx, logits_dot, *_):
    """Forward-mode rule: the tangents of logp and entropy are ``Σ_c (∂out/∂x_c) · ẋ_c`` per
    row, with ∂out/∂x from the backward kernel (upstream gradient 1 for that output alone) on
    an upcast copy of the logits; lse, argmax and the statistics are not differentiable."""
    if logits_dot is None:
        return (None,) * 5
    logits, target, stats = ctx.saved_tensors
    math = accum_dtype(logits)
    if stats.ndim == 1:
        stats = _tlp_stats(logits, target, *ctx.opts, ctx.entropy, False, True)[-1]
    x, x_dot = logits.to(math), logits_dot.to(math)
    ones = torch.ones(target.shape, dtype=math, device=logits.device)
    tangents = []
    for wanted, grads in ((True, (ones, None)), (ctx.entropy, (None, ones))):
        if wanted:
            slope = _tlp_bwd(x, target, stats, *grads, *ctx.opts)
            tangents.append((slope * x_dot).sum(-1))
        else:
            tangents.append(None)
    return (*tangents, None, None, None)


_tlp = differentiable_op(_tlp_op, _setup_context, _backward, _jvp,
                         lambda inputs, output: (inputs[0], inputs[1], output[4]))
_tlp_stats = terminal_op(_tlp_op, "probact_gpu.token_log_probs")
_tlp_bwd = terminal_op(_tlp_bwd_op, "probact_gpu.token_log_probs")
register_vmap_loop(_tlp_op)
register_vmap_loop(_tlp_bwd_op)


# --------------------------------------------------------------------------- public function


def check_target(logits: torch.Tensor, target: torch.Tensor, what: str = "logits", *,
                 allow_index: bool = False) -> bool:
    """``target`` an int32/int64 tensor shaped like ``logits`` without its last dim or, with
    ``allow_index``, with K in its place (``(…, K)``: returns True)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in _INT_DTYPES:
        raise TypeError(f"target must hold class indices as int32 or int64, got "
                        f"dtype={target.dtype}")
    lead = tuple(logits.shape[:-1])
    if allow_index and target.ndim == logits.ndim and tuple(target.shape[:-1]) == lead:
        return True
    if tuple(target.shape) != lead:
        also = f" or {lead + ('K',)}" if allow_index else ""
        raise ValueError(f"target must have shape {lead}{also} ({what} "
                         f"{tuple(logits.shape)} without the class dim), got "
                         f"{tuple(target.shape)}")
    return False


def _check_logits(logits: torch.Tensor) -> None:
    check_float("logits", logits)
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a class dim of at least one class, got shape "
                         f"{tuple(logits.shape)}")


def token_log_probs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    logit_scale: float | torch.Tensor = 1.0,
    logit_divisor: float | torch.Tensor = 1.0,
    softcap: float | None = None,
    temperature: float | torch.Tensor = 1.0,
    return_entropy: bool = False,
    return_lse: bool = False,
    return_argmax: bool = False,
    batch_invariant: bool = False,
):
    """Log-probability of each chosen token under ``softmax(z)`` (``logp = z_t − lse``),
    without materialising a (tokens × V) fp32 copy of the logits.

    - ``logits``: (…, V), any float dtype, any strides; ``target``: (…) int32/int64 class
      indices (the leading shape of ``logits``), or (…, K): the log-probs of K tokens per row
      (``ignore_index`` per entry; logp then (…, K), entropy, lse and argmax per row;
      ``ops.token_log_probs_index``).
    - ``z`` is the transformed logits, applied inside the kernels in fp32 (fp64 for fp64
      logits), in this order: ``· logit_scale``, ``/ logit_divisor``, ``softcap ·
      tanh(· / softcap)`` (when not None), ``/ temperature``. ``logit_scale``,
      ``logit_divisor`` and ``temperature`` may be 0-d floating tensors (on the logits' device
      or the CPU; a learnt temperature): folded into one factor applied as ``logits · f`` in
      torch (one elementwise pass and one logits-sized buffer, the price of the composition
      users come from), never read on the host, and differentiated. Refused: a tensor
      temperature with a softcap, a ``softcap`` tensor that requires grad (``cross_entropy``).
    - ``ignore_index`` rows: logp 0 and entropy 0, no gradient (lse and argmax still reported).
      A target outside ``[0, V)`` that is not ``ignore_index`` gives NaN (no error, no host
      sync).
    - ``return_entropy``: ``H = lse − Σ p·z`` per row, differentiable (together with logp or
      alone). ``return_lse``: lse of z per row, not differentiable. ``return_argmax``: the first
      index of the max of z (int64), not differentiable.
    - ``batch_invariant``: every output is the same bits whatever the other rows, their number
      and the launch (docs/rl.md: fixed 128-class tiles added exactly; ``logp ≤ 0``), at the
      cost of writing and reading 12 B a row and tile of statistics.

    Returns the fp32 (fp64 for fp64 logits) logp shaped like ``target`` when no ``return_*``
    flag is set, else a :class:`TokenLogProbs` ``(logprobs, entropy, lse, argmax)`` with None
    for the fields not asked for. One read of the logits in the forward (plus the backward's
    one read and one write of dlogits when a gradient is needed); under ``torch.no_grad`` (or
    logits not requiring grad) nothing is saved. Forward-mode AD and first-order ``torch.func``
    transforms work; double backward and nested transforms raise.
    """
    factor, kwargs = split_tensor_factors(logit_scale=logit_scale,
                                          logit_divisor=logit_divisor, softcap=softcap,
                                          temperature=temperature)
    transform = HeadTransform(**kwargs)
    _check_logits(logits)
    indexed = check_target(logits, target, allow_index=True)
    check_same_device(logits=logits, target=target)
    ignore_index = as_index("ignore_index", ignore_index)
    logits = scale_by_factor(logits, factor, "logits")
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    if indexed or batch_invariant:
        from ._autograd import refuse_transforms

        refuse_transforms("token_log_probs with batch_invariant=True or a (…, K) target", logits)
        if indexed:
            from .token_log_probs_index import token_log_probs_index

            logp, entropy, lse, arg, _ = token_log_probs_index(
                logits, target, ignore_index=ignore_index, transform=transform,
                compute_entropy=bool(return_entropy), compute_argmax=bool(return_argmax),
                batch_invariant=bool(batch_invariant))
        else:
            from .batch_invariant import invariant_token_log_probs

            logp, entropy, lse, arg, _ = invariant_token_log_probs(
                logits, target, ignore_index=ignore_index, transform=transform,
                compute_entropy=bool(return_entropy), compute_argmax=bool(return_argmax),
                needs_grad=needs_grad)
        return pack_outputs(logp, entropy, lse, arg, return_entropy=return_entropy,
                            return_lse=return_lse, return_argmax=return_argmax)
    logp, entropy, lse, arg, _ = _tlp(
        logits, target, ignore_index, transform.logit_scale, transform.logit_divisor,
        transform.softcap, transform.temperature, bool(return_entropy), bool(return_argmax),
        needs_grad)
    return pack_outputs(logp, entropy, lse, arg, return_entropy=return_entropy,
                        return_lse=return_lse, return_argmax=return_argmax)


def pack_outputs(logp, entropy, lse, arg, *, return_entropy, return_lse, return_argmax,
                 shape=None):
    """What the token log-probs functions return: logp alone when no ``return_*`` flag is set,
    else a :class:`TokenLogProbs` with None for the fields not asked for; each reshaped to
    ``shape`` when given."""
    def shaped(t):
        return t if shape is None else t.reshape(shape)

    if not (return_entropy or return_lse or return_argmax):
        return shaped(logp)
    return TokenLogProbs(shaped(logp), shaped(entropy) if return_entropy else None,
                         shaped(lse) if return_lse else None,
                         shaped(arg) if return_argmax else None)
