"""softmax / log_softmax forward and backward kernels.

Every tensor is addressed as rows of ``n_cols`` elements: row ``r`` starts at
``row_offset(r, n_inner, outer_stride, inner_stride)`` and its columns are ``col_stride`` apart
(see ``probact_gpu._runtime.RowView``). For the usual reduction over a contiguous last dim,
``n_inner = 1`` and ``col_stride = 1``, which Triton specialises so loads vectorise.

Maths, in fp32 (fp64 for fp64 input):

    softmax:      y = exp(x − m) / s                 m = max x,  s = Σ exp(x − m)
    log_softmax:  y = (x − m) − log(s)               (never x − lse: that cancels badly)
    backward:     dx = y ⊙ (dy − Σ dy ⊙ y)           (softmax)
                  dx = dy − exp(y) · Σ dy            (log_softmax)

Three paths (chosen in ``probact_gpu.tiling``):

- single tile (``SINGLE_TILE``): ``BLOCK_M`` rows x ``BLOCK_N >= n_cols`` per program, the row
  held in registers. HBM per row: fwd reads x, writes y (2·N·e); bwd reads y, dy, writes dx (3·N·e).
- multi tile: one program per row, or a persistent grid of P programs each taking rows P apart
  (``PERSISTENT``, ``RowConfig.n_programs``; the default for long rows, where P bounds the rows
  in flight so they fit L2: the model is in ``probact_gpu.tiling``). Sweep 1 folds tiles into
  the online (max, sum) (bwd: the dot product), sweep 2 walks the tiles *in reverse* so the
  first tiles it re-reads are the ones sweep 1 read last. HBM per row: fwd 2·N·e when sweep 2
  hits L2, up to 3·N·e when it misses; bwd 3·N·e to 5·N·e likewise. Bytes issued are the upper
  figure either way. ``NUM_STAGES`` > 1 software-pipelines both sweeps (off by default).
- split row: ``n_splits`` programs per row, two launches. ``*_split_stats``/``*_split_dot``
  write one partial per (row, split) to a small fp32 workspace; the second kernel merges the
  row's partials (in a fixed order: deterministic) and writes its own chunk. Bytes as multi-tile.
"""

import triton
import triton.language as tl

from ._online import exp, online_update, row_offset, safe_max, upcast


@triton.jit
def _softmax_out(x, shift, s, IS_LOG: tl.constexpr):
    """y from upcast x, the row's safe max and its sum of exp(x − shift)."""
    if IS_LOG:
        return (x - shift) - tl.log(s)
    else:
        return exp(x - shift) * (1.0 / s)


@triton.jit
def softmax_fwd_kernel(
    # data
    x_ptr, y_ptr,
    # shape
    n_rows, n_cols, n_inner,
    # strides (elements): x, then y
    x_outer_stride, x_inner_stride, x_col_stride,
    y_outer_stride, y_inner_stride, y_col_stride,
    # tiling and flavour
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_TILE: tl.constexpr, IS_LOG: tl.constexpr,
    PERSISTENT: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Single tile: program p computes rows [p·BLOCK_M, (p+1)·BLOCK_M). Multi tile: program p
    computes row p (``PERSISTENT``: rows p, p + P, ... of P programs) with two sweeps of
    BLOCK_N columns each, software-pipelined ``NUM_STAGES`` deep (1: not pipelined)."""
    if SINGLE_TILE:
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N).to(tl.int64)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        x_offs = row_offset(rows, n_inner, x_outer_stride, x_inner_stride)[:, None]
        x = upcast(tl.load(x_ptr + x_offs + cols[None, :] * x_col_stride, mask=mask,
                           other=float("-inf")))
        row_max = tl.max(x, axis=1)
        shift = safe_max(row_max)[:, None]
        row_sum = tl.sum(exp(x - shift), axis=1)
        y = _softmax_out(x, shift, row_sum[:, None], IS_LOG)
        y_offs = row_offset(rows, n_inner, y_outer_stride, y_inner_stride)[:, None]
        tl.store(y_ptr + y_offs + cols[None, :] * y_col_stride,
                 y.to(y_ptr.dtype.element_ty), mask=mask)
    elif PERSISTENT:
        # Rows pid, pid + P, ... (P programs). A flag, not the only path: the loop costs
        # registers on sm_90 (triton 3.6: 32 -> 40 here), so one program per row skips it.
        for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
            _softmax_row_fwd(x_ptr, y_ptr, row, n_cols, n_inner, x_outer_stride, x_inner_stride,
                             x_col_stride, y_outer_stride, y_inner_stride, y_col_stride,
                             BLOCK_N, IS_LOG, NUM_STAGES)
    else:
        _softmax_row_fwd(x_ptr, y_ptr, tl.program_id(0), n_cols, n_inner, x_outer_stride,
                         x_inner_stride, x_col_stride, y_outer_stride, y_inner_stride,
                         y_col_stride, BLOCK_N, IS_LOG, NUM_STAGES)


@triton.jit
def _softmax_row_fwd(x_ptr, y_ptr, row, n_cols, n_inner, x_outer_stride, x_inner_stride,
                     x_col_stride, y_outer_stride, y_inner_stride, y_col_stride,
                     BLOCK_N: tl.constexpr, IS_LOG: tl.constexpr, NUM_STAGES: tl.constexpr):
    """One row, multi tile: the online sweep, then the normalising sweep last tile first. Cache
    hints: sweep 1 reads with ``evict_last`` (the row is read again), sweep 2 reads and writes
    with ``evict_first`` (nothing is read again), so the y stream does not push x out of L2."""
    x_row = x_ptr + row_offset(row, n_inner, x_outer_stride, x_inner_stride)
    y_row = y_ptr + row_offset(row, n_inner, y_outer_stride, y_inner_stride)
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    # Sweep 1: online (max, sum). The first tile seeds the state (its dtype is the math's).
    x = upcast(tl.load(x_row + cols * x_col_stride, mask=cols < n_cols, other=float("-inf"),
                       eviction_policy="evict_last"))
    row_max = tl.max(x, axis=0)
    row_sum = tl.sum(exp(x - safe_max(row_max)), axis=0)
    for start in tl.range(BLOCK_N, n_cols, BLOCK_N, num_stages=NUM_STAGES):
        c = start + cols
        x = upcast(tl.load(x_row + c * x_col_stride, mask=c < n_cols, other=float("-inf"),
                           eviction_policy="evict_last"))
        row_max, row_sum = online_update(row_max, row_sum, x, 0)
    # Sweep 2, last tile first.
    shift = safe_max(row_max)
    n_tiles = tl.cdiv(n_cols, BLOCK_N)
    for i in tl.range(0, n_tiles, num_stages=NUM_STAGES):
        c = (n_tiles - 1 - i) * BLOCK_N + cols
        x = upcast(tl.load(x_row + c * x_col_stride, mask=c < n_cols,
                           eviction_policy="evict_first"))
        y = _softmax_out(x, shift, row_sum, IS_LOG)
        tl.store(y_row + c * y_col_stride, y.to(y_ptr.dtype.element_ty), mask=c < n_cols,
                 eviction_policy="evict_first")


@triton.jit
def softmax_split_stats_kernel(
    # data
    x_ptr, stats_ptr,
    # shape: columns [split·chunk, (split+1)·chunk) of a row belong to program (row, split)
    n_cols, n_inner, chunk,
    # strides (elements)
    x_outer_stride, x_inner_stride, x_col_stride,
    BLOCK_N: tl.constexpr,
):
    """Program (row, split) writes its chunk's partial (max, sum of exp) to
    ``stats[row, split, 0:2]`` (fp32; fp64 for fp64 input). Reads chunk·e bytes."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    x_row = x_ptr + row_offset(row, n_inner, x_outer_stride, x_inner_stride)
    start = split.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, n_cols)
    cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
    x = upcast(tl.load(x_row + cols * x_col_stride, mask=cols < end, other=float("-inf")))
    part_max = tl.max(x, axis=0)
    part_sum = tl.sum(exp(x - safe_max(part_max)), axis=0)
    for tile in range(start + BLOCK_N, end, BLOCK_N):
        c = tile + tl.arange(0, BLOCK_N).to(tl.int64)
        x = upcast(tl.load(x_row + c * x_col_stride, mask=c < end, other=float("-inf")))
        part_max, part_sum = online_update(part_max, part_sum, x, 0)
    out = stats_ptr + (row.to(tl.int64) * n_splits + split) * 2
    tl.store(out, part_max)
    tl.store(out + 1, part_sum)


@triton.jit
def _merge_row_stats(stats_ptr, row, n_splits, BLOCK_S: tl.constexpr):
    """(max, sum) of a row from its n_splits partials, merged in a fixed order."""
    splits = tl.arange(0, BLOCK_S)
    base = stats_ptr + (row.to(tl.int64) * n_splits + splits) * 2
    part_max = tl.load(base, mask=splits < n_splits, other=float("-inf"))
    part_sum = tl.load(base + 1, mask=splits < n_splits, other=0.0)
    row_max = tl.max(part_max, axis=0)
    shift = safe_max(row_max)
    row_sum = tl.sum(part_sum * exp(part_max - shift), axis=0)
    return row_max, row_sum


@triton.jit
def softmax_split_fwd_kernel(
    # data
    x_ptr, y_ptr, stats_ptr,
    # shape
    n_cols, n_inner, chunk, n_splits,
    # strides (elements): x, then y
    x_outer_stride, x_inner_stride, x_col_stride,
    y_outer_stride, y_inner_stride, y_col_stride,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, IS_LOG: tl.constexpr,
):
    """Program (row, split): merge the row's partial stats, then write y over its chunk
    (reads chunk·e, writes chunk·e)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    row_max, row_sum = _merge_row_stats(stats_ptr, row, n_splits, BLOCK_S)
    shift = safe_max(row_max)
    x_row = x_ptr + row_offset(row, n_inner, x_outer_stride, x_inner_stride)
    y_row = y_ptr + row_offset(row, n_inner, y_outer_stride, y_inner_stride)
    start = split.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, n_cols)
    for tile in range(start, end, BLOCK_N):
        c = tile + tl.arange(0, BLOCK_N).to(tl.int64)
        x = upcast(tl.load(x_row + c * x_col_stride, mask=c < end))
        y = _softmax_out(x, shift, row_sum, IS_LOG)
        tl.store(y_row + c * y_col_stride, y.to(y_ptr.dtype.element_ty), mask=c < end)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_term(y, dy, IS_LOG: tl.constexpr):
    """The per-element term of the row reduction: dy·y (softmax) or dy (log_softmax)."""
    if IS_LOG:
        return dy
    else:
        return dy * y


@triton.jit
def _row_dot(terms, axis: tl.constexpr):
    """Σ terms along ``axis``, added in fp64 and rounded once to the math dtype. ``dot`` is the
    one number every dx of the row depends on (the largest dx is ``dy − dot`` where p ≈ 1), so
    an fp32 tree sum's few ulps (3 ulps of Σ dy over 257 columns measured) would be every
    element's error; in fp64 the sum of a row of fp32 terms is exact to well below an fp32 ulp.
    The widening is per element inside the reduction: the fp32 tiles stay as they are."""
    return tl.sum(terms.to(tl.float64), axis=axis).to(terms.dtype)


@triton.jit
def _bwd_out(y, dy, dot, IS_LOG: tl.constexpr):
    if IS_LOG:
        return dy - exp(y) * dot
    else:
        return y * (dy - dot)


@triton.jit
def softmax_bwd_kernel(
    # data: y (the forward's output) and dx share one layout; dy has its own
    y_ptr, dy_ptr, dx_ptr,
    # shape
    n_rows, n_cols, n_inner,
    # strides (elements): y and dx, then dy
    y_outer_stride, y_inner_stride, y_col_stride,
    dy_outer_stride, dy_inner_stride, dy_col_stride,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_TILE: tl.constexpr, IS_LOG: tl.constexpr,
    PERSISTENT: tl.constexpr, RELOAD: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Program mapping as the forward. dot = Σ dy⊙y (softmax) or Σ dy (log_softmax), accumulated
    per lane and reduced once after the loop. ``RELOAD`` (single tile only): read y and dy again
    after the reduction instead of keeping both upcast tiles live across it -- the re-read comes
    from L1/L2 (this program read the same bytes a moment before; HBM traffic unchanged) and the
    registers drop enough for two CTAs per SM at 16384 columns (``tiling.softmax_bwd_reloads``)."""
    if SINGLE_TILE:
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N).to(tl.int64)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        y_offs = row_offset(rows, n_inner, y_outer_stride, y_inner_stride)[:, None] \
            + cols[None, :] * y_col_stride
        dy_offs = row_offset(rows, n_inner, dy_outer_stride, dy_inner_stride)[:, None] \
            + cols[None, :] * dy_col_stride
        y = upcast(tl.load(y_ptr + y_offs, mask=mask, other=0.0))
        dy = upcast(tl.load(dy_ptr + dy_offs, mask=mask, other=0.0))
        dot = _row_dot(_bwd_term(y, dy, IS_LOG), 1)[:, None]
        if RELOAD:  # a different eviction hint: a new load, not merged with the first
            y = upcast(tl.load(y_ptr + y_offs, mask=mask, other=0.0,
                               eviction_policy="evict_first"))
            dy = upcast(tl.load(dy_ptr + dy_offs, mask=mask, other=0.0,
                                eviction_policy="evict_first"))
        dx = _bwd_out(y, dy, dot, IS_LOG)
        tl.store(dx_ptr + y_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    elif PERSISTENT:
        for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
            _softmax_row_bwd(y_ptr, dy_ptr, dx_ptr, row, n_cols, n_inner, y_outer_stride,
                             y_inner_stride, y_col_stride, dy_outer_stride, dy_inner_stride,
                             dy_col_stride, BLOCK_N, IS_LOG, NUM_STAGES)
    else:
        _softmax_row_bwd(y_ptr, dy_ptr, dx_ptr, tl.program_id(0), n_cols, n_inner,
                         y_outer_stride, y_inner_stride, y_col_stride, dy_outer_stride,
                         dy_inner_stride, dy_col_stride, BLOCK_N, IS_LOG, NUM_STAGES)


@triton.jit
def _softmax_row_bwd(y_ptr, dy_ptr, dx_ptr, row, n_cols, n_inner, y_outer_stride,
                     y_inner_stride, y_col_stride, dy_outer_stride, dy_inner_stride,
                     dy_col_stride, BLOCK_N: tl.constexpr, IS_LOG: tl.constexpr,
                     NUM_STAGES: tl.constexpr):
    """One row, multi tile: the dot product sweep, then the gradient sweep last tile first, with
    the forward's cache hints (sweep 1 ``evict_last``, sweep 2 ``evict_first``)."""
    y_base = row_offset(row, n_inner, y_outer_stride, y_inner_stride)
    dy_row = dy_ptr + row_offset(row, n_inner, dy_outer_stride, dy_inner_stride)
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    mask = cols < n_cols
    y = upcast(tl.load(y_ptr + y_base + cols * y_col_stride, mask=mask, other=0.0,
                       eviction_policy="evict_last"))
    dy = upcast(tl.load(dy_row + cols * dy_col_stride, mask=mask, other=0.0,
                        eviction_policy="evict_last"))
    acc = _bwd_term(y, dy, IS_LOG)
    for start in tl.range(BLOCK_N, n_cols, BLOCK_N, num_stages=NUM_STAGES):
        c = start + cols
        y = upcast(tl.load(y_ptr + y_base + c * y_col_stride, mask=c < n_cols, other=0.0,
                           eviction_policy="evict_last"))
        dy = upcast(tl.load(dy_row + c * dy_col_stride, mask=c < n_cols, other=0.0,
                            eviction_policy="evict_last"))
        acc += _bwd_term(y, dy, IS_LOG)
    dot = _row_dot(acc, 0)
    n_tiles = tl.cdiv(n_cols, BLOCK_N)
    for i in tl.range(0, n_tiles, num_stages=NUM_STAGES):
        c = (n_tiles - 1 - i) * BLOCK_N + cols
        y = upcast(tl.load(y_ptr + y_base + c * y_col_stride, mask=c < n_cols, other=0.0,
                           eviction_policy="evict_first"))
        dy = upcast(tl.load(dy_row + c * dy_col_stride, mask=c < n_cols, other=0.0,
                            eviction_policy="evict_first"))
        dx = _bwd_out(y, dy, dot, IS_LOG)
        tl.store(dx_ptr + y_base + c * y_col_stride, dx.to(dx_ptr.dtype.element_ty),
                 mask=c < n_cols, eviction_policy="evict_first")


@triton.jit
def softmax_split_dot_kernel(
    # data
    y_ptr, dy_ptr, partial_ptr,
    # shape
    n_cols, n_inner, chunk,
    # strides (elements): y, then dy
    y_outer_stride, y_inner_stride, y_col_stride,
    dy_outer_stride, dy_inner_stride, dy_col_stride,
    BLOCK_N: tl.constexpr, IS_LOG: tl.constexpr,
):
    """Program (row, split) writes its chunk's Σ dy⊙y (or Σ dy) to ``partial[row, split]``."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    y_row = y_ptr + row_offset(row, n_inner, y_outer_stride, y_inner_stride)
    dy_row = dy_ptr + row_offset(row, n_inner, dy_outer_stride, dy_inner_stride)
    start = split.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, n_cols)
    cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
    y = upcast(tl.load(y_row + cols * y_col_stride, mask=cols < end, other=0.0))
    dy = upcast(tl.load(dy_row + cols * dy_col_stride, mask=cols < end, other=0.0))
    acc = _bwd_term(y, dy, IS_LOG)
    for tile in range(start + BLOCK_N, end, BLOCK_N):
        c = tile + tl.arange(0, BLOCK_N).to(tl.int64)
        y = upcast(tl.load(y_row + c * y_col_stride, mask=c < end, other=0.0))
        dy = upcast(tl.load(dy_row + c * dy_col_stride, mask=c < end, other=0.0))
        acc += _bwd_term(y, dy, IS_LOG)
    tl.store(partial_ptr + row.to(tl.int64) * tl.num_programs(1) + split, _row_dot(acc, 0))


@triton.jit
def softmax_split_bwd_kernel(
    # data: y and dx share one layout
    y_ptr, dy_ptr, dx_ptr, partial_ptr,
    # shape
    n_cols, n_inner, chunk, n_splits,
    # strides (elements): y and dx, then dy
    y_outer_stride, y_inner_stride, y_col_stride,
    dy_outer_stride, dy_inner_stride, dy_col_stride,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, IS_LOG: tl.constexpr,
):
    """Program (row, split): sum the row's partial dots (fixed order), write dx over its chunk."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dot = _row_dot(tl.load(partial_ptr + row.to(tl.int64) * n_splits + splits,
                           mask=splits < n_splits, other=0.0), axis=0)
    y_base = row_offset(row, n_inner, y_outer_stride, y_inner_stride)
    dy_row = dy_ptr + row_offset(row, n_inner, dy_outer_stride, dy_inner_stride)
    start = split.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, n_cols)
    for tile in range(start, end, BLOCK_N):
        c = tile + tl.arange(0, BLOCK_N).to(tl.int64)
        y = upcast(tl.load(y_ptr + y_base + c * y_col_stride, mask=c < end, other=0.0))
        dy = upcast(tl.load(dy_row + c * dy_col_stride, mask=c < end, other=0.0))
        dx = _bwd_out(y, dy, dot, IS_LOG)
        tl.store(dx_ptr + y_base + c * y_col_stride, dx.to(dx_ptr.dtype.element_ty), mask=c < end)

