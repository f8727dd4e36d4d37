"""Softmax cross-entropy kernels: loss, lse and (optionally, in the same pass) dlogits.

Notation for one row of logits ``x`` (``C`` classes), target class ``t``, class weights ``w``
(all 1 without ``weight``), ``W = Σ_c w_c``, smoothing ``ε``, z-loss coefficient ``ζ``, and
``z`` the logits after the head transform of ``kernels/_head.py`` (``logit_scale`` →
``logit_divisor`` → ``softcap`` → ``temperature``, in fp32; ``x`` itself without one):

    lse = m + log Σ exp(z − m)                       m = max z
    p   = exp(z − lse)
    loss = (1 − ε) · w_t · (lse − z_t) + (ε / C) · (W · lse − Σ_c w_c z_c) + ζ · lse²

which is torch's ``(1 − ε) · nll + (ε / C) · Σ_c w_c · (−log p_c)`` plus the PaLM z-loss. A row
whose target is ``ignore_index`` has loss 0 and gradient 0; a target outside ``[0, C)`` is never
used as an address: its row's loss (and gradient) is NaN.

Gradient of one row's loss, scaled by the row's ``g`` (grad_output, over the mean's divisor or
the normalizer):

    dz_c = g · ( (1 − ε) w_t · (p_c − [c = t])  +  (ε / C) · (p_c · W − w_c)  +  2 ζ lse · p_c )
    dx_c = dz_c · dz/dx                               (``head_chain``)

All of it in fp32 (fp64 for fp64 input); the true-class term is subtracted in fp32 before the
single cast at the store (rounding p to bf16 before subtracting 1 is a known peer bug).

Argument conventions of every kernel here: data pointers first (``weight_ptr`` is None without
class weights, ``divisor_ptr`` None without a device divisor: Triton specialises a None argument
away), then sizes, then strides as ``(outer, inner, col)`` tuples of a ``RowView`` (row ``r``
starts at ``(r // n_inner) · outer + (r % n_inner) · inner``), then runtime scalars — the
transform's ``head_scale, head_u_scale, head_cap_scale`` (``kernels/_head.py``) among them —
then constexprs. ``denom`` is a float the loss (and its gradient) is divided by: a numeric
``normalizer``, else 1. Every float parameter is annotated ``tl.float64`` (a Python float would
reach the GPU as fp32) and rounded once into the math dtype where it is used (``tl.full((), s,
dtype)``; converted at entry they stayed live in registers through the sweeps, where a constant
operand is free); inside, ``head`` is ``_head.head_factors``' tuple.

Launch-level structure (host side: ``probact_gpu.ops.cross_entropy``):

- ``cross_entropy_fwd_kernel``: single tile, ``BLOCK_M`` rows × ``BLOCK_N ≥ C`` held in
  registers; loss, lse and (``COMPUTE_GRAD``) dx from one read. HBM per row, e = element size:
  ``2·C·e`` with the gradient (the floor), ``C·e`` without.
- ``cross_entropy_fwd_sweep_kernel``: one program per row, an online sweep for (max, Σexp,
  z_t, Σ w·z), then (``COMPUTE_GRAD``) a reverse sweep writing dx, so its first re-reads hit the
  tiles still in L2: ``2·C·e`` of HBM when sweep 2 hits L2, up to ``3·C·e`` when the rows in
  flight overflow it; ``C·e`` without the gradient. Sweep 2's loads and stores are ``evict_first``
  (the row's last use). ``cross_entropy_fwd_persistent_kernel``: the same row sweep
  (``_sweep_row``) on a grid of P programs that loop over rows P apart, so at most P rows are in
  flight (``tiling.choose_cross_entropy_config``'s L2 model picks it for long rows).
- split row (few rows × huge C): ``cross_entropy_split_stats_kernel`` per (row, chunk) writes
  partial (max, Σexp, target logit, Σ w·z) to a ``(N, S, 4)`` fp32 workspace (reads ``C·e``);
  ``cross_entropy_combine_kernel`` merges a row's partials in a fixed order into loss and lse;
  ``cross_entropy_bwd_kernel`` per (row, chunk) writes dx from lse (reads ``C·e``, writes
  ``C·e``). These take ``vocab_start``: the local tensor holds global classes
  ``[vocab_start, vocab_start + n_cols)`` of ``n_classes``, so one rank's shard of a
  vocab-parallel head is just one chunk.
- ``cross_entropy_bwd_kernel`` is also the backward of ``reduction="none"`` (per-row g read on
  the device): reads x once, writes dx once.
- ``cross_entropy_total_weight_kernel``: one program sums ``w_t`` over non-ignored targets (the
  mean's divisor) on the device, in a fixed order, before the forward (reads the targets).
- ``cross_entropy_finish_kernel``: one program sums the per-row losses in a fixed order, divides
  by the mean's divisor or the normalizer and casts to the loss dtype (reads 4 B a row).
- ``cross_entropy_scale_grad_kernel``: backward of a fused gradient, ``dx *= grad_output`` read
  on the device, on a grid of a few programs per SM that walk the row tiles; every program
  returns at once when grad_output is exactly 1 (no host check, no traffic).

Unaligned rows (``PEEL_EDGES``: the sweep forward, ``cross_entropy_bwd_kernel`` and
``cross_entropy_scale_grad_kernel``). A tile loads or stores 16 bytes a thread only when Triton
can prove each run of VEC = 16 / e elements 16-byte aligned and its mask constant over it; it
proves that from launch-time hints (pointers 16-byte aligned, ints divisible by 16), which a
row stride like V = 50257 or a sliced view's base defeats: such rows load 2 bytes a thread in
bf16. The launcher (``tiling.peel_row_edges``) then sets ``PEEL_EDGES`` and each row is split
at the first 16-byte boundary after its start, ``c0 = VEC − head`` columns in (``head``: the
start's distance in elements past the boundary below it):

- the body, columns ``[c0, c0 + n_body)`` with ``n_body`` a multiple of VEC, swept by the usual
  tiles from a base the kernel hints 16-byte aligned (``tl.multiple_of``), masks against
  ``n_body``: 16 bytes a thread, as aligned rows;
- the edges, one masked tile of 2·VEC lanes: the VEC columns before the body (the head; the
  lanes before column 0 touch nothing) and the fewer than VEC after it (the tail).

The body and edge offsets, the target (``local_t``) and the class weights' offset (``w_off``)
count from column c0. The same bytes move; only the access width changes. The single-tile
forward and the split-stats kernel keep narrow loads on such rows.
"""

import triton
import triton.language as tl

from ._head import (
    HEAD_SOFTCAP,
    head_chain,
    head_factors,
    head_slope,
    head_transform,
    head_transform_slope,
)
from ._online import (
    exp,
    lse_shift,
    math_arg,
    online_update_lse,
    row_offset,
    safe_max,
    upcast,
)

# --------------------------------------------------------------------------- per-row math


@triton.jit
def _target_info(tgt, weight_ptr, n_classes, ignore_index):
    """(valid, in_range, w_t) of target(s) ``tgt`` (int64). ``w_t`` is read only for a valid
    in-range target; it is 0 for an ignored one (1 for a valid one without weights)."""
    valid = tgt != ignore_index
    in_range = (tgt >= 0) & (tgt < n_classes)
    if weight_ptr is not None:
        safe = tl.where(in_range, tgt, 0)
        w_t = upcast(tl.load(weight_ptr + safe, mask=valid & in_range, other=0.0))
    else:
        w_t = tl.where(valid, 1.0, 0.0)
    return valid, in_range, w_t


@triton.jit
def _load_w(weight_ptr, cols, mask):
    """The class weights of columns ``cols`` (0 where masked out), or 1.0 without weights."""
    if weight_ptr is not None:
        return upcast(tl.load(weight_ptr + cols, mask=mask, other=0.0))
    else:
        return 1.0


@triton.jit
def _grad_scale(divisor_ptr, denom, like):
    """1 / (denom · divisor) in the math dtype of ``like``: the gradient's scale before
    grad_output (the divisor, a device scalar in the math dtype, is the mean's Σ w_t or a tensor
    normalizer)."""
    g = 1.0 / tl.full((), denom, like.dtype)
    if divisor_ptr is not None:
        g = g / upcast(tl.load(divisor_ptr))
    return g


@triton.jit
def _zeta(z_loss, z_scale_ptr, like):
    """The z-loss coefficient in the math dtype of ``like``: ``z_loss``, times the device
    scalar at ``z_scale_ptr`` when given — ``Σ w_t / (non-ignored rows)`` for a weighted mean,
    so that the z term divided by the mean's divisor Σ w_t is averaged over the tokens."""
    zeta = tl.full((), z_loss, like.dtype)
    if z_scale_ptr is not None:
        zeta = zeta * upcast(tl.load(z_scale_ptr))
    return zeta


@triton.jit
def _row_loss(lse, nll, smooth, w_t, valid, in_range, n_classes, label_smoothing, z_loss,
              z_scale_ptr, HAS_SMOOTHING: tl.constexpr):
    """The loss of row(s) from lse, ``nll = lse − z_t`` and ``smooth = W·lse − Σ w·z``, each
    formed by the caller around a shift close to the logits (no cancellation at |x| ~ 1e4). A
    row with a +inf logit (lse = +inf, ``lse_shift``) has a NaN loss, as torch's log_softmax
    gives it (inf − inf), unless ignored."""
    zeta = _zeta(z_loss, z_scale_ptr, lse)
    if HAS_SMOOTHING:
        eps = tl.full((), label_smoothing, lse.dtype)
        loss = (1.0 - eps) * w_t * nll + zeta * lse * lse + (eps / n_classes) * smooth
    else:
        loss = w_t * nll + zeta * lse * lse
    loss = tl.where(lse == float("inf"), float("nan"), loss)
    loss = tl.where(valid, loss, 0.0)
    return tl.where(valid & (~in_range), float("nan"), loss)


@triton.jit
def _grad_coefs(g, lse, w_t, in_range, n_classes, label_smoothing, z_loss, z_scale_ptr,
                HAS_SMOOTHING: tl.constexpr):
    """(true_coef, smooth_coef, z_coef) of ``dz = true_coef·(p − [c = t]) + smooth_coef·(p·W −
    w_c) + z_coef·p`` (``_dx``; smooth_coef unused without smoothing); true_coef is NaN for a
    target outside ``[0, C)`` and on a row with a +inf logit (lse = +inf): its gradient is NaN,
    as torch's."""
    if HAS_SMOOTHING:
        eps = tl.full((), label_smoothing, lse.dtype)
        true_coef = tl.where(in_range, g * (1.0 - eps) * w_t, float("nan"))
        smooth_coef = tl.zeros_like(lse) + g * (eps / n_classes)  # shaped like lse
    else:
        true_coef = tl.where(in_range, g * w_t, float("nan"))
        smooth_coef = tl.zeros_like(lse)
    true_coef = tl.where(lse == float("inf"), float("nan"), true_coef)
    z_coef = g * (2.0 * _zeta(z_loss, z_scale_ptr, lse)) * lse
    return true_coef, smooth_coef, z_coef


@triton.jit
def _logits(ptrs, mask, head, HEAD: tl.constexpr, EVICTION: tl.constexpr):
    """z of a tile of logits (the head transform in fp32/fp64), −inf in masked-out lanes;
    ``EVICTION``: the load's L2 eviction policy ("evict_first" for a last read, "" for none;
    always passed: triton 3.6 cannot compile a nested function's string constexpr default)."""
    return _logits_of(_load_x(ptrs, mask, EVICTION), mask, head, HEAD)


@triton.jit
def _load_x(ptrs, mask, EVICTION: tl.constexpr):
    """A tile of logits, upcast (0 in masked-out lanes)."""
    return upcast(tl.load(ptrs, mask=mask, other=0.0, eviction_policy=EVICTION))


@triton.jit
def _logits_of(x, mask, head, HEAD: tl.constexpr):
    """z of the upcast logits x, −inf in masked-out lanes."""
    z = head_transform(x, head, HEAD)
    return tl.where(mask, z, float("-inf"))


@triton.jit
def _dx(slope, z, is_t, w, valid, shift, inv_sum, true_coef, smooth_coef, z_coef, W, head,
        HAS_SMOOTHING: tl.constexpr, HEAD: tl.constexpr):
    """dx of a tile from its logits' z and the transform's slope (``_head.head_slope``; unused
    without a softcap), with ``p = exp(z − shift) · inv_sum``
    (shift = the row max and inv_sum = 1 / Σ exp(z − max) where known, else shift = lse and
    inv_sum = 1); ``w`` is the tile's class weights (1 without), used only with smoothing; 0 on
    ignored rows.

    Each term is a difference of like quantities scaled once, ``(p − [c = t])`` and
    ``(p·W − w_c)``, not ``p·coef − true_coef − smooth_coef·w_c``: with ε = 0.1 (inexact in
    binary) ``(1 − ε) + ε`` is not 1, so the folded form left ~ulp(g) where the gradient is 0
    (one class, p = 1) and ~ulp(coef) of noise on the target column everywhere."""
    p = exp(z - shift) * inv_sum
    dz = true_coef * (p - tl.where(is_t, 1.0, 0.0)) + z_coef * p
    if HAS_SMOOTHING:
        dz += smooth_coef * (p * W - w)
    return tl.where(valid, head_chain(dz, slope, head, HEAD), 0.0)


@triton.jit
def _write_grad(x_ptrs, dx_ptrs, c, mask, tgt, valid, weight_ptr, w_off, shift, inv_sum,
                true_coef, smooth_coef, z_coef, W, head, HAS_SMOOTHING: tl.constexpr,
                HEAD: tl.constexpr):
    """Read a tile of logits (columns ``c``; their class weights at ``w_off + c``), write its
    dx (``shift``, ``inv_sum``: see ``_dx``). The tile's last use: load and store are
    ``evict_first``."""
    z, slope = head_transform_slope(_load_x(x_ptrs, mask, "evict_first"), head, HEAD)
    z = tl.where(mask, z, float("-inf"))
    w = _load_w(weight_ptr, w_off + c, mask)
    dx = _dx(slope, z, c == tgt, w, valid, shift, inv_sum, true_coef, smooth_coef, z_coef, W,
             head, HAS_SMOOTHING, HEAD)
    tl.store(dx_ptrs, dx.to(dx_ptrs.dtype.element_ty), mask=mask, eviction_policy="evict_first")


@triton.jit
def _fold_tile(z, c, mask, tgt, ref, row_max, row_sum, z_t, smooth_acc, w_acc, weight_ptr,
               w_off, HAS_SMOOTHING: tl.constexpr):
    """Fold tile ``z`` (columns ``c``) into the row's online (max, Σexp), target logit, and —
    with smoothing — the per-lane accumulators of ``w·(z − ref)`` and ``w``."""
    row_max, row_sum = online_update_lse(row_max, row_sum, z, 0)
    z_t += tl.sum(tl.where(c == tgt, z, 0.0), axis=0)
    if HAS_SMOOTHING:
        w = _load_w(weight_ptr, w_off + c, mask)
        smooth_acc += tl.where(mask, (z - ref) * w, 0.0)
        w_acc += tl.where(mask, w, 0.0).to(z.dtype)
    return row_max, row_sum, z_t, smooth_acc, w_acc


@triton.jit
def _peel(row_ptr, n_cols):
    """(c0, n_body) of the row starting at ``row_ptr`` (``PEEL_EDGES``, module docstring), int32:
    int64 offsets here took the bf16 forward from 64 to 96 registers on sm_90."""
    VEC: tl.constexpr = 16 // (row_ptr.dtype.element_ty.primitive_bitwidth // 8)
    head = ((row_ptr.to(tl.int64) % 16) // (16 // VEC)).to(tl.int32)
    c0 = VEC - head
    n_body = (tl.maximum(n_cols - c0, 0) // VEC) * VEC
    return c0, n_body


@triton.jit
def _edge_offsets(body_ptr, n_body):
    """Offsets from the body's base of the edge tile: −VEC .. −1, then n_body .. n_body + VEC − 1
    (the columns c0 − VEC .. c0 − 1 and c0 + n_body .. c0 + n_body + VEC − 1)."""
    VEC: tl.constexpr = 16 // (body_ptr.dtype.element_ty.primitive_bitwidth // 8)
    j = tl.arange(0, 2 * VEC).to(tl.int64)
    return j - VEC + tl.where(j >= VEC, n_body, 0)


# --------------------------------------------------------------------------- forward


@triton.jit
def cross_entropy_fwd_kernel(
    # data: logits, targets (int32/int64), class weights, device divisor, the z term's scale
    # (None: 1), per-row loss (fp32, or the loss dtype for reduction "none"), lse (fp32; fp64
    # for fp64 input), dlogits
    x_ptr, target_ptr, weight_ptr, divisor_ptr, z_scale_ptr, loss_ptr, lse_ptr, dx_ptr,
    # sizes
    n_rows, n_cols, n_inner, ignore_index,
    # strides (elements): (outer, inner, col) of x and of dx
    x_strides, dx_strides,
    # scalars (fp64 arguments, rounded to the math dtype where used)
    label_smoothing: tl.float64, z_loss: tl.float64, head_scale: tl.float64,
    head_u_scale: tl.float64, head_cap_scale: tl.float64, denom: tl.float64,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HEAD: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
):
    """Single tile: program p owns rows [p·BLOCK_M, (p+1)·BLOCK_M), each held whole in
    registers; loss, lse and (``COMPUTE_GRAD``) dx = dL/dx with g = 1 / (denom · divisor) come
    from the one read. W = Σ w is summed from the row's own tile of weights."""
    head = head_factors(head_scale, head_u_scale, head_cap_scale, x_ptr)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    col_mask = (cols < n_cols)[None, :]
    mask = row_mask[:, None] & col_mask
    x_offs = row_offset(rows, n_inner, x_strides[0], x_strides[1])[:, None] \
        + cols[None, :] * x_strides[2]
    z = _logits(x_ptr + x_offs, mask, head, HEAD, "")
    tgt = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    valid, in_range, w_t = _target_info(tgt, weight_ptr, n_cols, ignore_index)

    shift = lse_shift(tl.max(z, axis=1))
    row_sum = tl.sum(exp(z - shift[:, None]), axis=1)
    log_sum = tl.log(row_sum)
    lse = shift + log_sum
    is_t = cols[None, :] == tgt[:, None]
    nll = (shift - tl.sum(tl.where(is_t, z, 0.0), axis=1)) + log_sum
    w = _load_w(weight_ptr, cols[None, :], col_mask)
    if HAS_SMOOTHING:  # Σ w·(lse − z) = Σ w·(shift − z) + W·log Σ exp(z − shift)
        if weight_ptr is not None:
            W = tl.sum(w.to(lse.dtype), axis=1)
        else:
            W = n_cols.to(lse.dtype)
        smooth = tl.sum(tl.where(mask, (shift[:, None] - z) * w, 0.0), axis=1) + W * log_sum
    else:
        W = 0.0
        smooth = 0.0
    loss = _row_loss(lse, nll, smooth, w_t, valid, in_range, n_cols, label_smoothing, z_loss,
                     z_scale_ptr, HAS_SMOOTHING)
    tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)

    if COMPUTE_GRAD:
        g = _grad_scale(divisor_ptr, denom, lse)
        true_coef, smooth_coef, z_coef = _grad_coefs(g, lse, w_t, in_range, n_cols,
                                                     label_smoothing, z_loss, z_scale_ptr,
                                                     HAS_SMOOTHING)
        if HEAD == HEAD_SOFTCAP:  # sech² from the raw logits: read again (an L1/L2 hit)
            slope = head_slope(_load_x(x_ptr + x_offs, mask, ""), head, HEAD)
        else:
            slope = z  # unused without a softcap
        dx = _dx(slope, z, is_t, w, valid[:, None], shift[:, None], (1.0 / row_sum)[:, None],
                 true_coef[:, None], smooth_coef[:, None], z_coef[:, None],
                 (tl.zeros_like(lse) + W)[:, None], head,
                 HAS_SMOOTHING, HEAD)
        dx_offs = row_offset(rows, n_inner, dx_strides[0], dx_strides[1])[:, None] \
            + cols[None, :] * dx_strides[2]
        tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sweep_row(
    row, x_ptr, target_ptr, weight_ptr, divisor_ptr, z_scale_ptr, loss_ptr, lse_ptr, dx_ptr,
    n_cols, n_inner, ignore_index, x_strides, dx_strides, label_smoothing, z_loss, head, denom,
    BLOCK_N: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HEAD: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, PEEL_EDGES: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """The row-sweep forward of one row (the arguments of ``cross_entropy_fwd_sweep_kernel``):
    sweep 1 folds its tiles into the online (max, Σexp), the target logit and (smoothing)
    Σ w·(z − ref) and W = Σ w; then, with ``COMPUTE_GRAD``, sweep 2 walks the tiles in reverse
    writing dx (its loads and stores are the row's last use: ``evict_first``). With
    ``PEEL_EDGES`` the sweeps cover the row's body, and its edge tile last in sweep 1, first in
    sweep 2 (module docstring)."""
    x_row = x_ptr + row_offset(row, n_inner, x_strides[0], x_strides[1])
    dx_row = dx_ptr + row_offset(row, n_inner, dx_strides[0], dx_strides[1])
    tgt = tl.load(target_ptr + row).to(tl.int64)
    valid, in_range, w_t = _target_info(tgt, weight_ptr, n_cols, ignore_index)
    # The tiles sweep the row's body; offsets, local_t and w_off count from its first column.
    if PEEL_EDGES:
        c0, n_body = _peel(x_row, n_cols)
        x_row = tl.multiple_of(x_row + c0, 16)
        dx_row = tl.multiple_of(dx_row + c0, 16)
        local_t = tgt - c0
        w_off = c0
        # A body tile's masked-out lanes are real columns (the tail), −inf there: a target
        # outside the body must match none of them.
        body_t = tl.where(local_t < n_body, local_t, -1)
    else:
        n_body = n_cols
        local_t = tgt
        w_off = 0
        body_t = tgt
    cols = tl.arange(0, BLOCK_N).to(tl.int64)

    # Sweep 1: the first tile seeds every accumulator (its dtype is the math's).
    mask = cols < n_body
    z = _logits(x_row + cols * x_strides[2], mask, head, HEAD, "")
    row_max = tl.max(z, axis=0)
    row_sum = tl.sum(exp(z - lse_shift(row_max)), axis=0)
    z_t = tl.sum(tl.where(cols == body_t, z, 0.0), axis=0)
    # Σ w·z is accumulated around the first tile's max (fixed): no cancellation at 1e4.
    ref = safe_max(row_max)
    smooth_acc = tl.zeros_like(z)
    w_acc = tl.zeros_like(z)
    if HAS_SMOOTHING:
        w = _load_w(weight_ptr, w_off + cols, mask)
        smooth_acc = tl.where(mask, (z - ref) * w, 0.0)
        w_acc = tl.where(mask, w, 0.0).to(z.dtype)
    for start in tl.range(BLOCK_N, n_body, BLOCK_N, num_stages=NUM_STAGES):
        q = start + cols
        mask = q < n_body
        z = _logits(x_row + q * x_strides[2], mask, head, HEAD, "")
        row_max, row_sum, z_t, smooth_acc, w_acc = _fold_tile(
            z, q, mask, body_t, ref, row_max, row_sum, z_t, smooth_acc, w_acc, weight_ptr, w_off,
            HAS_SMOOTHING)
    smooth_sum = tl.sum(smooth_acc, axis=0)  # (0 without smoothing)
    w_sum = tl.sum(w_acc, axis=0)
    if PEEL_EDGES:
        e = _edge_offsets(x_row, n_body)
        edge = (e >= -c0) & (e < n_cols - c0)  # outside the body: compared with local_t
        z = _logits(x_row + e, edge, head, HEAD, "")
        edge_smooth = tl.zeros_like(z)
        edge_w = tl.zeros_like(z)
        row_max, row_sum, z_t, edge_smooth, edge_w = _fold_tile(
            z, e, edge, local_t, ref, row_max, row_sum, z_t, edge_smooth, edge_w, weight_ptr,
            w_off, HAS_SMOOTHING)
        smooth_sum += tl.sum(edge_smooth, axis=0)
        w_sum += tl.sum(edge_w, axis=0)

    shift = lse_shift(row_max)
    log_sum = tl.log(row_sum)
    lse = shift + log_sum
    nll = (shift - z_t) + log_sum
    if HAS_SMOOTHING:  # W·(lse − ref) − Σ w·(z − ref)
        if weight_ptr is not None:
            W = w_sum
        else:
            W = n_cols.to(lse.dtype)
        smooth = W * ((shift - ref) + log_sum) - smooth_sum
    else:
        W = 0.0
        smooth = 0.0
    loss = _row_loss(lse, nll, smooth, w_t, valid, in_range, n_cols, label_smoothing, z_loss,
                     z_scale_ptr, HAS_SMOOTHING)
    tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))
    tl.store(lse_ptr + row, lse)

    if COMPUTE_GRAD:
        g = _grad_scale(divisor_ptr, denom, lse)
        true_coef, smooth_coef, z_coef = _grad_coefs(g, lse, w_t, in_range, n_cols,
                                                     label_smoothing, z_loss, z_scale_ptr,
                                                     HAS_SMOOTHING)
        inv_sum = 1.0 / row_sum
        # Sweep 2 in reverse: the edges (read last), then the last tile first (those are the
        # tiles most likely still in L2).
        if PEEL_EDGES:
            _write_grad(x_row + e, dx_row + e, e, edge, local_t, valid, weight_ptr, w_off, shift,
                        inv_sum, true_coef, smooth_coef, z_coef, W, head, HAS_SMOOTHING,
                        HEAD)
        n_tiles = tl.cdiv(n_body, BLOCK_N)
        for i in tl.range(0, n_tiles, num_stages=NUM_STAGES):
            q = (n_tiles - 1 - i) * BLOCK_N + cols
            _write_grad(x_row + q * x_strides[2], dx_row + q * dx_strides[2], q, q < n_body,
                        body_t, valid, weight_ptr, w_off, shift, inv_sum, true_coef,
                        smooth_coef, z_coef, W, head, HAS_SMOOTHING, HEAD)




@triton.jit
def cross_entropy_fwd_sweep_kernel(
    # data: as cross_entropy_fwd_kernel
    x_ptr, target_ptr, weight_ptr, divisor_ptr, z_scale_ptr, loss_ptr, lse_ptr, dx_ptr,
    # sizes
    n_cols, n_inner, ignore_index,
    # strides (elements): (outer, inner, col) of x and of dx
    x_strides, dx_strides,
    # scalars (fp64 arguments, rounded to the math dtype where used)
    label_smoothing: tl.float64, z_loss: tl.float64, head_scale: tl.float64,
    head_u_scale: tl.float64, head_cap_scale: tl.float64, denom: tl.float64,
    BLOCK_N: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HEAD: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, PEEL_EDGES: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Program p owns row p (``_sweep_row``; ``NUM_STAGES`` > 1 software-pipelines both
    sweeps' tile loops, 1: not pipelined)."""
    head = head_factors(head_scale, head_u_scale, head_cap_scale, x_ptr)
    _sweep_row(tl.program_id(0), x_ptr, target_ptr, weight_ptr, divisor_ptr, z_scale_ptr,
               loss_ptr, lse_ptr, dx_ptr, n_cols, n_inner, ignore_index, x_strides, dx_strides,
               label_smoothing, z_loss, head, denom, BLOCK_N, HAS_SMOOTHING, HEAD, COMPUTE_GRAD,
               PEEL_EDGES, NUM_STAGES)


@triton.jit
def cross_entropy_fwd_persistent_kernel(
    # data: as cross_entropy_fwd_kernel
    x_ptr, target_ptr, weight_ptr, divisor_ptr, z_scale_ptr, loss_ptr, lse_ptr, dx_ptr,
    # sizes
    n_rows, n_cols, n_inner, ignore_index,
    # strides (elements): (outer, inner, col) of x and of dx
    x_strides, dx_strides,
    # scalars (fp64 arguments, rounded to the math dtype where used)
    label_smoothing: tl.float64, z_loss: tl.float64, head_scale: tl.float64,
    head_u_scale: tl.float64, head_cap_scale: tl.float64, denom: tl.float64,
    BLOCK_N: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HEAD: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, PEEL_EDGES: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """A persistent grid of P programs: program p sweeps rows p, p + P, p + 2P, ...
    (``_sweep_row``), so only P rows are in flight and sweep 2 re-reads a row while it is still
    in L2 (``tiling.choose_cross_entropy_config`` picks P from the L2 model)."""
    head = head_factors(head_scale, head_u_scale, head_cap_scale, x_ptr)
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        _sweep_row(row, x_ptr, target_ptr, weight_ptr, divisor_ptr, z_scale_ptr, loss_ptr,
                   lse_ptr, dx_ptr,
                   n_cols, n_inner, ignore_index, x_strides, dx_strides, label_smoothing,
                   z_loss, head, denom, BLOCK_N, HAS_SMOOTHING, HEAD, COMPUTE_GRAD,
                   PEEL_EDGES, NUM_STAGES)


@triton.jit
def cross_entropy_finish_kernel(
    # data: per-row losses (fp32; fp64 for fp64 input), device divisor, the 0-d loss
    loss_ptr, divisor_ptr, out_ptr,
    # sizes and scalars (denom: an fp64 argument, used in fp64)
    n_rows, denom: tl.float64,
    BLOCK: tl.constexpr,
):
    """One program: ``out = Σ_rows loss / (denom · divisor)``, cast to the loss dtype. Per-lane
    partial sums merged once at the end: a fixed order, deterministic (no atomics). The sum and
    the divisions run in fp64 and round once at the store: an fp32 sum of the rows' losses and
    two fp32 divisions measured 1.7 ulps of a weighted mean, where torch is within one."""
    offs = tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, n_rows, BLOCK):
        r = start + offs
        acc += tl.load(loss_ptr + r, mask=r < n_rows, other=0.0).to(tl.float64)
    total = tl.sum(acc, axis=0) / tl.full((), denom, tl.float64)
    if divisor_ptr is not None:
        total = total / tl.load(divisor_ptr).to(tl.float64)
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))


# --------------------------------------------------------------------------- split row


@triton.jit
def cross_entropy_split_stats_kernel(
    # data: logits (n_rows × n_cols local classes), targets, class weights (global), workspace
    x_ptr, target_ptr, weight_ptr, stats_ptr,
    # sizes: program (row, split) owns local columns [split·chunk, (split+1)·chunk); local
    # column c is global class vocab_start + c
    n_cols, n_inner, chunk, vocab_start,
    # strides (elements): (outer, inner, col) of x
    x_strides,
    # the head transform's factors (fp64 arguments: ``_head.head_factors``)
    head_scale: tl.float64, head_u_scale: tl.float64, head_cap_scale: tl.float64,
    BLOCK_N: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HEAD: tl.constexpr,
):
    """Writes ``stats[row, split, :] = (max z, Σ exp(z − max), z_t if t is in this chunk else 0,
    Σ w·z)`` over the chunk (the last is 0 without smoothing). Reads chunk·e bytes. Σ w·z is
    summed around no shift: its absolute error is about ulp(|z|) per element."""
    head = head_factors(head_scale, head_u_scale, head_cap_scale, x_ptr)
    row = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    x_row = x_ptr + row_offset(row, n_inner, x_strides[0], x_strides[1])
    local_t = tl.load(target_ptr + row).to(tl.int64) - vocab_start
    start = split.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, n_cols)
    cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
    mask = cols < end
    z = _logits(x_row + cols * x_strides[2], mask, head, HEAD, "")
    part_max = tl.max(z, axis=0)
    part_sum = tl.sum(exp(z - lse_shift(part_max)), axis=0)
    part_t = tl.sum(tl.where((cols == local_t) & mask, z, 0.0), axis=0)
    smooth_acc = tl.where(mask, z * _load_w(weight_ptr, vocab_start + cols, mask), 0.0)
    for tile in range(start + BLOCK_N, end, BLOCK_N):
        c = tile + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = c < end
        z = _logits(x_row + c * x_strides[2], mask, head, HEAD, "")
        part_max, part_sum = online_update_lse(part_max, part_sum, z, 0)
        part_t += tl.sum(tl.where((c == local_t) & mask, z, 0.0), axis=0)
        if HAS_SMOOTHING:
            smooth_acc += tl.where(mask, z * _load_w(weight_ptr, vocab_start + c, mask), 0.0)
    if HAS_SMOOTHING:
        part_smooth = tl.sum(smooth_acc, axis=0)
    else:
        part_smooth = 0.0
    out = stats_ptr + (row.to(tl.int64) * n_splits + split) * 4
    tl.store(out, part_max)
    tl.store(out + 1, part_sum)
    tl.store(out + 2, part_t)
    tl.store(out + 3, part_smooth)


@triton.jit
def cross_entropy_combine_kernel(
    # data: workspace (n_rows, n_splits, 4), targets, class weights, Σ w (device scalar; None
    # without weights or smoothing), the z term's scale (None: 1), per-row loss and lse
    stats_ptr, target_ptr, weight_ptr, w_sum_ptr, z_scale_ptr, loss_ptr, lse_ptr,
    # sizes
    n_rows, n_splits, n_classes, ignore_index,
    # scalars (fp64 arguments, in the math dtype of lse below)
    label_smoothing: tl.float64, z_loss: tl.float64,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
):
    """Program p merges the partials of rows [p·BLOCK_M, (p+1)·BLOCK_M), splits in a fixed order
    (deterministic), into loss and lse; the smoothing term is ``W·lse − Σ_splits (Σ w·z)`` (the
    partials' Σ w·z are unshifted). Reads 16 B per (row, split)."""
    label_smoothing = math_arg(label_smoothing, lse_ptr)
    z_loss = math_arg(z_loss, lse_ptr)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    splits = tl.arange(0, BLOCK_S)
    mask = row_mask[:, None] & (splits < n_splits)[None, :]
    base = stats_ptr + (rows.to(tl.int64)[:, None] * n_splits + splits[None, :]) * 4
    part_max = tl.load(base, mask=mask, other=float("-inf"))
    part_sum = tl.load(base + 1, mask=mask, other=0.0)
    z_t = tl.sum(tl.load(base + 2, mask=mask, other=0.0), axis=1)
    smooth_sum = tl.sum(tl.load(base + 3, mask=mask, other=0.0), axis=1)
    shift = lse_shift(tl.max(part_max, axis=1))
    row_sum = tl.sum(part_sum * exp(part_max - shift[:, None]), axis=1)
    log_sum = tl.log(row_sum)
    lse = shift + log_sum
    tgt = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    valid, in_range, w_t = _target_info(tgt, weight_ptr, n_classes, ignore_index)
    if w_sum_ptr is not None:
        W = upcast(tl.load(w_sum_ptr))
    else:
        W = n_classes.to(lse.dtype)
    loss = _row_loss(lse, (shift - z_t) + log_sum, W * lse - smooth_sum, w_t, valid, in_range,
                     n_classes, label_smoothing, z_loss, z_scale_ptr, HAS_SMOOTHING)
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)


# --------------------------------------------------------------------------- backward


@triton.jit
def cross_entropy_bwd_kernel(
    # data: logits, targets, class weights (global), Σ w (device scalar; None without weights or
    # smoothing), per-row lse, grad_output (a scalar or one per row), device divisor, the z
    # term's scale (None: 1), dlogits (may alias the logits)
    x_ptr, target_ptr, weight_ptr, w_sum_ptr, lse_ptr, grad_ptr, divisor_ptr, z_scale_ptr,
    dx_ptr,
    # sizes: program (row, split) owns local columns [split·chunk, (split+1)·chunk) = global
    # classes vocab_start + c of n_classes
    n_cols, n_inner, chunk, vocab_start, n_classes, ignore_index, grad_row_stride,
    # strides (elements): (outer, inner, col) of x and of dx
    x_strides, dx_strides,
    # scalars (fp64 arguments, rounded to the math dtype where used)
    label_smoothing: tl.float64, z_loss: tl.float64, head_scale: tl.float64,
    head_u_scale: tl.float64, head_cap_scale: tl.float64, denom: tl.float64,
    BLOCK_N: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HEAD: tl.constexpr,
    PEEL_EDGES: tl.constexpr, ROW_STATS: tl.constexpr = False,
    UNLESS_ONE: tl.constexpr = False,
):
    """dx over one chunk of one row from the row's lse, with g = grad[row · grad_row_stride]
    / (denom · divisor). Reads chunk·e, writes chunk·e; each element is read before it is
    written, so ``dx_ptr`` may be ``x_ptr`` (in place). With ``PEEL_EDGES`` the chunks (a
    multiple of 16 columns) divide the row's body and split 0 also writes the edge tile (module
    docstring). ``ROW_STATS`` (the whole row is this program's one tile, not peeled, no vocab
    offset): p comes from the tile's own max and Σ exp, as in the fused forward, not from lse:
    lse rounded to fp32 puts up to ulp(lse)/2 of relative error in every p (3.6 ulps of the
    largest dx at 9 × 7 against torch's 1.6). Same bytes; one more exp an element.

    ``UNLESS_ONE`` (a 0-d grad_output; dx holds the forward's fused gradient, the gradient for
    grad_output 1): every program returns at once, touching nothing, when grad_output is
    exactly 1; otherwise dx is recomputed for it, rounded once — the backward of a reduced loss,
    whose 16-bit gradient rescaled in place would be rounded twice."""
    head = head_factors(head_scale, head_u_scale, head_cap_scale, x_ptr)
    row = tl.program_id(0)
    split = tl.program_id(1)
    g = upcast(tl.load(grad_ptr + row.to(tl.int64) * grad_row_stride))
    if UNLESS_ONE:
        if g != 1.0:
            _bwd_chunk(row, split, g, x_ptr, target_ptr, weight_ptr, w_sum_ptr, lse_ptr,
                       divisor_ptr, z_scale_ptr, dx_ptr, n_cols, n_inner, chunk, vocab_start,
                       n_classes, ignore_index, x_strides, dx_strides, label_smoothing, z_loss,
                       head, denom, BLOCK_N, HAS_SMOOTHING, HEAD, PEEL_EDGES, ROW_STATS)
    else:
        _bwd_chunk(row, split, g, x_ptr, target_ptr, weight_ptr, w_sum_ptr, lse_ptr,
                   divisor_ptr, z_scale_ptr, dx_ptr, n_cols, n_inner, chunk, vocab_start,
                   n_classes, ignore_index, x_strides, dx_strides, label_smoothing, z_loss,
                   head, denom, BLOCK_N, HAS_SMOOTHING, HEAD, PEEL_EDGES, ROW_STATS)


@triton.jit
def _bwd_chunk(
    row, split, g, x_ptr, target_ptr, weight_ptr, w_sum_ptr, lse_ptr, divisor_ptr, z_scale_ptr,
    dx_ptr, n_cols, n_inner, chunk, vocab_start, n_classes, ignore_index, x_strides, dx_strides,
    label_smoothing, z_loss, head, denom, BLOCK_N: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HEAD: tl.constexpr, PEEL_EDGES: tl.constexpr, ROW_STATS: tl.constexpr,
):
    """The body of ``cross_entropy_bwd_kernel`` for program (row, split), grad_output ``g``."""
    lse = tl.load(lse_ptr + row)
    g = g * _grad_scale(divisor_ptr, denom, lse)
    tgt = tl.load(target_ptr + row).to(tl.int64)
    valid, in_range, w_t = _target_info(tgt, weight_ptr, n_classes, ignore_index)
    if w_sum_ptr is not None:
        W = upcast(tl.load(w_sum_ptr))
    else:
        W = n_classes.to(lse.dtype)
    true_coef, smooth_coef, z_coef = _grad_coefs(g, lse, w_t, in_range, n_classes,
                                                 label_smoothing, z_loss, z_scale_ptr,
                                                 HAS_SMOOTHING)
    x_row = x_ptr + row_offset(row, n_inner, x_strides[0], x_strides[1])
    dx_row = dx_ptr + row_offset(row, n_inner, dx_strides[0], dx_strides[1])
    # Offsets, local_t and w_off count from the first column of the row's body.
    if PEEL_EDGES:
        c0, n_body = _peel(x_row, n_cols)
        x_row = tl.multiple_of(x_row + c0, 16)
        dx_row = tl.multiple_of(dx_row + c0, 16)
    else:
        c0 = 0
        n_body = n_cols
    local_t = tgt - vocab_start - c0
    w_off = vocab_start + c0
    if PEEL_EDGES:
        if split == 0:  # split 0 also writes the edges
            e = _edge_offsets(x_row, n_body)
            _write_grad(x_row + e, dx_row + e, e, (e >= -c0) & (e < n_cols - c0), local_t,
                        valid, weight_ptr, w_off, lse, 1.0, true_coef, smooth_coef, z_coef, W,
                        head, HAS_SMOOTHING, HEAD)
    if ROW_STATS:
        q = tl.arange(0, BLOCK_N).to(tl.int64)
        mask = q < n_cols
        z, slope = head_transform_slope(_load_x(x_row + q * x_strides[2], mask, "evict_first"),
                                        head, HEAD)
        z = tl.where(mask, z, float("-inf"))
        shift = safe_max(tl.max(z, axis=0))
        inv_sum = 1.0 / tl.sum(exp(z - shift), axis=0)
        w = _load_w(weight_ptr, w_off + q, mask)
        dx = _dx(slope, z, q == local_t, w, valid, shift, inv_sum, true_coef, smooth_coef,
                 z_coef, W, head, HAS_SMOOTHING, HEAD)
        tl.store(dx_row + q * dx_strides[2], dx.to(dx_ptr.dtype.element_ty), mask=mask,
                 eviction_policy="evict_first")
    else:
        start = split.to(tl.int64) * chunk
        end = tl.minimum(start + chunk, n_body)
        for tile in range(start, end, BLOCK_N):
            q = tile + tl.arange(0, BLOCK_N).to(tl.int64)
            _write_grad(x_row + q * x_strides[2], dx_row + q * dx_strides[2], q, q < end,
                        local_t, valid, weight_ptr, w_off, lse, 1.0, true_coef, smooth_coef,
                        z_coef, W, head, HAS_SMOOTHING, HEAD)


@triton.jit
def _scale_tile(ptrs, g, mask):
    """``dx *= g`` over a masked tile."""
    dx = upcast(tl.load(ptrs, mask=mask, other=0.0))
    tl.store(ptrs, (dx * g).to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def cross_entropy_scale_grad_kernel(
    # data: the fused gradient (scaled in place) and grad_output (a 0-d tensor)
    dx_ptr, grad_ptr,
    # sizes: n_blocks tiles of BLOCK_N columns per row
    n_rows, n_cols, n_inner, n_blocks,
    # strides (elements): (outer, inner, col) of dx
    dx_strides,
    BLOCK_N: tl.constexpr, PEEL_EDGES: tl.constexpr,
):
    """Program p multiplies the tiles p, p + P, p + 2P, ... (tile = row · n_blocks + block) of
    dx by grad_output, unless it is exactly 1: then it returns without touching memory (the
    usual ``loss.backward()``). With ``PEEL_EDGES`` the blocks cover each row's body and block 0
    also scales the edges."""
    g = upcast(tl.load(grad_ptr))
    if g != 1.0:
        cols = tl.arange(0, BLOCK_N).to(tl.int64)
        for tile in range(tl.program_id(0), n_rows * n_blocks, tl.num_programs(0)):
            row = tile // n_blocks
            block = tile % n_blocks
            dx_row = dx_ptr + row_offset(row, n_inner, dx_strides[0], dx_strides[1])
            if PEEL_EDGES:
                c0, n_body = _peel(dx_row, n_cols)
                dx_row = tl.multiple_of(dx_row + c0, 16)
                if block == 0:
                    e = _edge_offsets(dx_row, n_body)
                    _scale_tile(dx_row + e, g, (e >= -c0) & (e < n_cols - c0))
            else:
                n_body = n_cols
            q = block * BLOCK_N + cols
            _scale_tile(dx_row + q * dx_strides[2], g, q < n_body)


@triton.jit
def cross_entropy_total_weight_kernel(
    # data: targets, class weights (None: a count), the output scalar, and (None unless
    # wanted) the z term's scale
    target_ptr, weight_ptr, out_ptr, z_scale_ptr,
    # sizes
    n_rows, n_classes, ignore_index,
    BLOCK: tl.constexpr,
):
    """One program: ``out = Σ_rows w_t`` over targets that are not ``ignore_index`` (a count
    without weights; an out-of-range target adds 0 with weights — its loss is NaN anyway),
    accumulated in the output's dtype (fp64 for fp64 logits, whatever the weights' dtype).
    Per-lane partial sums merged once at the end: a fixed order, deterministic. With
    ``z_scale_ptr``, also ``Σ w_t / (non-ignored rows)``: the factor that makes the z term of a
    weighted mean, divided by Σ w_t with the rest of the loss, an average over the tokens."""
    offs = tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
    count = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
    for start in range(0, n_rows, BLOCK):
        r = start + offs
        tgt = tl.load(target_ptr + r, mask=r < n_rows, other=ignore_index).to(tl.int64)
        valid, in_range, w_t = _target_info(tgt, weight_ptr, n_classes, ignore_index)
        acc += w_t.to(acc.dtype)
        if z_scale_ptr is not None:
            count += tl.where(valid, 1.0, 0.0).to(count.dtype)
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr, total)
    if z_scale_ptr is not None:
        tl.store(z_scale_ptr, total / tl.sum(count, axis=0))
