"""Distillation kernels: per row, a divergence between the teacher's distribution P and the
student's Q over the vocabulary, from one read of both logits rows; and the gradient to the
student's logits, in one more read of both rows and one write.

Notation for one row, student logits ``x`` and teacher logits ``y`` compared over ``n_cols``
classes, each through its own head transform (``kernels/_head.py``: scale → divisor → softcap →
1/temperature, the temperature shared)::

    z = head_s(x)      w = head_t(y)                   (−inf in masked lanes)
    a = z − m_s        b = w − m_t                     (m the row max; ``shift`` = m, or 0 at −inf)
    S = Σ exp(a)       T = Σ exp(b)                    L_s = log S,  L_t = log T
    lq = a − L_s       lp = b − L_t                    q = exp(lq),  p = exp(lp)

Per-row divergences (``DIVERGENCE``; the host maps TRL's JSD endpoints β = 0, 1 to KL, RKL)::

    KL   = Σ p (lp − lq)  = W / T + L_s − L_t,        W = Σ exp(b) · (b − a)      (online)
    RKL  = Σ q (lq − lp)  = W / S + L_t − L_s,        W = Σ exp(a) · (a − b)      (online)
    JSD  = β Σ p (lp − lm) + (1 − β) Σ q (lq − lm),   lm = log(β p + (1 − β) q)   (2 sweeps)
    TVD  = ½ Σ |p − q|                                                           (2 sweeps)

KL and RKL are online: when a tile moves the maxima (``α = exp(m − m')``, ``d = m − m'``, d = 0
while a prefix is all −inf), ``W' = α_t (W + (d_t − d_s) T) + Σ_tile …`` (KL; RKL with the
roles swapped). JSD and TVD compare p and q themselves, which need both normalisers: a first
sweep takes the statistics, a second (in reverse, so its first tiles are still in L2) sums the
terms. The JSD terms never form lm: with ``r = lp − lq`` and ``t = exp(−|r|)``::

    r > 0:  lp − lm = −log(β + (1 − β) t),      lq − lm = (lp − lm) − r
    r ≤ 0:  lq − lm = −log((1 − β) + β t),      lp − lm = (lq − lm) + r

one exp and one log a class, 0 exactly where ``lp = lq``. Every term is 0 where its weight p (or
q) is 0 — underflowed or −inf — so no ``0 · −inf``; identical rows give exactly 0 (W sums
``exp(b) · 0``, the logs cancel, r = 0). A class where p > 0 = q gives KL = +inf, as the maths.

Gradient to the student's logits, for a row's upstream ``g`` (the mean's 1/count folded in) and
the soft coefficient ``coef`` (T² when asked, 1/(β(1−β)) for the continuous JSD)::

    dD/dz_j:  KL   q_j − p_j
              RKL  q_j (lq_j − lp_j − RKL)
              JSD  (1 − β) q_j (lq_j − lm_j − KL(Q‖M))
              TVD  q_j (½ sign(q_j − p_j) − ½ Σ q sign(q − p))
    dz_j = coef · g · dD/dz_j  (+ hard_weight · g · (softmax(z_h)_j − [j = t]))
    dx_j = head_chain(dz_j)

so the backward needs per row ``(shift_s, L_s, shift_t, L_t, aux)`` — ``aux`` the divergence's
row statistic (RKL, KL(Q‖M), ½ Σ q sign(q − p); unused by KL) — and, with the hard term,
``(shift_h, L_h)`` of the student's logits without the temperature (``z_h``, its own transform
factors). The forward saves them as an (N, 8) fp32 row (fp64 for fp64 logits).

**Sparse top-k teacher**: the teacher gives ``k`` distinct class indices and their log-probs
ℓ. The comparison is over k + 1 buckets — the k classes, and the tail holding the rest of each
distribution's mass::

    P_i = exp(ℓ_i),  P_tail = 1 − Σ P_i      (Σ P_i > 1 from rounding: P_i / Σ P_i, P_tail = 0)
    Q_i = q_i,       Q_tail = S_tail / S,     S_tail = Σ_{j ∉ I} exp(a_j)

``S_tail`` is summed directly over the columns outside the k (``tl.histogram`` of the indices
falling in a tile marks them), never as ``1 − Σ Q_i`` (which cancels when the student puts
nearly all its mass on the k). The divergence is the dense formula over the buckets. Its
gradient is ``dz_j = q_j (G_b(j) − Σ_b Q_b G_b)``, ``G_b = ∂D/∂Q_b``: a class of the k gets the
dense formula with its bucket's values; a tail class gets ``(q_j / Q_tail) ·`` (the dense
formula at the tail bucket). The backward writes every class of its chunk as a tail class as it
sweeps (whole-tile, vectorised stores), then — after a barrier that orders the program's
stores — overwrites the k classes that fall in its chunk by one scatter; each program owns its
chunk's columns. An index outside ``[0, n_cols)`` or repeated gives a NaN row (loss and
gradient), never an out-of-bounds access.

Rows whose target is ``ignore_index`` (when a target is given) contribute 0 and get a zero
gradient; with the hard term a target outside ``[0, n_classes)`` gives NaN.

Kernels (host side: ``probact_gpu.ops.distillation``); HBM per row, e_s / e_t the element sizes:

- ``distillation_fwd_kernel``: one program per row: the online sweep (``n_cols · (e_s + e_t)``),
  for JSD / TVD a second, reverse sweep (the same bytes again, from L2 while the rows in flight
  fit), then the row's loss and saved statistics (4 + 32 B).
- ``distillation_partial_kernel``: program (row, split) writes its chunk's partial
  ``(m_s, S, m_t, T, W, m_h, S_h, z_h[t])`` (reads the chunk once): the split path for few long
  rows, and one rank's shard of a vocab-parallel pair of heads (``vocab_start``).
- ``distillation_terms_kernel``: program (row, split) sums JSD's / TVD's two term sums over its
  chunk from the merged statistics (reads the chunk once).
- ``distillation_bwd_kernel``: program (row, split) writes dx over its chunk from the saved
  statistics: reads ``chunk · (e_s + e_t)``, writes ``chunk · e_s``; each element of x is read
  before dx is written, so dx may be x's own buffer (the fused linear op recomputes the student's
  logits into a buffer and overwrites it with their gradient).
- ``distillation_topk_fwd_kernel`` / ``distillation_topk_bwd_kernel``: the sparse teacher; one
  sweep of the student's row (``n_cols · e_s``) plus k indices and log-probs; the backward writes
  ``n_cols · e_s``.
"""

import triton
import triton.language as tl

from ._head import head_chain, head_factors, head_transform, head_transform_slope
from ._online import exp_precise, math_arg, row_offset, safe_max, upcast

# The divergence, the kernels' ``DIVERGENCE`` constexpr (``probact_gpu.options.DIVERGENCE_KIND``).
DIV_KL: tl.constexpr = tl.constexpr(0)
DIV_REVERSE_KL: tl.constexpr = tl.constexpr(1)
DIV_JSD: tl.constexpr = tl.constexpr(2)
DIV_TVD: tl.constexpr = tl.constexpr(3)


# --------------------------------------------------------------------------- tiles


@triton.jit
def _load_x(ptrs, mask, KEEP: tl.constexpr):
    """A tile of logits upcast to the math dtype (0 in masked lanes). ``KEEP``: the row is read
    again (``evict_last``), else this is its last read (``evict_first``)."""
    if KEEP:
        return upcast(tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_last"))
    else:
        return upcast(tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first"))


@triton.jit
def _load_head(ptrs, mask, head, HEAD: tl.constexpr, KEEP: tl.constexpr):
    """The transformed logits of a tile, −inf in masked lanes (``_load_x``'s ``KEEP``)."""
    return tl.where(mask, head_transform(_load_x(ptrs, mask, KEEP), head, HEAD), float("-inf"))


@triton.jit
def _log_probs(z, w, shift_s, log_s, shift_t, log_t):
    """(lq, lp, q, p) of a tile from the rows' statistics (lq = −inf where z = −inf)."""
    lq = (z - shift_s) - log_s
    lp = (w - shift_t) - log_t
    return lq, lp, exp_precise(lq), exp_precise(lp)


@triton.jit
def _sign(d):
    return tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))


@triton.jit
def _jsd_logs(lp, lq, beta, one_minus_beta):
    """``(lp − lm, lq − lm)`` for the mixture ``m = β p + (1 − β) q`` (module docstring): one exp
    and one log, 0 and 0 where ``lp = lq``."""
    r = lp - lq
    t = exp_precise(-tl.abs(r))
    pos = r > 0.0
    x = tl.log(tl.where(pos, beta + one_minus_beta * t, one_minus_beta + beta * t))
    x = tl.where(r == 0.0, 0.0, x)
    return tl.where(pos, -x, r - x), tl.where(pos, -x - r, -x)


@triton.jit
def _terms(lp, lq, p, q, beta, one_minus_beta, DIVERGENCE: tl.constexpr):
    """The per-class (or per-bucket) contributions ``(t1, t2)`` of the divergence, elementwise:
    KL ``p (lp − lq)``; RKL ``q (lq − lp)``; JSD ``p (lp − lm)``, ``q (lq − lm)``; TVD
    ``|q − p|``, ``q sign(q − p)``. A term whose weight is 0 is 0."""
    if DIVERGENCE == DIV_KL:
        return tl.where(p > 0.0, p * (lp - lq), 0.0), p * 0.0
    elif DIVERGENCE == DIV_REVERSE_KL:
        return tl.where(q > 0.0, q * (lq - lp), 0.0), q * 0.0
    elif DIVERGENCE == DIV_JSD:
        a, b = _jsd_logs(lp, lq, beta, one_minus_beta)
        return tl.where(p > 0.0, p * a, 0.0), tl.where(q > 0.0, q * b, 0.0)
    else:
        d = q - p
        return tl.abs(d), q * _sign(d)


@triton.jit
def _divergence(t1, t2, beta, one_minus_beta, DIVERGENCE: tl.constexpr):
    """(D, aux) of a row from its term sums (``_terms``)."""
    if DIVERGENCE == DIV_JSD:
        return beta * t1 + one_minus_beta * t2, t2
    elif DIVERGENCE == DIV_TVD:
        return 0.5 * t1, 0.5 * t2
    else:
        return t1, t1


@triton.jit
def _grad(lp, lq, p, q, aux, beta, one_minus_beta, DIVERGENCE: tl.constexpr):
    """dD/dz per class (module docstring), from the row statistic ``aux``."""
    if DIVERGENCE == DIV_KL:
        return q - p
    elif DIVERGENCE == DIV_REVERSE_KL:
        return tl.where(q > 0.0, q * ((lq - lp) - aux), 0.0)
    elif DIVERGENCE == DIV_JSD:
        _, b = _jsd_logs(lp, lq, beta, one_minus_beta)
        return one_minus_beta * tl.where(q > 0.0, q * (b - aux), 0.0)
    else:
        return q * (0.5 * _sign(q - p) - aux)


@triton.jit
def _fold(m, s, z):
    """Fold tile ``z`` into a head's online ``(m, s)``; also ``(e, α, shift, d)`` of the step:
    ``e = exp(z − shift)``, ``α = exp(m − m')``, ``d = m − m'`` (0 while the prefix is −inf)."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    shift = safe_max(m_new)
    alpha = exp_precise(m - shift)
    e = exp_precise(z - shift)
    d = tl.where(m == float("-inf"), 0.0, m - shift)
    return m_new, s * alpha + tl.sum(e, axis=0), e, alpha, shift, d


@triton.jit
def _cross(e, rel_own, rel_other):
    """``Σ e (rel_own − rel_other)`` over a tile, 0 where e = 0 (also where rel_own = −inf)."""
    return tl.sum(tl.where(e > 0.0, e * (rel_own - rel_other), 0.0), axis=0)


@triton.jit
def _stats_sweep(x_row, y_row, start, end, x_col_stride, y_col_stride, head_s, head_t, head_h,
                 BLOCK_N: tl.constexpr, HEAD_S: tl.constexpr, HEAD_T: tl.constexpr,
                 DIVERGENCE: tl.constexpr, HAS_HARD: tl.constexpr, KEEP: tl.constexpr):
    """The online statistics of columns ``[start, end)``: ``(m_s, S, m_t, T, W, m_h, S_h)``
    (W for KL / RKL, else 0; the hard head's for ``HAS_HARD``, else −inf, 0)."""
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    m_s = math_arg(float("-inf"), x_row)
    s_s = math_arg(0.0, x_row)
    m_t, s_t, w_acc = m_s, s_s, s_s
    m_h, s_h = m_s, s_s
    for tile in range(start, end, BLOCK_N):
        q = tile + cols
        mask = q < end
        x = _load_x(x_row + q * x_col_stride, mask, KEEP)
        z = tl.where(mask, head_transform(x, head_s, HEAD_S), float("-inf"))
        w = _load_head(y_row + q * y_col_stride, mask, head_t, HEAD_T, KEEP)
        s_old, t_old = s_s, s_t
        m_s, s_s, e_s, alpha_s, shift_s, d_s = _fold(m_s, s_s, z)
        m_t, s_t, e_t, alpha_t, shift_t, d_t = _fold(m_t, s_t, w)
        if DIVERGENCE == DIV_KL:
            w_acc = alpha_t * (w_acc + (d_t - d_s) * t_old) + _cross(e_t, w - shift_t,
                                                                       z - shift_s)
        elif DIVERGENCE == DIV_REVERSE_KL:
            w_acc = alpha_s * (w_acc + (d_s - d_t) * s_old) + _cross(e_s, z - shift_s,
                                                                       w - shift_t)
        if HAS_HARD:
            zh = tl.where(mask, head_transform(x, head_h, HEAD_S), float("-inf"))
            m_h, s_h, _, _, _, _ = _fold(m_h, s_h, zh)
    return m_s, s_s, m_t, s_t, w_acc, m_h, s_h


@triton.jit
def _terms_sweep(x_row, y_row, start, end, x_col_stride, y_col_stride, head_s, head_t,
                 shift_s, log_s, shift_t, log_t, beta, one_minus_beta, BLOCK_N: tl.constexpr,
                 HEAD_S: tl.constexpr, HEAD_T: tl.constexpr, DIVERGENCE: tl.constexpr):
    """JSD's / TVD's term sums ``(Σ t1, Σ t2)`` over columns ``[start, end)``, last tile first
    (the tiles the statistics sweep read last are the likeliest still in L2)."""
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    acc1 = shift_s * 0.0
    acc2 = acc1
    n_tiles = tl.cdiv(end - start, BLOCK_N)
    for i in range(0, n_tiles):
        q = start + (n_tiles - 1 - i) * BLOCK_N + cols
        mask = q < end
        z = _load_head(x_row + q * x_col_stride, mask, head_s, HEAD_S, False)
        w = _load_head(y_row + q * y_col_stride, mask, head_t, HEAD_T, False)
        lq, lp, pq, pp = _log_probs(z, w, shift_s, log_s, shift_t, log_t)
        t1, t2 = _terms(lp, lq, pp, pq, beta, one_minus_beta, DIVERGENCE)
        acc1 += tl.sum(t1, axis=0)
        acc2 += tl.sum(t2, axis=0)
    return acc1, acc2


@triton.jit
def _row_target(target_ptr, row, ignore_index, n_classes):
    """(target, kept, in_range) of a row; without targets every row is kept."""
    if target_ptr is not None:
        tgt = tl.load(target_ptr + row).to(tl.int64)
        kept = tgt != ignore_index
    else:
        tgt = tl.full((), 0, tl.int64)
        kept = tgt == 0
    return tgt, kept, (tgt >= 0) & (tgt < n_classes)


@triton.jit
def _hard_logit(x_row, local_t, n_cols, x_col_stride, live, head_h, HEAD_S: tl.constexpr):
    """z_h at local column ``local_t`` where it lies in ``[0, n_cols)`` and ``live``, else 0."""
    here = live & (local_t >= 0) & (local_t < n_cols)
    safe = tl.where(here, local_t, 0)
    x = upcast(tl.load(x_row + safe * x_col_stride, mask=here, other=0.0))
    return tl.where(here, head_transform(x, head_h, HEAD_S), 0.0)


# --------------------------------------------------------------------------- dense forward


@triton.jit
def distillation_fwd_kernel(
    # data: student logits, teacher logits, targets (None: every row kept), per-row loss
    # (fp32; fp64 for fp64 logits), saved statistics (n_rows, 8) (None: not saved)
    x_ptr, y_ptr, target_ptr, loss_ptr, stats_ptr,
    # shape: the rows compare columns [0, n_cols) of both
    n_cols, n_inner, ignore_index,
    # strides (elements): student, then teacher
    x_outer_stride, x_inner_stride, x_col_stride,
    y_outer_stride, y_inner_stride, y_col_stride,
    # the transforms' factors (fp64: ``_head.head_factors``): student (with the temperature),
    # teacher (with it), the student's hard head (without it)
    s_scale: tl.float64, s_u_scale: tl.float64, s_cap_scale: tl.float64,
    t_scale: tl.float64, t_u_scale: tl.float64, t_cap_scale: tl.float64,
    h_scale: tl.float64, h_u_scale: tl.float64, h_cap_scale: tl.float64,
    # β, 1 − β (JSD), the soft coefficient, the hard term's weight
    beta: tl.float64, one_minus_beta: tl.float64, coef: tl.float64, hard_weight: tl.float64,
    BLOCK_N: tl.constexpr, HEAD_S: tl.constexpr, HEAD_T: tl.constexpr,
    DIVERGENCE: tl.constexpr, HAS_HARD: tl.constexpr,
):
    """Program p owns row p: the statistics sweep, for JSD / TVD the reverse terms sweep, then
    ``loss = coef · D + hard_weight · CE`` (0 on an ignored row) and the saved statistics."""
    head_s = head_factors(s_scale, s_u_scale, s_cap_scale, x_ptr)
    head_t = head_factors(t_scale, t_u_scale, t_cap_scale, x_ptr)
    head_h = head_factors(h_scale, h_u_scale, h_cap_scale, x_ptr)
    row = tl.program_id(0)
    x_row = x_ptr + row_offset(row, n_inner, x_outer_stride, x_inner_stride)
    y_row = y_ptr + row_offset(row, n_inner, y_outer_stride, y_inner_stride)
    b = math_arg(beta, x_ptr)
    omb = math_arg(one_minus_beta, x_ptr)
    m_s, s_s, m_t, s_t, w_acc, m_h, s_h = _stats_sweep(
        x_row, y_row, 0, n_cols, x_col_stride, y_col_stride, head_s, head_t, head_h, BLOCK_N,
        HEAD_S, HEAD_T, DIVERGENCE, HAS_HARD, DIVERGENCE >= DIV_JSD)
    shift_s, log_s = safe_max(m_s), tl.log(s_s)
    shift_t, log_t = safe_max(m_t), tl.log(s_t)
    if DIVERGENCE >= DIV_JSD:  # JSD, TVD: the second sweep
        t1, t2 = _terms_sweep(x_row, y_row, 0, n_cols, x_col_stride, y_col_stride, head_s,
                              head_t, shift_s, log_s, shift_t, log_t, b, omb, BLOCK_N, HEAD_S,
                              HEAD_T, DIVERGENCE)
    elif DIVERGENCE == DIV_KL:
        t1 = w_acc / s_t + (log_s - log_t)
        t2 = t1
    else:
        t1 = w_acc / s_s + (log_t - log_s)
        t2 = t1
    div, aux = _divergence(t1, t2, b, omb, DIVERGENCE)
    tgt, kept, in_range = _row_target(target_ptr, row, ignore_index, n_cols)
    loss = math_arg(coef, x_ptr) * div
    shift_h, log_h = safe_max(m_h), tl.log(s_h)
    if HAS_HARD:
        z_t = _hard_logit(x_row, tgt, n_cols, x_col_stride, kept, head_h, HEAD_S)
        ce = tl.where(in_range, (shift_h + log_h) - z_t, float("nan"))
        loss += math_arg(hard_weight, x_ptr) * ce
    tl.store(loss_ptr + row, tl.where(kept, loss, 0.0))
    if stats_ptr is not None:
        out = stats_ptr + row.to(tl.int64) * 8
        tl.store(out, shift_s)
        tl.store(out + 1, log_s)
        tl.store(out + 2, shift_t)
        tl.store(out + 3, log_t)
        tl.store(out + 4, aux)
        tl.store(out + 5, shift_h)
        tl.store(out + 6, log_h)
        tl.store(out + 7, aux * 0.0)


@triton.jit
def distillation_partial_kernel(
    # data: student, teacher (local columns), targets (global ids; None), partials
    # (n_rows, n_splits, 8)
    x_ptr, y_ptr, target_ptr, part_ptr,
    # shape: program (row, split) owns local columns [split·chunk, (split+1)·chunk) of n_cols;
    # local column c is global class vocab_start + c
    n_cols, n_inner, chunk, vocab_start,
    # strides (elements): student, then teacher
    x_outer_stride, x_inner_stride, x_col_stride,
    y_outer_stride, y_inner_stride, y_col_stride,
    # the transforms' factors (as distillation_fwd_kernel)
    s_scale: tl.float64, s_u_scale: tl.float64, s_cap_scale: tl.float64,
    t_scale: tl.float64, t_u_scale: tl.float64, t_cap_scale: tl.float64,
    h_scale: tl.float64, h_u_scale: tl.float64, h_cap_scale: tl.float64,
    BLOCK_N: tl.constexpr, HEAD_S: tl.constexpr, HEAD_T: tl.constexpr,
    DIVERGENCE: tl.constexpr, HAS_HARD: tl.constexpr,
):
    """Writes ``part[row, split] = (m_s, S, m_t, T, W, m_h, S_h, z_h[t] or 0)`` over the chunk
    (an empty chunk past the row's end: −inf maxima, zero sums). Reads the chunk once."""
    head_s = head_factors(s_scale, s_u_scale, s_cap_scale, x_ptr)
    head_t = head_factors(t_scale, t_u_scale, t_cap_scale, x_ptr)
    head_h = head_factors(h_scale, h_u_scale, h_cap_scale, x_ptr)
    row = tl.program_id(0)
    split = tl.program_id(1)
    start = split.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, n_cols)
    x_row = x_ptr + row_offset(row, n_inner, x_outer_stride, x_inner_stride)
    y_row = y_ptr + row_offset(row, n_inner, y_outer_stride, y_inner_stride)
    m_s, s_s, m_t, s_t, w_acc, m_h, s_h = _stats_sweep(
        x_row, y_row, start, end, x_col_stride, y_col_stride, head_s, head_t, head_h, BLOCK_N,
        HEAD_S, HEAD_T, DIVERGENCE, HAS_HARD, False)
    z_t = s_s * 0.0
    if HAS_HARD:
        if target_ptr is not None:
            local_t = tl.load(target_ptr + row).to(tl.int64) - vocab_start - start
            z_t = _hard_logit(x_row + start * x_col_stride, local_t, end - start, x_col_stride,
                              True, head_h, HEAD_S)
    out = part_ptr + (row.to(tl.int64) * tl.num_programs(1) + split) * 8
    tl.store(out, m_s)
    tl.store(out + 1, s_s)
    tl.store(out + 2, m_t)
    tl.store(out + 3, s_t)
    tl.store(out + 4, w_acc)
    tl.store(out + 5, m_h)
    tl.store(out + 6, s_h)
    tl.store(out + 7, z_t)


@triton.jit
def distillation_terms_kernel(
    # data: student, teacher (local columns), merged statistics (n_rows, 8) as saved for the
    # backward (shift_s, L_s, shift_t, L_t, …), term sums (n_rows, n_splits, 2)
    x_ptr, y_ptr, stats_ptr, part_ptr,
    # shape
    n_cols, n_inner, chunk,
    # strides (elements): student, then teacher
    x_outer_stride, x_inner_stride, x_col_stride,
    y_outer_stride, y_inner_stride, y_col_stride,
    # the transforms' factors (student, teacher), β, 1 − β
    s_scale: tl.float64, s_u_scale: tl.float64, s_cap_scale: tl.float64,
    t_scale: tl.float64, t_u_scale: tl.float64, t_cap_scale: tl.float64,
    beta: tl.float64, one_minus_beta: tl.float64,
    BLOCK_N: tl.constexpr, HEAD_S: tl.constexpr, HEAD_T: tl.constexpr,
    DIVERGENCE: tl.constexpr,
):
    """Writes ``part[row, split] = (Σ t1, Σ t2)`` of JSD / TVD over the chunk from the rows'
    merged (global) statistics. Reads the chunk once."""
    head_s = head_factors(s_scale, s_u_scale, s_cap_scale, x_ptr)
    head_t = head_factors(t_scale, t_u_scale, t_cap_scale, x_ptr)
    row = tl.program_id(0)
    split = tl.program_id(1)
    start = split.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, n_cols)
    stats = stats_ptr + row.to(tl.int64) * 8
    x_row = x_ptr + row_offset(row, n_inner, x_outer_stride, x_inner_stride)
    y_row = y_ptr + row_offset(row, n_inner, y_outer_stride, y_inner_stride)
    t1, t2 = _terms_sweep(x_row, y_row, start, end, x_col_stride, y_col_stride, head_s, head_t,
                          tl.load(stats), tl.load(stats + 1), tl.load(stats + 2),
                          tl.load(stats + 3), math_arg(beta, x_ptr),
                          math_arg(one_minus_beta, x_ptr), BLOCK_N, HEAD_S, HEAD_T, DIVERGENCE)
    out = part_ptr + (row.to(tl.int64) * tl.num_programs(1) + split) * 2
    tl.store(out, t1)
    tl.store(out + 1, t2)


# --------------------------------------------------------------------------- dense backward


@triton.jit
def distillation_bwd_kernel(
    # data: student, teacher, targets (global ids; None), saved statistics (n_rows, 8), the
    # rows' upstream gradient (``g_stride`` 0: one value for every row), dx (may alias x)
    x_ptr, y_ptr, target_ptr, stats_ptr, g_ptr, dx_ptr,
    # shape: program (row, split) owns local columns [split·chunk, (split+1)·chunk) of n_cols,
    # global classes vocab_start + c of n_classes
    n_cols, n_inner, chunk, vocab_start, n_classes, ignore_index, g_stride,
    # strides (elements): student, teacher, dx
    x_outer_stride, x_inner_stride, x_col_stride,
    y_outer_stride, y_inner_stride, y_col_stride,
    dx_outer_stride, dx_inner_stride, dx_col_stride,
    # the transforms' factors (student, teacher, hard), β, 1 − β, coef, hard weight
    s_scale: tl.float64, s_u_scale: tl.float64, s_cap_scale: tl.float64,
    t_scale: tl.float64, t_u_scale: tl.float64, t_cap_scale: tl.float64,
    h_scale: tl.float64, h_u_scale: tl.float64, h_cap_scale: tl.float64,
    beta: tl.float64, one_minus_beta: tl.float64, coef: tl.float64, hard_weight: tl.float64,
    BLOCK_N: tl.constexpr, HEAD_S: tl.constexpr, HEAD_T: tl.constexpr,
    DIVERGENCE: tl.constexpr, HAS_HARD: tl.constexpr,
):
    """dx over one chunk of one row (module docstring's gradient and the transform's chain
    rule), 0 on ignored rows. Reads ``chunk · (e_s + e_t)``, writes ``chunk · e_s``, plus 32 B of
    statistics and the row's g."""
    head_s = head_factors(s_scale, s_u_scale, s_cap_scale, x_ptr)
    head_t = head_factors(t_scale, t_u_scale, t_cap_scale, x_ptr)
    head_h = head_factors(h_scale, h_u_scale, h_cap_scale, x_ptr)
    row = tl.program_id(0)
    split = tl.program_id(1)
    stats = stats_ptr + row.to(tl.int64) * 8
    shift_s, log_s = tl.load(stats), tl.load(stats + 1)
    shift_t, log_t = tl.load(stats + 2), tl.load(stats + 3)
    aux = tl.load(stats + 4)
    tgt, kept, in_range = _row_target(target_ptr, row, ignore_index, n_classes)
    g = upcast(tl.load(g_ptr + row.to(tl.int64) * g_stride))
    g_soft = g * math_arg(coef, x_ptr)
    b = math_arg(beta, x_ptr)
    omb = math_arg(one_minus_beta, x_ptr)
    if HAS_HARD:
        shift_h, log_h = tl.load(stats + 5), tl.load(stats + 6)
        g_hard = tl.where(in_range, g * math_arg(hard_weight, x_ptr), float("nan"))
        local_t = tgt - vocab_start
    x_row = x_ptr + row_offset(row, n_inner, x_outer_stride, x_inner_stride)
    y_row = y_ptr + row_offset(row, n_inner, y_outer_stride, y_inner_stride)
    dx_row = dx_ptr + row_offset(row, n_inner, dx_outer_stride, dx_inner_stride)
    start = split.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, n_cols)
    for tile in range(start, end, BLOCK_N):
        q = tile + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = q < end
        x = upcast(tl.load(x_row + q * x_col_stride, mask=mask, other=0.0,
                           eviction_policy="evict_first"))
        z, slope = head_transform_slope(x, head_s, HEAD_S)
        z = tl.where(mask, z, float("-inf"))
        w = _load_head(y_row + q * y_col_stride, mask, head_t, HEAD_T, False)
        lq, lp, pq, pp = _log_probs(z, w, shift_s, log_s, shift_t, log_t)
        dx = head_chain(g_soft * _grad(lp, lq, pp, pq, aux, b, omb, DIVERGENCE), slope, head_s,
                        HEAD_S)
        if HAS_HARD:
            zh = tl.where(mask, head_transform(x, head_h, HEAD_S), float("-inf"))
            ph = exp_precise((zh - shift_h) - log_h)
            dzh = g_hard * (ph - tl.where(q == local_t, 1.0, 0.0))
            dx += head_chain(dzh, slope, head_h, HEAD_S)
        dx = tl.where(kept, dx, 0.0)
        tl.store(dx_row + q * dx_col_stride, dx.to(dx_ptr.dtype.element_ty), mask=mask,
                 eviction_policy="evict_first")


# --------------------------------------------------------------------------- sparse top-k


@triton.jit
def _topk_members(idx, valid_k, start, BLOCK_N: tl.constexpr):
    """Count, per column of the tile starting at ``start``, of the k indices that fall on it."""
    loc = idx - start
    inside = valid_k & (loc >= 0) & (loc < BLOCK_N)
    return tl.histogram(tl.where(inside, loc, 0).to(tl.int32), BLOCK_N, mask=inside)


@triton.jit
def _topk_buckets(x_row, idx_row, lp_row, k, n_cols, x_col_stride, shift_s, log_s, log_tail,
                  head_s, HEAD_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """The k buckets' ``(lp, lq, p, q, valid)`` and the tail's ``(lp, lq, p, q)`` (the module
    docstring's rule for the teacher's mass; ``log_tail`` = log S_tail)."""
    ks = tl.arange(0, BLOCK_K)
    valid = ks < k
    idx = tl.load(idx_row + ks, mask=valid, other=0).to(tl.int64)
    here = valid & (idx >= 0) & (idx < n_cols)
    x = upcast(tl.load(x_row + tl.where(here, idx, 0) * x_col_stride, mask=here, other=0.0))
    lq = (head_transform(x, head_s, HEAD_S) - shift_s) - log_s
    ell = upcast(tl.load(lp_row + ks, mask=valid, other=float("-inf")))
    ell = ell.to(lq.dtype)
    pk = tl.where(valid, exp_precise(ell), 0.0)
    total = tl.sum(pk, axis=0)
    over = total > 1.0
    lp = tl.where(over, ell - tl.log(total), ell)
    pk = tl.where(over, pk / total, pk)
    p_tail = tl.where(over, 0.0, 1.0 - total)
    lq_tail = log_tail - log_s
    return lp, lq, pk, exp_precise(lq), valid, tl.log(p_tail), lq_tail, p_tail, \
        exp_precise(lq_tail)


@triton.jit
def _topk_row_sweep(x_row, idx, valid_k, n_cols, x_col_stride, head_s, BLOCK_N: tl.constexpr,
                    HEAD_S: tl.constexpr):
    """``(m, S, S_tail, worst)`` of the student's row: the online max and sum, the sum over the
    columns outside the k (relative to the same max), and the largest count of one index."""
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    m = math_arg(float("-inf"), x_row)
    s = math_arg(0.0, x_row)
    s_tail = s
    worst = tl.full((), 0, tl.int32)
    for tile in range(0, n_cols, BLOCK_N):
        q = tile + cols
        mask = q < n_cols
        z = _load_head(x_row + q * x_col_stride, mask, head_s, HEAD_S, False)
        hits = _topk_members(idx, valid_k, tile, BLOCK_N)
        worst = tl.maximum(worst, tl.max(hits, axis=0))
        m, s, e, alpha, _, _ = _fold(m, s, z)
        s_tail = s_tail * alpha + tl.sum(tl.where(hits > 0, 0.0, e), axis=0)
    return m, s, s_tail, worst


@triton.jit
def distillation_topk_fwd_kernel(
    # data: student logits, teacher indices (n_rows, k) int32/int64 and log-probs (n_rows, k),
    # targets (None), per-row loss, saved statistics (n_rows, 8) (None)
    x_ptr, idx_ptr, lp_ptr, target_ptr, loss_ptr, stats_ptr,
    # shape
    n_cols, n_inner, k, ignore_index,
    # strides (elements): student; the rows of indices and log-probs (their columns are 1)
    x_outer_stride, x_inner_stride, x_col_stride, idx_row_stride, lp_row_stride,
    # the student's transform (no temperature with a sparse teacher: also the hard head's)
    s_scale: tl.float64, s_u_scale: tl.float64, s_cap_scale: tl.float64,
    beta: tl.float64, one_minus_beta: tl.float64, coef: tl.float64, hard_weight: tl.float64,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_S: tl.constexpr,
    DIVERGENCE: tl.constexpr, HAS_HARD: tl.constexpr,
):
    """Program p owns row p: one sweep of the student's row for (m, S, S_tail), then the
    divergence over the k + 1 buckets. Statistics saved: ``(shift, L_s, shift, L_s, aux,
    log S_tail, …)``: the hard head is the student's own here."""
    head_s = head_factors(s_scale, s_u_scale, s_cap_scale, x_ptr)
    row = tl.program_id(0)
    x_row = x_ptr + row_offset(row, n_inner, x_outer_stride, x_inner_stride)
    idx_row = idx_ptr + row.to(tl.int64) * idx_row_stride
    lp_row = lp_ptr + row.to(tl.int64) * lp_row_stride
    ks = tl.arange(0, BLOCK_K)
    valid_k = ks < k
    idx = tl.load(idx_row + ks, mask=valid_k, other=0).to(tl.int64)
    m, s, s_tail, worst = _topk_row_sweep(x_row, idx, valid_k, n_cols, x_col_stride, head_s,
                                          BLOCK_N, HEAD_S)
    shift, log_s, log_tail = safe_max(m), tl.log(s), tl.log(s_tail)
    b = math_arg(beta, x_ptr)
    omb = math_arg(one_minus_beta, x_ptr)
    lp, lq, pk, qk, valid, lp_t, lq_t, p_t, q_t = _topk_buckets(
        x_row, idx_row, lp_row, k, n_cols, x_col_stride, shift, log_s, log_tail, head_s, HEAD_S,
        BLOCK_K)
    t1, t2 = _terms(lp, lq, pk, qk, b, omb, DIVERGENCE)
    u1, u2 = _terms(lp_t, lq_t, p_t, q_t, b, omb, DIVERGENCE)
    div, aux = _divergence(tl.sum(tl.where(valid, t1, 0.0), axis=0) + u1,
                           tl.sum(tl.where(valid, t2, 0.0), axis=0) + u2, b, omb, DIVERGENCE)
    # A repeated index or one outside the row: NaN (the buckets would not partition the row).
    bad = (worst > 1) | (tl.sum(tl.where(valid_k & ((idx < 0) | (idx >= n_cols)), 1, 0),
                                axis=0) > 0)
    div = tl.where(bad, float("nan"), div)
    tgt, kept, in_range = _row_target(target_ptr, row, ignore_index, n_cols)
    loss = math_arg(coef, x_ptr) * div
    if HAS_HARD:
        z_t = _hard_logit(x_row, tgt, n_cols, x_col_stride, kept, head_s, HEAD_S)
        loss += math_arg(hard_weight, x_ptr) * tl.where(in_range, (shift + log_s) - z_t,
                                                        float("nan"))
    tl.store(loss_ptr + row, tl.where(kept, loss, 0.0))
    if stats_ptr is not None:
        out = stats_ptr + row.to(tl.int64) * 8
        tl.store(out, shift)
        tl.store(out + 1, log_s)
        tl.store(out + 2, shift)
        tl.store(out + 3, log_s)
        tl.store(out + 4, tl.where(bad, float("nan"), aux))
        tl.store(out + 5, log_tail)
        tl.store(out + 6, log_s)
        tl.store(out + 7, aux * 0.0)


@triton.jit
def distillation_topk_bwd_kernel(
    # data: student, teacher indices and log-probs, targets (None), saved statistics, the rows'
    # upstream gradient (``g_stride`` 0: one value), dx (may alias x)
    x_ptr, idx_ptr, lp_ptr, target_ptr, stats_ptr, g_ptr, dx_ptr,
    # shape: program (row, split) owns columns [split·chunk, (split+1)·chunk) of n_cols
    n_cols, n_inner, chunk, k, ignore_index, g_stride,
    # strides (elements): student, indices' and log-probs' rows, dx
    x_outer_stride, x_inner_stride, x_col_stride, idx_row_stride, lp_row_stride,
    dx_outer_stride, dx_inner_stride, dx_col_stride,
    s_scale: tl.float64, s_u_scale: tl.float64, s_cap_scale: tl.float64,
    beta: tl.float64, one_minus_beta: tl.float64, coef: tl.float64, hard_weight: tl.float64,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_S: tl.constexpr,
    DIVERGENCE: tl.constexpr, HAS_HARD: tl.constexpr,
):
    """dx of one chunk of one row: every class as a tail class as the chunk is swept, then,
    after a barrier, the k classes that fall in the chunk overwritten by one scatter (module
    docstring)."""
    head_s = head_factors(s_scale, s_u_scale, s_cap_scale, x_ptr)
    row = tl.program_id(0)
    split = tl.program_id(1)
    stats = stats_ptr + row.to(tl.int64) * 8
    shift, log_s = tl.load(stats), tl.load(stats + 1)
    aux, log_tail = tl.load(stats + 4), tl.load(stats + 5)
    x_row = x_ptr + row_offset(row, n_inner, x_outer_stride, x_inner_stride)
    dx_row = dx_ptr + row_offset(row, n_inner, dx_outer_stride, dx_inner_stride)
    idx_row = idx_ptr + row.to(tl.int64) * idx_row_stride
    lp_row = lp_ptr + row.to(tl.int64) * lp_row_stride
    tgt, kept, in_range = _row_target(target_ptr, row, ignore_index, n_cols)
    g = upcast(tl.load(g_ptr + row.to(tl.int64) * g_stride))
    # aux is NaN on a row whose indices repeat or leave the row: its gradient is NaN too
    g_soft = tl.where(aux != aux, float("nan"), g * math_arg(coef, x_ptr))
    g_hard = tl.where(in_range, g * math_arg(hard_weight, x_ptr), float("nan"))
    b = math_arg(beta, x_ptr)
    omb = math_arg(one_minus_beta, x_ptr)
    lp, lq, pk, qk, valid, lp_t, lq_t, p_t, q_t = _topk_buckets(
        x_row, idx_row, lp_row, k, n_cols, x_col_stride, shift, log_s, log_tail, head_s, HEAD_S,
        BLOCK_K)
    # The tail bucket's dD/dz as a class, spread over its classes by q_j / Q_tail.
    grad_tail = tl.where(q_t > 0.0, _grad(lp_t, lq_t, p_t, q_t, aux, b, omb, DIVERGENCE), 0.0)
    idx = tl.load(idx_row + tl.arange(0, BLOCK_K), mask=valid, other=0).to(tl.int64)
    start = split.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, n_cols)
    for tile in range(start, end, BLOCK_N):
        q = tile + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = q < end
        x = upcast(tl.load(x_row + q * x_col_stride, mask=mask, other=0.0,
                           eviction_policy="evict_first"))
        z, slope = head_transform_slope(x, head_s, HEAD_S)
        z = tl.where(mask, z, float("-inf"))
        ratio = exp_precise((z - shift) - log_tail)
        dz = g_soft * tl.where(q_t > 0.0, ratio * grad_tail, 0.0)
        if HAS_HARD:
            ph = exp_precise((z - shift) - log_s)
            dz += g_hard * (ph - tl.where(q == tgt, 1.0, 0.0))
        dx = tl.where(kept, head_chain(dz, slope, head_s, HEAD_S), 0.0)
        tl.store(dx_row + q * dx_col_stride, dx.to(dx_ptr.dtype.element_ty), mask=mask,
                 eviction_policy="evict_first")
    # The k classes of this chunk, overwritten once every tail store of the program is done
    # (a store masked off them would not vectorise: its mask would depend on the data).
    tl.debug_barrier()
    here = valid & (idx >= start) & (idx < end)
    safe = tl.where(here, idx, 0)
    xk = upcast(tl.load(x_row + safe * x_col_stride, mask=here, other=0.0))
    _, slope_k = head_transform_slope(xk, head_s, HEAD_S)
    dz = g_soft * _grad(lp, lq, pk, qk, aux, b, omb, DIVERGENCE)
    if HAS_HARD:
        dz += g_hard * (qk - tl.where(idx == tgt, 1.0, 0.0))
    dx = tl.where(kept, head_chain(dz, slope_k, head_s, HEAD_S), 0.0)
    tl.store(dx_row + safe * dx_col_stride, dx.to(dx_ptr.dtype.element_ty), mask=here)
