"""The launch heuristics are pure functions: check their contracts at the shapes that matter."""

import pytest

from probact_gpu import tiling
from probact_gpu.tiling import RowConfig

H200_SMS = 132


@pytest.mark.parametrize("elem_size", [2, 4, 8])
@pytest.mark.parametrize("n_cols", [1, 7, 129, 1024, 4097, 16384, 32000, 65536, 262144, 1 << 20])
@pytest.mark.parametrize("n_rows", [1, 8, 4096, 65536])
def test_choose_row_config_is_valid(n_rows, n_cols, elem_size):
    cfg = tiling.choose_row_config(n_rows, n_cols, elem_size, H200_SMS)
    cfg.validate_for(n_cols)
    if cfg.path == "single":
        assert cfg.block_n >= n_cols and cfg.block_n * elem_size <= 2 * tiling.SINGLE_TILE_MAX_BYTES
    else:
        assert n_cols > tiling.single_tile_max_cols(elem_size)
        assert cfg.block_n * elem_size <= tiling.LOOP_TILE_BYTES
    if cfg.path == "split":
        chunk = tiling.split_chunk(n_cols, cfg)
        assert chunk % cfg.block_n == 0 and chunk * cfg.n_splits >= n_cols
        assert chunk >= min(tiling.SPLIT_MIN_CHUNK, n_cols) // 2


def test_single_tile_packs_rows_only_while_the_gpu_stays_full():
    many = tiling.choose_row_config(1 << 18, 1024, 2, H200_SMS)
    assert many.path == "single" and many.block_m == 4
    few = tiling.choose_row_config(300, 1024, 2, H200_SMS)
    assert few.block_m == 1  # 300 rows: packing would leave SMs idle


def test_few_long_rows_split_to_fill_the_gpu():
    cfg = tiling.choose_row_config(8, 262144, 2, H200_SMS)
    assert cfg.path == "split"
    assert 8 * cfg.n_splits >= tiling.MIN_PROGRAMS_PER_SM * H200_SMS
    assert tiling.choose_row_config(4096, 262144, 2, H200_SMS).path == "multi"


def test_max_single_cols_lowers_the_single_tile_limit():
    assert tiling.choose_row_config(4096, 8192, 2, H200_SMS).path == "single"
    assert tiling.choose_row_config(4096, 8192, 2, H200_SMS, max_single_cols=4096).path == "multi"


def test_elementwise_config():
    assert tiling.choose_elementwise_config(1, 4).block == 16
    assert tiling.choose_elementwise_config(1 << 28, 2).block == tiling.LOOP_TILE_BYTES // 2
    with pytest.raises(ValueError, match="power of two"):
        tiling.ElementwiseConfig(3, 4)


def test_bce_config_caps_elements_per_thread():
    for elem_size, cap in ((2, tiling.BCE_ELEMS_PER_THREAD), (4, tiling.BCE_ELEMS_PER_THREAD),
                           (8, tiling.BCE_ELEMS_PER_THREAD_FP64)):
        cfg = tiling.choose_bce_config(1 << 28, elem_size)
        assert cfg.block <= cap * cfg.num_warps * 32
    assert tiling.choose_bce_config(1 << 28, 2).block == 4096
    assert tiling.choose_bce_config(5, 4).block == 16
    # Broadcast operands (index terms): 8 elements a thread.
    for elem_size in (2, 4, 8):
        cfg = tiling.choose_bce_config(1 << 28, elem_size, broadcast=True)
        assert cfg.block == tiling.BCE_ELEMS_PER_THREAD_BROADCAST * cfg.num_warps * 32


def test_row_config_rejects_nonsense():
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        RowConfig("multi", 100, 4)
    with pytest.raises(ValueError, match="num_warps"):
        RowConfig("multi", 128, 3)
    with pytest.raises(ValueError, match="block_m=2 only applies"):
        RowConfig("multi", 128, 4, block_m=2)
    with pytest.raises(ValueError, match="n_programs=4 must be >= 0 and applies to the multi"):
        RowConfig("single", 128, 4, n_programs=4)


def test_row_programs():
    assert tiling.row_programs(10, RowConfig("single", 128, 4, block_m=4)) == 3
    assert tiling.row_programs(10, RowConfig("multi", 128, 4)) == 10
    assert tiling.row_programs(10, RowConfig("multi", 128, 4, n_programs=4)) == 4
    assert tiling.row_programs(3, RowConfig("multi", 128, 4, n_programs=4)) == 3


def test_softmax_bwd_reloads_only_tiles_that_cost_occupancy():
    """The 16k bf16 single tile re-reads y and dy in backward (two CTAs per SM instead of one,
    scripts/sm90_report.py); smaller tiles and the loop paths do not."""
    assert tiling.softmax_bwd_reloads(tiling.choose_row_config(16384, 16384, 2, H200_SMS))
    for n_rows, n_cols, elem_size in ((65536, 4096, 2), (1 << 18, 1024, 2), (4096, 8192, 4),
                                      (4096, 65536, 2), (8, 262144, 2)):
        cfg = tiling.choose_row_config(n_rows, n_cols, elem_size, H200_SMS)
        assert not tiling.softmax_bwd_reloads(cfg), cfg


@pytest.mark.parametrize("elem_size", [2, 4])
@pytest.mark.parametrize("n_cols", [20000, 32768, 65536, 131072, 262144])
@pytest.mark.parametrize("reread", [1, 2], ids=["fwd", "bwd"])
def test_softmax_long_rows_fit_l2_or_run_one_row_per_sm(n_cols, elem_size, reread):
    """The L2 model: the multi path keeps at most L2_REREAD_FRACTION of L2 in rows to re-read;
    when one program per row would exceed it, a persistent grid of k rows a SM does (k >= 1;
    k = 1 when even that exceeds it: fewest rows in flight), with tiles widened so each SM has
    IN_FLIGHT_BYTES_PER_SM of loads a step, never past twice LOOP_TILE_BYTES."""
    n_rows = (1 << 28) // n_cols
    cfg = tiling.choose_row_config(n_rows, n_cols, elem_size, H200_SMS, reread_tensors=reread)
    assert cfg.path == "multi" and cfg.num_stages == tiling.PIPELINE_STAGES
    row_bytes = reread * n_cols * elem_size
    budget = tiling.l2_reread_budget()
    if cfg.n_programs == 0:
        resident = tiling.SM_WARPS // cfg.num_warps
        assert resident * H200_SMS * row_bytes <= budget
        assert cfg.block_n * elem_size <= tiling.LOOP_TILE_BYTES
        return
    k, rem = divmod(cfg.n_programs, H200_SMS)
    assert rem == 0 and k >= 1
    assert k * H200_SMS * row_bytes <= budget or k == 1
    assert (k + 1) * H200_SMS * row_bytes > budget  # no more rows in flight than fit
    assert cfg.block_n * elem_size <= 2 * tiling.LOOP_TILE_BYTES
    assert k * reread * cfg.block_n * elem_size >= tiling.IN_FLIGHT_BYTES_PER_SM


def test_softmax_l2_model_at_the_perf_shapes():
    """bf16, 132 SMs, 25 MB budget: the numbers written beside the model in tiling.py."""
    def pick(n_cols, reread):
        return tiling.choose_row_config((1 << 28) // n_cols, n_cols, 2, H200_SMS,
                                        reread_tensors=reread)

    assert (pick(32768, 1).n_programs, pick(32768, 1).block_n) == (264, 8192)
    for n_cols in (65536, 131072, 262144):
        assert (pick(n_cols, 1).n_programs, pick(n_cols, 1).block_n) == (132, 16384)
        assert (pick(n_cols, 2).n_programs, pick(n_cols, 2).block_n) == (132, 8192)
    # Rows short enough that one program per row fits: unchanged.
    assert pick(20000, 1).n_programs == 0
    # Cross-entropy (no reread_tensors) never gets a persistent grid.
    ce = tiling.choose_row_config(4096, 131072, 2, H200_SMS)
    assert ce.n_programs == 0 and ce.block_n == tiling.loop_block(2)


def test_row_config_num_stages():
    assert RowConfig("multi", 128, 4, num_stages=3).num_stages == 3
    with pytest.raises(ValueError, match="num_stages=2 must be >= 1 and only the multi"):
        RowConfig("single", 128, 4, num_stages=2)
    with pytest.raises(ValueError, match="num_stages=0"):
        RowConfig("multi", 128, 4, num_stages=0)


# --------------------------------------------------------------------------- cross-entropy


def test_cross_entropy_scale_grid_is_a_few_programs_per_sm():
    assert tiling.choose_cross_entropy_scale_grid(4096 * 16, H200_SMS) == \
        tiling.CE_SCALE_PROGRAMS_PER_SM * H200_SMS
    assert tiling.choose_cross_entropy_scale_grid(3, H200_SMS) == 3
    assert tiling.choose_cross_entropy_scale_grid(0, H200_SMS) == 1


@pytest.mark.parametrize("n_cols,elem_size,persistent", [
    (32000, 2, False),   # 264 rows x 64 KB = 17 MB in flight: fits
    (50257, 2, False),   # 27 MB: fits
    (128256, 2, True),   # 68 MB: overflows; one program per SM: 34 MB
    (65536, 4, True),    # 69 MB
])
def test_cross_entropy_sweep_bounds_rows_in_flight_to_l2(n_cols, elem_size, persistent):
    """The fused-gradient sweep re-reads each row: past the L2 model's budget it runs one
    program per SM; the loss-only forward (one read) and few rows never do."""
    cfg = tiling.choose_cross_entropy_config(4096, n_cols, elem_size, H200_SMS, fused_grad=True)
    assert cfg.path == "multi"
    assert cfg.n_programs == (H200_SMS if persistent else 0)
    if persistent:
        assert H200_SMS * n_cols * elem_size < 2 * tiling.CE_L2_BYTES
    plain = tiling.choose_cross_entropy_config(4096, n_cols, elem_size, H200_SMS)
    assert plain.n_programs == 0
    few = tiling.choose_cross_entropy_config(H200_SMS, n_cols, elem_size, H200_SMS,
                                             fused_grad=True)
    assert few.n_programs == 0
