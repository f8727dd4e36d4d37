"""Softmax cross-entropy: launchers, the registered custom ops, autograd, the public function.

Read top-down: the launchers run the kernels of ``probact_gpu.kernels.cross_entropy`` (every
launch through ``_runtime.launch``, which records it); the ``probact_gpu::cross_entropy*``
torch.library ops wrap them (with fake implementations, so ``torch.compile(fullgraph=True)``
traces them), taking the options flattened by ``CrossEntropyOptions.schema_args`` (native
schema types); autograd is registered on the main op; an ``autograd.Function`` handles
``inplace_backward=True``; ``cross_entropy`` is the public function. Its options are validated
once, by ``CrossEntropyOptions``.

Launchers meant for reuse (fused linear+CE, vocab-parallel CE); no host sync in any of them.
Each takes the options either as keywords (``weight``, ``ignore_index``, ``reduction``,
``label_smoothing``, ``z_loss``, ``softcap``, ``logit_scale``, ``logit_divisor``,
``temperature``, ``normalizer`` where it applies) or as one ``options=CrossEntropyOptions``
(then those keywords must stay at their defaults):

``cross_entropy_fwd(logits, target, *, <options>, compute_grad=False, grad_out=None,
total_weight=None, config=None) -> (loss_rows, lse, dlogits | None)``
    ``logits`` (N, C) of any strides, ``target`` (N,) int32/int64. ``loss_rows`` and ``lse`` are
    (N,) fp32 (fp64 for fp64 logits), unreduced. With ``compute_grad``, dlogits of the *reduced*
    loss (sum, divided by a ``normalizer``; mean divides by ``total_weight``, a 0-d device
    tensor, computed from these targets when None; ``reduction="none"`` gives the gradient of
    ``loss_rows.sum()``) is written to ``grad_out`` (which may be ``logits`` itself: in place)
    or a new tensor, and returned.

``cross_entropy_total_weight(target, n_classes, *, weight=None, ignore_index=-100, dtype)``
    The mean's divisor, Σ w_t over non-ignored targets, as a 0-d device tensor.

Split row, with a column offset so a rank holding classes ``[vocab_start, vocab_start + V_local)``
of ``n_classes`` calls them on its shard (``weight`` is always the *global* (n_classes,) vector):

``cross_entropy_partial_stats(logits, target, *, vocab_start=0, <options>, config=None)``
    (N, S, 4) fp32: per (row, chunk) max z, Σ exp(z − max), z_t (0 unless the target is in the
    chunk), Σ w·z. Partials from several ranks concatenate along dim 1 (all_gather) before:
``cross_entropy_combine(stats, target, n_classes, *, <options>) -> (loss_rows, lse)``
``cross_entropy_grad(logits, target, lse, grad, *, vocab_start=0, n_classes=None, <options>,
divisor=None, out=None, config=None) -> dlogits``
    ``grad``: 0-d or (N,) device tensor (grad_output), divided by ``divisor`` (0-d) when given
    and by a ``normalizer``. ``out`` may be ``logits`` (in place).

``cross_entropy_finish(rows, *, divisor=None, denom=1.0, dtype=None)``: the reduced loss,
``Σ rows / (denom · divisor)``, cast to ``dtype``, in one deterministic kernel.

``cross_entropy_scale_grad(dx, grad_output)``: ``dx *= grad_output`` on the device.

A tensor a kernel writes (``grad_out``, ``out``, ``dx``) is never a hidden copy: one whose
memory overlaps itself (an expanded tensor) is refused before anything is written; one whose
dims after the class dim do not merge into one stride is written through a contiguous
temporary that is then copied back into it, explicitly.

Long rows with the fused gradient run a persistent sweep (one program per SM, looping over
rows) when one program per row would put more rows in flight than L2 holds for the second
sweep's re-read (``tiling.choose_cross_entropy_config``); ``config=RowConfig("multi", ...,
n_programs=P)`` forces P programs, ``n_programs=0`` one per row.

Rows Triton cannot prove 16-byte aligned (a row stride like V = 50257, a sliced view's base)
run the sweep forward, the backward and the gradient rescale with ``PEEL_EDGES`` (16-byte
accesses for all but a row's first and last few elements) whenever the logits' and the
gradient's rows sit at one offset from a 16-byte boundary: ``tiling.peel_row_edges``; the launch
record's meta says which ran.

Semantics not fixed by torch: a target outside ``[0, C)`` that is not ``ignore_index`` gives a
NaN loss for its row (and a NaN gradient row) instead of an error; all targets ignored with
``reduction="mean"`` gives NaN (0 / 0), as torch; the z-loss term ``z_loss · lse²`` is added per
non-ignored row and, for ``"mean"``, divided by the same divisor as the rest of the loss.

Precision: float options (``label_smoothing``, ``z_loss``, the transform's factors
``logit_scale / logit_divisor``, ``softcap`` and ``1 / temperature``, a numeric normalizer)
reach the kernels as fp32 scalars. The single-tile and sweep forwards form ``lse − z_t`` and
the smoothing sum around the row's max, so |x| ~ 1e4 loses nothing; the split path's smoothing
partial (Σ w·z per chunk) and the from-lse gradient (``exp(z − lse)``) carry an absolute error
of about ulp(|x|) there. The from-lse gradient (the backward of ``reduction="none"``, and the
split path) also carries lse's own rounding to fp32: every p is off by up to ulp(lse)/2
relative, where torch's ``exp(log_softmax)`` is off by ulp(log p) (at 9 × 7 logits of scale 2,
3.6 ulps of the largest dx against torch's 1.6). A row that is one whole tile of the backward
therefore recomputes its own max and Σ exp (``ROW_STATS``); longer rows keep the lse error —
saving lse as a float64, or the row's max and log Σ exp apart as the token log-probs ops do,
would remove it there too.
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from .. import tiling
from .._runtime import (
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
from ..kernels.cross_entropy import (
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
from ..options import CrossEntropyOptions
from ..tiling import RowConfig

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
    target = target.reshape(-1)
    out = torch.empty((), dtype=dtype, device=target.device)
    if target.numel() == 0:
        return out.zero_()
    check_runnable(target, "target")
    weight = None if weight is None else weight.contiguous()
    launch(cross_entropy_total_weight_kernel, (1,),
           (target, weight, out, target.numel(), n_classes, ignore_index),
           path="prepass", num_warps=4, BLOCK=tiling.CE_TOTAL_WEIGHT_BLOCK)
    return out


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
    _loss_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split step 2: merge the (N, S, 4) partials of each row into (loss_rows, lse), both (N,)
    in the stats' dtype."""
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
           (stats, target, weight, _weight_sum(opts, weight, stats), loss, lse,
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
    out: torch.Tensor | None = None,
    config: RowConfig | None = None,
) -> torch.Tensor:
    """dlogits from the rows' ``lse``: ``grad`` (0-d, or one per row) times d loss_row / d x,
    divided by ``divisor`` (0-d) when given and by the options' ``normalizer`` (which needs
    ``reduction="sum"`` in the options). One read of ``logits``, one write of ``out`` (a new
    tensor like ``logits`` when None; may be ``logits`` itself)."""
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
               denom=denom, config=config)
    _copy_back(out, temp)
    return out


def _grad_rows(xv: RowView, dxv: RowView, target, lse, grad, opts: CrossEntropyOptions, *,
               vocab_start: int, n_classes: int, divisor, denom: float, config) -> None:
    """cross_entropy_grad on RowViews, g = grad / (denom · divisor)."""
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
            dxv.tensor, xv.n_cols, xv.n_inner, chunk, vocab_start, n_classes, opts.ignore_index,
            0 if grad.ndim == 0 else grad.stride(0), xv.strides, dxv.strides,
            opts.label_smoothing, opts.z_loss, *opts.transform.kernel_factors, denom),
           path=cfg.path, num_warps=cfg.num_warps, BLOCK_N=block_n,
           HAS_SMOOTHING=_smoothing(opts), HEAD=opts.transform.kernel_mode,
           PEEL_EDGES=peel, ROW_STATS=row_stats)


def _fwd_rows(xv: RowView, target: torch.Tensor, opts: CrossEntropyOptions, *,
              dxv: RowView | None, divisor, denom: float, config, loss_dtype=None):
    """The forward on a RowView ``xv`` (rows along the class dim) and flat targets: returns
    (loss_rows, lse); with ``dxv`` the fused gradient of the reduced loss (g = 1 / (denom ·
    divisor)) is written there."""
    x = xv.tensor
    n_rows, n_cols = xv.n_rows, xv.n_cols
    sdt = accum_dtype(x)
    loss_dtype = loss_dtype or sdt
    if n_rows == 0:
        return empty((0,), loss_dtype, x.device), empty((0,), sdt, x.device)
    cfg = _config(n_rows, n_cols, x, config, fused_grad=dxv is not None)
    if cfg.path == "split":
        stats = cross_entropy_partial_stats(x, target, options=opts, config=cfg, _view=xv)
        loss, lse = cross_entropy_combine(stats, target, n_cols, options=opts,
                                          _loss_dtype=loss_dtype)
        if dxv is not None:
            one = torch.ones((), dtype=sdt, device=x.device)
            _grad_rows(xv, dxv, target, lse, one, opts, vocab_start=0, n_classes=n_cols,
                       divisor=divisor, denom=denom, config=cfg)
        return loss, lse
    loss = empty((n_rows,), loss_dtype, x.device)
    lse = empty((n_rows,), sdt, x.device)
    compute_grad = dxv is not None
    dx_view = dxv if compute_grad else xv
    data = (x, target, _weight(opts), divisor, loss, lse, dx_view.tensor)
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
    config: RowConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row loss and lse of 2-D ``logits`` (N, C) against class indices ``target`` (N,), and,
    with ``compute_grad``, the gradient of the reduced loss written to ``grad_out`` (default: a
    new tensor; ``logits`` itself for in place). See the module docstring."""
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
    if compute_grad and opts.reduction == "mean":
        divisor = total_weight if total_weight is not None else cross_entropy_total_weight(
            target, logits.shape[1], weight=opts.weight, ignore_index=opts.ignore_index,
            dtype=sdt)
    elif compute_grad and opts.reduction == "sum":
        divisor, denom = _normalizer(opts, logits, sdt)
    dx, dxv, temp = None, None, None
    if compute_grad:
        dx = grad_out if grad_out is not None else empty(logits.shape, logits.dtype,
                                                         logits.device)
        dxv, temp = _written_view(dx, "grad_out")
    loss, lse = _fwd_rows(row_view(logits, 1), target, opts, dxv=dxv, divisor=divisor,
                          denom=denom, config=config)
    if dx is not None:
        _copy_back(dx, temp)
    return loss, lse, dx


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


# --------------------------------------------------------------------------- validation


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


def _inplace_carrier(input: torch.Tensor, reduction: str):
    """Before anything is written: may autograd let ``input`` be overwritten in place? Returns
    (the tensor to hand autograd as written, the logits' geometry in it or None). A view (sum /
    mean) is written through its base — autograd cannot mark a view dirty in a function with
    several outputs — so it must cover its base whole (``logits.view(-1, V)``, the usual LM
    head call)."""
    if input.is_leaf:
        raise RuntimeError(
            "cross_entropy(..., inplace_backward=True) overwrites input with its gradient, but "
            "input is a leaf tensor that requires grad, which autograd never lets be written in "
            "place: pass the logits as computed (a non-leaf tensor), or inplace_backward=False")
    if _overlaps(input):
        raise ValueError(
            f"cross_entropy(..., inplace_backward=True): input (shape {tuple(input.shape)}, "
            f"strides {input.stride()}) has elements sharing memory (an expanded tensor), so "
            "its gradient cannot be written in place: use inplace_backward=False")
    if not input._is_view():
        return input, None
    base = input._base
    if base.is_leaf:
        raise RuntimeError(
            "cross_entropy(..., inplace_backward=True) overwrites input with its gradient, but "
            "input is a view of a leaf tensor that requires grad, which autograd never lets be "
            "written in place: use inplace_backward=False")
    meta = torch._C._autograd._get_creation_meta(input)
    if meta != torch._C._autograd.CreationMeta.DEFAULT:
        raise RuntimeError(
            f"cross_entropy(..., inplace_backward=True) overwrites input with its gradient, but "
            f"input is a view autograd does not let be written in place ({meta}: a view made "
            "under no_grad, or one of several views from one op such as split): pass a tensor "
            "that is not such a view, or inplace_backward=False")
    if reduction == "none":
        return input, None
    if base.numel() != input.numel() or torch._debug_has_internal_overlap(base) != 0:
        raise ValueError(
            f"cross_entropy(..., inplace_backward=True): input is a view of part of a larger "
            f"tensor (shape {tuple(base.shape)}); its gradient can be written in place only "
            "when the view covers its base whole (e.g. logits.view(-1, V)): pass "
            "input.contiguous(), or inplace_backward=False")
    return base, (tuple(input.shape), input.stride(), input.storage_offset())


# --------------------------------------------------------------------------- custom ops
#
# Every op takes the options as ``CrossEntropyOptions.schema_args()``: weight: Tensor?,
# ignore_index: int, reduction: str, label_smoothing: float, z_loss: float, logit_scale: float,
# logit_divisor: float, softcap: float?, temperature: float, normalizer: Tensor?,
# normalizer_value: float?.


def _run(input: torch.Tensor, target: torch.Tensor, opts: CrossEntropyOptions,
         grad_out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward for an ND input (class dim 1) and its targets: (loss, lse). With
    ``grad_out`` the fused gradient of the loss is written there. Launches: the mean's divisor
    (mean only), the forward, and (sum/mean) the finish kernel, which reduces the rows."""
    sdt = accum_dtype(input)
    if input.numel() > 0:
        check_runnable(input)
    flat = target.reshape(-1).contiguous()
    xv = row_view(input, 1)
    divisor, denom = None, 1.0
    if opts.reduction == "mean":
        divisor = cross_entropy_total_weight(flat, xv.n_cols, weight=opts.weight,
                                             ignore_index=opts.ignore_index, dtype=sdt)
    elif opts.reduction == "sum":
        divisor, denom = _normalizer(opts, input, sdt)
    dxv, temp = (None, None) if grad_out is None else _written_view(grad_out, "input")
    rows, lse = _fwd_rows(xv, flat, opts, dxv=dxv, divisor=divisor, denom=denom, config=None,
                          loss_dtype=input.dtype if opts.reduction == "none" else None)
    if grad_out is not None:
        _copy_back(grad_out, temp)
    if opts.reduction == "none":
        loss = rows.reshape(target.shape)
    else:
        loss = cross_entropy_finish(rows, divisor=divisor, denom=denom, dtype=input.dtype)
    return loss, lse.reshape(target.shape)


def _fake_outputs(input, target, reduction):
    loss_shape = target.shape if reduction == "none" else ()
    return (input.new_empty(loss_shape),
            input.new_empty(target.shape, dtype=accum_dtype(input)))


@torch.library.custom_op("probact_gpu::cross_entropy", mutates_args=())
def _ce_op(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
    reduction: str, label_smoothing: float, z_loss: float, logit_scale: float,
    logit_divisor: float, softcap: float | None, temperature: float,
    normalizer: torch.Tensor | None, normalizer_value: float | None, compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, dlogits of the reduced loss — or an empty tensor without compute_grad).
    ``input`` has at least 2 dims (class dim 1)."""
    opts = CrossEntropyOptions.from_schema(weight, ignore_index, reduction, label_smoothing,
                                           z_loss, logit_scale, logit_divisor, softcap,
                                           temperature, normalizer, normalizer_value)
    grad = empty(input.shape if compute_grad else (0,), input.dtype, input.device)
    loss, lse = _run(input, target, opts, grad if compute_grad else None)
    return loss, lse, grad


@_ce_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, logit_scale,
      logit_divisor, softcap, temperature, normalizer, normalizer_value, compute_grad):
    loss, lse = _fake_outputs(input, target, reduction)
    return loss, lse, input.new_empty(input.shape if compute_grad else (0,))


@torch.library.custom_op("probact_gpu::cross_entropy_inplace", mutates_args=("input",))
def _ce_inplace_op(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
    reduction: str, label_smoothing: float, z_loss: float, logit_scale: float,
    logit_divisor: float, softcap: float | None, temperature: float,
    normalizer: torch.Tensor | None, normalizer_value: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) for sum/mean; the gradient of the loss overwrites ``input``."""
    opts = CrossEntropyOptions.from_schema(weight, ignore_index, reduction, label_smoothing,
                                           z_loss, logit_scale, logit_divisor, softcap,
                                           temperature, normalizer, normalizer_value)
    return _run(input, target, opts, input)


@_ce_inplace_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, logit_scale,
      logit_divisor, softcap, temperature, normalizer, normalizer_value):
    return _fake_outputs(input, target, reduction)


def _bwd_impl(input, target, lse, grad_output, opts: CrossEntropyOptions, out) -> None:
    flat = target.reshape(-1).contiguous()
    xv = row_view(input, 1)
    dxv, temp = _written_view(out, "input")
    divisor, denom = None, 1.0
    if opts.reduction == "mean":
        divisor = cross_entropy_total_weight(flat, xv.n_cols, weight=opts.weight,
                                             ignore_index=opts.ignore_index, dtype=lse.dtype)
    elif opts.reduction == "sum":
        divisor, denom = _normalizer(opts, input, lse.dtype)
    g = grad_output.reshape(-1) if grad_output.ndim else grad_output
    _grad_rows(xv, dxv, flat, lse.reshape(-1), g, opts, vocab_start=0, n_classes=xv.n_cols,
               divisor=divisor, denom=denom, config=None)
    _copy_back(out, temp)


@torch.library.custom_op("probact_gpu::cross_entropy_bwd", mutates_args=())
def _ce_bwd_op(
    input: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad_output: torch.Tensor,
    weight: torch.Tensor | None, ignore_index: int, reduction: str, label_smoothing: float,
    z_loss: float, logit_scale: float, logit_divisor: float, softcap: float | None,
    temperature: float, normalizer: torch.Tensor | None, normalizer_value: float | None,
) -> torch.Tensor:
    """dlogits from the saved lse and ``grad_output`` (0-d, or the per-row loss's shape)."""
    opts = CrossEntropyOptions.from_schema(weight, ignore_index, reduction, label_smoothing,
                                           z_loss, logit_scale, logit_divisor, softcap,
                                           temperature, normalizer, normalizer_value)
    out = empty(input.shape, input.dtype, input.device)
    _bwd_impl(input, target, lse, grad_output, opts, out)
    return out


@_ce_bwd_op.register_fake
def _(input, target, lse, grad_output, *schema):
    return input.new_empty(input.shape)


@torch.library.custom_op("probact_gpu::cross_entropy_bwd_inplace", mutates_args=("input",))
def _ce_bwd_inplace_op(
    input: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad_output: torch.Tensor,
    weight: torch.Tensor | None, ignore_index: int, reduction: str, label_smoothing: float,
    z_loss: float, logit_scale: float, logit_divisor: float, softcap: float | None,
    temperature: float, normalizer: torch.Tensor | None, normalizer_value: float | None,
) -> None:
    """As ``cross_entropy_bwd``, the gradient overwriting ``input``."""
    opts = CrossEntropyOptions.from_schema(weight, ignore_index, reduction, label_smoothing,
                                           z_loss, logit_scale, logit_divisor, softcap,
                                           temperature, normalizer, normalizer_value)
    _bwd_impl(input, target, lse, grad_output, opts, input)


@_ce_bwd_inplace_op.register_fake
def _(input, target, lse, grad_output, *schema):
    return None


# --------------------------------------------------------------------------- autograd


def _refuse_double_backward() -> None:
    """Raise when a backward runs with grad mode on (``create_graph=True``): the gradient comes
    from a kernel (in the forward, for sum/mean), so it has no graph of its own to
    differentiate — returning it would silently make every second derivative 0."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            "probact_gpu.cross_entropy does not support double backward (create_graph=True): "
            "its gradient is computed by a kernel, not by differentiable ops; use "
            "torch.nn.functional.cross_entropy for higher-order derivatives")


_MODIFIED = ("cross_entropy: a repeated backward through this graph (retain_graph) rescales the "
             "gradient the first backward returned, but that tensor (or the first grad_output) "
             "was modified in place since — e.g. accumulated into .grad, or changed by the "
             "caller. Clone the first gradient before modifying it, or run the forward again")


def _saved_grad(ctx) -> torch.Tensor:
    """The fused gradient saved by the forward; our error when autograd finds it was modified
    in place (it is the tensor a first backward handed out)."""
    try:
        (grad,) = ctx.saved_tensors
    except RuntimeError as exc:
        if "modified by an inplace operation" not in str(exc):
            raise
        raise RuntimeError(_MODIFIED) from exc
    return grad


def _scale_saved_grad(ctx, grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """The fused gradient times grad_output. First backward, eager: in place, by the launcher
    directly (one small launch that returns at once when grad_output is 1; not a registered
    mutating op, so the saved tensor's version stays valid) and the buffer itself is returned,
    so autograd keeps it as .grad with no copy. A repeated backward through the same graph
    (retain_graph) returns a new tensor, rescaled by grad_output over the grad_output applied
    first (a first grad_output of exactly 0 leaves NaN); it needs both as the first backward
    left them, so it raises if either was modified in place since (version counters) — e.g.
    by an in-place accumulation into ``.grad``. Under torch.compile (which cannot partition a
    backward mutating a saved forward output) always out of place."""
    if torch.compiler.is_compiling():
        return grad * grad_output
    if ctx.handed_out is None:
        cross_entropy_scale_grad(grad, grad_output)
        ctx.handed_out = (grad._version, grad_output, grad_output._version)
        return grad
    version, first, first_version = ctx.handed_out
    if grad._version != version or first._version != first_version:
        raise RuntimeError(_MODIFIED)
    return grad * (grad_output / first).to(grad.dtype)


_N_OP_INPUTS = 2 + CrossEntropyOptions.N_SCHEMA_ARGS + 1


def _setup_context(ctx, inputs, output):
    input, target, *schema, compute_grad = inputs
    _, lse, grad = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse, grad)
    ctx.fused = compute_grad
    ctx.handed_out = None
    weight, normalizer = schema[0], schema[9]
    ctx.scalars = (*schema[1:9], schema[10])
    if compute_grad:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(input, target, lse, weight, normalizer)


def _backward(ctx, grad_loss, grad_lse, grad_grad):
    none = (None,) * (_N_OP_INPUTS - 1)
    if grad_loss is None:
        return (None, *none)
    _refuse_double_backward()
    if ctx.fused:
        return (_scale_saved_grad(ctx, _saved_grad(ctx), grad_loss), *none)
    input, target, lse, weight, normalizer = ctx.saved_tensors
    scalars = ctx.scalars
    dx = _ce_bwd_op(input, target, lse, grad_loss, weight, *scalars[:8], normalizer, scalars[8])
    return (dx, *none)


torch.library.register_autograd("probact_gpu::cross_entropy", _backward,
                                setup_context=_setup_context)


class CrossEntropyInplaceFunction(torch.autograd.Function):
    """``inplace_backward=True``: the gradient lives in the logits' storage.

    sum/mean: the forward writes the gradient into the logits, marks them dirty and returns them
    as a hidden output, so autograd knows: an op that saved the logits before raises at backward
    ("modified by an inplace operation"), and any differentiable use of the logits afterwards
    flows a gradient into this node, whose backward raises. none: the backward writes the
    gradient into the saved logits (a version bump, so a later unpack of the same logits
    raises). ``cross_entropy`` validates the logits before calling it (nothing is written
    when autograd would refuse)."""

    @staticmethod
    def forward(ctx, carrier, target, geometry, *schema):
        """``carrier``: the logits, or (sum/mean, logits that are a view) the base tensor they
        cover whole, which autograd is told was written; ``geometry``: None, or the logits'
        (size, stride, storage_offset) in the base."""
        opts = CrossEntropyOptions.from_schema(*schema)
        ctx.set_materialize_grads(False)
        ctx.used = False
        ctx.handed_out = None
        ctx.schema_scalars = (*schema[1:9], schema[10])
        if opts.reduction == "none":
            loss, lse, _ = _ce_op(carrier, target, *schema, False)
            ctx.save_for_backward(carrier, target, lse, schema[0])
            ctx.mark_non_differentiable(lse)
            return loss, lse, None
        x = carrier if geometry is None else carrier.as_strided(*geometry)
        loss, lse = _ce_inplace_op(x, target, *schema)
        ctx.mark_dirty(carrier)
        ctx.save_for_backward(carrier)
        ctx.mark_non_differentiable(lse)
        return loss, lse, carrier

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_input_out):
        none = (None,) * (2 + CrossEntropyOptions.N_SCHEMA_ARGS)
        if grad_input_out is not None:
            raise RuntimeError(
                "the logits passed to cross_entropy(..., inplace_backward=True) were used after "
                "the call, but they now hold the gradient: compute with them before the loss, or "
                "use inplace_backward=False")
        if grad_loss is None:
            return (None, *none)
        _refuse_double_backward()
        if ctx.schema_scalars[1] == "none":
            if ctx.used:
                raise RuntimeError(
                    "cross_entropy(..., reduction='none', inplace_backward=True) supports one "
                    "backward pass: it overwrites the logits with their gradient")
            ctx.used = True
            input, target, lse, weight = ctx.saved_tensors
            s = ctx.schema_scalars
            _ce_bwd_inplace_op(input, target, lse, grad_loss, weight, *s[:8], None, s[8])
            return (input, *none)
        return (_scale_saved_grad(ctx, _saved_grad(ctx), grad_loss), *none)


# --------------------------------------------------------------------------- public function


def _soft_target_ce(input: torch.Tensor, target: torch.Tensor, opts: CrossEntropyOptions):
    """Class-probability targets, composed from torch ops and probact's log_softmax (the simple
    path: correctness first). loss_row = −Σ_c w_c t'_c log p_c + z_loss · lse², with
    t' = (1 − ε) t + ε / C over the transformed logits (``HeadTransform.apply``); mean divides
    by the number of rows, as torch; sum by the normalizer when one is given."""
    from .softmax import log_softmax

    math_dtype = accum_dtype(input)
    z = opts.transform.apply(input.to(math_dtype))
    dim = 1 if input.ndim >= 2 else 0
    n_classes = input.shape[dim]
    t = target.to(math_dtype)
    if opts.label_smoothing > 0.0:
        t = t * (1.0 - opts.label_smoothing) + opts.label_smoothing / n_classes
    if opts.weight is not None:
        shape = [1] * input.ndim
        shape[dim] = n_classes
        t = t * opts.weight.to(math_dtype).view(shape)
    logp = log_softmax(z, dim)
    lse = torch.logsumexp(z, dim)
    rows = -(t * logp).sum(dim)
    if opts.z_loss:
        rows = rows + opts.z_loss * lse * lse
    if opts.reduction == "none":
        loss = rows
    elif opts.reduction == "sum":
        loss = rows.sum()
        if opts.normalizer is not None:
            loss = loss / opts.normalizer
    else:
        loss = rows.sum() / (input.numel() // max(n_classes, 1))
    return loss.to(input.dtype), lse.detach().to(math_dtype)


@overload
def cross_entropy(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, *,
    ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
    z_loss: float = 0.0, softcap: float | None = None, logit_scale: float = 1.0,
    logit_divisor: float = 1.0, temperature: float = 1.0,
    normalizer: float | torch.Tensor | None = None, return_lse: Literal[False] = False,
    inplace_backward: bool = False,
) -> torch.Tensor: ...


@overload
def cross_entropy(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, *,
    ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
    z_loss: float = 0.0, softcap: float | None = None, logit_scale: float = 1.0,
    logit_divisor: float = 1.0, temperature: float = 1.0,
    normalizer: float | torch.Tensor | None = None, return_lse: Literal[True],
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    logit_divisor: float = 1.0,
    temperature: float = 1.0,
    normalizer: float | torch.Tensor | None = None,
    return_lse: bool = False,
    inplace_backward: bool = False,
):
    """Softmax cross-entropy as ``torch.nn.functional.cross_entropy`` (input (C), (N, C) or
    (N, C, d1, ...), class dim 1; targets as class indices or class probabilities; ``weight``,
    ``ignore_index``, ``reduction``, ``label_smoothing`` with torch's semantics and scalar rules),
    computed in fp32 (fp64 for fp64 input) and returned in the input's dtype, plus:

    - ``z_loss``: adds ``z_loss · lse²`` per non-ignored row (PaLM).
    - the logit transform, in this order, inside the kernels: ``logit_scale`` (multiplies),
      ``logit_divisor`` (divides), ``softcap`` (``softcap · tanh(z / softcap)``, Gemma 2),
      ``temperature`` (divides); loss and lse are those of the transformed logits.
    - ``normalizer`` (``reduction="sum"`` only): a number or a 0-d device tensor the summed loss
      and its gradient are divided by on the device (Hugging Face's ``num_items_in_batch``).
    - ``return_lse``: returns ``(loss, lse)``, lse of the transformed logits per row, fp32 (fp64
      for fp64 input), not differentiable.
    - ``inplace_backward``: the gradient is written into ``input``'s storage (no logits-sized
      buffer), when ``input`` requires grad (otherwise it is left alone). Class indices and a
      batch dim only. Checked before anything is written: a leaf that requires grad, a view of
      one, a view autograd forbids writing (no_grad, multi-output), an expanded tensor and
      (sum/mean) a view of part of a larger tensor raise; a view covering its base whole
      (``logits.view(-1, V)``) works. Logits whose dims after the class dim do not merge into
      one stride are computed through a temporary copied back into them (correct, not free).
      After the call ``input`` holds the gradient (sum/mean; none: after backward). Autograd
      then raises if an op that saved the logits earlier runs its backward, or if a
      differentiable use of the logits after the call needs a gradient; a non-differentiable
      read (``logits.argmax(1)``, printing, a copy under no_grad) raises nothing and silently
      reads the gradient — read the logits before the call. Under ``torch.compile`` the
      out-of-place op is traced instead (same values, one logits-sized buffer).

    A class index outside ``[0, C)`` that is not ``ignore_index`` gives NaN for its row (never an
    out-of-bounds read); all targets ignored with ``"mean"`` gives NaN, as torch. With
    ``reduction`` sum or mean and ``input.requires_grad``, the gradient is computed in the forward
    (one read of the logits when a row fits on-chip); backward only scales it by grad_output (a
    no-op when that is 1). Double backward (``create_graph=True``) raises.
    """
    opts = CrossEntropyOptions.from_kwargs(
        weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, logit_scale=logit_scale,
        logit_divisor=logit_divisor, softcap=softcap, temperature=temperature,
        normalizer=normalizer)
    check_float("input", input)
    soft = _check_target(input, target)
    opts.check_weight(input.shape[1] if input.ndim >= 2 else input.shape[0], input.device)
    check_same_device(input=input, target=target)
    if isinstance(opts.normalizer, torch.Tensor):
        check_same_device(input=input, normalizer=opts.normalizer)
    if soft:
        if inplace_backward:
            raise ValueError("inplace_backward=True supports class-index targets only, got "
                             f"class probabilities (dtype={target.dtype})")
        loss, lse = _soft_target_ce(input, target, opts)
        return (loss, lse) if return_lse else loss
    squeeze = input.ndim == 1
    if inplace_backward and squeeze:
        raise ValueError("inplace_backward=True needs input with a batch dim (N, C, ...)")
    x = input.unsqueeze(0) if squeeze else input
    t = target.reshape(1) if squeeze else target
    needs_grad = input.requires_grad and torch.is_grad_enabled()
    if inplace_backward and needs_grad and not torch.compiler.is_compiling():
        carrier, geometry = _inplace_carrier(input, opts.reduction)
        loss, lse, _ = CrossEntropyInplaceFunction.apply(carrier, t, geometry,
                                                         *opts.schema_args())
    else:  # (in place without a backward to feed would only destroy the logits)
        loss, lse, _ = _ce_op(x, t, *opts.schema_args(),
                              needs_grad and opts.reduction != "none")
    if squeeze:
        lse = lse.reshape(())
        if opts.reduction == "none":
            loss = loss.reshape(())
    return (loss, lse) if return_lse else loss
