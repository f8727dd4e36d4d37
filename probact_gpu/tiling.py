"""Every launch heuristic of probact_gpu, in one place. Pure functions of sizes, dtype width and
SM count: no device queries, no tensors.

Row-reduction ops (softmax, log_softmax, cross-entropy) run one of three paths:

- ``single``: the whole row is one tile held on-chip (``BLOCK_N >= n_cols``), optionally several
  rows per program (``BLOCK_M``). One read, one write per element.
- ``multi``: one program per row sweeps it in ``BLOCK_N`` tiles keeping an online (max, sum of
  exp), then sweeps it again (in reverse, so the tiles read last are still in L2) to write. For
  softmax the programs may be a persistent grid that loops over rows, bounding the rows in
  flight so the second sweep is an L2 hit (``choose_row_config``'s ``reread_tensors``, below).
- ``split``: few long rows. ``n_splits`` programs per row each reduce a chunk to a partial
  (max, sum); a second launch merges the partials of its row and writes its chunk. This is what
  lets 8 rows x 262144 columns spread over every SM.

The thresholds below are reasoned, not yet swept on hardware (no GPU was available when they
were written; see perf/NOTES.md): a single tile of up to 32 KiB of input per row keeps at most
128 KiB of fp32 values per program (half an SM's register file at 16 warps), and the split path
starts when the rows alone give fewer than two programs per SM.
"""

from __future__ import annotations

from dataclasses import dataclass

PATHS = ("single", "multi", "split")

# Largest row (in bytes of input) kept on-chip as one tile.
SINGLE_TILE_MAX_BYTES = 32 * 1024
# Elements per tile of the multi-tile / split loops.
LOOP_TILE_BYTES = 16 * 1024
# Rows per program in the single-tile path stop growing once a program holds this many elements.
SINGLE_TILE_TARGET_ELEMS = 4096
# Programs per SM under which rows alone do not fill the GPU.
MIN_PROGRAMS_PER_SM = 2
# Programs per SM the split path aims for, and the fewest elements a split chunk should hold
# (below that, the second launch and the partials cost more than the parallelism gains).
SPLIT_PROGRAMS_PER_SM = 4
SPLIT_MIN_CHUNK = 4096


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class RowConfig:
    """How a row reduction is launched. ``block_m`` is used by ``single`` only, ``n_splits`` by
    ``split`` only (1 elsewhere). ``n_programs`` (``multi`` only): 0 launches one program per
    row; k > 0 launches min(k, rows) programs that each loop over rows k apart — a persistent
    grid bounding the rows in flight (and so the L2 footprint of the second sweep). Softmax's
    default uses it where the L2 model says it pays (``persistent_programs``); cross-entropy's
    fused-gradient forward runs it through its own persistent kernel where its model says so
    (``choose_cross_entropy_config``). ``num_stages`` (``multi``
    only): software-pipelining depth of the two sweeps (``tl.range(..., num_stages=)``); 1 is
    none, the default (see ``PIPELINE_STAGES``)."""

    path: str
    block_n: int
    num_warps: int
    block_m: int = 1
    n_splits: int = 1
    n_programs: int = 0
    num_stages: int = 1

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        for name in ("block_n", "block_m"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 1, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps must be a power of two in [1, 32], got {self.num_warps}")
        if self.n_splits < 1:
            raise ValueError(f"n_splits must be >= 1, got {self.n_splits}")
        if self.path != "split" and self.n_splits != 1:
            raise ValueError(f"n_splits={self.n_splits} only applies to the split path")
        if self.path != "single" and self.block_m != 1:
            raise ValueError(f"block_m={self.block_m} only applies to the single path")
        if self.n_programs < 0 or (self.n_programs and self.path != "multi"):
            raise ValueError(f"n_programs={self.n_programs} must be >= 0 and applies to the "
                             "multi path only")
        if self.num_stages < 1 or (self.num_stages > 1 and self.path != "multi"):
            raise ValueError(f"num_stages={self.num_stages} must be >= 1 and only the multi "
                             "path pipelines (> 1)")

    def validate_for(self, n_cols: int) -> None:
        """A single tile must cover the row; raise otherwise (a user-supplied config)."""
        if self.path == "single" and self.block_n < n_cols:
            raise ValueError(
                f"config.block_n={self.block_n} is smaller than the row ({n_cols} columns): "
                "the single path holds the whole row in one tile"
            )


def warps_for(elems_per_program: int) -> int:
    """Warps per program: about 16 to 32 elements per thread, 4 to 16 warps."""
    if elems_per_program <= 1024:
        return 4
    if elems_per_program <= 4096:
        return 8
    return 16


def single_tile_max_cols(elem_size: int) -> int:
    """The longest row the single-tile path holds on-chip, for an input of this element size."""
    return SINGLE_TILE_MAX_BYTES // elem_size


def loop_block(elem_size: int) -> int:
    """Tile width of the multi-tile and split loops: 16 KiB of input per tile."""
    return LOOP_TILE_BYTES // elem_size


# --------------------------------------------------------------------------- long rows: L2 model
#
# The multi path reads each row twice; the second (reverse) sweep is an L2 hit only while every
# row in flight still sits in L2 from its first sweep. Rows in flight = programs resident per SM
# x SMs, each holding ``reread_tensors x n_cols x e`` bytes to be read again (softmax forward:
# x; backward: y and dy). The y / dx the second sweep writes streams through L2 as well (with
# evict_first), so the rows may use only ``L2_REREAD_FRACTION`` of it. H200: 132 SMs, 50 MB L2.
#
#   one program per row: up to 64 / num_warps resident a SM (4 at 16 warps; 3-4 by registers,
#   scripts/sm90_report.py), i.e. 528 rows in flight:
#       fwd 65536 bf16: 528 x 128 KiB = 69 MB > 25 MB     bwd: 2 x that
#   persistent, k programs a SM (k x 132 rows in flight), k the largest that fits 25 MB:
#       fwd 32768 bf16 (64 KiB rows): k = 2, 17 MB      65536: k = 1, 17 MB
#       fwd 131072 bf16: k = 1, 34 MB (over the budget, under the 50 MB L2)
#       fwd 262144 bf16 / bwd 131072+: k = 1, 66+ MB -- no longer fits; one row a SM still keeps
#       the most of it in L2 (4x fewer rows in flight than one program per row). Past that only
#       keeping the row on-chip across CTAs reaches one read.
#
# With one or two programs a SM, bytes in flight come from the tile alone (the loops are not
# pipelined by default, below): a persistent tile is widened until each SM has
# ``IN_FLIGHT_BYTES_PER_SM`` of loads per step -- 32 KiB (16384 bf16 / 8192 fp32) for the forward
# at k = 1, 16 KiB for the backward (two tensors) -- Little's law at ~4.2 TB/s and ~1 µs of
# latency wants ~32 KiB a SM. sm_90 (triton 3.9): forward 16384 bf16 at 16 warps 63 registers,
# backward 16 KiB tiles 40: no spill.

L2_BYTES = 50 * 1000 * 1000
L2_REREAD_FRACTION = 0.5
IN_FLIGHT_BYTES_PER_SM = 32 * 1024
SM_WARPS = 64  # resident warps an SM holds at most (sm_80 / sm_90)
# Software pipelining of the sweeps (RowConfig.num_stages > 1) is reachable by config= and
# tested, not the default: on sm_90 (triton 3.9, scripts/sm90_report.py) it turned the 16-byte
# loads into 4-byte ones staged through shared memory (no cp.async), and 3 stages took 84-144
# registers at the widths above. A GPU sweep should decide.
PIPELINE_STAGES = 1


def l2_reread_budget() -> int:
    """Bytes of rows in flight the second sweep may expect to find in L2."""
    return int(L2_BYTES * L2_REREAD_FRACTION)


def persistent_programs(n_cols: int, elem_size: int, sm_count: int, num_warps: int,
                        reread_tensors: int) -> int:
    """Programs of the persistent multi-tile grid (0: one program per row pays as well). The
    largest k <= the resident limit with k x ``sm_count`` rows in flight within the L2 budget,
    at least 1 a SM; 0 when one program per row already fits the budget."""
    row_bytes = reread_tensors * n_cols * elem_size
    resident = max(1, SM_WARPS // num_warps)
    if resident * sm_count * row_bytes <= l2_reread_budget():
        return 0
    k = max(1, min(resident, l2_reread_budget() // (sm_count * row_bytes)))
    return k * sm_count


def persistent_block(n_cols: int, elem_size: int, programs_per_sm: int,
                     reread_tensors: int) -> int:
    """Tile width (elements) of the persistent sweeps: ``IN_FLIGHT_BYTES_PER_SM`` of loads a step
    across the SM's programs and tensors, between ``LOOP_TILE_BYTES`` and twice that."""
    per_tile = IN_FLIGHT_BYTES_PER_SM // (programs_per_sm * reread_tensors)
    tile_bytes = min(max(per_tile, LOOP_TILE_BYTES), 2 * LOOP_TILE_BYTES)
    return min(tile_bytes // elem_size, next_power_of_2(n_cols))


def choose_row_config(
    n_rows: int, n_cols: int, elem_size: int, sm_count: int, *,
    max_single_cols: int | None = None, reread_tensors: int = 0,
) -> RowConfig:
    """Pick the path and tile sizes for ``n_rows`` rows of ``n_cols`` elements of ``elem_size``
    bytes on a device with ``sm_count`` SMs. ``max_single_cols`` lowers the single-tile limit for
    kernels that keep more than one row-sized value live (cross-entropy's gradient).
    ``reread_tensors``: row-sized tensors the multi path's second sweep reads again (softmax
    forward 1, backward 2); with it the multi path may become a persistent grid (the L2 model
    above). 0 (cross-entropy) keeps one program per row."""
    single_limit = single_tile_max_cols(elem_size)
    if max_single_cols is not None:
        single_limit = min(single_limit, max_single_cols)
    if n_cols <= single_limit:
        block_n = next_power_of_2(n_cols)
        block_m = max(1, SINGLE_TILE_TARGET_ELEMS // block_n)
        # Keep enough programs to fill the device before packing rows together.
        while block_m > 1 and cdiv(n_rows, block_m) < MIN_PROGRAMS_PER_SM * sm_count:
            block_m //= 2
        block_m = min(block_m, next_power_of_2(n_rows))
        return RowConfig("single", block_n, warps_for(block_m * block_n), block_m=block_m)

    block_n = min(loop_block(elem_size), next_power_of_2(n_cols))
    if n_rows < MIN_PROGRAMS_PER_SM * sm_count:
        wanted = cdiv(SPLIT_PROGRAMS_PER_SM * sm_count, n_rows)
        n_splits = min(wanted, cdiv(n_cols, SPLIT_MIN_CHUNK))
        if n_splits > 1:
            block_n = min(block_n, next_power_of_2(cdiv(n_cols, n_splits)))
            return RowConfig("split", block_n, warps_for(block_n), n_splits=n_splits)
    if reread_tensors:
        programs = persistent_programs(n_cols, elem_size, sm_count, warps_for(block_n),
                                       reread_tensors)
        if programs and programs < n_rows:
            block_n = persistent_block(n_cols, elem_size, programs // sm_count, reread_tensors)
            return RowConfig("multi", block_n, warps_for(block_n), n_programs=programs,
                             num_stages=PIPELINE_STAGES)
    return RowConfig("multi", block_n, warps_for(block_n), num_stages=PIPELINE_STAGES)


# Softmax backward, single tile: at 16384 elements a program (a 32 KiB bf16 row at 16 warps)
# keeping both upcast tiles (y, dy) live across the row reduction took 80 registers (72 for
# log_softmax) on sm_90: one 16-warp CTA per SM. Re-reading them after the reduction (``RELOAD``,
# served by L1/L2, HBM bytes unchanged) took 46 / 32: two / four CTAs (scripts/sm90_report.py,
# triton 3.9). Smaller tiles already fit three or more CTAs and keep the single read.
SOFTMAX_BWD_RELOAD_ELEMS = 16384


def softmax_bwd_reloads(config: RowConfig) -> bool:
    """Whether the single-tile softmax backward re-reads y and dy after its reduction."""
    return config.path == "single" and config.block_m * config.block_n >= SOFTMAX_BWD_RELOAD_ELEMS


def row_programs(n_rows: int, config: RowConfig) -> int:
    """Programs of a ``single`` or ``multi`` launch (see ``RowConfig.n_programs``)."""
    if config.path == "single":
        return cdiv(n_rows, config.block_m)
    return min(n_rows, config.n_programs) if config.n_programs else n_rows


def split_chunk(n_cols: int, config: RowConfig) -> int:
    """Columns per split program: a whole number of tiles, so only the row's last tile masks."""
    return cdiv(cdiv(n_cols, config.n_splits), config.block_n) * config.block_n


@dataclass(frozen=True)
class ElementwiseConfig:
    """Launch of an elementwise kernel over a flattened tensor: ``block`` elements a program."""

    block: int
    num_warps: int

    def __post_init__(self) -> None:
        if self.block < 1 or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two >= 1, got {self.block}")


def choose_elementwise_config(
    numel: int, elem_size: int, *, max_elems_per_thread: int | None = None
) -> ElementwiseConfig:
    """16 KiB of input per program (fewer for a small tensor): at 8 warps that is 16 to 64 bytes
    in flight per thread, enough to stream at the copy rate. ``max_elems_per_thread`` caps the
    block for kernels that keep many live values per element (at 8 warps, 256 threads)."""
    block = min(LOOP_TILE_BYTES // elem_size, next_power_of_2(max(numel, 1)))
    block = max(block, 16)
    num_warps = 4 if block <= 2048 else 8
    if max_elems_per_thread is not None:
        block = max(16, min(block, max_elems_per_thread * num_warps * 32))
    return ElementwiseConfig(block, num_warps)


# Elements per thread of the fused BCE forward (loss + gradient + broadcast weight and
# pos_weight index math). scripts/sm90_report.py on sm_90: 32 bf16 elements per thread took
# 213-255 registers and spilled with both weights; 16 took 80-87 and 16-24 resident warps/SM.
# fp64 (twice the registers per value) gets 8.
BCE_ELEMS_PER_THREAD = 16
BCE_ELEMS_PER_THREAD_FP64 = 8
# With a weight or pos_weight read through index terms (a 64-bit division and modulo per element
# and term), 16 elements a thread took 149 (bf16) / 166 (fp32) registers in the fused forward
# with both operands: one 8-warp CTA per SM. 8 took 74 / 82: three / two CTAs (sm_90, triton 3.9,
# scripts/sm90_report.py).
BCE_ELEMS_PER_THREAD_BROADCAST = 8


def choose_bce_config(numel: int, elem_size: int, *, broadcast: bool = False) -> ElementwiseConfig:
    """``choose_elementwise_config`` capped at ``BCE_ELEMS_PER_THREAD`` (8 for fp64, and 8 when
    ``broadcast``: an operand is addressed by index terms)."""
    cap = BCE_ELEMS_PER_THREAD_FP64 if elem_size == 8 else BCE_ELEMS_PER_THREAD
    if broadcast:
        cap = min(cap, BCE_ELEMS_PER_THREAD_BROADCAST)
    return choose_elementwise_config(numel, elem_size, max_elems_per_thread=cap)


# The finishing sum of a reduced BCE loss: one program adds the forward's per-program partials
# (65,536 fp32 values at 2^28 elements and 4096 a program). 16 warps and 64 KiB of partials a
# trip (16 fp32 / 8 fp64 values a thread, 16-byte loads) make that 4 trips of a full SM's worth
# of loads in flight instead of 64 dependent trips of 4 KiB.
BCE_FINISH_BYTES = 64 * 1024
BCE_FINISH_WARPS = 16


def choose_bce_finish_config(n_partials: int, partial_size: int) -> ElementwiseConfig:
    """Lanes of the single finishing program: ``BCE_FINISH_BYTES`` of partials a trip, fewer
    (a power of two >= 16) when there are fewer partials."""
    block = min(BCE_FINISH_BYTES // partial_size, next_power_of_2(n_partials))
    block = max(block, 16)
    return ElementwiseConfig(block, BCE_FINISH_WARPS if block >= 4096 else 4)


def grid_stride_programs(numel: int, block: int, sm_count: int) -> int:
    """Programs of a grid-stride elementwise launch (the BCE gradient rescale): one per SM, no
    more than there are blocks. Each walks blocks ``programs`` apart."""
    return max(1, min(sm_count, cdiv(numel, block)))


# --------------------------------------------------------------------------- cross-entropy

# Longest row the cross-entropy single-tile kernel holds on-chip. Lower than the softmax limit
# because the fused forward+gradient keeps z, exp(z − lse) and dx live per element: 8192 fp32
# values of z per row is 16 per thread at 16 warps. Reasoned, not yet swept (perf/NOTES.md).
CE_MAX_SINGLE_COLS = 8192
# Targets summed per step by the one-program mean-divisor pre-pass.
CE_TOTAL_WEIGHT_BLOCK = 1024
# Row losses summed per step by the one-program finish kernel (sum, divide, cast): 32 fp32 a
# thread at 4 warps; 4096 rows take 4 steps.
CE_FINISH_BLOCK = 1024
# Programs per SM of the fused gradient's rescale (backward of sum/mean). It runs on every
# backward and is a no-op when grad_output is 1 (the usual loss.backward()): a fixed grid of
# about one program per SM costs one wave of programs that return at once, where a program per
# (row, tile) cost 4096 x 16 programs for 4096 x 128k bf16 logits. When grad_output != 1 (an
# AMP loss scale) each program walks its tiles: 2 programs of 16 KiB tiles per SM keep 32 KiB
# of loads in flight per SM, about what HBM3 needs at ~4.8 TB/s (reasoned, not yet swept).
CE_SCALE_PROGRAMS_PER_SM = 2


# Long rows: the multi-tile ("sweep") forward with its fused gradient reads each row twice,
# sweep 2 in reverse so its first tiles are those sweep 1 read last. Sweep 2 is an L2 hit only
# while the rows in flight still fit in L2 beside what streams through it (the dx stores, marked
# evict_first, and the class weights). H200: 50 MB of L2, 132 SMs. One program per row runs 16
# warps at about 64 registers (scripts/sm90_report.py): 2 programs resident per SM
# (65536 / (512 x 64)), so 264 rows in flight:
#     32000 bf16 ( 64 KB a row):  17 MB  fits
#     50257 bf16 (100 KB a row):  27 MB  fits
#    128256 bf16 (256 KB a row):  68 MB  does not: sweep 2 mostly re-reads HBM, 3·C·e a row
#                                         instead of 2·C·e (+50 % of the forward's traffic)
# A persistent grid of one program per SM (cross_entropy_fwd_persistent_kernel; with the row
# loop it takes 88 registers, 102 with smoothing and softcap, at 16 warps on sm_90 / triton 3.9,
# so one program per SM is also all that fits) bounds the rows in flight to the SM count:
# 34 MB for 128256 bf16. fp32 rows of 128256 (68 MB even so)
# keep about half a row in L2 at sweep 2 — the best short of holding a row on-chip across CTAs.
# Tiles stay 16 KiB (16 KiB of loads in flight per SM at one program; wider tiles are
# reachable by config= but their registers are not measured). Pipelining the sweeps
# (RowConfig.num_stages = 2, reachable by config=) took the persistent kernel to 118 registers,
# 128 and an 8-byte stack frame with smoothing and softcap: off (PIPELINE_STAGES). Reasoned, not
# yet timed: perf/sweep_tiling.py compares config=RowConfig("multi", ..., n_programs=0 or SMs).
CE_L2_BYTES = 50 * 1000 * 1000
# Share of L2 the re-read rows may take (the rest: dx stores in flight, weights, targets).
CE_L2_REREAD_FRACTION = 0.75
# One-program-per-row sweeps resident per SM (16 warps, ~64 registers).
CE_SWEEP_PROGRAMS_PER_SM = 2


def choose_cross_entropy_config(
    n_rows: int, n_cols: int, elem_size: int, sm_count: int, *, fused_grad: bool = False
) -> RowConfig:
    """``choose_row_config`` with the single tile capped at ``CE_MAX_SINGLE_COLS``: single tile
    up to 8192 classes, multi tile beyond, split when the rows alone do not fill the device.
    With ``fused_grad`` (the forward also writes dx, reading each row twice), a multi-tile
    launch whose one-program-per-row rows in flight overflow ``CE_L2_REREAD_FRACTION`` of L2
    runs a persistent grid of one program per SM (``n_programs``; the model above)."""
    cfg = choose_row_config(
        n_rows, n_cols, elem_size, sm_count, max_single_cols=CE_MAX_SINGLE_COLS
    )
    if fused_grad and cfg.path == "multi" and n_rows > sm_count:
        in_flight = CE_SWEEP_PROGRAMS_PER_SM * sm_count * n_cols * elem_size
        if in_flight > CE_L2_BYTES * CE_L2_REREAD_FRACTION:
            cfg = RowConfig("multi", cfg.block_n, cfg.num_warps, n_programs=sm_count,
                            num_stages=cfg.num_stages)
    return cfg


def choose_cross_entropy_scale_grid(n_tiles: int, sm_count: int) -> int:
    """Programs of the gradient rescale: ``CE_SCALE_PROGRAMS_PER_SM`` per SM, at most one per
    tile, at least 1."""
    return max(1, min(n_tiles, CE_SCALE_PROGRAMS_PER_SM * sm_count))


# --------------------------------------------------------------------------- linear + CE

# Bytes of logits one token chunk of fused linear + cross-entropy may hold (the chunk buffer,
# which the CE kernel overwrites with its gradient). 512 MiB is 2048 tokens of a 128k bf16
# vocabulary: each chunk's matmuls are then ~2 TFLOP, long enough for cuBLAS to run at its rate.
LINEAR_CE_LOGITS_BUDGET = 512 * 1024 * 1024
# Token chunks are a multiple of this (a matmul tile height).
LINEAR_CE_CHUNK_ALIGN = 64


def _rows_in_budget(n_rows: int, row_elems: int, elem_size: int, budget_bytes: int | None) -> int:
    budget = LINEAR_CE_LOGITS_BUDGET if budget_bytes is None else budget_bytes
    if budget <= 0:
        raise ValueError(f"memory budget must be positive, got {budget_bytes}")
    fit = max(1, budget // max(1, row_elems * elem_size))
    if fit >= LINEAR_CE_CHUNK_ALIGN:
        fit -= fit % LINEAR_CE_CHUNK_ALIGN
    return max(1, min(fit, n_rows))


def choose_token_chunk(
    n_tokens: int, n_classes: int, elem_size: int, budget_bytes: int | None = None
) -> int:
    """Tokens per chunk of fused linear + cross-entropy: as many as fit ``budget_bytes`` of
    logits (default ``LINEAR_CE_LOGITS_BUDGET``), a multiple of ``LINEAR_CE_CHUNK_ALIGN`` when
    that many fit, at least 1, at most ``n_tokens``."""
    return _rows_in_budget(n_tokens, n_classes, elem_size, budget_bytes)


def choose_vocab_chunk(
    n_tokens: int, n_classes: int, elem_size: int, budget_bytes: int | None = None
) -> int:
    """Classes per chunk of the low-memory linear + cross-entropy backward, whose (tokens ×
    chunk) logits block must fit ``budget_bytes``; same rounding as ``choose_token_chunk``."""
    return _rows_in_budget(n_classes, n_tokens, elem_size, budget_bytes)


# --------------------------------------------------------------------------- row alignment

# Bytes of the widest global access per thread (LDG.E.128 / STG.E.128).
VECTOR_BYTES = 16


def peel_row_edges(elem_size: int, n_cols: int, block_n: int, frames) -> bool:
    """Whether a row kernel should peel its rows (``PEEL_EDGES``, kernels/cross_entropy.py): split
    each row at the first 16-byte boundary after its start into a body of whole 16-byte vectors,
    tiled as usual but 16 bytes a thread, and one small masked tile for the head and the tail --
    instead of tiling it from its first column.

    ``frames``: one ``(address, outer_stride, inner_stride, col_stride, n_inner)`` per tensor the
    kernel walks along its rows: the data pointer in bytes, the ``RowView`` strides in elements.

    False (tile from the first column, as always) when
    - Triton's launch-time specialisation already proves every row aligned: every address a
      multiple of 16 bytes, ``n_cols`` and every row stride a multiple of 16 (it marks such ints
      ``tt.divisibility = 16``), so the masked tiles vectorise as they are;
    - the columns are not contiguous (no 16-byte access either way);
    - the tensors' rows do not all sit at the same distance from a 16-byte boundary (one tiling
      cannot align both), or an address is not a multiple of the element size;
    - a tile is narrower than one 16-byte vector.
    Otherwise True: V = 50257 rows (a 100514-byte bf16 stride) or a sliced view's base.
    """
    vec = VECTOR_BYTES // elem_size
    if block_n < vec or any(col != 1 for _, _, _, col, _ in frames):
        return False
    if any(addr % elem_size for addr, *_ in frames):
        return False
    ints = [n_cols]
    for _, outer, inner, _, n_inner in frames:
        ints += [outer, inner] if n_inner > 1 else [outer]
    if all(a % VECTOR_BYTES == 0 for a, *_ in frames) and all(i % 16 == 0 for i in ints):
        return False

    def offsets(frame):  # bytes from a 16-byte boundary: the base, a step along each row dim
        addr, outer, inner, _, n_inner = frame
        steps = (outer, inner) if n_inner > 1 else (outer,)
        return (addr % VECTOR_BYTES,) + tuple(s * elem_size % VECTOR_BYTES for s in steps)

    return len({offsets(f) for f in frames}) == 1


# --------------------------------------------------------------------------- distillation

# Tile of the distillation row kernels, per tensor: every step loads a tile of the student's row
# and one of the teacher's, 8 KiB each (4096 bf16 / 2048 fp32), so a program has the 16 KiB of
# loads in flight a step that the CE loop has, at 8 warps (16 elements of each row a thread).
# Reasoned, not yet swept (perf/NOTES.md); registers: perf/sm90_static.md.
DISTILLATION_TILE_BYTES = 8 * 1024
# Tile width of the sparse top-k kernels: each tile also builds a histogram of the k indices
# over its columns (which of them are the teacher's). At 4096 columns triton 3.6's ptxas
# allocated 254 registers to the forward (bf16, k = 64, softcap and hard term; 3.9's: 79); at
# 2048, 127 (16 warps/SM) and the backward 48 (scripts/sm90_report.py --smoke).
TOPK_TILE_COLS = 2048
# Most teacher classes a sparse top-k row may hold (its k log-probs, indices and the student's
# logits at them stay in registers: 1024 at 8 warps is 4 of each a thread).
TOPK_MAX = 1024


def choose_distillation_config(n_rows: int, n_cols: int, elem_size: int,
                               sm_count: int) -> RowConfig:
    """The distillation kernels' launch: ``multi`` (one program per row sweeping
    ``DISTILLATION_TILE_BYTES`` tiles; a row that fits one tile takes one step), or ``split``
    when the rows alone give fewer than ``MIN_PROGRAMS_PER_SM`` programs a SM (the rule of
    ``choose_row_config``: chunks of at least ``SPLIT_MIN_CHUNK`` columns, about
    ``SPLIT_PROGRAMS_PER_SM`` programs a SM). ``elem_size``: the wider of the two heads'."""
    block_n = min(DISTILLATION_TILE_BYTES // elem_size, next_power_of_2(n_cols))
    if n_rows < MIN_PROGRAMS_PER_SM * sm_count:
        wanted = cdiv(SPLIT_PROGRAMS_PER_SM * sm_count, max(n_rows, 1))
        n_splits = min(wanted, cdiv(n_cols, SPLIT_MIN_CHUNK))
        if n_splits > 1:
            block_n = min(block_n, next_power_of_2(cdiv(n_cols, n_splits)))
            return RowConfig("split", block_n, _distillation_warps(block_n, elem_size),
                             n_splits=n_splits)
    return RowConfig("multi", block_n, _distillation_warps(block_n, elem_size))


def _distillation_warps(block_n: int, elem_size: int) -> int:
    """``warps_for``, doubled for fp64 tiles up to 1024 columns: the fp64 JSD backward with a
    hard term held 8 values of each row a thread at 4 warps and spilled 16 B (255 registers,
    sm_90, triton 3.9); 4 a thread at 8 warps."""
    warps = warps_for(block_n)
    return 2 * warps if elem_size == 8 and block_n <= 1024 else warps


def choose_distillation_token_chunk(n_tokens: int, bytes_per_token: int,
                                    budget_bytes: int | None = None) -> int:
    """Tokens per chunk of the fused linear distillation: as many as fit ``budget_bytes``
    (default ``LINEAR_CE_LOGITS_BUDGET``) of *both* heads' logits (``bytes_per_token`` =
    ``V_s·e_s + V_t·e_t``), rounded as ``choose_token_chunk``."""
    return _rows_in_budget(n_tokens, bytes_per_token, 1, budget_bytes)


# --------------------------------------------------------------------------- batch-invariant mode
#
# ``batch_invariant=True`` (docs/rl.md) reduces every row's vocabulary in fixed tiles of
# ``INVARIANT_TILE`` classes, each tile's (max, Σexp, τ) formed the same way whatever else the
# launch holds, then adds the tiles exactly (an integer fixed-point sum, kernels/_invariant.py):
# so nothing below may depend on the number of rows. Every config here is a function of the
# dtype alone. A vocab-parallel shard must start on a multiple of INVARIANT_TILE (Megatron pads
# the vocabulary to a multiple of 128 · TP, which gives that).

INVARIANT_TILE = 128
# Rows a program of the logits-given tile-statistics kernel holds: 16 × 128 values, 16 fp32 a
# thread at 4 warps.
INVARIANT_ROWS = 16
INVARIANT_WARPS = 4
# The exact merge: rows a program and tiles a step (16 × 32 states a step, 4 a thread at 4
# warps, each with its int64 sums: 64 tiles a step took 168 registers at sm_90, triton 3.9;
# the integer sums make any split of the tiles give the same bits).
INVARIANT_MERGE_ROWS = 16
INVARIANT_MERGE_TILES = 32
# Default bytes of the fused head's buffers: the forward's per-(token, tile) statistics (12 B a
# token and tile: at 151936 classes 14 KiB a token, so 8192 tokens take 116 MiB, one chunk) and
# the backward's dz block (tokens × a vocabulary chunk in the input's dtype: 8192 bf16 tokens
# take 16384 classes a chunk, 10 chunks at 151936).
FUSED_HEAD_BUDGET = 256 * 1024 * 1024


@dataclass(frozen=True)
class HeadGemmConfig:
    """Tiles of the fused head's kernels (kernels/head_gemm.py): ``block_m`` tokens ×
    ``block_n`` classes (always ``INVARIANT_TILE``) of logits per program, ``block_k`` of the
    hidden size per ``tl.dot`` step; ``block_h`` hidden columns per program of the dh / dW
    kernels. Fixed per dtype: a token's logits never depend on how many tokens there are (no
    split-K, no tile chosen from M)."""

    block_m: int
    block_n: int
    block_k: int
    block_h: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "block_h"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's smallest "
                                 f"tile), got {value}")
        if self.block_n != INVARIANT_TILE:
            raise ValueError(f"block_n must be INVARIANT_TILE={INVARIANT_TILE} (the tile the "
                             f"statistics are kept per), got {self.block_n}")


# Reasoned for sm_90, then checked by scripts/sm90_report.py (registers, no spills, HMMA/wgmma
# in the SASS): a 64 × 128 fp32 accumulator is 32 values a thread at 8 warps, leaving room for
# the epilogue's exponentials on the same tile; 16-bit operands take 64-wide k steps (8 KiB + 16
# KiB of operands a stage, 3 stages in 72 KiB of shared memory) — forward 127, dz 116, dh 63-71,
# dW 162 registers (triton 3.9). fp32 operands halve block_k (the same bytes a stage; the bf16
# splits keep two or three pieces of each operand live: 180-190 registers in the forward and dz,
# 100-133 in dh — whose 128-class steps took 249-255 and spilled 368 B with the six-product
# split before it stepped by block_k too). fp64 halves the tiles again at 8 warps (DMMA, twice
# the registers a value: 184-186 in the forward and dz; at 4 warps dz spilled 152 B, dW 16 B).
_HEAD_GEMM = {
    2: HeadGemmConfig(64, INVARIANT_TILE, 64, 128, 8, 3),
    4: HeadGemmConfig(64, INVARIANT_TILE, 32, 64, 8, 3),
    8: HeadGemmConfig(32, INVARIANT_TILE, 16, 16, 8, 2),
}


# Token tiles per group of the fused head's 1-D grid (kernels/head_gemm.py ``_grouped``): the
# programs in flight walk the vocabulary tiles together, so each W tile read from HBM serves
# GROUP_M token tiles from L2. Changes no result (the programs are independent).
HEAD_GEMM_GROUP_M = 8


def head_gemm_config(elem_size: int) -> HeadGemmConfig:
    """The fused head's tiles for inputs of ``elem_size`` bytes (a function of the dtype only)."""
    return _HEAD_GEMM[elem_size]


def invariant_tiles(n_cols: int) -> int:
    """Tiles of ``INVARIANT_TILE`` classes covering ``n_cols`` (the last one may be partial)."""
    return cdiv(n_cols, INVARIANT_TILE)


def fused_head_token_chunk(n_tokens: int, n_tiles: int, stat_fields: int, block_m: int,
                           budget_bytes: int | None = None) -> int:
    """Tokens per chunk of the fused head's forward: as many as keep the (tokens, tiles,
    ``stat_fields``) fp32 statistics within ``budget_bytes`` (default ``FUSED_HEAD_BUDGET``),
    a multiple of ``block_m``, at least ``block_m``, at most what the tokens need. The chunk
    changes no result (each token's statistics are its own)."""
    budget = FUSED_HEAD_BUDGET if budget_bytes is None else budget_bytes
    fit = budget // max(1, n_tiles * stat_fields * 4)
    fit = max(block_m, fit - fit % block_m)
    return min(fit, max(block_m, cdiv(n_tokens, block_m) * block_m))


def fused_head_vocab_chunk(n_tokens: int, n_classes: int, elem_size: int,
                           budget_bytes: int | None = None) -> int:
    """Classes per chunk of the fused head's backward, whose (tokens × chunk) dz block must fit
    ``budget_bytes`` (default ``FUSED_HEAD_BUDGET``): a multiple of ``INVARIANT_TILE``, at
    least one tile, at most what the classes need. The chunk changes no result: dh is carried
    between chunks in fp32 and walks the tiles in one order, dW rows are each one chunk's."""
    budget = FUSED_HEAD_BUDGET if budget_bytes is None else budget_bytes
    fit = budget // max(1, n_tokens * elem_size)
    fit = max(INVARIANT_TILE, fit - fit % INVARIANT_TILE)
    return min(fit, invariant_tiles(n_classes) * INVARIANT_TILE)
