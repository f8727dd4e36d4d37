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
