"""Softmax cross-entropy, the launchers: every kernel of ``probact_gpu.kernels.cross_entropy``
is launched here (through ``_runtime.launch``, which records it), from 2-D views of the logits.
Their contracts are in the package docstring (``probact_gpu.ops.cross_entropy``); no host sync in
any of them."""

from __future__ import annotations

import torch

from ... import tiling
from ..._runtime import (
    RowView,
    accum_dtype,
    check_float,
    check_runnable,
    check_same_device,
    empty,
    launch,
    row_view,
    sm_count,
)
from ...kernels.cross_entropy import (
    cross_entropy_bwd_kernel,
    cross_entropy_combine_kernel,
    cross_entropy_finish_kernel,
    cross_entropy_fwd_kernel,
    cross_entropy_fwd_persistent_kernel,
    cross_entropy_fwd_sweep_kernel,
    cross_entropy_scale_grad_kernel,
    cross_entropy_split_stats_kernel,
    cross_entropy_total_weight_kernel,
)
from ...options import CrossEntropyOptions
from ...tiling import RowConfig

_INT_DTYPES = (torch.int32, torch.int64)
_OPTION_DEFAULTS = dict(weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                        z_loss=0.0, softcap=None, logit_scale=1.0, logit_divisor=1.0,
                        temperature=1.0, normalizer=None)


# --------------------------------------------------------------------------- helpers


def _options(options: CrossEntropyOptions | None, **kwargs) -> CrossEntropyOptions:
    """A launcher's options: ``options`` when given (its option keywords then at their
    defaults), else built and validated from the keywords."""
    if options is None:
        return CrossEntropyOptions.from_kwargs(**kwargs)
    if not isinstance(options, CrossEntropyOptions):
        raise TypeError(f"options must be a CrossEntropyOptions, got {type(options).__name__}")
    changed = [k for k, v in kwargs.items() if v is not _OPTION_DEFAULTS[k]
               and v != _OPTION_DEFAULTS[k]]
    if changed:
        raise TypeError(f"pass the options either as options= or as keywords, not both: got "
                        f"options= and {', '.join(changed)}")
    return options


def _smoothing(opts: CrossEntropyOptions) -> bool:
    return opts.label_smoothing > 0.0


def _weight(opts: CrossEntropyOptions) -> torch.Tensor | None:
    return None if opts.weight is None else opts.weight.contiguous()


def _weight_sum(opts: CrossEntropyOptions, weight, logits: torch.Tensor):
    """W = Σ_c w_c as a 0-d device tensor in the math dtype (fp64 when the logits or the weights
    are), for the kernels that do not see a whole row of weights; None when unused."""
    if weight is None or not _smoothing(opts):
        return None
    return weight.sum(dtype=accum_dtype(logits, weight))


def _normalizer(opts: CrossEntropyOptions, like: torch.Tensor, sdt: torch.dtype):
    """(device divisor or None, denom): a tensor normalizer in the math dtype, or a number."""
    n = opts.normalizer
    if isinstance(n, torch.Tensor):
        check_same_device(logits=like, normalizer=n)
        return (n if n.dtype == sdt else n.to(sdt)), 1.0
    return None, 1.0 if n is None else float(n)


def _overlaps(t: torch.Tensor) -> bool:
    """True unless ``t``'s elements provably occupy distinct memory (torch's own test, then the
    stride ordering rule for the non-dense layouts it calls too hard)."""
    verdict = torch._debug_has_internal_overlap(t)
    if verdict != 2:
        return verdict == 1
    extent = 0  # each dim's stride must step past everything the smaller-stride dims span
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride(), strict=True)
                               if s > 1):
        if stride <= extent:
            return True
        extent += (size - 1) * stride
    return False


def _written_view(t: torch.Tensor, name: str) -> tuple[RowView, torch.Tensor | None]:
    """The RowView (class dim 1, or 0 for 1-D) of a tensor a kernel writes, and the temporary
    the kernel writes instead when the view needs one (copy it back with ``_copy_back``)."""
    if _overlaps(t):
        raise ValueError(f"{name} (shape {tuple(t.shape)}, strides {t.stride()}) has elements "
                         "sharing memory (an expanded tensor): a kernel cannot write it; pass "
                         "a tensor with its own memory (e.g. .contiguous())")
    v = row_view(t, 1 if t.ndim >= 2 else 0)
    return v, (None if v.tensor is t else v.tensor)


def _copy_back(t: torch.Tensor, temp: torch.Tensor | None) -> None:
    if temp is not None:
        t.copy_(temp)


def _config(n_rows: int, n_cols: int, t: torch.Tensor, config: RowConfig | None, *,
            fused_grad: bool = False) -> RowConfig:
    """``config`` (checked against the row), or ``tiling``'s choice. ``n_programs`` (a
    persistent grid) applies to the sweep forward only; the other kernels ignore it."""
    if config is None:
        return tiling.choose_cross_entropy_config(n_rows, n_cols, t.element_size(),
                                                  sm_count(t.device), fused_grad=fused_grad)
    config.validate_for(n_cols)
    return config


def _peel(views, n_cols: int, block_n: int) -> bool:
    """``PEEL_EDGES`` for a kernel walking the rows of these RowViews (``tiling.peel_row_edges``:
    rows Triton cannot prove 16-byte aligned, all at one offset from a 16-byte boundary)."""
    frames = [(v.tensor.data_ptr(), *v.strides, v.n_inner) for v in views]
    return tiling.peel_row_edges(views[0].tensor.element_size(), n_cols, block_n, frames)


def _check_2d(logits: torch.Tensor, target: torch.Tensor) -> None:
    check_float("logits", logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    if target.dtype not in _INT_DTYPES or tuple(target.shape) != (logits.shape[0],):
        raise ValueError(f"target must be an int32/int64 tensor of shape ({logits.shape[0]},), "
                         f"got dtype={target.dtype}, shape={tuple(target.shape)}")


# --------------------------------------------------------------------------- launchers


def cross_entropy_total_weight(
    target: torch.Tensor,
    n_classes: int,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Σ w_t over targets that are not ``ignore_index`` (a count without ``weight``): the divisor
    of ``reduction="mean"``, as a 0-d ``dtype`` tensor on the targets' device (no host sync),
    summed in ``dtype`` whatever the weights' dtype."""
    return _total_weight(target, n_classes, weight, ignore_index, dtype, False)[0]


def cross_entropy_mean_divisors(
    target: torch.Tensor,
    n_classes: int,
    options: CrossEntropyOptions,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``reduction="mean"``'s device divisors, from one launch: Σ w_t over non-ignored targets
    (``cross_entropy_total_weight``), and — when ``options.scales_z_term`` (class weights and a
    z-loss) — the z term's scale ``Σ w_t / (non-ignored rows)``, else None. The kernels multiply
    ``z_loss`` by that scale, so the z term divided by Σ w_t with the rest of the loss is
    ``z_loss · Σ lse² / (non-ignored rows)``: an average over the tokens that does not depend
    on the weights' overall scale."""
    return _total_weight(target, n_classes, options.weight, options.ignore_index, dtype,
                         options.scales_z_term)


def _total_weight(target, n_classes, weight, ignore_index, dtype, z_scale: bool, out=None):
    """(Σ w_t, Σ w_t / n or None), written into ``out`` (2,) when given (both always)."""
    target = target.reshape(-1)
    if out is not None:
        out, scale = out[0], out[1]
    else:
        out = torch.empty((), dtype=dtype, device=target.device)
        scale = torch.empty((), dtype=dtype, device=target.device) if z_scale else None
    if target.numel() == 0:
        return out.zero_(), None if scale is None else scale.fill_(float("nan"))
    check_runnable(target, "target")
    weight = None if weight is None else weight.contiguous()
    launch(cross_entropy_total_weight_kernel, (1,),
           (target, weight, out, scale, target.numel(), n_classes, ignore_index),
           path="prepass", num_warps=4, BLOCK=tiling.CE_TOTAL_WEIGHT_BLOCK)
    return out, scale


def cross_entropy_finish(
    rows: torch.Tensor,
    *,
    divisor: torch.Tensor | None = None,
    denom: float = 1.0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The reduced loss from per-row losses ``rows`` (fp32/fp64): ``Σ rows / (denom ·
    divisor)`` as a 0-d ``dtype`` tensor (default: the rows' dtype), in one small kernel that
    sums in a fixed order (deterministic), divides and casts. ``divisor``: the mean's 0-d
    device divisor (``cross_entropy_total_weight``) or a tensor normalizer, in the rows'
    dtype; ``denom``: a numeric normalizer."""
    out = empty((), dtype or rows.dtype, rows.device)
    launch(cross_entropy_finish_kernel, (1,), (rows, divisor, out, rows.numel(), denom),
           path="finish", num_warps=4, BLOCK=tiling.CE_FINISH_BLOCK)
    return out


def cross_entropy_partial_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    vocab_start: int = 0,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    logit_divisor: float = 1.0,
    temperature: float = 1.0,
    options: CrossEntropyOptions | None = None,
    config: RowConfig | None = None,
    _view: RowView | None = None,
) -> torch.Tensor:
    """Split step 1: per (row, chunk) partial statistics of ``logits`` (N, V_local), which hold
    global classes ``[vocab_start, vocab_start + V_local)``; returns (N, S, 4) fp32 (fp64 for
    fp64 logits)."""
    opts = _options(options, weight=weight, label_smoothing=label_smoothing, softcap=softcap,
                    logit_scale=logit_scale, logit_divisor=logit_divisor,
                    temperature=temperature)
    xv = _view or row_view(logits, logits.ndim - 1)
    cfg = config or tiling.choose_cross_entropy_config(
        xv.n_rows, xv.n_cols, logits.element_size(), sm_count(logits.device))
    if cfg.path != "split":
        cfg = RowConfig("split", cfg.block_n if cfg.path != "single" else
                        min(cfg.block_n, tiling.loop_block(logits.element_size())),
                        cfg.num_warps, n_splits=1)
    chunk = tiling.split_chunk(xv.n_cols, cfg)
    stats = empty((xv.n_rows, cfg.n_splits, 4), accum_dtype(logits), logits.device)
    if xv.n_rows == 0:
        return stats
    launch(cross_entropy_split_stats_kernel, (xv.n_rows, cfg.n_splits),
           (xv.tensor, target, _weight(opts), stats, xv.n_cols, xv.n_inner, chunk, vocab_start,
            xv.strides, *opts.transform.kernel_factors),
           path="split", num_warps=cfg.num_warps, BLOCK_N=cfg.block_n,
           HAS_SMOOTHING=_smoothing(opts), HEAD=opts.transform.kernel_mode)
    return stats


def cross_entropy_combine(
    stats: torch.Tensor,
    target: torch.Tensor,
    n_classes: int,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    options: CrossEntropyOptions | None = None,
    z_scale: torch.Tensor | None = None,
    _loss_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split step 2: merge the (N, S, 4) partials of each row into (loss_rows, lse), both (N,)
    in the stats' dtype. ``z_scale``: a 0-d device scalar multiplying ``z_loss`` (the weighted
    mean's, ``cross_entropy_mean_divisors``), or None."""
    opts = _options(options, weight=weight, ignore_index=ignore_index,
                    label_smoothing=label_smoothing, z_loss=z_loss)
    n_rows, n_splits, _ = stats.shape
    stats = stats.contiguous()
    loss = empty((n_rows,), _loss_dtype or stats.dtype, stats.device)
    lse = empty((n_rows,), stats.dtype, stats.device)
    if n_rows == 0:
        return loss, lse
    weight = _weight(opts)
    block_s = tiling.next_power_of_2(n_splits)
    block_m = max(1, min(tiling.next_power_of_2(n_rows), 1024 // block_s))
    launch(cross_entropy_combine_kernel, (tiling.cdiv(n_rows, block_m),),
           (stats, target, weight, _weight_sum(opts, weight, stats), z_scale, loss, lse,
            n_rows, n_splits, n_classes, opts.ignore_index, opts.label_smoothing, opts.z_loss),
           path="split", num_warps=4, BLOCK_M=block_m, BLOCK_S=block_s,
           HAS_SMOOTHING=_smoothing(opts))
    return loss, lse


def cross_entropy_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    *,
    vocab_start: int = 0,
    n_classes: int | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    logit_divisor: float = 1.0,
    temperature: float = 1.0,
    normalizer: float | torch.Tensor | None = None,
    options: CrossEntropyOptions | None = None,
    divisor: torch.Tensor | None = None,
    z_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: RowConfig | None = None,
) -> torch.Tensor:
    """dlogits from the rows' ``lse``: ``grad`` (0-d, or one per row) times d loss_row / d x,
    divided by ``divisor`` (0-d) when given and by the options' ``normalizer`` (which needs
    ``reduction="sum"`` in the options); ``z_scale`` (0-d, or None) multiplies ``z_loss`` (the
    weighted mean's, with ``divisor``: ``cross_entropy_mean_divisors``). One read of
    ``logits``, one write of ``out`` (a new tensor like ``logits`` when None; may be
    ``logits`` itself)."""
    opts = _options(options, weight=weight, ignore_index=ignore_index,
                    reduction="sum" if normalizer is not None else "mean",
                    label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                    logit_scale=logit_scale, logit_divisor=logit_divisor,
                    temperature=temperature, normalizer=normalizer)
    if out is None:
        out = empty(logits.shape, logits.dtype, logits.device)
    xv = row_view(logits, logits.ndim - 1 if logits.ndim < 2 else 1)
    dxv, temp = _written_view(out, "out")
    norm, denom = _normalizer(opts, logits, lse.dtype)
    if norm is not None:
        if divisor is not None:
            raise ValueError("divisor and a tensor normalizer cannot both divide the gradient")
        divisor = norm
    _grad_rows(xv, dxv, target, lse, grad, opts, vocab_start=vocab_start,
               n_classes=xv.n_cols if n_classes is None else n_classes, divisor=divisor,
               z_scale=z_scale, denom=denom, config=config)
    _copy_back(out, temp)
    return out


def _grad_rows(xv: RowView, dxv: RowView, target, lse, grad, opts: CrossEntropyOptions, *,
               vocab_start: int, n_classes: int, divisor, denom: float, config,
               z_scale=None, unless_one: bool = False) -> None:
    """cross_entropy_grad on RowViews, g = grad / (denom · divisor); ``unless_one``: the
    kernel's ``UNLESS_ONE`` (a 0-d grad that is exactly 1 writes nothing)."""
    if xv.n_rows == 0 or xv.n_cols == 0:
        return
    cfg = _config(xv.n_rows, xv.n_cols, xv.tensor, config)
    if cfg.path == "split":
        n_splits, chunk = cfg.n_splits, tiling.split_chunk(xv.n_cols, cfg)
    else:
        n_splits, chunk = 1, xv.n_cols
    block_n = min(cfg.block_n, tiling.next_power_of_2(chunk))
    # The whole row in one tile of its own program: p from the row's own statistics, not lse
    # (kernel docstring); such a row keeps narrow loads, as the single-tile forward does.
    row_stats = (n_splits == 1 and block_n >= xv.n_cols and vocab_start == 0
                 and n_classes == xv.n_cols)
    peel = not row_stats and _peel((xv, dxv), xv.n_cols, block_n)
    if peel and n_splits == 1:  # whole tiles: Triton then knows the chunk's end is a multiple
        chunk = tiling.cdiv(chunk, block_n) * block_n  # of 16, and the body masks stay per-vector
    weight = _weight(opts)
    launch(cross_entropy_bwd_kernel, (xv.n_rows, n_splits),
           (xv.tensor, target, weight, _weight_sum(opts, weight, xv.tensor), lse, grad, divisor,
            z_scale, dxv.tensor, xv.n_cols, xv.n_inner, chunk, vocab_start, n_classes,
            opts.ignore_index,
            0 if grad.ndim == 0 else grad.stride(0), xv.strides, dxv.strides,
            opts.label_smoothing, opts.z_loss, *opts.transform.kernel_factors, denom),
           path=cfg.path, num_warps=cfg.num_warps, BLOCK_N=block_n,
           HAS_SMOOTHING=_smoothing(opts), HEAD=opts.transform.kernel_mode,
           PEEL_EDGES=peel, ROW_STATS=row_stats, UNLESS_ONE=unless_one)


def _fwd_rows(xv: RowView, target: torch.Tensor, opts: CrossEntropyOptions, *,
              dxv: RowView | None, divisor, denom: float, config, loss_dtype=None,
              z_scale=None):
    """The forward on a RowView ``xv`` (rows along the class dim) and flat targets: returns
    (loss_rows, lse); with ``dxv`` the fused gradient of the reduced loss (g = 1 / (denom ·
    divisor)) is written there. ``z_scale`` (0-d or None) multiplies ``z_loss``, in the rows
    and the gradient."""
    x = xv.tensor
    n_rows, n_cols = xv.n_rows, xv.n_cols
    sdt = accum_dtype(x)
    loss_dtype = loss_dtype or sdt
    if n_rows == 0:
        return empty((0,), loss_dtype, x.device), empty((0,), sdt, x.device)
    cfg = _config(n_rows, n_cols, x, config, fused_grad=dxv is not None)
    if cfg.path == "split":
        stats = cross_entropy_partial_stats(x, target, options=opts, config=cfg, _view=xv)
        loss, lse = cross_entropy_combine(stats, target, n_cols, options=opts, z_scale=z_scale,
                                          _loss_dtype=loss_dtype)
        if dxv is not None:
            one = torch.ones((), dtype=sdt, device=x.device)
            _grad_rows(xv, dxv, target, lse, one, opts, vocab_start=0, n_classes=n_cols,
                       divisor=divisor, z_scale=z_scale, denom=denom, config=cfg)
        return loss, lse
    loss = empty((n_rows,), loss_dtype, x.device)
    lse = empty((n_rows,), sdt, x.device)
    compute_grad = dxv is not None
    dx_view = dxv if compute_grad else xv
    data = (x, target, _weight(opts), divisor, z_scale, loss, lse, dx_view.tensor)
    scalars = (xv.strides, dx_view.strides, opts.label_smoothing, opts.z_loss,
               *opts.transform.kernel_factors, denom)
    flags = dict(HAS_SMOOTHING=_smoothing(opts), HEAD=opts.transform.kernel_mode,
                 COMPUTE_GRAD=compute_grad)
    if cfg.path == "single":
        launch(cross_entropy_fwd_kernel, (tiling.cdiv(n_rows, cfg.block_m),),
               (*data, n_rows, n_cols, xv.n_inner, opts.ignore_index, *scalars),
               path="single", num_warps=cfg.num_warps, BLOCK_M=cfg.block_m,
               BLOCK_N=cfg.block_n, **flags)
    else:
        peel = _peel((xv, dxv) if compute_grad else (xv,), n_cols, cfg.block_n)
        sizes = (n_cols, xv.n_inner, opts.ignore_index)
        kernel, grid = cross_entropy_fwd_sweep_kernel, (n_rows,)
        if cfg.n_programs:  # persistent: bounds the rows in flight (tiling's L2 model)
            kernel, grid = cross_entropy_fwd_persistent_kernel, (tiling.row_programs(n_rows, cfg),)
            sizes = (n_rows, *sizes)
        launch(kernel, grid, (*data, *sizes, *scalars), path="multi", num_warps=cfg.num_warps,
               BLOCK_N=cfg.block_n, PEEL_EDGES=peel, NUM_STAGES=cfg.num_stages, **flags)
    return loss, lse


def cross_entropy_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    logit_divisor: float = 1.0,
    temperature: float = 1.0,
    normalizer: float | torch.Tensor | None = None,
    options: CrossEntropyOptions | None = None,
    compute_grad: bool = False,
    grad_out: torch.Tensor | None = None,
    total_weight: torch.Tensor | None = None,
    z_scale: torch.Tensor | None = None,
    config: RowConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row loss and lse of 2-D ``logits`` (N, C) against class indices ``target`` (N,), and,
    with ``compute_grad``, the gradient of the reduced loss written to ``grad_out`` (default: a
    new tensor; ``logits`` itself for in place). ``total_weight`` and ``z_scale``: the mean's
    divisors (``cross_entropy_mean_divisors``), computed from these targets when None. See the
    module docstring."""
    opts = _options(options, weight=weight, ignore_index=ignore_index, reduction=reduction,
                    label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                    logit_scale=logit_scale, logit_divisor=logit_divisor,
                    temperature=temperature, normalizer=normalizer)
    _check_2d(logits, target)
    opts.check_weight(logits.shape[1], logits.device)
    check_same_device(logits=logits, target=target, grad_out=grad_out,
                      total_weight=total_weight)
    if logits.numel() > 0:
        check_runnable(logits, "logits")
    target = target.contiguous()
    sdt = accum_dtype(logits)
    divisor, denom = None, 1.0
    if opts.reduction == "mean" and (compute_grad or opts.scales_z_term):
        if total_weight is None:
            divisor, z_scale = cross_entropy_mean_divisors(target, logits.shape[1], opts, sdt)
        else:
            divisor = total_weight
        if opts.scales_z_term and z_scale is None:
            raise ValueError("total_weight was given for a weighted mean with a z-loss: pass its "
                             "z_scale too (cross_entropy_mean_divisors)")
    elif compute_grad and opts.reduction == "sum":
        divisor, denom = _normalizer(opts, logits, sdt)
    dx, dxv, temp = None, None, None
    if compute_grad:
        dx = grad_out if grad_out is not None else empty(logits.shape, logits.dtype,
                                                         logits.device)
        dxv, temp = _written_view(dx, "grad_out")
    loss, lse = _fwd_rows(row_view(logits, 1), target, opts, dxv=dxv, divisor=divisor,
                          denom=denom, config=config,
                          z_scale=z_scale if opts.scales_z_term else None)
    if dx is not None:
        _copy_back(dx, temp)
    return loss, lse, dx


def cross_entropy_regrad_(
    dx: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad_output: torch.Tensor,
    *,
    options: CrossEntropyOptions,
    divisor: torch.Tensor | None = None,
    z_scale: torch.Tensor | None = None,
) -> None:
    """The backward of a reduced loss whose gradient the forward fused: ``dx`` (the logits'
    shape, class dim 1, holding the gradient for grad_output 1) becomes the gradient for the 0-d
    ``grad_output`` — untouched when it is exactly 1 (every program of the launch returns at
    once: no bytes move), else recomputed from ``logits`` and ``lse`` (one read, one write) and
    rounded once. Scaling the stored 16-bit gradient instead would round twice (about a quarter
    of the elements one ulp off). ``divisor`` / ``z_scale``: the forward's mean divisors
    (``cross_entropy_mean_divisors``); a ``normalizer`` comes from ``options``."""
    if dx.numel() == 0:
        return
    xv = row_view(logits, 1 if logits.ndim >= 2 else 0)
    dxv, temp = _written_view(dx, "dx")
    opts = options
    norm, denom = _normalizer(opts, logits, lse.dtype)
    if norm is not None:
        divisor = norm
    if temp is not None:  # the kernel writes whole rows or nothing: start from dx's values
        temp.copy_(dx)
    _grad_rows(xv, dxv, target.reshape(-1).contiguous(), lse.reshape(-1), grad_output, opts,
               vocab_start=0, n_classes=xv.n_cols, divisor=divisor, denom=denom, config=None,
               z_scale=z_scale if opts.scales_z_term else None, unless_one=True)
    _copy_back(dx, temp)


def cross_entropy_scale_grad(dx: torch.Tensor, grad_output: torch.Tensor) -> None:
    """``dx *= grad_output`` (0-d) in place, on the device, on a grid of a few programs per SM
    (``tiling.choose_cross_entropy_scale_grid``) that return at once when it is exactly 1: then
    no memory moves."""
    if dx.numel() == 0:
        return
    v, temp = _written_view(dx, "dx")
    block = min(tiling.loop_block(dx.element_size()), tiling.next_power_of_2(v.n_cols))
    peel = _peel((v,), v.n_cols, block)
    n_blocks = tiling.cdiv(v.n_cols, block)
    grid = (tiling.choose_cross_entropy_scale_grid(v.n_rows * n_blocks, sm_count(dx.device)),)
    launch(cross_entropy_scale_grad_kernel, grid,
           (v.tensor, grad_output, v.n_rows, v.n_cols, v.n_inner, n_blocks, v.strides),
           path="scale", num_warps=tiling.warps_for(block), BLOCK_N=block, PEEL_EDGES=peel)
    _copy_back(dx, temp)
