"""Softmax cross-entropy: launchers, the registered custom ops, autograd, the public function.

Read top-down: the launchers run the kernels of ``probact_gpu.kernels.cross_entropy``; the
``probact_gpu::cross_entropy*`` torch.library ops wrap them (with fake implementations, so
``torch.compile(fullgraph=True)`` traces them); autograd is registered on the main op; an
``autograd.Function`` handles ``inplace_backward=True``; ``cross_entropy`` is the public function.

Launchers meant for reuse (fused linear+CE, vocab-parallel CE); no host sync in any of them:

``cross_entropy_fwd(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0, compute_grad=False,
grad_out=None, total_weight=None, config=None) -> (loss_rows, lse, dlogits | None)``
    ``logits`` (N, C) of any strides, ``target`` (N,) int32/int64. ``loss_rows`` and ``lse`` are
    (N,) fp32 (fp64 for fp64 logits), unreduced. With ``compute_grad``, dlogits of the *reduced*
    loss (sum; mean divides by ``total_weight``, a 0-d device tensor, computed from these targets
    when None; ``reduction="none"`` gives the gradient of ``loss_rows.sum()``) is written to
    ``grad_out`` (which may be ``logits`` itself: in place) or a new tensor, and returned.

``cross_entropy_total_weight(target, n_classes, *, weight=None, ignore_index=-100, dtype)``
    The mean's divisor, Σ w_t over non-ignored targets, as a 0-d device tensor.

Split row, with a column offset so a rank holding classes ``[vocab_start, vocab_start + V_local)``
of ``n_classes`` calls them on its shard (``weight`` is always the *global* (n_classes,) vector):

``cross_entropy_partial_stats(logits, target, *, vocab_start=0, weight=None, label_smoothing=0.0,
softcap=None, logit_scale=1.0, config=None) -> stats``
    (N, S, 4) fp32: per (row, chunk) max z, Σ exp(z − max), z_t (0 unless the target is in the
    chunk), Σ w·z. Partials from several ranks concatenate along dim 1 (all_gather) before:
``cross_entropy_combine(stats, target, n_classes, *, weight=None, ignore_index=-100,
label_smoothing=0.0, z_loss=0.0) -> (loss_rows, lse)``
``cross_entropy_grad(logits, target, lse, grad, *, vocab_start=0, n_classes=None, weight=None,
ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
divisor=None, out=None, config=None) -> dlogits``
    ``grad``: 0-d or (N,) device tensor (grad_output), divided by ``divisor`` (0-d) when given.
    ``out`` may be ``logits`` (in place).

Rows Triton cannot prove 16-byte aligned (a row stride like V = 50257, a sliced view's base)
run the multi-tile forward, the backward and the gradient rescale with ``PEEL_EDGES`` (16-byte
accesses for all but a row's first and last few elements) whenever the logits' and the
gradient's rows sit at one offset from a 16-byte boundary: ``tiling.peel_row_edges``; the launch
record's meta says which ran.

Semantics not fixed by torch: a target outside ``[0, C)`` that is not ``ignore_index`` gives a
NaN loss for its row (and a NaN gradient row) instead of an error; all targets ignored with
``reduction="mean"`` gives NaN (0 / 0), as torch; the z-loss term ``z_loss · lse²`` is added per
non-ignored row and, for ``"mean"``, divided by the same divisor as the rest of the loss.

Precision: float options (``label_smoothing``, ``z_loss``, ``softcap``, ``logit_scale``) reach
the kernels as fp32 scalars. The single- and multi-tile paths form ``lse − z_t`` and the
smoothing sum around the row's max, so |x| ~ 1e4 loses nothing; the split path's smoothing
partial (Σ w·z per chunk) and the from-lse gradient (``exp(z − lse)``) carry an absolute error
of about ulp(|x|) there.
"""

from __future__ import annotations

import math

import torch

from .. import tiling
from .._runtime import (
    accum_dtype,
    check_float,
    check_runnable,
    check_same_device,
    device_guard,
    record,
    row_view,
    sm_count,
)
from ..kernels.cross_entropy import (
    cross_entropy_bwd_kernel,
    cross_entropy_combine_kernel,
    cross_entropy_fwd_kernel,
    cross_entropy_scale_grad_kernel,
    cross_entropy_split_stats_kernel,
    cross_entropy_total_weight_kernel,
)
from ..tiling import RowConfig

REDUCTIONS = ("none", "sum", "mean")
_INT_DTYPES = (torch.int32, torch.int64)


def _config(n_rows: int, n_cols: int, t: torch.Tensor, config: RowConfig | None) -> RowConfig:
    if config is None:
        return tiling.choose_cross_entropy_config(n_rows, n_cols, t.element_size(),
                                                  sm_count(t.device))
    config.validate_for(n_cols)
    if config.n_programs:
        raise ValueError(f"config.n_programs={config.n_programs}: the cross-entropy kernels run "
                         "one program per row (a persistent grid cost them occupancy on sm_90)")
    return config


def _flags(weight, label_smoothing, softcap) -> dict:
    return dict(HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0.0,
                HAS_SOFTCAP=softcap is not None)


def _prep_weight(weight: torch.Tensor | None, label_smoothing: float):
    """(weight contiguous, Σ weight as a 0-d device tensor or the weight itself as a dummy)."""
    if weight is None:
        return None, None
    weight = weight.contiguous()
    w_sum = weight.sum(dtype=accum_dtype(weight)) if label_smoothing > 0.0 else weight
    return weight, w_sum


def _dummy(t: torch.Tensor) -> torch.Tensor:
    return t  # a pointer the kernel never reads (its flag is off)


def _peel(views, n_cols: int, block_n: int) -> bool:
    """``PEEL_EDGES`` for a kernel walking the rows of these RowViews (``tiling.peel_row_edges``:
    rows Triton cannot prove 16-byte aligned, all at one offset from a 16-byte boundary)."""
    frames = [(v.tensor.data_ptr(), *v.strides, v.n_inner) for v in views]
    return tiling.peel_row_edges(views[0].tensor.element_size(), n_cols, block_n, frames)


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
    of ``reduction="mean"``, as a 0-d ``dtype`` tensor on the targets' device (no host sync)."""
    target = target.reshape(-1)
    out = torch.empty((), dtype=dtype, device=target.device)
    if target.numel() == 0:
        return out.zero_()
    check_runnable(target, "target")
    weight = None if weight is None else weight.contiguous()
    with device_guard(target):
        cross_entropy_total_weight_kernel[(1,)](
            target, _dummy(target) if weight is None else weight, out,
            target.numel(), n_classes, ignore_index,
            BLOCK=tiling.CE_TOTAL_WEIGHT_BLOCK, HAS_WEIGHT=weight is not None, num_warps=4,
        )
    record(cross_entropy_total_weight_kernel, "prepass", (1,))
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
    config: RowConfig | None = None,
    _view=None,
) -> torch.Tensor:
    """Split step 1: per (row, chunk) partial statistics of ``logits`` (N, V_local), which hold
    global classes ``[vocab_start, vocab_start + V_local)``; returns (N, S, 4) fp32."""
    xv = _view or row_view(logits, logits.ndim - 1)
    cfg = config or tiling.choose_cross_entropy_config(
        xv.n_rows, xv.n_cols, logits.element_size(), sm_count(logits.device))
    if cfg.path != "split":
        cfg = RowConfig("split", cfg.block_n if cfg.path != "single" else
                        min(cfg.block_n, tiling.loop_block(logits.element_size())),
                        cfg.num_warps, n_splits=1)
    chunk = tiling.split_chunk(xv.n_cols, cfg)
    stats = torch.empty((xv.n_rows, cfg.n_splits, 4), dtype=accum_dtype(logits),
                        device=logits.device)
    if xv.n_rows == 0:
        return stats
    weight, _ = _prep_weight(weight, 0.0)
    grid = (xv.n_rows, cfg.n_splits)
    with device_guard(logits):
        cross_entropy_split_stats_kernel[grid](
            xv.tensor, target, _dummy(target) if weight is None else weight, stats,
            xv.n_cols, xv.n_inner, chunk, vocab_start, *xv.strides,
            1.0 if softcap is None else softcap, logit_scale,
            BLOCK_N=cfg.block_n, **_flags(weight, label_smoothing, softcap),
            num_warps=cfg.num_warps,
        )
    record(cross_entropy_split_stats_kernel, "split", grid, BLOCK_N=cfg.block_n)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split step 2: merge the (N, S, 4) partials of each row into (loss_rows, lse), both (N,)."""
    n_rows, n_splits, _ = stats.shape
    stats = stats.contiguous()
    loss = torch.empty(n_rows, dtype=stats.dtype, device=stats.device)
    lse = torch.empty(n_rows, dtype=stats.dtype, device=stats.device)
    if n_rows == 0:
        return loss, lse
    weight, w_sum = _prep_weight(weight, label_smoothing)
    block_s = tiling.next_power_of_2(n_splits)
    block_m = max(1, min(tiling.next_power_of_2(n_rows), 1024 // block_s))
    grid = (tiling.cdiv(n_rows, block_m),)
    with device_guard(stats):
        cross_entropy_combine_kernel[grid](
            stats, target, _dummy(stats) if weight is None else weight,
            _dummy(stats) if w_sum is None else w_sum, loss, lse,
            n_rows, n_splits, n_classes, ignore_index, label_smoothing, z_loss,
            BLOCK_M=block_m, BLOCK_S=block_s, HAS_WEIGHT=weight is not None,
            HAS_SMOOTHING=label_smoothing > 0.0, num_warps=4,
        )
    record(cross_entropy_combine_kernel, "split", grid, BLOCK_M=block_m)
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
    divisor: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: RowConfig | None = None,
    _views=None,
) -> torch.Tensor:
    """dlogits from the rows' ``lse``: ``grad`` (0-d, or one per row) times d loss_row / d x,
    divided by ``divisor`` (0-d) when given. One read of ``logits``, one write of ``out`` (a new
    tensor like ``logits`` when None; may be ``logits`` itself)."""
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if _views is None:
        _views = (row_view(logits, logits.ndim - 1), row_view(out, out.ndim - 1))
    xv, dxv = _views
    n_classes = xv.n_cols if n_classes is None else n_classes
    if xv.n_rows == 0 or xv.n_cols == 0:
        return out
    cfg = _config(xv.n_rows, xv.n_cols, logits, config)
    if cfg.path == "split":
        n_splits, chunk = cfg.n_splits, tiling.split_chunk(xv.n_cols, cfg)
    else:
        n_splits, chunk = 1, xv.n_cols
    block_n = min(cfg.block_n, tiling.next_power_of_2(chunk))
    peel = _peel((xv, dxv), xv.n_cols, block_n)
    if peel and n_splits == 1:  # whole tiles: Triton then knows the chunk's end is a multiple
        chunk = tiling.cdiv(chunk, block_n) * block_n  # of 16, and the body masks stay per-vector
    grad_row_stride = 0 if grad.ndim == 0 else grad.stride(0)
    weight, w_sum = _prep_weight(weight, label_smoothing)
    grid = (xv.n_rows, n_splits)
    with device_guard(logits):
        cross_entropy_bwd_kernel[grid](
            xv.tensor, target, _dummy(target) if weight is None else weight,
            _dummy(lse) if w_sum is None else w_sum, lse, grad,
            _dummy(lse) if divisor is None else divisor, dxv.tensor,
            xv.n_cols, xv.n_inner, chunk, vocab_start, n_classes, ignore_index, grad_row_stride,
            *xv.strides, *dxv.strides,
            label_smoothing, z_loss, 1.0 if softcap is None else softcap, logit_scale,
            BLOCK_N=block_n, **_flags(weight, label_smoothing, softcap),
            HAS_DIVISOR=divisor is not None, PEEL_EDGES=peel, num_warps=cfg.num_warps,
        )
    record(cross_entropy_bwd_kernel, cfg.path, grid, BLOCK_N=block_n, PEEL_EDGES=peel)
    return out


def _fwd_rows(xv, target, *, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
              logit_scale, compute_grad, dxv, total_weight, config):
    """cross_entropy_fwd on a RowView ``xv`` (rows along the class dim) and flat targets."""
    x = xv.tensor
    n_rows, n_cols = xv.n_rows, xv.n_cols
    sdt = accum_dtype(x)
    divisor = None
    if compute_grad and reduction == "mean":
        divisor = total_weight if total_weight is not None else cross_entropy_total_weight(
            target, n_cols, weight=weight, ignore_index=ignore_index, dtype=sdt)
    if n_rows == 0:
        empty = torch.empty(0, dtype=sdt, device=x.device)
        return empty, empty.clone()
    cfg = _config(n_rows, n_cols, x, config)
    if cfg.path == "split":
        stats = cross_entropy_partial_stats(
            x, target, weight=weight, label_smoothing=label_smoothing, softcap=softcap,
            logit_scale=logit_scale, config=cfg, _view=xv)
        loss, lse = cross_entropy_combine(
            stats, target, n_cols, weight=weight, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss)
        if compute_grad:
            one = torch.ones((), dtype=sdt, device=x.device)
            cross_entropy_grad(
                x, target, lse, one, weight=weight, ignore_index=ignore_index,
                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                logit_scale=logit_scale, divisor=divisor, config=cfg, _views=(xv, dxv))
        return loss, lse
    loss = torch.empty(n_rows, dtype=sdt, device=x.device)
    lse = torch.empty(n_rows, dtype=sdt, device=x.device)
    weight, w_sum = _prep_weight(weight, label_smoothing)
    single = cfg.path == "single"
    grid = (tiling.cdiv(n_rows, cfg.block_m),)
    dx_view = dxv if compute_grad else xv
    peel = not single and _peel((xv, dxv) if compute_grad else (xv,), n_cols, cfg.block_n)
    with device_guard(x):
        cross_entropy_fwd_kernel[grid](
            x, target, _dummy(target) if weight is None else weight,
            _dummy(loss) if w_sum is None else w_sum, _dummy(loss) if divisor is None else divisor,
            loss, lse, dx_view.tensor,
            n_rows, n_cols, xv.n_inner, ignore_index, *xv.strides, *dx_view.strides,
            label_smoothing, z_loss, 1.0 if softcap is None else softcap, logit_scale,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SINGLE_TILE=single,
            **_flags(weight, label_smoothing, softcap),
            COMPUTE_GRAD=compute_grad, HAS_DIVISOR=divisor is not None, PEEL_EDGES=peel,
            num_warps=cfg.num_warps,
        )
    record(cross_entropy_fwd_kernel, cfg.path, grid, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
           COMPUTE_GRAD=compute_grad, PEEL_EDGES=peel)
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
    compute_grad: bool = False,
    grad_out: torch.Tensor | None = None,
    total_weight: torch.Tensor | None = None,
    config: RowConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row loss and lse of 2-D ``logits`` (N, C) against class indices ``target`` (N,), and,
    with ``compute_grad``, the gradient of the reduced loss written to ``grad_out`` (default: a
    new tensor; ``logits`` itself for in place). See the module docstring."""
    _check_options(logits, None, weight, reduction, label_smoothing, z_loss, softcap,
                   logit_scale)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    if target.dtype not in _INT_DTYPES or tuple(target.shape) != (logits.shape[0],):
        raise ValueError(f"target must be an int32/int64 tensor of shape ({logits.shape[0]},), "
                         f"got dtype={target.dtype}, shape={tuple(target.shape)}")
    check_same_device(logits=logits, target=target, weight=weight, grad_out=grad_out,
                      total_weight=total_weight)
    if logits.numel() > 0:
        check_runnable(logits, "logits")
    target = target.contiguous()
    dx = None
    if compute_grad:
        dx = grad_out if grad_out is not None else torch.empty(
            logits.shape, dtype=logits.dtype, device=logits.device)
    xv = row_view(logits, 1)
    dxv = row_view(dx, 1) if dx is not None else None
    loss, lse = _fwd_rows(xv, target, weight=weight, ignore_index=ignore_index,
                          reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                          softcap=softcap, logit_scale=logit_scale, compute_grad=compute_grad,
                          dxv=dxv, total_weight=total_weight, config=config)
    return loss, lse, dx


def cross_entropy_scale_grad(dx: torch.Tensor, grad_output: torch.Tensor) -> None:
    """``dx *= grad_output`` (0-d) in place, on the device; no memory traffic when it is
    exactly 1."""
    if dx.numel() == 0:
        return
    dim = 1 if dx.ndim >= 2 else 0
    v = row_view(dx, dim)
    block = min(tiling.loop_block(dx.element_size()), tiling.next_power_of_2(v.n_cols))
    peel = _peel((v,), v.n_cols, block)
    grid = (v.n_rows, tiling.cdiv(v.n_cols, block))
    with device_guard(dx):
        cross_entropy_scale_grad_kernel[grid](
            v.tensor, grad_output, v.n_cols, v.n_inner, *v.strides, BLOCK_N=block,
            PEEL_EDGES=peel, num_warps=tiling.warps_for(block),
        )
    record(cross_entropy_scale_grad_kernel, "scale", grid, BLOCK_N=block, PEEL_EDGES=peel)


# --------------------------------------------------------------------------- validation


def _check_options(input, target, weight, reduction, label_smoothing, z_loss, softcap,
                   logit_scale) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not input.dtype.is_floating_point:
        raise TypeError(f"input (logits) must be a floating tensor, got dtype={input.dtype}")
    check_float("input", input)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if not isinstance(z_loss, (int, float)) or not 0.0 <= z_loss < math.inf:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is not None and (not isinstance(softcap, (int, float))
                                or not 0.0 < softcap < math.inf):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if not isinstance(logit_scale, (int, float)) or not -math.inf < logit_scale < math.inf:
        raise ValueError(f"logit_scale must be a finite number, got {logit_scale!r}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
            raise TypeError("weight must be a floating tensor, got "
                            f"{getattr(weight, 'dtype', type(weight).__name__)}")
        n_classes = input.shape[1] if input.ndim >= 2 else input.shape[0]
        if weight.ndim != 1 or weight.shape[0] != n_classes:
            raise ValueError(f"weight must have shape ({n_classes},) (one per class), "
                             f"got {tuple(weight.shape)}")


def _check_target(input: torch.Tensor, target) -> bool:
    """Validate ``target`` against ``input``; True for class probabilities (float targets)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if input.ndim == 0:
        raise ValueError("input must have at least 1 dimension (the classes), got a 0-d tensor")
    if target.dtype.is_floating_point:
        if target.shape != input.shape:
            raise ValueError(
                f"target holds class probabilities (dtype={target.dtype}) so it must have the "
                f"input's shape {tuple(input.shape)}, got {tuple(target.shape)}")
        return True
    if target.dtype not in _INT_DTYPES:
        raise TypeError(f"target must hold class indices (int64 or int32) or class "
                        f"probabilities (float), got dtype={target.dtype}")
    expected = tuple(input.shape[:1] + input.shape[2:]) if input.ndim >= 2 else ()
    if tuple(target.shape) != expected:
        raise ValueError(f"target of class indices must have shape {expected} for input of "
                         f"shape {tuple(input.shape)}, got {tuple(target.shape)}")
    return False


# --------------------------------------------------------------------------- custom ops

_RED = {"none": 0, "sum": 1, "mean": 2}


def _run(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
         logit_scale, compute_grad, grad_out):
    """Launch for an ND input (class dim 1) and its targets; returns (loss, lse)."""
    red = REDUCTIONS[reduction]
    sdt = accum_dtype(input)
    if input.numel() > 0:
        check_runnable(input)
    flat = target.reshape(-1).contiguous()
    xv = row_view(input, 1)
    dxv = row_view(grad_out, 1) if compute_grad else None
    total_weight = None
    if red == "mean":
        total_weight = cross_entropy_total_weight(flat, xv.n_cols, weight=weight,
                                                  ignore_index=ignore_index, dtype=sdt)
    rows, lse = _fwd_rows(xv, flat, weight=weight, ignore_index=ignore_index, reduction=red,
                          label_smoothing=label_smoothing, z_loss=z_loss,
                          softcap=None if softcap == 0.0 else softcap, logit_scale=logit_scale,
                          compute_grad=compute_grad, dxv=dxv, total_weight=total_weight,
                          config=None)
    if red == "none":
        loss = rows.reshape(target.shape).to(input.dtype)
    elif red == "sum":
        loss = rows.sum().to(input.dtype)
    else:
        loss = (rows.sum() / total_weight).to(input.dtype)
    return loss, lse.reshape(target.shape)


def _as2(input: torch.Tensor) -> torch.Tensor:
    return input.unsqueeze(0) if input.ndim == 1 else input


def _fake_outputs(input, target, reduction):
    sdt = accum_dtype(input)
    loss_shape = target.shape if reduction == 0 else ()
    return (input.new_empty(loss_shape), input.new_empty(target.shape, dtype=sdt))


@torch.library.custom_op("probact_gpu::cross_entropy", mutates_args=())
def _ce_op(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
    reduction: int, label_smoothing: float, z_loss: float, softcap: float, logit_scale: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, dlogits of the reduced loss — or an empty tensor without compute_grad).
    ``input`` has at least 2 dims (class dim 1); ``softcap == 0`` means none."""
    grad = torch.empty(input.shape if compute_grad else (0,), dtype=input.dtype,
                       device=input.device)
    loss, lse = _run(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                     softcap, logit_scale, compute_grad, grad)
    return loss, lse, grad


@_ce_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      logit_scale, compute_grad):
    loss, lse = _fake_outputs(input, target, reduction)
    return loss, lse, input.new_empty(input.shape if compute_grad else (0,))


@torch.library.custom_op("probact_gpu::cross_entropy_inplace", mutates_args=("input",))
def _ce_inplace_op(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
    reduction: int, label_smoothing: float, z_loss: float, softcap: float, logit_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) for sum/mean; the gradient of the loss overwrites ``input``."""
    return _run(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                logit_scale, True, input)


@_ce_inplace_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      logit_scale):
    return _fake_outputs(input, target, reduction)


def _scale_saved_grad(ctx, grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """The fused gradient times grad_output. First backward, eager: in place, by the launcher
    directly (a no-op when grad_output is 1; not a registered mutating op, so the saved tensor's
    version stays valid) and the buffer itself is returned, so autograd can keep it as .grad with
    no copy. A repeated backward through the same graph (retain_graph) must not touch that
    buffer again — the caller may hold it — so it returns a new tensor, rescaled by grad_output
    over the grad_output applied first (kept on the device: no host sync; a first grad_output
    of exactly 0 leaves NaN). Under torch.compile (which cannot partition a backward mutating a
    saved forward output) always out of place: Inductor fuses the multiply into the consumer."""
    if torch.compiler.is_compiling():
        return grad * grad_output
    if ctx.applied is None:
        cross_entropy_scale_grad(grad, grad_output)
        ctx.applied = grad_output.detach().clone()
        return grad
    return grad * (grad_output / ctx.applied).to(grad.dtype)


def _bwd_impl(input, target, weight, lse, grad_output, ignore_index, reduction, label_smoothing,
              z_loss, softcap, logit_scale, out):
    flat = target.reshape(-1).contiguous()
    xv, dxv = row_view(input, 1), row_view(out, 1)
    divisor = None
    if reduction == 2:
        divisor = cross_entropy_total_weight(flat, xv.n_cols, weight=weight,
                                             ignore_index=ignore_index, dtype=lse.dtype)
    g = grad_output.reshape(-1) if grad_output.ndim else grad_output
    cross_entropy_grad(input, flat, lse.reshape(-1), g, weight=weight, ignore_index=ignore_index,
                       label_smoothing=label_smoothing, z_loss=z_loss,
                       softcap=None if softcap == 0.0 else softcap, logit_scale=logit_scale,
                       divisor=divisor, out=out, _views=(xv, dxv))


@torch.library.custom_op("probact_gpu::cross_entropy_bwd", mutates_args=())
def _ce_bwd_op(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, lse: torch.Tensor,
    grad_output: torch.Tensor, ignore_index: int, reduction: int, label_smoothing: float,
    z_loss: float, softcap: float, logit_scale: float,
) -> torch.Tensor:
    """dlogits from the saved lse and ``grad_output`` (0-d, or the per-row loss's shape)."""
    out = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    _bwd_impl(input, target, weight, lse, grad_output, ignore_index, reduction, label_smoothing,
              z_loss, softcap, logit_scale, out)
    return out


@_ce_bwd_op.register_fake
def _(input, target, weight, lse, grad_output, ignore_index, reduction, label_smoothing, z_loss,
      softcap, logit_scale):
    return input.new_empty(input.shape)


@torch.library.custom_op("probact_gpu::cross_entropy_bwd_inplace", mutates_args=("input",))
def _ce_bwd_inplace_op(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, lse: torch.Tensor,
    grad_output: torch.Tensor, ignore_index: int, reduction: int, label_smoothing: float,
    z_loss: float, softcap: float, logit_scale: float,
) -> None:
    """As ``cross_entropy_bwd``, the gradient overwriting ``input``."""
    _bwd_impl(input, target, weight, lse, grad_output, ignore_index, reduction, label_smoothing,
              z_loss, softcap, logit_scale, input)


@_ce_bwd_inplace_op.register_fake
def _(input, target, weight, lse, grad_output, ignore_index, reduction, label_smoothing, z_loss,
      softcap, logit_scale):
    return None


def _opts(ctx):
    return (ctx.ignore_index, ctx.reduction, ctx.label_smoothing, ctx.z_loss, ctx.softcap,
            ctx.logit_scale)


def _setup_context(ctx, inputs, output):
    (input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
     logit_scale, compute_grad) = inputs
    _, lse, grad = output
    ctx.mark_non_differentiable(lse, grad)
    ctx.fused = compute_grad
    ctx.applied = None
    (ctx.ignore_index, ctx.reduction, ctx.label_smoothing, ctx.z_loss, ctx.softcap,
     ctx.logit_scale) = ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale
    if compute_grad:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(input, target, weight, lse)


def _backward(ctx, grad_loss, grad_lse, grad_grad):
    if ctx.fused:
        (grad,) = ctx.saved_tensors
        dx = _scale_saved_grad(ctx, grad, grad_loss)
    else:
        input, target, weight, lse = ctx.saved_tensors
        dx = _ce_bwd_op(input, target, weight, lse, grad_loss, *_opts(ctx))
    return dx, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("probact_gpu::cross_entropy", _backward,
                                setup_context=_setup_context)


class CrossEntropyInplaceFunction(torch.autograd.Function):
    """``inplace_backward=True``: the gradient lives in the logits' storage.

    sum/mean: the forward writes the gradient into the logits, marks them dirty and returns them
    as a hidden output, so autograd knows: an op that saved the logits before raises at backward
    ("modified by an inplace operation"), and any use of the logits afterwards flows a gradient
    into this node, whose backward raises. none: the backward writes the gradient into the saved
    logits (a version bump, so a later unpack of the same logits raises)."""

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                softcap, logit_scale):
        (ctx.ignore_index, ctx.reduction, ctx.label_smoothing, ctx.z_loss, ctx.softcap,
         ctx.logit_scale) = ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale
        ctx.set_materialize_grads(False)
        ctx.used = False
        ctx.applied = None
        if reduction == 0:
            loss, lse, _ = _ce_op(input, target, weight, ignore_index, reduction,
                                  label_smoothing, z_loss, softcap, logit_scale, False)
            ctx.save_for_backward(input, target, weight, lse)
            ctx.mark_non_differentiable(lse)
            return loss, lse, None
        loss, lse = _ce_inplace_op(input, target, weight, ignore_index, reduction,
                                   label_smoothing, z_loss, softcap, logit_scale)
        ctx.mark_dirty(input)
        ctx.save_for_backward(input)
        ctx.mark_non_differentiable(lse)
        return loss, lse, input

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_input_out):
        if grad_input_out is not None:
            raise RuntimeError(
                "the logits passed to cross_entropy(..., inplace_backward=True) were used after "
                "the call, but they now hold the gradient: compute with them before the loss, or "
                "use inplace_backward=False")
        none = (None,) * 8
        if grad_loss is None:
            return (None,) + none
        if ctx.reduction == 0:
            if ctx.used:
                raise RuntimeError(
                    "cross_entropy(..., reduction='none', inplace_backward=True) supports one "
                    "backward pass: it overwrites the logits with their gradient")
            ctx.used = True
            input, target, weight, lse = ctx.saved_tensors
            _ce_bwd_inplace_op(input, target, weight, lse, grad_loss, *_opts(ctx))
            return (input,) + none
        (grad,) = ctx.saved_tensors
        return (_scale_saved_grad(ctx, grad, grad_loss),) + none


# --------------------------------------------------------------------------- public function


def _soft_target_ce(input, target, weight, reduction, label_smoothing, z_loss, softcap,
                    logit_scale):
    """Class-probability targets, composed from torch ops and probact's log_softmax (the simple
    path: correctness first). loss_row = −Σ_c w_c t'_c log p_c + z_loss · lse², with
    t' = (1 − ε) t + ε / C; mean divides by the number of rows, as torch."""
    from .softmax import log_softmax

    math_dtype = accum_dtype(input)
    z = input.to(math_dtype) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    dim = 1 if input.ndim >= 2 else 0
    n_classes = input.shape[dim]
    t = target.to(math_dtype)
    if label_smoothing > 0.0:
        t = t * (1.0 - label_smoothing) + label_smoothing / n_classes
    if weight is not None:
        shape = [1] * input.ndim
        shape[dim] = n_classes
        t = t * weight.to(math_dtype).view(shape)
    logp = log_softmax(z, dim)
    lse = torch.logsumexp(z, dim)
    rows = -(t * logp).sum(dim)
    if z_loss:
        rows = rows + z_loss * lse * lse
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / (input.numel() // max(n_classes, 1))
    return loss.to(input.dtype), lse.detach().to(math_dtype)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_lse: bool = False,
    inplace_backward: bool = False,
):
    """Softmax cross-entropy as ``torch.nn.functional.cross_entropy`` (input (C), (N, C) or
    (N, C, d1, ...), class dim 1; targets as class indices or class probabilities; ``weight``,
    ``ignore_index``, ``reduction``, ``label_smoothing`` with torch's semantics), computed in
    fp32 and returned in the input's dtype, plus:

    - ``z_loss``: adds ``z_loss · lse²`` per non-ignored row (PaLM).
    - ``softcap``: logits become ``softcap · tanh(x / softcap)`` before the softmax (Gemma 2).
    - ``logit_scale``: logits are multiplied by it first (before the softcap).
    - ``return_lse``: returns ``(loss, lse)``, lse of the transformed logits per row, fp32 (fp64
      for fp64 input), not differentiable.
    - ``inplace_backward``: the gradient is written into ``input``'s storage (no logits-sized
      buffer). After the call ``input`` holds the gradient (sum/mean) or will hold it after
      backward (none); autograd raises if the logits are used again. Class indices only.

    A class index outside ``[0, C)`` that is not ``ignore_index`` gives NaN for its row (never an
    out-of-bounds read); all targets ignored with ``"mean"`` gives NaN, as torch. With
    ``reduction`` sum or mean and ``input.requires_grad``, the gradient is computed in the forward
    (one read of the logits when a row fits on-chip); backward only scales it by grad_output (a
    no-op when that is 1).
    """
    _check_options(input, target, weight, reduction, label_smoothing, z_loss, softcap,
                   logit_scale)
    soft = _check_target(input, target)
    check_same_device(input=input, target=target, weight=weight)
    label_smoothing = float(label_smoothing)
    if soft:
        if inplace_backward:
            raise ValueError("inplace_backward=True supports class-index targets only, got "
                             f"class probabilities (dtype={target.dtype})")
        loss, lse = _soft_target_ce(input, target, weight, reduction, label_smoothing,
                                    float(z_loss), softcap, float(logit_scale))
        return (loss, lse) if return_lse else loss
    squeeze = input.ndim == 1
    x = _as2(input)
    t = target.reshape(1) if squeeze else target
    args = (t, weight, int(ignore_index), _RED[reduction], label_smoothing, float(z_loss),
            0.0 if softcap is None else float(softcap), float(logit_scale))
    needs_grad = input.requires_grad and torch.is_grad_enabled()
    if inplace_backward and squeeze:
        raise ValueError("inplace_backward=True needs input with a batch dim (N, C, ...)")
    if inplace_backward and needs_grad:
        loss, lse, _ = CrossEntropyInplaceFunction.apply(x, *args)
    else:  # (in place without a backward to feed would only destroy the logits)
        loss, lse, _ = _ce_op(x, *args, needs_grad and reduction != "none")
    if squeeze:
        lse = lse.reshape(())
        if reduction == "none":
            loss = loss.reshape(())
    return (loss, lse) if return_lse else loss
