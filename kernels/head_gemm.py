"""The fused LM head: the logits ``x = h @ W.T (+ b)`` computed tile by tile with ``tl.dot``
in fp32 (fp64 for fp64 inputs) and consumed on chip — never rounded, never stored — for the
batch-invariant log-probs, entropy, lse, argmax and cross-entropy (host side:
``probact_gpu.ops.fused_head``; the contract in docs/rl.md).

A program owns one (``BLOCK_M`` tokens × ``TILE`` = 128 classes) tile of logits, formed over the
hidden size in ``BLOCK_K`` steps in one fixed order: no split-K, and tiles fixed by the dtype
(``tiling.head_gemm_config``), so a token's logits are the same bits whatever the number of
tokens, the token's place among them, or the chunking.

Tokens are visited through ``order`` (slot → token row) and only the first ``n_active`` slots
(a device scalar) are computed: the host puts the tokens that need their row first (a stable
sort of ``target == ignore_index``, no host sync), so ignored tokens cost no GEMM work — their
programs see an inactive tile and do nothing.

Kernels, with ``e`` the input's element size and ``H`` the hidden size:

- ``head_gemm_fwd_kernel`` (grid: token tiles × vocabulary tiles, grouped for L2 reuse): the
  tile's logits (``2·BLOCK_M·128·H`` FLOPs), the head transform, then the tile state of
  ``kernels/_invariant.py`` for each token (12 B; 1 B of argmax) and ``z_t`` where the token's
  target falls in the tile. Reads ``BLOCK_M·H·e + 128·H·e`` a program (h and W tiles, L2-shared
  between neighbours), writes no logits.
- ``head_gemm_bwd_dz_kernel``: the same tile recomputed (bit for bit the forward's), then
  ``dz = A·p − B·[c = t] − D·p·(z − shift − μ)`` with per-token coefficients (token
  log-probs: ``A = B = −g_logp, D = g_H``; cross-entropy: ``A = g·(w_t + 2λ·lse), B =
  g·w_t``), through the transform's chain rule, written in the input's dtype (fp32/fp64 kept
  for those inputs) into a (tokens × vocabulary chunk) block.
- ``head_gemm_bwd_dh_kernel``: ``dh = Σ dz[:, k] @ W[k]`` for its (tokens × hidden block), the
  classes walked in order in ``BLOCK_K`` steps and the fp32 sum carried between vocabulary
  chunks in an fp32 buffer — the same order of additions whatever the chunk.
- ``head_gemm_bwd_dw_kernel``: ``dW[tile] = Σ_token-tiles dz[:, tile].T @ h`` for its (128
  classes × hidden block), over every active token in slot order, rounded once; ``db`` from
  the same loads.

GEMMs: 1 forward (the logits), 3 backward (recompute, dh, dW), each ``2·N·H·V`` FLOPs
(``SPLIT_BF16X3``: three ``tl.dot`` each). Against the atomic design (one backward kernel that
adds ``dz @ W`` into dh and ``dz.T @ h`` into an fp32 dW with atomics), the fixed order costs
the dz block's write and two reads (``3·N·V·e`` bytes) and dh's fp32 round trip between
vocabulary chunks, and saves an fp32 (V, H) accumulator and its atomic traffic; docs/rl.md
counts both at 8192 × 4096 × 151936.
"""

import triton
import triton.language as tl

from ._head import head_chain, head_factors, head_transform, head_transform_slope
from ._invariant import TILE, store_tile_state, target_in_tile, tile_state
from ._online import exp_precise, upcast

# How fp32 operands are multiplied (the kernels' SPLIT constexpr): IEEE fp32 fmas, or each
# operand split into bf16 pieces and the products of the pieces summed on the tensor cores:
# two pieces (16 of fp32's 24 bits) and three products (hi·hi + hi·lo + lo·hi), or three
# pieces (all 24 bits) and the six products down to 2^−16 of the largest.
SPLIT_NONE: tl.constexpr = tl.constexpr(0)
SPLIT_BF16X3: tl.constexpr = tl.constexpr(1)
SPLIT_BF16X6: tl.constexpr = tl.constexpr(2)


@triton.jit
def _split_bf16(a):
    """``(hi, lo)``: ``a`` (fp32) rounded to bf16, and the remainder (exact in fp32) rounded to
    bf16."""
    hi = a.to(tl.bfloat16)
    lo = (a - hi.to(tl.float32)).to(tl.bfloat16)
    return hi, lo


@triton.jit
def mma(a, b, acc, SPLIT: tl.constexpr):
    """``acc + a @ b``: tensor cores for 16-bit operands, IEEE fmas for fp32 and fp64, or, for
    fp32 operands, the bf16 pieces' products (``SPLIT_BF16X3``: ``lo·hi + hi·lo + hi·hi``;
    ``SPLIT_BF16X6``: with ``a = hi + mid + lo`` exactly, ``lo·hi + hi·lo + mid·mid + mid·hi +
    hi·mid + hi·hi``), the small products first. Never tf32."""
    if SPLIT == SPLIT_BF16X3:
        a_hi, a_lo = _split_bf16(a)
        b_hi, b_lo = _split_bf16(b)
        acc = tl.dot(a_lo, b_hi, acc)
        acc = tl.dot(a_hi, b_lo, acc)
        acc = tl.dot(a_hi, b_hi, acc)
    elif SPLIT == SPLIT_BF16X6:
        a_hi = a.to(tl.bfloat16)
        b_hi = b.to(tl.bfloat16)
        a_mid, a_lo = _split_bf16(a - a_hi.to(tl.float32))
        b_mid, b_lo = _split_bf16(b - b_hi.to(tl.float32))
        acc = tl.dot(a_lo, b_hi, acc)
        acc = tl.dot(a_hi, b_lo, acc)
        acc = tl.dot(a_mid, b_mid, acc)
        acc = tl.dot(a_mid, b_hi, acc)
        acc = tl.dot(a_hi, b_mid, acc)
        acc = tl.dot(a_hi, b_hi, acc)
    elif a.dtype == tl.float32 or a.dtype == tl.float64:
        # out_dtype spelled out: triton 3.6 takes fp32 by default and refuses an fp64 acc
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _logits_tile(h_ptr, w_ptr, bias_ptr, rows, row_ok, cls, cls_ok, n_hidden,
                 h_row_stride, h_col_stride, w_row_stride, w_col_stride,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SPLIT: tl.constexpr):
    """``x = h[rows] @ W[cls].T (+ b[cls])``, (BLOCK_M, TILE) in the math dtype, the hidden
    size walked in ``BLOCK_K`` steps from 0 (masked lanes load 0 and add exactly 0)."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows.to(tl.int64)[:, None] * h_row_stride
    b_ptrs = w_ptr + cls.to(tl.int64)[None, :] * w_row_stride
    if h_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros((BLOCK_M, TILE), tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, TILE), tl.float32)
    for k0 in range(0, n_hidden, BLOCK_K):
        k = k0 + ks
        k_ok = k < n_hidden
        a = tl.load(a_ptrs + k[None, :] * h_col_stride, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(b_ptrs + k[:, None] * w_col_stride, mask=k_ok[:, None] & cls_ok[None, :],
                    other=0.0)
        acc = mma(a, b, acc, SPLIT)
    if HAS_BIAS:
        acc += upcast(tl.load(bias_ptr + cls, mask=cls_ok, other=0.0))[None, :]
    return acc


@triton.jit
def _grouped(pid, n_m, n_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a 1-D grid in groups of ``GROUP_M`` token tiles, so the programs in
    flight share W tiles in L2 (the order changes no result)."""
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def head_gemm_fwd_kernel(
    # data: hidden states (tokens, H), weight (V_local, H), bias (V_local,) (unread without
    # HAS_BIAS), targets (tokens,) global ids, slot → token order (tokens,) int64 and the active
    # count (1,) int64; out: tile states (n_slots, n_tiles, N_STATS), tile argmax (n_slots,
    # n_tiles) int8, target logits (n_slots,)
    h_ptr, w_ptr, bias_ptr, target_ptr, order_ptr, count_ptr, stats_ptr, arg_ptr, zt_ptr,
    # shape: slots [slot_start, slot_start + n_slots); local class c is global vocab_start + c
    slot_start, n_slots, n_hidden, n_cols, vocab_start,
    # strides (elements)
    h_row_stride, h_col_stride, w_row_stride, w_col_stride,
    # the head transform's factors (fp64 arguments: ``_head.head_factors``)
    head_scale: tl.float64, head_u_scale: tl.float64, head_cap_scale: tl.float64,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, HEAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, N_STATS: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr, COMPUTE_ARGMAX: tl.constexpr,
):
    """One (tokens × 128 classes) tile: logits by ``tl.dot``, then each token's tile state and,
    for the token whose target is here, ``z_t`` (module docstring)."""
    n_tiles = tl.cdiv(n_cols, TILE)
    pid_m, tile = _grouped(tl.program_id(0), tl.cdiv(n_slots, BLOCK_M), n_tiles, GROUP_M)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_active = tl.load(count_ptr)
    ok = (slots < n_slots) & (slot_start + slots < n_active)
    if slot_start + pid_m * BLOCK_M < n_active:
        head = head_factors(head_scale, head_u_scale, head_cap_scale, h_ptr)
        rows = tl.load(order_ptr + slot_start + slots, mask=ok, other=0)
        cols = tl.arange(0, TILE)
        cls = tile * TILE + cols
        cls_ok = cls < n_cols
        x = _logits_tile(h_ptr, w_ptr, bias_ptr, rows, ok, cls, cls_ok, n_hidden,
                         h_row_stride, h_col_stride, w_row_stride, w_col_stride,
                         BLOCK_M, BLOCK_K, HAS_BIAS, SPLIT)
        z = tl.where(cls_ok[None, :], head_transform(x, head, HEAD), float("-inf"))
        m, s, tau, arg = tile_state(z, cols, COMPUTE_ENTROPY, COMPUTE_ARGMAX)
        store_tile_state(stats_ptr, arg_ptr, slots, ok, tile, n_tiles, m, s, tau, arg,
                         N_STATS, COMPUTE_ENTROPY, COMPUTE_ARGMAX)
        tgt = tl.load(target_ptr + rows, mask=ok, other=-1).to(tl.int64)
        local_t = tgt - vocab_start - tile.to(tl.int64) * TILE
        here, z_t = target_in_tile(z, cols, local_t)
        tl.store(zt_ptr + slots, z_t, mask=ok & here & (local_t + tile * TILE < n_cols))


@triton.jit
def head_gemm_bwd_dz_kernel(
    # data: as the forward (no targets' logits out), the per-token statistics (tokens, 3) =
    # (shift, log s, μ) and coefficients (tokens, 3) = (A, B, D); out: dz (slots, chunk) in
    # the input's dtype
    h_ptr, w_ptr, bias_ptr, target_ptr, order_ptr, count_ptr, stats_ptr, coef_ptr, dz_ptr,
    # shape: the chunk is local classes [chunk_start, chunk_start + chunk_cols)
    n_slots, n_hidden, n_cols, vocab_start, chunk_start, chunk_cols,
    # strides (elements)
    h_row_stride, h_col_stride, w_row_stride, w_col_stride, dz_row_stride,
    # the head transform's factors (fp64 arguments: ``_head.head_factors``)
    head_scale: tl.float64, head_u_scale: tl.float64, head_cap_scale: tl.float64,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, HEAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, HAS_ENTROPY_TERM: tl.constexpr,
):
    """One tile of dz over the chunk: the forward's logits recomputed, dz from the saved
    statistics and the token's coefficients, the transform's chain rule (module docstring)."""
    n_tiles = tl.cdiv(chunk_cols, TILE)
    pid_m, tile = _grouped(tl.program_id(0), tl.cdiv(n_slots, BLOCK_M), n_tiles, GROUP_M)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_active = tl.load(count_ptr)
    ok = (slots < n_slots) & (slots < n_active)
    if pid_m * BLOCK_M < n_active:
        head = head_factors(head_scale, head_u_scale, head_cap_scale, h_ptr)
        rows = tl.load(order_ptr + slots, mask=ok, other=0)
        cols = tl.arange(0, TILE)
        local = tile * TILE + cols  # within the chunk
        cls = chunk_start + local
        cls_ok = (local < chunk_cols) & (cls < n_cols)
        x = _logits_tile(h_ptr, w_ptr, bias_ptr, rows, ok, cls, cls_ok, n_hidden,
                         h_row_stride, h_col_stride, w_row_stride, w_col_stride,
                         BLOCK_M, BLOCK_K, HAS_BIAS, SPLIT)
        z, slope = head_transform_slope(x, head, HEAD)
        z = tl.where(cls_ok[None, :], z, float("-inf"))
        row64 = rows.to(tl.int64)
        shift = tl.load(stats_ptr + row64 * 3, mask=ok, other=0.0)
        log_sum = tl.load(stats_ptr + row64 * 3 + 1, mask=ok, other=0.0)
        coef_a = tl.load(coef_ptr + row64 * 3, mask=ok, other=0.0)
        coef_b = tl.load(coef_ptr + row64 * 3 + 1, mask=ok, other=0.0)
        rel = z - shift[:, None]
        p = exp_precise(rel - log_sum[:, None])
        dz = coef_a[:, None] * p
        tgt = tl.load(target_ptr + rows, mask=ok, other=-1).to(tl.int64)
        hit = (vocab_start + cls)[None, :].to(tl.int64) == tgt[:, None]
        dz -= tl.where(hit, coef_b[:, None], 0.0)
        if HAS_ENTROPY_TERM:
            coef_d = tl.load(coef_ptr + row64 * 3 + 2, mask=ok, other=0.0)
            mu = tl.load(stats_ptr + row64 * 3 + 2, mask=ok, other=0.0)
            term = tl.where(z == float("-inf"), 0.0, p * (rel - mu[:, None]))
            dz -= coef_d[:, None] * term
        dx = head_chain(dz, slope, head, HEAD)
        out = dz_ptr + slots.to(tl.int64)[:, None] * dz_row_stride + local[None, :]
        tl.store(out, dx.to(dz_ptr.dtype.element_ty), mask=ok[:, None] & cls_ok[None, :])


@triton.jit
def head_gemm_bwd_dh_kernel(
    # data: dz (slots, chunk), weight (V_local, H), slot → token order and the active count,
    # the fp32 (fp64) carry between chunks (slots, H), dh (tokens, H) in the input's dtype
    dz_ptr, w_ptr, order_ptr, count_ptr, carry_ptr, dh_ptr,
    # shape: the chunk is local classes [chunk_start, chunk_start + chunk_cols)
    n_slots, n_hidden, n_cols, chunk_start, chunk_cols,
    # strides (elements)
    dz_row_stride, w_row_stride, w_col_stride, dh_row_stride,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, SPLIT: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr,
):
    """``dh[tokens, hidden block] (+)= Σ dz[:, k] @ W[k, block]`` over the chunk's classes in
    ``BLOCK_K`` steps, in order, after the carry of the chunks before (``FIRST``: none; a chunk
    is a whole number of 128-class tiles, which ``BLOCK_K`` divides, so the steps are the same
    for any chunking); ``LAST`` writes dh in the input's dtype (0 for inactive tokens), else
    the carry."""
    slots = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    hcols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hcols < n_hidden
    n_active = tl.load(count_ptr)
    ok = (slots < n_slots) & (slots < n_active)
    carry = carry_ptr + slots.to(tl.int64)[:, None] * n_hidden + hcols[None, :]
    if FIRST:
        if dz_ptr.dtype.element_ty == tl.float64:
            acc = tl.zeros((BLOCK_M, BLOCK_H), tl.float64)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_H), tl.float32)
    else:
        acc = tl.load(carry, mask=ok[:, None] & h_ok[None, :], other=0.0)
    if tl.program_id(0) * BLOCK_M < n_active:
        cols = tl.arange(0, BLOCK_K)
        a_ptrs = dz_ptr + slots.to(tl.int64)[:, None] * dz_row_stride
        b_ptrs = w_ptr + hcols[None, :] * w_col_stride
        for t0 in range(0, chunk_cols, BLOCK_K):
            local = t0 + cols
            c_ok = (local < chunk_cols) & (chunk_start + local < n_cols)
            a = tl.load(a_ptrs + local[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(b_ptrs + (chunk_start + local).to(tl.int64)[:, None] * w_row_stride,
                        mask=c_ok[:, None] & h_ok[None, :], other=0.0)
            acc = mma(a, b, acc, SPLIT)
    if LAST:
        rows = tl.load(order_ptr + slots, mask=slots < n_slots, other=0).to(tl.int64)
        out = dh_ptr + rows[:, None] * dh_row_stride + hcols[None, :]
        tl.store(out, acc.to(dh_ptr.dtype.element_ty),
                 mask=(slots < n_slots)[:, None] & h_ok[None, :])
    else:
        tl.store(carry, acc, mask=ok[:, None] & h_ok[None, :])


@triton.jit
def head_gemm_bwd_dw_kernel(
    # data: dz (slots, chunk), hidden states (tokens, H), slot → token order and the active
    # count; out: dW (V_local, H) in the weight's dtype, db (V_local,) (unwritten without
    # HAS_BIAS_GRAD)
    dz_ptr, h_ptr, order_ptr, count_ptr, dw_ptr, db_ptr,
    # shape: the chunk is local classes [chunk_start, chunk_start + chunk_cols)
    n_slots, n_hidden, n_cols, chunk_start, chunk_cols,
    # strides (elements)
    dz_row_stride, h_row_stride, h_col_stride, dw_row_stride,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, SPLIT: tl.constexpr,
    HAS_WEIGHT_GRAD: tl.constexpr, HAS_BIAS_GRAD: tl.constexpr,
):
    """``dW[tile, hidden block] = Σ dz[:, tile].T @ h[:, block]`` over the active tokens in slot
    order, ``BLOCK_M`` at a time, rounded once (``HAS_WEIGHT_GRAD``); with ``HAS_BIAS_GRAD`` the
    hidden block 0 program also writes ``db[tile] = Σ dz[:, tile]`` (fp32 sums in the same
    order)."""
    tile = tl.program_id(0)
    local = tile * TILE + tl.arange(0, TILE)
    c_ok = (local < chunk_cols) & (chunk_start + local < n_cols)
    hcols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hcols < n_hidden
    n_active = tl.minimum(tl.load(count_ptr), n_slots)
    if dz_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros((TILE, BLOCK_H), tl.float64)
        db = tl.zeros((TILE,), tl.float64)
    else:
        acc = tl.zeros((TILE, BLOCK_H), tl.float32)
        db = tl.zeros((TILE,), tl.float32)
    for s0 in range(0, n_active, BLOCK_M):
        slots = s0 + tl.arange(0, BLOCK_M)
        ok = slots < n_active
        a = tl.load(dz_ptr + slots.to(tl.int64)[None, :] * dz_row_stride + local[:, None],
                    mask=c_ok[:, None] & ok[None, :], other=0.0)
        if HAS_WEIGHT_GRAD:
            rows = tl.load(order_ptr + slots, mask=ok, other=0).to(tl.int64)
            b = tl.load(h_ptr + rows[:, None] * h_row_stride + hcols[None, :] * h_col_stride,
                        mask=ok[:, None] & h_ok[None, :], other=0.0)
            acc = mma(a, b, acc, SPLIT)
        if HAS_BIAS_GRAD:
            db += tl.sum(upcast(a), axis=1)
    cls = (chunk_start + local).to(tl.int64)
    if HAS_WEIGHT_GRAD:
        tl.store(dw_ptr + cls[:, None] * dw_row_stride + hcols[None, :],
                 acc.to(dw_ptr.dtype.element_ty), mask=c_ok[:, None] & h_ok[None, :])
    if HAS_BIAS_GRAD:
        if tl.program_id(1) == 0:
            tl.store(db_ptr + cls, db.to(db_ptr.dtype.element_ty), mask=c_ok)
