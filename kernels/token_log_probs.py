"""Token log-probs kernels: per row of an LM head's logits, the log-probability of the chosen
token, the entropy of the distribution, lse and argmax, in one read of the logits; and the
gradient through log-prob and entropy together, in one more read and one write.

Notation for one row of logits ``x`` (``V`` classes), target ``t``, the head transform of
``kernels/_head.py`` (``z = head_transform(x)``: scale → divide → softcap → 1/temperature)::

    m    = max z                         (the row max; ``shift`` = m, or 0 where m = −inf)
    s    = Σ exp(z − shift)              lse  = shift + log s
    τ    = Σ exp(z − shift) · (z − shift)       μ_rel = τ / s = Σ p · (z − shift)
    logp = (z_t − shift) − log s
    H    = lse − Σ p·z = log s − μ_rel   (the stable form: never p · log p, no 0 · −inf)

Everything is formed around the row max, so |z| ~ 1e4 loses nothing to cancellation (``lse −
Σ p·z`` in fp32 would lose ulp(1e4) ≈ 1e-3). The online forms (multi tile, split partials): a
new tile moves the max from ``m`` to ``m'``; with ``α = exp(m − m')`` and ``d = m − m'``::

    s' = α · s + Σ_tile exp(z − m')
    τ' = α · (τ + d · s) + Σ_tile exp(z − m') · (z − m')

each guarded where a prefix, a tile or a lane is all −inf: ``d`` is taken as 0 where ``m = −inf``
(then ``s = τ = 0``), a lane whose ``z = −inf`` adds 0 to τ (``exp = 0``, and ``0 · −inf`` would
be NaN), and ``m' = ±inf`` shifts by 0 (``lse_shift``). An all −inf row ends with ``s = 0``:
lse = −inf, logp and H NaN (torch's log_softmax of such a row is NaN too); a row with a +inf
logit ends with ``s = +inf``: lse = +inf as torch.logsumexp (NaN if the row also holds a NaN),
logp, H and the gradient NaN as log_softmax's.

Every exponential here is ``exp_precise`` (``kernels/_online.py``): the entropy of a row one
logit dominates is made of ``p ~ e^−80``, where ``exp2(x · log2 e)`` alone is 5e-6 off.

Gradient, with per-row upstream ``g_logp`` and ``g_H`` (either may be absent)::

    p_c  = exp((z_c − shift) − log s)
    dz_c = g_logp · ([c = t] − p_c) − g_H · p_c · ((z_c − shift) − μ_rel)
    dx_c = head_chain(dz_c, sech²(u_c))   (the transform's chain rule; sech² with z_c)

``∂H/∂z_c = −p_c (z_c − Σ p·z)``; the entropy term is 0 where ``z_c = −inf`` (p_c = 0). The
backward therefore needs per row ``(shift, log s, μ_rel)`` — the forward's saved statistics,
12 bytes (fp32) a row — rather than lse alone: ``z − lse`` with lse rounded to fp32 at |z| ~ 1e4
would put an error of ulp(1e4)/2 in every p.

Rows whose target is ``ignore_index``: logp = 0, H = 0, gradient 0 (lse and argmax are still
reported). A target outside ``[0, n_classes)`` that is not ignored gives logp NaN and a NaN
gradient row (never an out-of-bounds read). Argmax is the first index of the max of ``z`` (as
``torch.argmax``; a negative ``logit_scale`` flips it), or of its first NaN (torch.argmax takes
NaN as the max; ``tl.max`` skips it, so NaN columns are tracked apart, ``_nan_arg``).

Kernels (host side: ``probact_gpu.ops.token_log_probs``):

- ``token_log_probs_fwd_kernel``: single tile, ``BLOCK_M`` rows × ``BLOCK_N ≥ V`` in registers.
- ``token_log_probs_fwd_loop_kernel``: one program per row sweeping it in ``BLOCK_N`` tiles with
  the online (m, s, τ) and argmax.
  Both read the row once (``V·e`` bytes, e the element size) plus the target's logit (one
  element, a cache hit), and write logp and lse (4 + 4 B), H (4 B) and argmax (8 B) when asked,
  and the saved statistics (12 B) when a backward will run (``SAVE_STATS``). Forward-only
  (no grad): ``V·e + 8 + 8`` bytes a row — the floor.
- ``token_log_probs_partial_kernel``: program (row, split) writes its chunk's partial
  ``(m, s, τ, z_t or 0)`` and the chunk's argmax (global index): the split path for few long
  rows, and one rank's shard of a vocab-parallel head (``vocab_start``). Merged on the host.
- ``token_log_probs_bwd_kernel``: program (row, split) writes dx over its chunk from the saved
  statistics: reads ``chunk·e``, writes ``chunk·e``; each element is read before it is written,
  so dx may be the logits' own buffer (the fused linear op recomputes logits into a buffer and
  overwrites it with their gradient).
"""

import triton
import triton.language as tl

from ._head import head_chain, head_factors, head_transform, head_transform_slope
from ._online import exp_precise, lse_shift, row_offset, upcast

_NO_INDEX: tl.constexpr = tl.constexpr(2**62)  # larger than any column: the argmin's identity


@triton.jit
def _nan_arg(z, cols, axis: tl.constexpr):
    """The first NaN's column among ``cols``, encoded as ``col − 2^62`` (negative, so it wins
    every argmin against a plain column, and an earlier NaN against a later one); ``_NO_INDEX``
    where there is none. torch.argmax takes a NaN as the max; ``tl.max`` skips NaN."""
    return tl.min(tl.where(z != z, cols - _NO_INDEX, _NO_INDEX), axis=axis)


@triton.jit
def _decode_arg(arg):
    """A column from an argmax that may hold a NaN's encoded column (``_nan_arg``)."""
    return tl.where(arg < 0, arg + _NO_INDEX, arg)


@triton.jit
def _load_z(ptrs, mask, head, HEAD: tl.constexpr):
    """z of a tile of logits (fp32; fp64 for fp64 input), −inf in masked-out lanes."""
    x = upcast(tl.load(ptrs, mask=mask, other=0.0))
    z = head_transform(x, head, HEAD)
    return tl.where(mask, z, float("-inf"))


@triton.jit
def _excess(z, shift):
    """``z − shift``, 0 where ``z = −inf`` (its weight exp(z − shift) is 0; 0 · −inf is NaN)."""
    return tl.where(z == float("-inf"), 0.0, z - shift)


@triton.jit
def _target_info(tgt, n_classes, ignore_index):
    """(valid, in_range) of target(s) ``tgt`` (int64, global ids)."""
    valid = tgt != ignore_index
    in_range = (tgt >= 0) & (tgt < n_classes)
    return valid, in_range


@triton.jit
def _target_logit(row_ptr, local_t, n_cols, col_stride, live, head, HEAD: tl.constexpr):
    """z at local column ``local_t`` where it lies in ``[0, n_cols)`` and ``live``, else 0."""
    here = live & (local_t >= 0) & (local_t < n_cols)
    safe = tl.where(here, local_t, 0)
    x = upcast(tl.load(row_ptr + safe * col_stride, mask=here, other=0.0))
    z = head_transform(x, head, HEAD)
    return tl.where(here, z, 0.0)


@triton.jit
def _fold(z, cols, row_max, row_sum, tau, arg, COMPUTE_ENTROPY: tl.constexpr,
          COMPUTE_ARGMAX: tl.constexpr):
    """Fold tile ``z`` (1-D, columns ``cols``) into the row's online (max, s, τ, argmax)."""
    tile_max = tl.max(z, axis=0)
    new_max = tl.maximum(row_max, tile_max)
    shift = lse_shift(new_max)
    alpha = exp_precise(row_max - shift)
    e = exp_precise(z - shift)
    if COMPUTE_ENTROPY:
        d = tl.where(row_max == float("-inf"), 0.0, row_max - shift)
        tau = alpha * (tau + d * row_sum) + tl.sum(e * _excess(z, shift), axis=0)
    row_sum = row_sum * alpha + tl.sum(e, axis=0)
    if COMPUTE_ARGMAX:  # a NaN found (arg < 0) is kept: only an earlier NaN is smaller
        tile_arg = tl.min(tl.where(z == tile_max, cols, _NO_INDEX), axis=0)
        arg = tl.where((tile_max > row_max) & (arg >= 0), tile_arg, arg)
        arg = tl.minimum(arg, _nan_arg(z, cols, 0))
    return new_max, row_sum, tau, arg


@triton.jit
def _sweep(x_row, n_cols, col_stride, head, BLOCK_N: tl.constexpr, HEAD: tl.constexpr,
           COMPUTE_ENTROPY: tl.constexpr, COMPUTE_ARGMAX: tl.constexpr):
    """(max, s, τ, argmax) of local columns ``[0, n_cols)`` of one row (n_cols ≥ 1), the first
    tile seeding every accumulator (its dtype is the math's)."""
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    mask = cols < n_cols
    z = _load_z(x_row + cols * col_stride, mask, head, HEAD)
    row_max = tl.max(z, axis=0)
    shift = lse_shift(row_max)
    e = exp_precise(z - shift)
    row_sum = tl.sum(e, axis=0)
    if COMPUTE_ENTROPY:
        tau = tl.sum(e * _excess(z, shift), axis=0)
    else:
        tau = row_sum * 0.0
    if COMPUTE_ARGMAX:
        arg = tl.min(tl.where(mask & (z == row_max), cols, _NO_INDEX), axis=0)
        arg = tl.minimum(arg, _nan_arg(z, cols, 0))
    else:
        arg = tl.min(cols, axis=0)
    for start in range(BLOCK_N, n_cols, BLOCK_N):
        q = start + cols
        z = _load_z(x_row + q * col_stride, q < n_cols, head, HEAD)
        row_max, row_sum, tau, arg = _fold(z, q, row_max, row_sum, tau, arg, COMPUTE_ENTROPY,
                                           COMPUTE_ARGMAX)
    return row_max, row_sum, tau, arg


@triton.jit
def _finish(rows, row_mask, shift, row_sum, tau, z_t, valid, in_range, arg, logp_ptr,
            entropy_ptr, lse_ptr, argmax_ptr, stats_ptr, COMPUTE_ENTROPY: tl.constexpr,
            COMPUTE_ARGMAX: tl.constexpr, SAVE_STATS: tl.constexpr):
    """Store the outputs of row(s) ``rows`` from their (shift, s, τ) and target logit (argmax
    possibly NaN-encoded, ``_nan_arg``). A row with a +inf logit (``s = +inf`` around shift 0,
    ``lse_shift``) has lse +inf and logp, entropy and (its saved log s) gradient NaN, as torch's
    logsumexp and log_softmax give."""
    log_sum = tl.log(row_sum)
    blown = row_sum == float("inf")
    logp = tl.where(blown, float("nan"), (z_t - shift) - log_sum)
    logp = tl.where(valid, tl.where(in_range, logp, float("nan")), 0.0)
    tl.store(logp_ptr + rows, logp, mask=row_mask)
    tl.store(lse_ptr + rows, shift + log_sum, mask=row_mask)
    mu_rel = tau / row_sum
    if COMPUTE_ENTROPY:
        entropy = tl.where(blown, float("nan"), log_sum - mu_rel)
        tl.store(entropy_ptr + rows, tl.where(valid, entropy, 0.0), mask=row_mask)
    if COMPUTE_ARGMAX:
        tl.store(argmax_ptr + rows, _decode_arg(arg), mask=row_mask)
    if SAVE_STATS:
        out = stats_ptr + rows.to(tl.int64) * 3
        tl.store(out, shift, mask=row_mask)
        tl.store(out + 1, tl.where(blown, float("nan"), log_sum), mask=row_mask)
        tl.store(out + 2, mu_rel, mask=row_mask)


@triton.jit
def token_log_probs_fwd_kernel(
    # data: logits, targets (int32/int64), per-row outputs (fp32; fp64 for fp64 logits):
    # logp, entropy, lse, argmax (int64), saved statistics (n_rows, 3)
    x_ptr, target_ptr, logp_ptr, entropy_ptr, lse_ptr, argmax_ptr, stats_ptr,
    # shape
    n_rows, n_cols, n_inner, ignore_index,
    # strides (elements) of the logits
    x_outer_stride, x_inner_stride, x_col_stride,
    # the head transform's factors (fp64 arguments: ``_head.head_factors``)
    head_scale: tl.float64, head_u_scale: tl.float64, head_cap_scale: tl.float64,
    # tiling and flavour
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr, COMPUTE_ARGMAX: tl.constexpr, SAVE_STATS: tl.constexpr,
):
    """Single tile: program p owns rows [p·BLOCK_M, (p+1)·BLOCK_M), each held whole in registers
    (``BLOCK_N ≥ n_cols``); every output from the one read."""
    head = head_factors(head_scale, head_u_scale, head_cap_scale, x_ptr)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    row_offs = row_offset(rows, n_inner, x_outer_stride, x_inner_stride)
    z = _load_z(x_ptr + row_offs[:, None] + cols[None, :] * x_col_stride, mask, head,
                HEAD)
    row_max = tl.max(z, axis=1)
    shift = lse_shift(row_max)
    e = exp_precise(z - shift[:, None])
    row_sum = tl.sum(e, axis=1)
    if COMPUTE_ENTROPY:
        tau = tl.sum(e * _excess(z, shift[:, None]), axis=1)
    else:
        tau = row_sum * 0.0
    if COMPUTE_ARGMAX:
        arg = tl.min(tl.where(mask & (z == row_max[:, None]), cols[None, :], _NO_INDEX), axis=1)
        arg = tl.minimum(arg, _nan_arg(z, cols[None, :], 1))
    else:
        arg = 0
    tgt = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    valid, in_range = _target_info(tgt, n_cols, ignore_index)
    z_t = _target_logit(x_ptr + row_offs, tgt, n_cols, x_col_stride, row_mask & valid, head,
                        HEAD)
    _finish(rows, row_mask, shift, row_sum, tau, z_t, valid, in_range, arg, logp_ptr,
            entropy_ptr, lse_ptr, argmax_ptr, stats_ptr, COMPUTE_ENTROPY, COMPUTE_ARGMAX,
            SAVE_STATS)


@triton.jit
def token_log_probs_fwd_loop_kernel(
    # data: as token_log_probs_fwd_kernel
    x_ptr, target_ptr, logp_ptr, entropy_ptr, lse_ptr, argmax_ptr, stats_ptr,
    # shape
    n_cols, n_inner, ignore_index,
    # strides (elements) of the logits
    x_outer_stride, x_inner_stride, x_col_stride,
    # the head transform's factors (fp64 arguments: ``_head.head_factors``)
    head_scale: tl.float64, head_u_scale: tl.float64, head_cap_scale: tl.float64,
    BLOCK_N: tl.constexpr, HEAD: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr,
    COMPUTE_ARGMAX: tl.constexpr, SAVE_STATS: tl.constexpr,
):
    """Multi tile: program p owns row p and sweeps it once in ``BLOCK_N`` tiles, keeping the
    online (max, s, τ, argmax) (module docstring); every output from that one read."""
    head = head_factors(head_scale, head_u_scale, head_cap_scale, x_ptr)
    row = tl.program_id(0)
    x_row = x_ptr + row_offset(row, n_inner, x_outer_stride, x_inner_stride)
    row_max, row_sum, tau, arg = _sweep(x_row, n_cols, x_col_stride, head, BLOCK_N,
                                        HEAD, COMPUTE_ENTROPY, COMPUTE_ARGMAX)
    tgt = tl.load(target_ptr + row).to(tl.int64)
    valid, in_range = _target_info(tgt, n_cols, ignore_index)
    z_t = _target_logit(x_row, tgt, n_cols, x_col_stride, valid, head, HEAD)
    _finish(row, row >= 0, lse_shift(row_max), row_sum, tau, z_t, valid, in_range, arg, logp_ptr,
            entropy_ptr, lse_ptr, argmax_ptr, stats_ptr, COMPUTE_ENTROPY, COMPUTE_ARGMAX,
            SAVE_STATS)


@triton.jit
def token_log_probs_partial_kernel(
    # data: logits (n_rows × n_cols local classes), targets (global ids), partial statistics
    # (n_rows, n_splits, 4) and argmax (n_rows, n_splits) int64
    x_ptr, target_ptr, stats_ptr, argmax_ptr,
    # shape: program (row, split) owns local columns [split·chunk, (split+1)·chunk); local
    # column c is global class vocab_start + c
    n_cols, n_inner, chunk, vocab_start,
    # strides (elements) of the logits
    x_outer_stride, x_inner_stride, x_col_stride,
    # the head transform's factors (fp64 arguments: ``_head.head_factors``)
    head_scale: tl.float64, head_u_scale: tl.float64, head_cap_scale: tl.float64,
    BLOCK_N: tl.constexpr, HEAD: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr,
    COMPUTE_ARGMAX: tl.constexpr,
):
    """Writes ``stats[row, split] = (max z, s, τ, z_t if t is in this chunk else 0)`` over the
    chunk (τ = 0 without ``COMPUTE_ENTROPY``) and ``argmax[row, split]`` = the global index of
    the chunk's first max (2^62 for an empty chunk; a NaN's, encoded negative by ``_nan_arg``,
    for a chunk holding one). Reads chunk·e bytes."""
    head = head_factors(head_scale, head_u_scale, head_cap_scale, x_ptr)
    row = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    start = split.to(tl.int64) * chunk
    n_local = tl.minimum(start + chunk, n_cols) - start
    x_row = x_ptr + row_offset(row, n_inner, x_outer_stride, x_inner_stride)
    out = stats_ptr + (row.to(tl.int64) * n_splits + split) * 4
    arg_out = argmax_ptr + row.to(tl.int64) * n_splits + split
    if n_local <= 0:  # a chunk past the row's end (the last splits of a short row)
        tl.store(out, float("-inf"))
        tl.store(out + 1, 0.0)
        tl.store(out + 2, 0.0)
        tl.store(out + 3, 0.0)
        if COMPUTE_ARGMAX:
            tl.store(arg_out, _NO_INDEX)
    else:
        chunk_row = x_row + start * x_col_stride
        row_max, row_sum, tau, arg = _sweep(chunk_row, n_local, x_col_stride, head, BLOCK_N,
                                            HEAD, COMPUTE_ENTROPY, COMPUTE_ARGMAX)
        local_t = tl.load(target_ptr + row).to(tl.int64) - vocab_start - start
        z_t = _target_logit(chunk_row, local_t, n_local, x_col_stride, True, head, HEAD)
        tl.store(out, row_max)
        tl.store(out + 1, row_sum)
        tl.store(out + 2, tau)
        tl.store(out + 3, z_t)
        if COMPUTE_ARGMAX:
            tl.store(arg_out, arg + start + vocab_start)


@triton.jit
def token_log_probs_bwd_kernel(
    # data: logits, targets (global ids), saved statistics (n_rows, 3) = (shift, log s, μ_rel),
    # upstream gradients of logp and of the entropy (n_rows,), dlogits (may alias the logits)
    x_ptr, target_ptr, stats_ptr, grad_logp_ptr, grad_entropy_ptr, dx_ptr,
    # shape: program (row, split) owns local columns [split·chunk, (split+1)·chunk) = global
    # classes vocab_start + c of n_classes
    n_cols, n_inner, chunk, vocab_start, n_classes, ignore_index,
    # strides (elements): logits, then dlogits
    x_outer_stride, x_inner_stride, x_col_stride,
    dx_outer_stride, dx_inner_stride, dx_col_stride,
    # the head transform's factors (fp64 arguments: ``_head.head_factors``)
    head_scale: tl.float64, head_u_scale: tl.float64, head_cap_scale: tl.float64,
    BLOCK_N: tl.constexpr, HEAD: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
):
    """dx over one chunk of one row (module docstring's dz, then the transform's chain rule),
    0 on ignored rows. Reads chunk·e, writes chunk·e, plus 12 B of statistics and up to 8 B of
    upstream gradient a row."""
    head = head_factors(head_scale, head_u_scale, head_cap_scale, x_ptr)
    row = tl.program_id(0)
    split = tl.program_id(1)
    stats = stats_ptr + row.to(tl.int64) * 3
    shift = tl.load(stats)
    log_sum = tl.load(stats + 1)
    tgt = tl.load(target_ptr + row).to(tl.int64)
    valid, in_range = _target_info(tgt, n_classes, ignore_index)
    if HAS_GRAD_LOGP:
        g_logp = upcast(tl.load(grad_logp_ptr + row))
        g_logp = tl.where(in_range, g_logp, float("nan"))
    if HAS_GRAD_ENTROPY:
        g_entropy = upcast(tl.load(grad_entropy_ptr + row))
        mu_rel = tl.load(stats + 2)
    local_t = tgt - vocab_start
    x_row = x_ptr + row_offset(row, n_inner, x_outer_stride, x_inner_stride)
    dx_row = dx_ptr + row_offset(row, n_inner, dx_outer_stride, dx_inner_stride)
    start = split.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, n_cols)
    for tile in range(start, end, BLOCK_N):
        q = tile + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = q < end
        x = upcast(tl.load(x_row + q * x_col_stride, mask=mask, other=0.0))
        z, slope = head_transform_slope(x, head, HEAD)
        z = tl.where(mask, z, float("-inf"))
        rel = z - shift
        p = exp_precise(rel - log_sum)
        dz = tl.zeros_like(p)
        if HAS_GRAD_LOGP:
            dz += g_logp * (tl.where(q == local_t, 1.0, 0.0) - p)
        if HAS_GRAD_ENTROPY:
            dz -= g_entropy * tl.where(z == float("-inf"), 0.0, p * (rel - mu_rel))
        dx = tl.where(valid, head_chain(dz, slope, head, HEAD), 0.0)
        tl.store(dx_row + q * dx_col_stride, dx.to(dx_ptr.dtype.element_ty), mask=mask)
