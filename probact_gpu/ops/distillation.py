"""Distillation on logits: a divergence between a teacher's and a student's distributions over
the vocabulary, token by token — launchers, the registered custom ops, autograd and the public
function :func:`distillation_loss` (``docs/distillation.md`` has the semantics).

Read top-down: the launchers run the kernels of ``probact_gpu.kernels.distillation`` (whose
docstring has the maths and the bytes); ``probact_gpu::distillation`` /
``probact_gpu::distillation_bwd`` (dense teacher) and ``probact_gpu::distillation_topk`` /
``probact_gpu::distillation_topk_bwd`` (sparse top-k teacher) wrap them as torch.library ops with
fake implementations, so ``torch.compile(fullgraph=True)`` traces them; autograd is registered on
the forward ops (the per-row loss is differentiable, the saved statistics are not); the public
function reduces the per-row losses with torch ops (``mean`` over the kept tokens, ``sum`` with an
optional ``normalizer``).

Launchers meant for reuse (the fused linear op, the vocab-parallel ops); no host sync in any:

``distillation_fwd(student, teacher, target, *, options, n_cols, save_stats, config=None)
-> (loss_rows, stats | None)``
    ``student`` (N, ≥ n_cols), ``teacher`` (N, ≥ n_cols) logits of any strides (rows along the
    last dim); ``target`` (N,) int32/int64 or None. ``loss_rows`` (N,) fp32 (fp64 for fp64
    logits): ``coef · D + hard_weight · CE`` per row, 0 on ignored rows; ``stats`` (N, 8) for the
    backward. Paths: ``multi`` (one program per row) and ``split`` (few long rows: partials
    merged on the device by :func:`merge_partials` and finished by :func:`finish_rows`).

``distillation_partial(student, teacher, target, *, options, n_cols, vocab_start=0,
config=None) -> partials (N, S, 8)``
    Per (row, chunk) ``(m_s, S, m_t, T, W, m_h, S_h, z_h[t])`` of shards holding global classes
    ``[vocab_start, vocab_start + n_cols)``.

``distillation_terms(student, teacher, stats, *, options, n_cols, config=None) -> (N, S, 2)``
    JSD's / TVD's term sums per (row, chunk) from merged statistics.

``distillation_bwd(student, teacher, target, stats, grad_rows, *, options, n_cols,
vocab_start=0, n_classes=None, out=None, config=None) -> dstudent``
    ``grad_rows`` (N,) or a 0-d tensor (one value for every row); ``out`` may be ``student``
    itself. Columns past ``n_cols`` of the student get 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import tiling
from .._runtime import (
    accum_dtype,
    autocast_fp32,
    check_float,
    check_runnable,
    check_same_device,
    empty,
    launch,
    row_view,
    sm_count,
)
from ..kernels.distillation import (
    distillation_bwd_kernel,
    distillation_fwd_kernel,
    distillation_partial_kernel,
    distillation_terms_kernel,
    distillation_topk_bwd_kernel,
    distillation_topk_fwd_kernel,
)
from ..options import (
    DIVERGENCE_KIND,
    DistillationOptions,
    scale_by_factor,
    split_student_factors,
)
from ..tiling import RowConfig
from ._autograd import differentiable_op, kernel_backward, register_vmap_loop, terminal_op

__all__ = [
    "TopKTeacher",
    "distillation_bwd",
    "distillation_fwd",
    "distillation_loss",
    "distillation_partial",
    "distillation_terms",
    "distillation_topk_bwd",
    "distillation_topk_fwd",
    "finish_rows",
    "merge_partials",
    "reduce_loss_rows",
]

KL, REVERSE_KL, JSD, TVD = (DIVERGENCE_KIND[k] for k in ("kl", "reverse_kl", "jsd", "tvd"))
N_STATS = 8  # the saved statistics a row: shift_s, L_s, shift_t, L_t, aux, shift_h, L_h, 0
_INT_DTYPES = (torch.int32, torch.int64)


class TopKTeacher(NamedTuple):
    """A sparse teacher: its ``k`` most likely classes per token and their log-probabilities
    under the full teacher distribution (the usual offline format). ``indices`` (…, k) int32 or
    int64, distinct within a token and in ``[0, V)``; ``log_probs`` (…, k) float, ``log p`` of
    those classes (−inf allowed). Pass it as ``distillation_loss``'s ``teacher_logits``."""

    indices: torch.Tensor
    log_probs: torch.Tensor


# --------------------------------------------------------------------------- launchers


def _elem(*tensors: torch.Tensor) -> int:
    return max(t.element_size() for t in tensors)


def _config(n_rows: int, n_cols: int, like: tuple, config: RowConfig | None) -> RowConfig:
    if config is None:
        return tiling.choose_distillation_config(n_rows, n_cols, _elem(*like),
                                                 sm_count(like[0].device))
    if config.path not in ("multi", "split") or config.n_programs or config.num_stages > 1:
        raise ValueError(f"config={config}: the distillation kernels run the 'multi' path (one "
                         "program per row) or the 'split' path, unpipelined")
    return config


def _chunking(n_cols: int, cfg: RowConfig) -> tuple[int, int]:
    """(splits, columns a split) of a (row, split) launch."""
    if cfg.path == "split":
        return cfg.n_splits, tiling.split_chunk(n_cols, cfg)
    return 1, max(n_cols, 1)


def distillation_partial(student, teacher, target, *, options: DistillationOptions, n_cols: int,
                         vocab_start: int = 0, config: RowConfig | None = None) -> torch.Tensor:
    """Per (row, chunk) partial statistics over local columns ``[0, n_cols)`` (global classes
    from ``vocab_start``): (N, S, 8) fp32 (fp64 for fp64 logits)."""
    sv, tv = row_view(student, student.ndim - 1), row_view(teacher, teacher.ndim - 1)
    cfg = _config(sv.n_rows, n_cols, (student, teacher), config)
    if cfg.path != "split":
        cfg = RowConfig("split", cfg.block_n, cfg.num_warps, n_splits=1)
    chunk = tiling.split_chunk(n_cols, cfg)
    parts = empty((sv.n_rows, cfg.n_splits, N_STATS), accum_dtype(student), student.device)
    if sv.n_rows == 0:
        return parts
    floats, flags = options.kernel_args()
    launch(distillation_partial_kernel, (sv.n_rows, cfg.n_splits),
           (sv.tensor, tv.tensor, target, parts, n_cols, 1, chunk, vocab_start, *sv.strides,
            *tv.strides, *floats[:9]),
           path="split", num_warps=cfg.num_warps, BLOCK_N=cfg.block_n, **flags)
    return parts


def rescale_partials(parts: torch.Tensor, maxima: torch.Tensor, kind: int) -> torch.Tensor:
    """Partials ``(…, 8)`` moved to the row maxima ``maxima`` ``(…, 3)`` (m_s, m_t, m_h, each
    ≥ the partial's): ``(S, T, W, S_h, z_h[t])`` ``(…, 5)``, to be summed over the partials (the
    online merge: ``s·α``, and ``W' = α (W + (d_own − d_other) s_own)`` with d = 0 where the
    partial is all −inf)."""
    m_s, s_s, m_t, s_t, w, m_h, s_h, z_t = parts.unbind(-1)

    def step(m, big):
        shift = torch.where(big == float("-inf"), 0.0, big)
        return torch.exp(m - shift), torch.where(m == float("-inf"), 0.0, m - shift)

    a_s, d_s = step(m_s, maxima[..., 0])
    a_t, d_t = step(m_t, maxima[..., 1])
    a_h, _ = step(m_h, maxima[..., 2])
    if kind == KL:
        w = a_t * (w + (d_t - d_s) * s_t)
    elif kind == REVERSE_KL:
        w = a_s * (w + (d_s - d_t) * s_s)
    return torch.stack([a_s * s_s, a_t * s_t, w, a_h * s_h, z_t], -1)


def merge_partials(parts: torch.Tensor, kind: int) -> torch.Tensor:
    """(N, K, 8) partials merged over K into (N, 8) ``(m_s, S, m_t, T, W, m_h, S_h, z_h[t])``,
    torch ops on the device (:func:`rescale_partials`, then a sum)."""
    maxima = parts[..., [0, 2, 5]].amax(dim=1)
    sums = rescale_partials(parts, maxima[:, None, :], kind).sum(dim=1)
    return torch.stack([maxima[:, 0], sums[:, 0], maxima[:, 1], sums[:, 1], sums[:, 2],
                        maxima[:, 2], sums[:, 3], sums[:, 4]], dim=1)


def merged_stats(merged: torch.Tensor, kind: int) -> torch.Tensor:
    """The saved (N, 8) statistics ``(shift_s, L_s, shift_t, L_t, aux, shift_h, L_h, z_h[t])``
    of merged rows; ``aux`` is KL / RKL for those divergences (the kernels' finish), 0 for JSD and
    TVD until their terms are summed (:func:`finish_rows`)."""
    m_s, s_s, m_t, s_t, w, m_h, s_h, z_t = merged.unbind(1)

    def shift(m):
        return torch.where(m == float("-inf"), 0.0, m)

    log_s, log_t = torch.log(s_s), torch.log(s_t)
    if kind == KL:
        aux = w / s_t + (log_s - log_t)
    elif kind == REVERSE_KL:
        aux = w / s_s + (log_t - log_s)
    else:
        aux = torch.zeros_like(w)
    return torch.stack([shift(m_s), log_s, shift(m_t), log_t, aux, shift(m_h), torch.log(s_h),
                        z_t], dim=1)


def finish_rows(stats: torch.Tensor, terms: torch.Tensor | None, target: torch.Tensor | None,
                options: DistillationOptions, n_classes: int) -> tuple[torch.Tensor,
                                                                       torch.Tensor]:
    """(loss rows, stats) from :func:`merged_stats`' rows and, for JSD / TVD, the summed term
    sums ``terms`` (N, 2): the kernels' finish in torch ops (``coef · D + hard_weight · CE``, 0
    on ignored rows; ``aux`` set). Column 7 of ``stats`` (z_h[t]) is not read again."""
    kind, coef = options.kernel_divergence
    beta = options.beta
    if kind == JSD:
        div = beta * terms[:, 0] + (1.0 - beta) * terms[:, 1]
        stats = torch.cat([stats[:, :4], terms[:, 1:2], stats[:, 5:]], dim=1)
    elif kind == TVD:
        div = 0.5 * terms[:, 0]
        stats = torch.cat([stats[:, :4], 0.5 * terms[:, 1:2], stats[:, 5:]], dim=1)
    else:
        div = stats[:, 4]
    loss = coef * div
    if options.hard_weight:
        t = target.to(torch.int64)
        in_range = (t >= 0) & (t < n_classes)
        ce = (stats[:, 5] + stats[:, 6]) - stats[:, 7]
        loss = loss + options.hard_weight * torch.where(in_range, ce, float("nan"))
    if target is not None:
        loss = torch.where(target != options.ignore_index, loss, 0.0)
    return loss, stats


def distillation_terms(student, teacher, stats, *, options: DistillationOptions, n_cols: int,
                       config: RowConfig | None = None) -> torch.Tensor:
    """JSD's / TVD's term sums (N, S, 2) over local columns ``[0, n_cols)``, from the merged
    statistics ``stats`` (N, 8)."""
    sv, tv = row_view(student, student.ndim - 1), row_view(teacher, teacher.ndim - 1)
    cfg = _config(sv.n_rows, n_cols, (student, teacher), config)
    n_splits, chunk = _chunking(n_cols, cfg)
    out = empty((sv.n_rows, n_splits, 2), accum_dtype(student), student.device)
    if sv.n_rows == 0:
        return out
    floats, flags = options.kernel_args()
    launch(distillation_terms_kernel, (sv.n_rows, n_splits),
           (sv.tensor, tv.tensor, stats, out, n_cols, 1, chunk, *sv.strides, *tv.strides,
            *floats[:6], *floats[9:11]),
           path=cfg.path, num_warps=cfg.num_warps, BLOCK_N=cfg.block_n,
           HEAD_S=flags["HEAD_S"], HEAD_T=flags["HEAD_T"], DIVERGENCE=flags["DIVERGENCE"])
    return out


def distillation_fwd(student, teacher, target, *, options: DistillationOptions, n_cols: int,
                     save_stats: bool = False, config: RowConfig | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss (and the saved statistics) over the first ``n_cols`` classes of both rows
    (module docstring). One read of each row for KL / RKL; JSD and TVD read them again in a
    reverse sweep (the ``multi`` path) or a second launch (``split``)."""
    sv, tv = row_view(student, student.ndim - 1), row_view(teacher, teacher.ndim - 1)
    n_rows, sdt, device = sv.n_rows, accum_dtype(student), student.device
    if n_rows == 0:
        return (torch.empty(0, dtype=sdt, device=device),
                torch.empty((0, N_STATS), dtype=sdt, device=device) if save_stats else None)
    cfg = _config(n_rows, n_cols, (student, teacher), config)
    kind, _ = options.kernel_divergence
    if cfg.path == "split":
        parts = distillation_partial(student, teacher, target, options=options, n_cols=n_cols,
                                     config=cfg)
        stats = merged_stats(merge_partials(parts, kind), kind)
        terms = None
        if kind in (JSD, TVD):
            terms = distillation_terms(student, teacher, stats, options=options, n_cols=n_cols,
                                       config=cfg).sum(dim=1)
        loss, stats = finish_rows(stats, terms, target, options, n_cols)
        return loss, stats if save_stats else None
    loss = empty((n_rows,), sdt, device)
    stats = empty((n_rows, N_STATS), sdt, device) if save_stats else None
    floats, flags = options.kernel_args()
    launch(distillation_fwd_kernel, (n_rows,),
           (sv.tensor, tv.tensor, target, loss, stats, n_cols, 1, options.ignore_index,
            *sv.strides, *tv.strides, *floats),
           path="multi", num_warps=cfg.num_warps, BLOCK_N=cfg.block_n, **flags)
    return loss, stats


def _grad_rows(grad_rows: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, int]:
    """The upstream gradient and its row stride: 0 for one value for every row (a 0-d tensor or
    an expanded (N,) view: read in place)."""
    if grad_rows.ndim == 0:
        return grad_rows, 0
    if tuple(grad_rows.shape) != (n_rows,):
        raise ValueError(f"grad_rows must be ({n_rows},) or 0-d, got {tuple(grad_rows.shape)}")
    return grad_rows, grad_rows.stride(0)


def distillation_bwd(student, teacher, target, stats, grad_rows, *, options: DistillationOptions,
                     n_cols: int, vocab_start: int = 0, n_classes: int | None = None,
                     out: torch.Tensor | None = None, config: RowConfig | None = None
                     ) -> torch.Tensor:
    """dstudent = d(Σ g·loss_rows)/dstudent from the forward's (N, 8) ``stats``: one read of both
    rows, one write of ``out`` (a new contiguous tensor like ``student`` when None; may be
    ``student``). ``vocab_start`` / ``n_classes``: the local columns are global classes
    ``[vocab_start, vocab_start + n_cols)`` of ``n_classes`` (the hard term's target)."""
    if out is None:
        out = empty(student.shape, student.dtype, student.device)
    sv, tv = row_view(student, student.ndim - 1), row_view(teacher, teacher.ndim - 1)
    ov = row_view(out, out.ndim - 1)
    if ov.tensor is not out:
        raise ValueError("out must be addressable as rows along its last dim without a copy")
    if tuple(stats.shape) != (sv.n_rows, N_STATS):
        raise ValueError(f"stats must be the forward's ({sv.n_rows}, {N_STATS}) statistics, got "
                         f"shape {tuple(stats.shape)}")
    if sv.n_cols > n_cols:  # the student's classes past the shared ones: no gradient
        out[..., n_cols:].zero_()
    if sv.n_rows == 0 or n_cols == 0:
        return out
    g, g_stride = _grad_rows(grad_rows, sv.n_rows)
    cfg = _config(sv.n_rows, n_cols, (student, teacher), config)
    n_splits, chunk = _chunking(n_cols, cfg)
    floats, flags = options.kernel_args()
    launch(distillation_bwd_kernel, (sv.n_rows, n_splits),
           (sv.tensor, tv.tensor, target, stats, g, ov.tensor, n_cols, 1, chunk, vocab_start,
            n_cols if n_classes is None else n_classes, options.ignore_index, g_stride,
            *sv.strides, *tv.strides, *ov.strides, *floats),
           path=cfg.path, num_warps=cfg.num_warps, BLOCK_N=min(cfg.block_n,
                                                               tiling.next_power_of_2(chunk)),
           **flags)
    return out


# --------------------------------------------------------------------------- sparse launchers


def _topk_views(indices: torch.Tensor, log_probs: torch.Tensor, n_rows: int):
    """(N, k) views of the teacher's indices and log-probs with unit column stride (a copy only
    for a layout that has none: these are k values a token)."""
    k = indices.shape[-1]
    idx = indices.reshape(n_rows, k)
    lp = log_probs.reshape(n_rows, k)
    if k > 1 and idx.stride(1) != 1:
        idx = idx.contiguous()
    if k > 1 and lp.stride(1) != 1:
        lp = lp.contiguous()
    return idx, lp, k


def distillation_topk_fwd(student, indices, log_probs, target, *, options: DistillationOptions,
                          save_stats: bool = False, config: RowConfig | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss against a sparse top-k teacher (``kernels/distillation.py``): one sweep of
    the student's row, the k buckets and the tail."""
    sv = row_view(student, student.ndim - 1)
    n_rows, sdt, device = sv.n_rows, accum_dtype(student), student.device
    if n_rows == 0:
        return (torch.empty(0, dtype=sdt, device=device),
                torch.empty((0, N_STATS), dtype=sdt, device=device) if save_stats else None)
    idx, lp, k = _topk_views(indices, log_probs, n_rows)
    cfg = _config(n_rows, sv.n_cols, (student,), config)
    block_n = min(cfg.block_n, tiling.TOPK_TILE_COLS)
    loss = empty((n_rows,), sdt, device)
    stats = empty((n_rows, N_STATS), sdt, device) if save_stats else None
    floats, flags = options.kernel_args()
    launch(distillation_topk_fwd_kernel, (n_rows,),
           (sv.tensor, idx, lp, target, loss, stats, sv.n_cols, 1, k, options.ignore_index,
            *sv.strides, idx.stride(0), lp.stride(0), *floats[:3], *floats[9:]),
           path="multi", num_warps=cfg.num_warps, BLOCK_N=block_n,
           BLOCK_K=tiling.next_power_of_2(k), HEAD_S=flags["HEAD_S"],
           DIVERGENCE=flags["DIVERGENCE"], HAS_HARD=flags["HAS_HARD"])
    return loss, stats


def distillation_topk_bwd(student, indices, log_probs, target, stats, grad_rows, *,
                          options: DistillationOptions, out: torch.Tensor | None = None,
                          config: RowConfig | None = None) -> torch.Tensor:
    """dstudent against a sparse top-k teacher: the tail classes swept, the k scattered."""
    if out is None:
        out = empty(student.shape, student.dtype, student.device)
    sv, ov = row_view(student, student.ndim - 1), row_view(out, out.ndim - 1)
    if ov.tensor is not out:
        raise ValueError("out must be addressable as rows along its last dim without a copy")
    if sv.n_rows == 0:
        return out
    idx, lp, k = _topk_views(indices, log_probs, sv.n_rows)
    g, g_stride = _grad_rows(grad_rows, sv.n_rows)
    cfg = _config(sv.n_rows, sv.n_cols, (student,), config)
    n_splits, chunk = _chunking(sv.n_cols, cfg)
    floats, flags = options.kernel_args()
    launch(distillation_topk_bwd_kernel, (sv.n_rows, n_splits),
           (sv.tensor, idx, lp, target, stats, g, ov.tensor, sv.n_cols, 1, chunk, k,
            options.ignore_index, g_stride, *sv.strides, idx.stride(0), lp.stride(0),
            *ov.strides, *floats[:3], *floats[9:]),
           path=cfg.path, num_warps=cfg.num_warps,
           BLOCK_N=min(cfg.block_n, tiling.next_power_of_2(chunk), tiling.TOPK_TILE_COLS),
           BLOCK_K=tiling.next_power_of_2(k), HEAD_S=flags["HEAD_S"],
           DIVERGENCE=flags["DIVERGENCE"], HAS_HARD=flags["HAS_HARD"])
    return out


# --------------------------------------------------------------------------- custom ops
# Options cross the torch.library boundary as DistillationOptions.schema_args() (13 values,
# native schema types). Outputs: the (N,) per-row loss and the (N, 8) statistics (an empty (0,)
# tensor when not saved: schemas have no optional outputs).


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1)


def _fake_forward(student: torch.Tensor, save_stats: bool):
    n = math.prod(student.shape[:-1])
    sdt = accum_dtype(student)
    return (student.new_empty((n,), dtype=sdt),
            student.new_empty((n, N_STATS) if save_stats else (0,), dtype=sdt))


def _n_cols(options: DistillationOptions, student: torch.Tensor) -> int:
    return options.shared_vocab or student.shape[-1]


@torch.library.custom_op("probact_gpu::distillation", mutates_args=())
def _distill_op(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None, divergence: str,
    beta: float, temperature: float, ignore_index: int, hard_weight: float,
    temperature_squared: bool, shared_vocab: int | None, s_logit_scale: float,
    s_logit_divisor: float, s_softcap: float | None, t_logit_scale: float,
    t_logit_divisor: float, t_softcap: float | None, save_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss rows (N,), stats (N, 8) or (0,)) of (…, V) logits; N the leading dims' product."""
    options = DistillationOptions.from_schema(
        divergence, beta, temperature, ignore_index, hard_weight, temperature_squared,
        shared_vocab, s_logit_scale, s_logit_divisor, s_softcap, t_logit_scale,
        t_logit_divisor, t_softcap)
    if student.numel() > 0:
        check_runnable(student, "student_logits")
    loss, stats = distillation_fwd(student, teacher, _flat(target), options=options,
                                   n_cols=_n_cols(options, student), save_stats=save_stats)
    return loss, stats if stats is not None else student.new_empty(0, dtype=loss.dtype)


@_distill_op.register_fake
def _(student, teacher, target, *args):
    return _fake_forward(student, args[-1])


@torch.library.custom_op("probact_gpu::distillation_bwd", mutates_args=())
def _distill_bwd_op(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None,
    stats: torch.Tensor, grad_rows: torch.Tensor, divergence: str, beta: float,
    temperature: float, ignore_index: int, hard_weight: float, temperature_squared: bool,
    shared_vocab: int | None, s_logit_scale: float, s_logit_divisor: float,
    s_softcap: float | None, t_logit_scale: float, t_logit_divisor: float,
    t_softcap: float | None,
) -> torch.Tensor:
    """dstudent (a new contiguous tensor like ``student``) from the saved statistics and the
    per-row upstream gradient (N,)."""
    options = DistillationOptions.from_schema(
        divergence, beta, temperature, ignore_index, hard_weight, temperature_squared,
        shared_vocab, s_logit_scale, s_logit_divisor, s_softcap, t_logit_scale,
        t_logit_divisor, t_softcap)
    return distillation_bwd(student, teacher, _flat(target), stats, grad_rows, options=options,
                            n_cols=_n_cols(options, student))


@_distill_bwd_op.register_fake
def _(student, teacher, target, stats, grad_rows, *args):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


@torch.library.custom_op("probact_gpu::distillation_topk", mutates_args=())
def _topk_op(
    student: torch.Tensor, indices: torch.Tensor, log_probs: torch.Tensor,
    target: torch.Tensor | None, divergence: str, beta: float, temperature: float,
    ignore_index: int, hard_weight: float, temperature_squared: bool,
    shared_vocab: int | None, s_logit_scale: float, s_logit_divisor: float,
    s_softcap: float | None, t_logit_scale: float, t_logit_divisor: float,
    t_softcap: float | None, save_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss rows, stats) against a sparse top-k teacher."""
    options = DistillationOptions.from_schema(
        divergence, beta, temperature, ignore_index, hard_weight, temperature_squared,
        shared_vocab, s_logit_scale, s_logit_divisor, s_softcap, t_logit_scale,
        t_logit_divisor, t_softcap)
    if student.numel() > 0:
        check_runnable(student, "student_logits")
    loss, stats = distillation_topk_fwd(student, indices, log_probs, _flat(target),
                                        options=options, save_stats=save_stats)
    return loss, stats if stats is not None else student.new_empty(0, dtype=loss.dtype)


@_topk_op.register_fake
def _(student, indices, log_probs, target, *args):
    return _fake_forward(student, args[-1])


@torch.library.custom_op("probact_gpu::distillation_topk_bwd", mutates_args=())
def _topk_bwd_op(
    student: torch.Tensor, indices: torch.Tensor, log_probs: torch.Tensor,
    target: torch.Tensor | None, stats: torch.Tensor, grad_rows: torch.Tensor, divergence: str,
    beta: float, temperature: float, ignore_index: int, hard_weight: float,
    temperature_squared: bool, shared_vocab: int | None, s_logit_scale: float,
    s_logit_divisor: float, s_softcap: float | None, t_logit_scale: float,
    t_logit_divisor: float, t_softcap: float | None,
) -> torch.Tensor:
    options = DistillationOptions.from_schema(
        divergence, beta, temperature, ignore_index, hard_weight, temperature_squared,
        shared_vocab, s_logit_scale, s_logit_divisor, s_softcap, t_logit_scale,
        t_logit_divisor, t_softcap)
    return distillation_topk_bwd(student, indices, log_probs, _flat(target), stats, grad_rows,
                                 options=options)


@_topk_bwd_op.register_fake
def _(student, indices, log_probs, target, stats, grad_rows, *args):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


_NS = DistillationOptions.N_SCHEMA_ARGS


_NAME = "probact_gpu.distillation_loss"
_distill_bwd = terminal_op(_distill_bwd_op, _NAME)
_topk_bwd = terminal_op(_topk_bwd_op, _NAME)


def _setup_dense(ctx, inputs, output):
    student, teacher, target = inputs[:3]
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(student, teacher, target, stats)
    ctx.schema = inputs[3:3 + _NS]


@kernel_backward(_NAME)
def _backward_dense(ctx, grad_rows, _grad_stats):
    none = (None,) * (2 + _NS + 1)
    if grad_rows is None:
        return (None,) + none
    student, teacher, target, stats = ctx.saved_tensors
    if stats.ndim == 1:  # called with save_stats=False: recompute the statistics
        stats = _distill_op(student, teacher, target, *ctx.schema, True)[1]
    ds = _distill_bwd(student, teacher, target, stats, grad_rows, *ctx.schema)
    return (ds,) + none


def _row_tangent(slope: torch.Tensor, student_dot: torch.Tensor, rows: torch.Tensor):
    """Σ_c (∂row/∂s_c) · ṡ_c per row, in the rows' dtype: ``slope`` is the backward kernel's
    dstudent for an upstream gradient of 1 on every row."""
    terms = slope.to(rows.dtype) * student_dot.to(rows.dtype)
    return terms.reshape(rows.shape[0], -1).sum(1)


def _refuse_teacher_tangent(*tangents) -> None:
    if any(t is not None for t in tangents):
        raise RuntimeError("distillation_loss: the teacher has a forward-mode tangent, but the "
                           "loss is not differentiated with respect to the teacher (as in "
                           "the backward, which refuses a teacher requiring grad)")


def _jvp_dense(ctx, student_dot, teacher_dot, *rest):
    """Forward-mode rule: each row's tangent from the backward kernel's slope (an upstream
    gradient of 1 per row) against the student's tangent; the statistics are non
    differentiable."""
    _refuse_teacher_tangent(teacher_dot)
    student, teacher, target, stats, rows = ctx.saved_tensors
    if student_dot is None:
        return None, None
    if stats.ndim == 1:
        stats = _distill_op(student, teacher, target, *ctx.schema, True)[1]
    ones = torch.ones(rows.shape, dtype=rows.dtype, device=rows.device)
    slope = _distill_bwd(student, teacher, target, stats, ones, *ctx.schema)
    return _row_tangent(slope, student_dot, rows), None


def _jvp_saved_dense(inputs, output):
    return (*inputs[:3], output[1], output[0])


_distill = differentiable_op(_distill_op, _setup_dense, _backward_dense, _jvp_dense,
                             _jvp_saved_dense)


def _setup_topk(ctx, inputs, output):
    student, indices, log_probs, target = inputs[:4]
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(student, indices, log_probs, target, stats)
    ctx.schema = inputs[4:4 + _NS]


@kernel_backward(_NAME)
def _backward_topk(ctx, grad_rows, _grad_stats):
    none = (None,) * (3 + _NS + 1)
    if grad_rows is None:
        return (None,) + none
    student, indices, log_probs, target, stats = ctx.saved_tensors
    if stats.ndim == 1:
        stats = _topk_op(student, indices, log_probs, target, *ctx.schema, True)[1]
    ds = _topk_bwd(student, indices, log_probs, target, stats, grad_rows, *ctx.schema)
    return (ds,) + none


def _jvp_topk(ctx, student_dot, indices_dot, log_probs_dot, *rest):
    _refuse_teacher_tangent(log_probs_dot)
    student, indices, log_probs, target, stats, rows = ctx.saved_tensors
    if student_dot is None:
        return None, None
    if stats.ndim == 1:
        stats = _topk_op(student, indices, log_probs, target, *ctx.schema, True)[1]
    ones = torch.ones(rows.shape, dtype=rows.dtype, device=rows.device)
    slope = _topk_bwd(student, indices, log_probs, target, stats, ones, *ctx.schema)
    return _row_tangent(slope, student_dot, rows), None


def _jvp_saved_topk(inputs, output):
    return (*inputs[:4], output[1], output[0])


_topk = differentiable_op(_topk_op, _setup_topk, _backward_topk, _jvp_topk, _jvp_saved_topk)
for _op in (_distill_op, _distill_bwd_op, _topk_op, _topk_bwd_op):
    register_vmap_loop(_op)


# --------------------------------------------------------------------------- public function


def check_teacher_no_grad(**tensors: torch.Tensor | None) -> None:
    """Raise when a teacher tensor requires grad while gradients are on: the teacher gets none
    (a silent zero would be the one wrong answer)."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise ValueError(
                f"{name} requires grad, but distillation gives the teacher no gradient; pass "
                f"{name}.detach() (or compute the teacher under torch.no_grad())")


def check_target_mask(target, batch: tuple[int, ...], options: DistillationOptions) -> None:
    """``target`` None or an int32/int64 tensor of the tokens' shape; required by the hard
    term."""
    if target is None:
        if options.hard_weight:
            raise ValueError(f"hard_weight={options.hard_weight} adds the student's "
                             "cross-entropy against target: pass target")
        return
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor or None, got {type(target).__name__}")
    if target.dtype not in _INT_DTYPES:
        raise TypeError(f"target must hold class indices (only ignore_index is read unless "
                        f"hard_weight > 0) as int32 or int64, got dtype={target.dtype}")
    if tuple(target.shape) != batch:
        raise ValueError(f"target must have shape {batch} (the tokens' shape), got "
                         f"{tuple(target.shape)}")


def check_math_dtypes(a: torch.Tensor, b: torch.Tensor, names) -> None:
    """float64 on one side needs float64 on the other (the math is fp64 only when both are)."""
    if (a.dtype == torch.float64) != (b.dtype == torch.float64):
        raise TypeError(f"{names[0]} ({a.dtype}) and {names[1]} ({b.dtype}): float64 on one "
                        "side needs float64 on the other (the math runs in float64 only when "
                        "both are)")


def check_pair(student: torch.Tensor, teacher: torch.Tensor, options: DistillationOptions, *,
               names=("student_logits", "teacher_logits")) -> int:
    """Both logits' float dtypes, the same leading (token) dims, their class counts against
    ``shared_vocab``. Returns the compared class count."""
    check_float(names[0], student)
    check_float(names[1], teacher)
    check_math_dtypes(student, teacher, names)
    for name, t in zip(names, (student, teacher), strict=True):
        if t.ndim == 0 or t.shape[-1] == 0:
            raise ValueError(f"{name} must have a class dim of at least one class, got shape "
                             f"{tuple(t.shape)}")
    if tuple(student.shape[:-1]) != tuple(teacher.shape[:-1]):
        raise ValueError(f"{names[0]} {tuple(student.shape)} and {names[1]} "
                         f"{tuple(teacher.shape)} must have the same leading (token) dims")
    return shared_classes(student.shape[-1], teacher.shape[-1], options, names)


def shared_classes(v_s: int, v_t: int, options: DistillationOptions, names) -> int:
    """The class count both distributions are taken over: both heads' when they agree and
    ``shared_vocab`` is None; ``shared_vocab`` when given (at most either's)."""
    n = options.shared_vocab
    if n is None:
        if v_s != v_t:
            raise ValueError(
                f"{names[0]} has {v_s} classes and {names[1]} {v_t}: pass "
                f"shared_vocab={min(v_s, v_t)} to compare the distributions over the classes "
                "both heads share (each renormalised over them), or make the heads agree")
        return v_s
    if n > min(v_s, v_t):
        raise ValueError(f"shared_vocab={n} is more classes than {names[0]} ({v_s}) or "
                         f"{names[1]} ({v_t}) has")
    return n


def reduce_loss_rows(rows: torch.Tensor, target: torch.Tensor | None,
                     options: DistillationOptions, batch_shape, dtype) -> torch.Tensor:
    """The per-row losses reduced with torch ops (differentiable): ``none`` shaped like the
    tokens; ``sum`` (over ``normalizer`` when given); ``mean`` over the kept tokens (those whose
    target is not ``ignore_index``; every token without a target), 0 when none is kept."""
    if options.reduction == "none":
        return rows.reshape(batch_shape).to(dtype)
    total = rows.sum()
    if options.reduction == "sum":
        n = options.normalizer
        if isinstance(n, torch.Tensor):
            total = total / n.to(device=total.device, dtype=total.dtype)
        elif n is not None:
            total = total / n
        return total.to(dtype)
    if target is None:
        return (total / max(rows.shape[0], 1)).to(dtype)
    kept = (target != options.ignore_index).sum().clamp_min(1)
    return (total / kept.to(total.dtype)).to(dtype)


def _check_topk(teacher: TopKTeacher, student: torch.Tensor,
                options: DistillationOptions) -> None:
    idx, lp = teacher
    if not isinstance(idx, torch.Tensor) or idx.dtype not in _INT_DTYPES:
        raise TypeError("TopKTeacher.indices must be an int32 or int64 tensor, got "
                        f"{getattr(idx, 'dtype', type(idx).__name__)}")
    check_float("TopKTeacher.log_probs", lp)
    batch = tuple(student.shape[:-1])
    if idx.ndim != len(batch) + 1 or tuple(idx.shape[:-1]) != batch or idx.shape != lp.shape:
        raise ValueError(f"TopKTeacher.indices {tuple(idx.shape)} and log_probs "
                         f"{tuple(lp.shape)} must both be {batch} + (k,)")
    k = idx.shape[-1]
    if not 1 <= k <= tiling.TOPK_MAX:
        raise ValueError(f"a top-k teacher holds 1 to {tiling.TOPK_MAX} classes a token, got "
                         f"k={k}")
    if options.temperature != 1.0:
        raise ValueError(
            f"temperature={options.temperature} with a TopKTeacher: a sparse teacher's "
            "log-probs cannot be re-tempered (its tail's shape is unknown); produce them at the "
            "temperature you distil at, and give the student its temperature as "
            f"student_logit_divisor={options.temperature}")
    if options.shared_vocab is not None:
        raise ValueError("shared_vocab does not apply to a TopKTeacher: its indices address "
                         "the student's classes")
    t = options.teacher
    if t.logit_scale != 1.0 or t.logit_divisor != 1.0 or t.softcap is not None:
        raise ValueError("teacher_logit_scale / teacher_logit_divisor / teacher_softcap do not "
                         "apply to a TopKTeacher (its log-probs are final)")
    if lp.dtype == torch.float64 and student.dtype != torch.float64:
        raise TypeError("TopKTeacher.log_probs is float64 but student_logits is "
                        f"{student.dtype}: float64 needs float64 on both sides")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopKTeacher,
    target: torch.Tensor | None = None,
    *,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    hard_weight: float = 0.0,
    temperature_squared: bool = False,
    shared_vocab: int | None = None,
    student_logit_scale: float | torch.Tensor = 1.0,
    student_logit_divisor: float | torch.Tensor = 1.0,
    student_softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_logit_divisor: float = 1.0,
    teacher_softcap: float | None = None,
) -> torch.Tensor:
    """A divergence between the teacher's distribution P and the student's Q, per token over the
    vocabulary, reduced over tokens — without a (tokens × V) fp32 copy of either logits.

    - ``student_logits`` (…, V_s) and ``teacher_logits`` (…, V_t): any float dtype (float64 with
      float64), any strides. The teacher may also be its **log-probabilities** (an inference
      server's: log-probs are logits, softmax(log p / T) = softmax(z / T)), or a
      :class:`TopKTeacher` (indices and log-probs of its k most likely classes: compared over
      the k classes plus one tail bucket holding the rest of each distribution's mass).
    - ``target`` (…) int32/int64 or None: **only a mask** — tokens equal to ``ignore_index``
      contribute 0 and get no gradient — unless ``hard_weight > 0``, which adds
      ``hard_weight · cross_entropy(student, target)`` at the student's own transform without
      the temperature. No hard term otherwise.
    - P = softmax(teacher_transform(teacher) / T), Q = softmax(student_transform(student) / T)
      with ``T = temperature`` applied to both heads and nothing else; each head's transform
      (``*_logit_scale`` → ``*_logit_divisor`` → ``*_softcap``, as ``cross_entropy``'s) runs
      inside the kernels, in fp32 (fp64 for fp64 logits). ``temperature_squared=True``
      multiplies the divergence by T² (Hinton's scaling); off by default.
    - Tensor options: a 0-d ``student_logit_scale`` / ``student_logit_divisor`` is applied as
      ``student_logits · f`` in torch (one elementwise pass and one logits-sized buffer) and
      gets its gradient (soft and hard terms alike); the teacher is not differentiated, so a
      teacher option or ``temperature`` (which divides the teacher too) that requires grad
      raises, and one that does not is read as a number, as before (a device sync for a
      device tensor); a ``student_softcap`` that requires grad raises.
    - ``divergence``: ``"kl"`` KL(P‖Q); ``"reverse_kl"`` KL(Q‖P); ``"jsd"`` TRL's generalized
      JSD, ``β KL(P‖M) + (1 − β) KL(Q‖M)`` with ``M = β P + (1 − β) Q`` and TRL's endpoints
      (β = 0: KL(P‖Q), β = 1: KL(Q‖P) — discontinuous there, as TRL); ``"jsd_continuous"``
      that JSD divided by β(1 − β), continuous in β with those endpoints as its limits;
      ``"tvd"`` ½ Σ|P − Q|.
    - ``reduction``: ``"mean"`` (default) averages over the kept tokens (0 when none is kept,
      as TRL's GKD); ``"sum"`` sums, divided by ``normalizer`` (a number or a 0-d device tensor,
      e.g. ``num_items_in_batch``) when given; ``"none"`` returns per-token losses shaped like
      the tokens (0 on ignored ones).
    - ``shared_vocab``: heads of different sizes raise unless given; then both distributions
      are taken over classes ``[0, shared_vocab)``, each renormalised over them (the student's
      other classes get a zero gradient). Never a silent truncation.

    Returns the loss in the student's dtype (computed in fp32). Gradients flow to
    ``student_logits`` only; a teacher tensor that requires grad while gradients are enabled
    raises (detach it). Double backward is not supported. One read of each logits row in the
    forward (KL, reverse KL; JSD and TVD read them twice), one read of both and one write of
    the student's gradient in the backward.
    """
    factor, transforms = split_student_factors(
        temperature=temperature, student_logit_scale=student_logit_scale,
        student_logit_divisor=student_logit_divisor, student_softcap=student_softcap,
        teacher_logit_scale=teacher_logit_scale, teacher_logit_divisor=teacher_logit_divisor,
        teacher_softcap=teacher_softcap)
    options = DistillationOptions.from_kwargs(
        divergence=divergence, beta=beta, ignore_index=ignore_index,
        reduction=reduction, normalizer=normalizer, hard_weight=hard_weight,
        temperature_squared=temperature_squared, shared_vocab=shared_vocab, **transforms)
    check_float("student_logits", student_logits)
    student_logits = scale_by_factor(student_logits, factor, "student_logits")
    batch = tuple(student_logits.shape[:-1]) if student_logits.ndim else ()
    check_target_mask(target, batch, options)
    norm = options.normalizer if isinstance(options.normalizer, torch.Tensor) else None
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    if isinstance(teacher_logits, TopKTeacher):
        if student_logits.ndim == 0 or student_logits.shape[-1] == 0:
            raise ValueError("student_logits must have a class dim of at least one class, got "
                             f"shape {tuple(student_logits.shape)}")
        _check_topk(teacher_logits, student_logits, options)
        idx, lp = teacher_logits
        check_same_device(student_logits=student_logits, indices=idx, log_probs=lp,
                          target=target, normalizer=norm)
        check_teacher_no_grad(**{"TopKTeacher.log_probs": lp})
        rows, _ = _topk(student_logits, idx, lp, target, *options.schema_args(), needs_grad)
    else:
        check_pair(student_logits, teacher_logits, options)
        check_same_device(student_logits=student_logits, teacher_logits=teacher_logits,
                          target=target, normalizer=norm)
        check_teacher_no_grad(teacher_logits=teacher_logits)
        rows, _ = _distill(student_logits, teacher_logits, target, *options.schema_args(),
                           needs_grad)
    teacher = teacher_logits.log_probs if isinstance(teacher_logits, TopKTeacher) else (
        teacher_logits)
    # under autocast the loss is float32 for 16-bit logits, as kl_div's (nothing is copied)
    dtype = (torch.float32 if autocast_fp32("distillation_loss", student_logits, teacher)
             else student_logits.dtype)
    return reduce_loss_rows(rows, None if target is None else target.reshape(-1), options,
                            batch, dtype)
