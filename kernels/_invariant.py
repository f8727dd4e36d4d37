"""The batch-invariant vocabulary reduction: per row, the softmax statistics of fixed tiles of
``TILE`` = 128 classes, then an exact sum over the tiles — so a row's lse, log-probs, entropy
and argmax are the same bits whatever the batch, the chunking, the launch or the split of the
vocabulary over ranks (docs/rl.md has the contract and the argument).

**Tiles.** Tile ``b`` holds global classes ``[128·b, 128·(b + 1))``. Its state, over the tile's
transformed logits ``z`` (−inf in lanes past the vocabulary)::

    m_b = max z                  s_b = Σ exp(z − m_b)          τ_b = Σ exp(z − m_b)·(z − m_b)
    arg_b = first column of the max (local, 0..127)

is computed by one fixed sequence of operations on one row of one tile (``tile_state``); which
kernel holds the tile, beside which other rows, never enters. ``s_b ≥ 1`` (its max lane adds
exp(0) = 1; sums of non-negative terms never fall below a term).

**Exact merge.** With ``M = max_b m_b`` (exact in any order; across ranks an all_reduce(MAX)),
each tile's share rescaled to M is rounded once, elementwise::

    v_b = s_b · exp(m_b − M)              w_b = exp(m_b − M) · (τ_b + (m_b − M) · s_b)

and turned into an integer of ``FIXED_BITS`` = 44 fractional bits (truncated toward zero). The
row's sums ``S = Σ_b v_b`` and ``T = Σ_b w_b`` are then integer additions: exact, so the same in
any order, any grouping and across ranks (an all_reduce(SUM) of int64). Bounds: ``0 ≤ v_b ≤
128`` and ``|w_b| ≤ 2·128/e`` (``x·e^{−x} ≤ 1/e``), and a row has at most 2^11 tiles (2^18
classes), so ``|Σ| < 2^62``. The truncation costs at most 2^−44 a tile: below 2^−33 of S (S ≥ 1,
the max tile has ``v = s_b ≥ 1``), far below fp32's 2^−24. fp64 rows carry a second limb of 44
more bits (``EXTRA_LIMB``: the truncated remainder, scaled again), 2^−77 of S.

Non-finite shares (a NaN or +inf logit) are not converted: ``probe`` sums ``v · 0`` in floating
point — 0, or NaN when any share is NaN or ±inf — and the host adds it to S and T.

The argmax is exact too: the smallest ``128·b + arg_b`` among the tiles with ``m_b = M``.
"""

import triton
import triton.language as tl

from ._head import head_chain, head_factors, head_transform, head_transform_slope
from ._online import exp_precise, row_offset, safe_max, upcast

TILE: tl.constexpr = tl.constexpr(128)  # tiling.INVARIANT_TILE
FIXED_ONE: tl.constexpr = tl.constexpr(2.0**44)  # 2^FIXED_BITS: one unit of a share
NO_INDEX: tl.constexpr = tl.constexpr(2**62)  # larger than any class: the argmin's identity


@triton.jit
def excess(z, shift):
    """``z − shift``, 0 where ``z = −inf`` (its weight exp(z − shift) is 0; 0 · −inf is NaN)."""
    return tl.where(z == float("-inf"), 0.0, z - shift)


@triton.jit
def tile_state(z, cols, COMPUTE_ENTROPY: tl.constexpr, COMPUTE_ARGMAX: tl.constexpr):
    """``(m, s, τ, arg)`` of each row of the (rows, TILE) tile ``z`` (−inf in lanes past the
    vocabulary; ``cols`` the local column of each lane, 0..TILE−1): the module docstring's tile
    state. τ is 0 without ``COMPUTE_ENTROPY``, arg 0 without ``COMPUTE_ARGMAX``."""
    m = tl.max(z, axis=1)
    shift = safe_max(m)
    e = exp_precise(z - shift[:, None])
    s = tl.sum(e, axis=1)
    if COMPUTE_ENTROPY:
        tau = tl.sum(e * excess(z, shift[:, None]), axis=1)
    else:
        tau = s * 0.0
    if COMPUTE_ARGMAX:
        arg = tl.min(tl.where(z == m[:, None], cols[None, :], TILE), axis=1)
        arg = tl.minimum(arg, TILE - 1)  # a NaN row matches no lane: keep the index in range
    else:
        arg = tl.zeros_like(m).to(tl.int32)
    return m, s, tau, arg


@triton.jit
def target_in_tile(z, cols, local_t):
    """``(here, z_t)``: per row, whether its target's local column ``local_t`` (relative to the
    tile's first class) falls in the tile, and z there (0 elsewhere; an exact pick)."""
    here = (local_t >= 0) & (local_t < TILE)
    z_t = tl.sum(tl.where(cols[None, :] == local_t[:, None], z, 0.0), axis=1)
    return here, z_t


@triton.jit
def store_tile_state(stats_ptr, arg_ptr, slots, slot_ok, tile, n_tiles, m, s, tau, arg,
                     N_STATS: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr,
                     COMPUTE_ARGMAX: tl.constexpr):
    """Write the rows' states of local tile ``tile`` into ``stats`` (slots, n_tiles, N_STATS)
    fp32/fp64 and ``arg`` (slots, n_tiles) int8."""
    at = slots.to(tl.int64) * n_tiles + tile
    out = stats_ptr + at * N_STATS
    tl.store(out, m, mask=slot_ok)
    tl.store(out + 1, s, mask=slot_ok)
    if COMPUTE_ENTROPY:
        tl.store(out + 2, tau, mask=slot_ok)
    if COMPUTE_ARGMAX:
        tl.store(arg_ptr + at, arg.to(tl.int8), mask=slot_ok)


@triton.jit
def invariant_tile_stats_kernel(
    # data: logits, targets (global ids), tile states (rows, n_tiles, N_STATS) fp32 (fp64 for
    # fp64 logits), tile argmax (rows, n_tiles) int8, target logits (rows,)
    x_ptr, target_ptr, stats_ptr, arg_ptr, zt_ptr,
    # shape: local column c is global class vocab_start + c (vocab_start a multiple of TILE)
    n_rows, n_cols, n_inner, vocab_start,
    # strides (elements) of the logits
    x_outer_stride, x_inner_stride, x_col_stride,
    # the head transform's factors (fp64 arguments: ``_head.head_factors``)
    head_scale: tl.float64, head_u_scale: tl.float64, head_cap_scale: tl.float64,
    ROWS: tl.constexpr, HEAD: tl.constexpr, N_STATS: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr, COMPUTE_ARGMAX: tl.constexpr,
):
    """Program (p, b) writes the tile states of rows ``[p·ROWS, (p+1)·ROWS)`` over local tile
    ``b`` (columns ``[128·b, 128·(b+1))``), and ``z_t`` for the rows whose target lies in it.
    Reads the tile once (ROWS·128·e bytes), writes 8–12 B (+1 B argmax) a row."""
    head = head_factors(head_scale, head_u_scale, head_cap_scale, x_ptr)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    tile = tl.program_id(1)
    row_ok = rows < n_rows
    cols = tl.arange(0, TILE)
    q = tile.to(tl.int64) * TILE + cols
    col_ok = q < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    offs = row_offset(rows, n_inner, x_outer_stride, x_inner_stride)
    x = upcast(tl.load(x_ptr + offs[:, None] + q[None, :] * x_col_stride, mask=mask, other=0.0))
    z = tl.where(mask, head_transform(x, head, HEAD), float("-inf"))
    m, s, tau, arg = tile_state(z, cols, COMPUTE_ENTROPY, COMPUTE_ARGMAX)
    store_tile_state(stats_ptr, arg_ptr, rows, row_ok, tile, tl.num_programs(1), m, s, tau, arg,
                     N_STATS, COMPUTE_ENTROPY, COMPUTE_ARGMAX)
    tgt = tl.load(target_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    local_t = tgt - vocab_start - tile.to(tl.int64) * TILE
    here, z_t = target_in_tile(z, cols, local_t)
    tl.store(zt_ptr + rows, z_t, mask=row_ok & here & (local_t + tile * TILE < n_cols))


@triton.jit
def invariant_merge_kernel(
    # data: tile states (rows, n_tiles, N_STATS) and tile argmax (rows, n_tiles) int8, the
    # rows' max M (rows,) (over every tile of every rank); out: the fixed-point sums (rows,
    # N_SUMS) int64 — S, T, then with EXTRA_LIMB their low limbs — the non-finite probe (rows,)
    # and the argmax candidates (rows,) int64 (NO_INDEX when no tile here holds the max)
    stats_ptr, arg_ptr, row_max_ptr, sums_ptr, probe_ptr, best_ptr,
    # shape: this launch's tiles are global tiles [tile_start, tile_start + n_tiles)
    n_rows, n_tiles, tile_start,
    ROWS: tl.constexpr, BLOCK_T: tl.constexpr, N_STATS: tl.constexpr, N_SUMS: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr, COMPUTE_ARGMAX: tl.constexpr, EXTRA_LIMB: tl.constexpr,
):
    """Program p merges rows ``[p·ROWS, (p+1)·ROWS)``: the module docstring's exact merge of
    each row's tiles against its max M, ``BLOCK_T`` tiles a step (integer sums: any grouping
    gives the same bits). Reads 8–13 B a tile, writes 8–32 B a row."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    big_m = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
    shift = safe_max(big_m)[:, None]
    zero = tl.zeros((ROWS, BLOCK_T), tl.int64)
    acc_s = zero
    acc_t = zero
    lo_s = zero
    lo_t = zero
    probe = tl.zeros((ROWS, BLOCK_T), big_m.dtype)
    best = zero + NO_INDEX
    states = stats_ptr + (rows * n_tiles * N_STATS)[:, None]
    for t0 in range(0, n_tiles, BLOCK_T):
        b = t0 + tl.arange(0, BLOCK_T)
        ok = row_ok[:, None] & (b < n_tiles)[None, :]
        at = states + (b * N_STATS)[None, :]
        m_b = tl.load(at, mask=ok, other=float("-inf"))
        s_b = tl.load(at + 1, mask=ok, other=0.0)
        alpha = exp_precise(m_b - shift)
        v = s_b * alpha
        acc_s, lo_s, probe = _fixed_add(acc_s, lo_s, probe, v, EXTRA_LIMB)
        if COMPUTE_ENTROPY:
            tau_b = tl.load(at + 2, mask=ok, other=0.0)
            d = tl.where(m_b == float("-inf"), 0.0, m_b - shift)
            w = alpha * (tau_b + d * s_b)
            acc_t, lo_t, probe = _fixed_add(acc_t, lo_t, probe, w, EXTRA_LIMB)
        if COMPUTE_ARGMAX:
            arg_b = tl.load(arg_ptr + (rows * n_tiles)[:, None] + b[None, :], mask=ok,
                            other=0).to(tl.int64)
            cand = (tile_start + b).to(tl.int64)[None, :] * TILE + arg_b
            best = tl.minimum(best, tl.where(ok & (m_b == big_m[:, None]), cand, NO_INDEX))
    out = sums_ptr + rows * N_SUMS
    tl.store(out, tl.sum(acc_s, axis=1), mask=row_ok)
    tl.store(out + 1, tl.sum(acc_t, axis=1), mask=row_ok)
    if EXTRA_LIMB:
        tl.store(out + 2, tl.sum(lo_s, axis=1), mask=row_ok)
        tl.store(out + 3, tl.sum(lo_t, axis=1), mask=row_ok)
    tl.store(probe_ptr + rows, tl.sum(probe, axis=1), mask=row_ok)
    if COMPUTE_ARGMAX:
        tl.store(best_ptr + rows, tl.min(best, axis=1), mask=row_ok)


@triton.jit
def _fixed_add(acc, lo, probe, v, EXTRA_LIMB: tl.constexpr):
    """Add the shares ``v`` to the fixed-point ``acc`` (and, with ``EXTRA_LIMB``, the remainder
    below 2^−44 to ``lo`` in units of 2^−88); a non-finite share goes to ``probe`` instead."""
    finite = tl.abs(v) < float("inf")
    scaled = tl.where(finite, v, 0.0) * FIXED_ONE  # exact: a power of two
    whole = scaled.to(tl.int64)  # truncated toward zero; |scaled| < 2^52
    acc += whole
    if EXTRA_LIMB:
        rest = scaled - whole.to(scaled.dtype)  # exact: the fraction of a number below 2^52
        lo += (rest * FIXED_ONE).to(tl.int64)
    probe += v * 0.0
    return acc, lo, probe


@triton.jit
def target_logits_kernel(
    # data: logits, targets (rows, K) global ids (row stride target_row_stride), out: z at each
    # target (rows, K) in the math dtype (0 where the target is not in [0, n_cols))
    x_ptr, target_ptr, z_ptr,
    # shape
    n_rows, n_cols, n_inner, n_targets, target_row_stride,
    # strides (elements) of the logits
    x_outer_stride, x_inner_stride, x_col_stride,
    # the head transform's factors (fp64 arguments: ``_head.head_factors``)
    head_scale: tl.float64, head_u_scale: tl.float64, head_cap_scale: tl.float64,
    BLOCK: tl.constexpr, HEAD: tl.constexpr,
):
    """The transformed logit at each of the rows' K targets (the ``(…, K)`` index of
    ``token_log_probs``): one element read each, elementwise (no reduction)."""
    head = head_factors(head_scale, head_u_scale, head_cap_scale, x_ptr)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n_rows * n_targets
    row = i // n_targets
    k = i % n_targets
    tgt = tl.load(target_ptr + row * target_row_stride + k, mask=ok, other=0).to(tl.int64)
    here = ok & (tgt >= 0) & (tgt < n_cols)
    offs = row_offset(row, n_inner, x_outer_stride, x_inner_stride)
    x = upcast(tl.load(x_ptr + offs + tl.where(here, tgt, 0) * x_col_stride, mask=here,
                       other=0.0))
    z = tl.where(here, head_transform(x, head, HEAD), 0.0)
    tl.store(z_ptr + i, z, mask=ok)


@triton.jit
def invariant_bwd_kernel(
    # data: logits, targets (rows, K) global ids, statistics (rows, 3) = (shift, log s, μ),
    # coefficients (rows, 3) = (A, ·, D) and B (rows, K), dlogits
    x_ptr, target_ptr, stats_ptr, coef_ptr, coef_b_ptr, dx_ptr,
    # shape: local column c is global class vocab_start + c
    n_rows, n_cols, n_inner, vocab_start, n_targets, target_row_stride, coef_b_row_stride,
    # strides (elements): logits, then dlogits
    x_outer_stride, x_inner_stride, x_col_stride,
    dx_outer_stride, dx_inner_stride, dx_col_stride,
    # the head transform's factors (fp64 arguments: ``_head.head_factors``)
    head_scale: tl.float64, head_u_scale: tl.float64, head_cap_scale: tl.float64,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr,
    HAS_ENTROPY_TERM: tl.constexpr,
):
    """Program (p, block) writes ``dx = chain(A·p − Σ_k B_k·[c = t_k] − D·p·(z − shift −
    μ))`` over one block of columns of rows ``[p·ROWS, (p+1)·ROWS)``, ``p = exp((z −
    shift) − log s)`` (the fused head's dz, kernels/head_gemm.py, on given logits). Elementwise
    from the rows' statistics: each element's bits are its own, whatever the launch. Reads and
    writes ROWS·BLOCK_N·e a program."""
    head = head_factors(head_scale, head_u_scale, head_cap_scale, x_ptr)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    q = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = row_ok[:, None] & (q < n_cols)[None, :]
    x_rows = row_offset(rows, n_inner, x_outer_stride, x_inner_stride)
    x = upcast(tl.load(x_ptr + x_rows[:, None] + q[None, :] * x_col_stride, mask=mask,
                       other=0.0))
    z, slope = head_transform_slope(x, head, HEAD)
    z = tl.where(mask, z, float("-inf"))
    stats = stats_ptr + rows * 3
    shift = tl.load(stats, mask=row_ok, other=0.0)[:, None]
    log_sum = tl.load(stats + 1, mask=row_ok, other=0.0)[:, None]
    rel = z - shift
    p = exp_precise(rel - log_sum)
    coef = coef_ptr + rows * 3
    dz = tl.load(coef, mask=row_ok, other=0.0)[:, None] * p
    for k in range(0, n_targets):
        tgt = tl.load(target_ptr + rows * target_row_stride + k, mask=row_ok,
                      other=-1).to(tl.int64)
        b_k = tl.load(coef_b_ptr + rows * coef_b_row_stride + k, mask=row_ok, other=0.0)
        dz -= tl.where(vocab_start + q[None, :] == tgt[:, None], b_k[:, None], 0.0)
    if HAS_ENTROPY_TERM:
        mu = tl.load(stats + 2, mask=row_ok, other=0.0)[:, None]
        d = tl.load(coef + 2, mask=row_ok, other=0.0)[:, None]
        dz -= d * tl.where(z == float("-inf"), 0.0, p * (rel - mu))
    dx = head_chain(dz, slope, head, HEAD)
    dx_rows = row_offset(rows, n_inner, dx_outer_stride, dx_inner_stride)
    tl.store(dx_ptr + dx_rows[:, None] + q[None, :] * dx_col_stride,
             dx.to(dx_ptr.dtype.element_ty), mask=mask)
