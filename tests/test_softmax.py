"""softmax / log_softmax: values and gradients against NumPy float64, every path forced and
asserted, properties, edge values, strides, bad input. Every shape says why it is there."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

import probact_gpu as pg
from probact_gpu import check, reference, tiling
from probact_gpu.ops.softmax import softmax_bwd, softmax_fwd
from probact_gpu.testing import assert_close_to_reference, make_input, record_launches, to_numpy64
from probact_gpu.tiling import RowConfig

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = {
    False: (reference.softmax, reference.softmax_grad, torch.softmax),
    True: (reference.log_softmax, reference.log_softmax_grad, torch.log_softmax),
}

# (config, shape, why): each path with a shape that makes its masking matter.
PATH_CASES = [
    (RowConfig("single", 256, 4, block_m=4), (7, 129), "single tile, several rows a program, "
     "masked rows (7 % 4) and columns (129 < 256)"),
    (RowConfig("single", 1, 1, block_m=1), (5, 1), "single column"),
    (RowConfig("single", 16384, 16), (3, 9000), "single tile of 16384 columns: the backward "
     "re-reads y and dy after its reduction (RELOAD)"),
    (RowConfig("multi", 32, 4), (6, 129), "multi tile: 5 tiles, last one 1 column"),
    (RowConfig("multi", 64, 4), (3, 64), "multi tile, exactly one full tile"),
    (RowConfig("multi", 32, 4, n_programs=3), (7, 129), "multi tile, persistent: 3 programs "
     "loop over 7 rows (rows 0, 3, 6 / 1, 4 / 2, 5)"),
    (RowConfig("multi", 32, 4, num_stages=2), (5, 129), "multi tile, sweeps pipelined 2 deep"),
    (RowConfig("multi", 32, 4, n_programs=2, num_stages=3), (5, 100), "multi tile, persistent "
     "and pipelined 3 deep"),
    (RowConfig("split", 16, 4, n_splits=3), (4, 100), "split: 3 chunks of 48 columns, last short"),
    (RowConfig("split", 16, 4, n_splits=8), (2, 40), "split with empty trailing chunks"),
]


def _fwd_bwd_check(x, x64, dy, dy64, dim, log, dtype, config):
    ref_fwd, ref_grad, _ = OPS[log]
    y = softmax_fwd(x, dim, log=log, config=config)
    y_ref = ref_fwd(x64, dim)
    assert_close_to_reference(y, y_ref, dtype, "y")
    dx = softmax_bwd(y, dy, dim, log=log, dtype=x.dtype, config=config)
    # The reference gradient from the *rounded* output the kernel saw, so that only the backward's
    # own error is measured.
    assert_close_to_reference(dx, ref_grad(to_numpy64(y), dy64, dim), dtype, "dx")


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "config,shape,why", PATH_CASES, ids=[c[2].split(":")[0] for c in PATH_CASES]
)
def test_softmax_every_path_matches_reference(config, shape, why, dtype, log, device, rng):
    x, x64 = make_input(shape, dtype, rng, scale=3.0, device=device)
    dy, dy64 = make_input(shape, dtype, rng, device=device)
    with record_launches() as launches:
        _fwd_bwd_check(x, x64, dy, dy64, -1, log, dtype, config)
    assert {launch.path for launch in launches} == {config.path}, why
    expected = (["softmax_split_stats_kernel", "softmax_split_fwd_kernel",
                 "softmax_split_dot_kernel", "softmax_split_bwd_kernel"]
                if config.path == "split" else ["softmax_fwd_kernel", "softmax_bwd_kernel"])
    assert [launch.kernel for launch in launches] == expected
    # The record holds the constexprs the kernels really ran with (launched via _runtime.launch).
    for launch in launches:
        if launch.kernel != "softmax_split_stats_kernel":
            assert launch.meta["IS_LOG"] == log
        if config.path != "split":
            assert launch.meta["PERSISTENT"] == (config.n_programs > 0)
            assert launch.meta["SINGLE_TILE"] == (config.path == "single")
            assert launch.meta["NUM_STAGES"] == config.num_stages
        if launch.kernel == "softmax_bwd_kernel":
            assert launch.meta["RELOAD"] == (config.block_n == 16384)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize(
    "n_cols,why",
    [(1, "one column"), (7, "odd"), (129, "one past a power of two"), (4097, "odd, > 4096"),
     (32000, "an LM vocabulary; multi tile or split on CPU's SM count")],
)
def test_softmax_odd_sizes_default_config(n_cols, why, log, device, rng):
    x, x64 = make_input((3, n_cols), torch.float32, rng, scale=2.0, device=device)
    dy, dy64 = make_input((3, n_cols), torch.float32, rng, device=device)
    _fwd_bwd_check(x, x64, dy, dy64, -1, log, torch.float32, None)


def test_softmax_persistent_grid_launches_n_programs(device, rng):
    x, x64 = make_input((7, 100), torch.float32, rng, device=device)
    for n_programs, expected in ((3, 3), (50, 7)):
        cfg = RowConfig("multi", 32, 4, n_programs=n_programs)
        with record_launches() as launches:
            y = softmax_fwd(x, config=cfg)
            softmax_bwd(y, y, config=cfg)
        assert [launch.grid for launch in launches] == [(expected,), (expected,)]
        assert_close_to_reference(y, reference.softmax(x64), torch.float32)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_default_long_rows_run_persistent(log, device, rng, monkeypatch):
    """The default multi path becomes a persistent grid when one program per row would keep more
    rows in flight than L2 holds (tiling's model). Shrink the modelled L2 so the small CPU
    shapes hit that branch: forward (x re-read) and backward (y and dy re-read)."""
    from probact_gpu.ops import softmax as softmax_ops

    monkeypatch.setattr(softmax_ops, "sm_count", lambda device: 4)  # as on CPU, also on a GPU
    monkeypatch.setattr(tiling, "L2_BYTES", 2 * 4 * 3 * 20000 * 4)  # 3 fp32 rows a SM fit
    x, x64 = make_input((40, 20000), torch.float32, rng, scale=2.0, device=device)
    dy, dy64 = make_input((40, 20000), torch.float32, rng, device=device)
    xr = x.clone().requires_grad_()
    fn = pg.log_softmax if log else pg.softmax
    with record_launches() as launches:
        y = fn(xr, -1)
        y.backward(dy)
    fwd, bwd = launches
    assert fwd.kernel == "softmax_fwd_kernel" and fwd.meta["PERSISTENT"]
    assert bwd.kernel == "softmax_bwd_kernel" and bwd.meta["PERSISTENT"]
    assert fwd.grid == (3 * 4,)  # 3 rows of x a SM
    assert bwd.grid == (1 * 4,)  # rows of y and dy: 1.5 a SM fit, so one
    ref_fwd, ref_grad, _ = OPS[log]
    assert_close_to_reference(y, ref_fwd(x64), torch.float32, "y")
    assert_close_to_reference(xr.grad, ref_grad(to_numpy64(y), dy64), torch.float32, "dx")


def test_tiling_reaches_each_path_by_default():
    """The default heuristics pick each path for the shapes they were written for (132 SMs)."""
    assert tiling.choose_row_config(4096, 1024, 2, 132).path == "single"
    assert tiling.choose_row_config(4096, 262144, 2, 132).path == "multi"
    assert tiling.choose_row_config(8, 262144, 2, 132).path == "split"
    assert tiling.choose_row_config(8, 262144, 2, 132).n_splits > 1


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize(
    "shape,dim,why",
    [((4, 5, 6), 1, "middle dim: rows strided by 6"), ((4, 5, 6), 0, "first dim"),
     ((4, 5, 6), -3, "negative dim"), ((9,), 0, "1-d"), ((2, 3, 4, 5), 2, "4-d, inner dims merge")],
)
def test_softmax_any_dim(shape, dim, why, log, device, rng):
    x, x64 = make_input(shape, torch.float32, rng, device=device)
    dy, dy64 = make_input(shape, torch.float32, rng, device=device)
    for config in (None, RowConfig("multi", 2, 1)):
        _fwd_bwd_check(x, x64, dy, dy64, dim, log, torch.float32, config)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_strided_views_without_copy(log, device, rng):
    base, base64 = make_input((8, 40), torch.float32, rng, device=device)
    views = {
        "transposed": (base.t(), base64.T),
        "column slice": (base[:, 3:30], base64[:, 3:30]),
        "every other column": (base[:, ::2], base64[:, ::2]),
        "every other row": (base[::2], base64[::2]),
    }
    for _name, (x, x64) in views.items():
        dy, dy64 = make_input(tuple(x.shape), torch.float32, rng, device=device)
        for config in (None, RowConfig("multi", 8, 1), RowConfig("split", 4, 1, n_splits=3)):
            _fwd_bwd_check(x, x64, dy.t().contiguous().t(), dy64, -1, log, torch.float32, config)


def test_softmax_permuted_input_is_copied_not_misread(device, rng):
    """Dims around `dim` that cannot merge into one stride fall back to a contiguous copy."""
    x, x64 = make_input((3, 4, 5), torch.float32, rng, device=device)
    xp, xp64 = x.permute(2, 0, 1), np.transpose(x64, (2, 0, 1))  # dims 0 and 2 do not merge
    assert_close_to_reference(pg.softmax(xp, 1), reference.softmax(xp64, 1), torch.float32)


def test_softmax_public_api_autograd(device, rng):
    for log in (False, True):
        ref_fwd, ref_grad, _ = OPS[log]
        fn = pg.log_softmax if log else pg.softmax
        x, x64 = make_input((5, 33), torch.bfloat16, rng, device=device)
        dy, dy64 = make_input((5, 33), torch.bfloat16, rng, device=device)
        xr = x.clone().requires_grad_()
        y = fn(xr, dim=-1)
        y.backward(dy)
        assert y.dtype == torch.bfloat16 and xr.grad.dtype == torch.bfloat16
        assert_close_to_reference(y, ref_fwd(x64), torch.bfloat16)
        assert_close_to_reference(xr.grad, ref_grad(to_numpy64(y), dy64), torch.bfloat16)


def test_softmax_dtype_argument(device, rng):
    x, x64 = make_input((4, 50), torch.bfloat16, rng, device=device)
    y = pg.softmax(x.clone().requires_grad_(), dim=1, dtype=torch.float32)
    assert y.dtype == torch.float32
    assert_close_to_reference(y, reference.softmax(x64), torch.float32)
    xr = x.clone().requires_grad_()
    pg.log_softmax(xr, 1, dtype=torch.float32).sum().backward()
    assert xr.grad.dtype == torch.bfloat16
    ints = torch.arange(6, device=device).reshape(2, 3)
    assert_close_to_reference(pg.softmax(ints, 1, dtype=torch.float64),
                              reference.softmax(to_numpy64(ints), 1), torch.float64)


def test_softmax_implicit_dim_as_torch(device, rng):
    for shape in ((5,), (2, 3, 4), (2, 3), (2, 3, 4, 5)):
        x = torch.randn(shape, device=device)
        with pytest.warns(UserWarning, match="Implicit dimension choice for softmax"):
            ours = pg.softmax(x, None)
        with pytest.warns(UserWarning, match="Implicit dimension choice"):
            theirs = torch.nn.functional.softmax(x, None)
        torch.testing.assert_close(ours, theirs)
        with pytest.warns(UserWarning, match="log_softmax"):
            torch.testing.assert_close(pg.log_softmax(x, dim=None),
                                       torch.log_softmax(x, 0 if x.ndim in (0, 1, 3) else 1))


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_gradcheck_float64(log, device):
    fn = pg.log_softmax if log else pg.softmax
    x = torch.randn(3, 7, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fn(t, 1), (x,))
    x2 = torch.randn(4, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fn(t, 1), (x2,))


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_second_derivatives(log, device):
    """create_graph=True: the backward op has its own autograd formula (it used to raise 'no
    autograd formula was registered'); gradgradcheck in float64 and torch's Hessian-vector."""
    fn = pg.log_softmax if log else pg.softmax
    x = torch.randn(3, 7, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: fn(t, 1), (x,))
    x2 = torch.randn(4, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: fn(t, 1), (x2,))
    weights = torch.randn(3, 7, dtype=torch.float64, device=device)
    xe = x.detach().clone().requires_grad_()
    ref = torch.log_softmax if log else torch.softmax
    (ours,) = torch.autograd.grad((fn(x, 1) * weights).sum(), x, create_graph=True)
    (theirs,) = torch.autograd.grad((ref(xe, 1) * weights).sum(), xe, create_graph=True)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours.pow(2).sum(), x)[0],
                               torch.autograd.grad(theirs.pow(2).sum(), xe)[0])


def test_softmax_retained_graph_ignores_mutated_gradient(device, rng):
    """Each backward returns a new tensor: mutating one cannot reach a later backward."""
    x, _ = make_input((4, 40), torch.float32, rng, device=device)
    xr = x.clone().requires_grad_()
    out = (pg.softmax(xr, -1) * torch.arange(40.0, device=device)).sum()
    (first,) = torch.autograd.grad(out, xr, retain_graph=True)
    expected = first.clone()
    first.fill_(7.0)
    (second,) = torch.autograd.grad(out, xr)
    torch.testing.assert_close(second, expected)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_softmax_rows_sum_to_one_and_log_is_nonpositive(dtype, device, rng):
    x, _ = make_input((6, 300), dtype, rng, scale=5.0, device=device)
    for config in (None, RowConfig("multi", 64, 4), RowConfig("split", 64, 4, n_splits=3)):
        y = softmax_fwd(x, log=False, config=config).double()
        atol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
        ones = torch.ones(6, dtype=torch.float64, device=device)
        assert torch.allclose(y.sum(-1), ones, atol=atol)
        assert (y >= 0).all()
        assert (softmax_fwd(x, log=True, config=config) <= 0).all()


def test_softmax_shift_invariant(device, rng):
    x, _ = make_input((4, 257), torch.float32, rng, device=device)
    for config in (None, RowConfig("multi", 32, 4), RowConfig("split", 32, 4, n_splits=4)):
        a = softmax_fwd(x, config=config)
        b = softmax_fwd(x + 100.0, config=config)
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_large_logits_finite(dtype, log, device, rng):
    x, x64 = make_input((4, 200), torch.float32, rng, device=device)
    x = (x.sign() * 1e4 + x).to(dtype)  # ±1e4 with a spread
    for config in (None, RowConfig("multi", 32, 4), RowConfig("split", 32, 4, n_splits=3)):
        y = softmax_fwd(x, log=log, config=config)
        assert torch.isfinite(y).all()
        assert_close_to_reference(y, OPS[log][0](to_numpy64(x)), dtype)


@pytest.mark.parametrize("config", [None, RowConfig("multi", 2, 1),
                                    RowConfig("split", 2, 1, n_splits=2)], ids=str)
def test_softmax_edge_values_match_torch(config, device):
    inf, nan = math.inf, math.nan
    x = torch.tensor([
        [1000.0, 1000.0, -inf, -inf],    # equal logits → exactly 0.5; −inf → exactly 0
        [-inf, -inf, -inf, -inf],        # all −inf: torch gives NaN
        [-inf, -inf, 2.0, -inf],         # one finite entry: one-hot
        [1.0, nan, 2.0, 3.0],            # NaN propagates to the row
        [inf, 1.0, 2.0, 3.0],            # +inf: torch gives NaN
        [-1e4, 1e4, 0.0, 1e4],
    ], device=device)
    for log in (False, True):
        ours = softmax_fwd(x, log=log, config=config)
        theirs = torch.log_softmax(x, -1) if log else torch.softmax(x, -1)
        torch.testing.assert_close(ours, theirs, equal_nan=True)
    y = softmax_fwd(x, config=config)
    assert y[0].tolist() == [0.5, 0.5, 0.0, 0.0]
    assert y[2].tolist() == [0.0, 0.0, 1.0, 0.0]


def test_softmax_empty_and_0d(device):
    for shape, dim in [((0, 5), 1), ((5, 0), 1), ((3, 0, 2), 0), ((0,), 0)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        y = pg.softmax(x, dim)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
    scalar = torch.tensor(3.0, device=device, requires_grad=True)
    y = pg.softmax(scalar, 0)
    assert y.shape == () and y.item() == 1.0
    assert pg.log_softmax(scalar, -1).item() == 0.0
    y.backward()
    assert scalar.grad.item() == 0.0


def test_softmax_poisoned_output_is_fully_written(device, rng):
    """Outputs start as NaN under poison_outputs (every test runs so, via conftest): a kernel
    that skips an element leaves a NaN there. Prove the poison is really on."""
    from probact_gpu._runtime import empty

    assert torch.isnan(empty((3,), torch.float32, device)).all()
    x, x64 = make_input((5, 77), torch.float32, rng, device=device)
    for config in (RowConfig("single", 128, 4, block_m=2), RowConfig("multi", 16, 1),
                   RowConfig("split", 16, 1, n_splits=3)):
        y = softmax_fwd(x, config=config)
        assert not torch.isnan(y).any(), config
        assert_close_to_reference(y, reference.softmax(x64), torch.float32)


# --------------------------------------------------------------------------- bad input


def test_softmax_rejects_bad_input(device):
    with pytest.raises(TypeError, match="dtype=torch.int64"):
        pg.softmax(torch.arange(4, device=device))
    with pytest.raises(IndexError, match="dim=2"):
        pg.softmax(torch.randn(3, 4, device=device), dim=2)
    with pytest.raises(IndexError, match="dim=-3"):
        pg.log_softmax(torch.randn(3, 4, device=device), dim=-3)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        pg.softmax([1.0, 2.0])
    with pytest.raises(ValueError, match="block_n=16 is smaller than the row"):
        softmax_fwd(torch.randn(2, 40, device=device), config=RowConfig("single", 16, 4))
    with pytest.raises(ValueError, match="grad_output has shape"):
        softmax_bwd(torch.rand(2, 3, device=device), torch.rand(3, 2, device=device))
    with pytest.raises(ValueError, match="path must be one of"):
        RowConfig("fast", 16, 4)
    with pytest.raises(ValueError, match="n_splits=2 only applies"):
        RowConfig("multi", 16, 4, n_splits=2)


def test_cpu_without_interpreter_raises_clear_error(monkeypatch):
    from probact_gpu import _runtime

    monkeypatch.setattr(_runtime, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _runtime.check_runnable(torch.zeros(2))


def test_modules(device, rng):
    x, x64 = make_input((3, 10), torch.float32, rng, device=device)
    assert_close_to_reference(pg.Softmax(dim=0)(x), reference.softmax(x64, 0), torch.float32)
    assert_close_to_reference(pg.LogSoftmax()(x), reference.log_softmax(x64), torch.float32)
    assert "dim=0" in repr(pg.Softmax(dim=0))


# --------------------------------------------------------------------------- GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape", [(4096, 1024), (64, 131072), (8, 262144), (2, 1 << 20),
                                   (32, 65536)], ids=str)
def test_softmax_large_shapes_gpu(shape, log, device, rng):
    for dtype in (torch.bfloat16, torch.float32):
        x, x64 = make_input(shape, dtype, rng, device=device)
        dy, dy64 = make_input(shape, dtype, rng, device=device)
        _fwd_bwd_check(x, x64, dy, dy64, -1, log, dtype, None)


@pytest.mark.gpu
def test_softmax_over_2_pow_31_elements_gpu(device):
    """int64 offsets: rows × cols > 2^31. Check the last rows against torch in float32."""
    n_rows, n_cols = 16400, 131072  # 2.15e9 elements, 4.3 GB in bf16
    x = torch.randn(n_rows, n_cols, device=device, dtype=torch.bfloat16)
    y = pg.softmax(x)
    tail = torch.softmax(x[-3:].float(), -1)
    torch.testing.assert_close(y[-3:].float(), tail, atol=8e-3, rtol=2e-2)
    del y
    for config in (RowConfig("multi", 8192, 16), RowConfig("split", 8192, 16, n_splits=4)):
        y = softmax_fwd(x, config=config)
        torch.testing.assert_close(y[-3:].float(), tail, atol=8e-3, rtol=2e-2)
        del y


@pytest.mark.gpu
def test_softmax_torch_compile_fullgraph_gpu(device):
    def f(x):
        return pg.log_softmax(x * 2.0, -1).sum() + pg.softmax(x, 0).square().sum()

    compiled = torch.compile(f, fullgraph=True)
    x = torch.randn(64, 1000, device=device, requires_grad=True)
    out = compiled(x)
    out.backward()
    x2 = x.detach().clone().requires_grad_()
    ref = f(x2)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.gpu
def test_softmax_cuda_graph_capture_gpu(device):
    x = torch.randn(256, 5000, device=device)
    dy = torch.randn_like(x)
    static_y = softmax_fwd(x)  # warm-up: compile kernels outside capture
    softmax_bwd(static_y, dy)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = softmax_fwd(x)
        static_dx = softmax_bwd(static_y, dy)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(static_y, torch.softmax(x, -1))
    y = torch.softmax(x, -1)
    torch.testing.assert_close(static_dx, y * (dy - (dy * y).sum(-1, keepdim=True)))


def test_softmax_fp64_tiny_probabilities_to_a_few_ulps(device):
    """fp64 exponentials are ``tl.exp`` (kernels/_online.exp): exp2(x · log2 e) rounds the product
    with an absolute error ~|x| · 1e-16 in the exponent, ~18 ulps of e^−345 (the check's fp64
    4×257 row at ±1e4 logits was 18 ulps where torch is exact)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.zeros(1, dtype=torch.float64),
                   -torch.empty(63, dtype=torch.float64).uniform_(300.0, 350.0, generator=gen)])
    x = x.reshape(1, -1).to(device)
    expected = reference.softmax(to_numpy64(x))
    rel = np.abs(to_numpy64(pg.softmax(x, -1)) - expected) / expected
    assert rel.max() < 4 * torch.finfo(torch.float64).eps, rel.max()


def test_log_softmax_bwd_row_dot_rounds_once(device):
    """dx = dy − p · Σ dy: Σ dy is summed in fp64 and rounded once, so the largest dx (p ≈ 1,
    dx ≈ dy − Σ dy) carries no sum error; an fp32 tree sum over 257 columns was 3 ulps off and
    made the check's log_softmax fp32 4×257 row at ±1e4 logits worse than torch (this is that
    row, with the check's own inputs)."""
    case = next(c for c in check.collect(False, ("log_softmax",))
                if c.dtype == torch.float32 and c.shape == "4x257")
    rng = np.random.default_rng([0, zlib.crc32(b"log_softmax|fp32|4x257|1")])
    rows = [r for r in case.run(device, rng) if r.op == "log_softmax bwd"]
    assert rows and not any(r.worse_than_torch for r in rows), rows
