"""sigmoid / logsigmoid: values and gradients against NumPy float64 in every dtype, the tiling
forced and asserted, saturation and special values, layouts, autograd, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as torch_F

import probact_gpu as pg
from probact_gpu import reference
from probact_gpu.ops.sigmoid import sigmoid_bwd, sigmoid_fwd
from probact_gpu.testing import assert_close_to_reference, make_input, record_launches, to_numpy64
from probact_gpu.tiling import ElementwiseConfig

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
OPS = {
    False: (pg.sigmoid, torch.sigmoid, reference.sigmoid),
    True: (pg.logsigmoid, torch_F.logsigmoid, reference.logsigmoid),
}
IDS = {False: "sigmoid", True: "logsigmoid"}


def _ref_grad(log, x64, y, dy64):
    """logsigmoid: dy·σ(−x) from the input. sigmoid: dy·y·(1 − y) on the *rounded* output the
    backward is given (torch's definition too), so only the backward's own error is measured."""
    if log:
        return reference.logsigmoid_grad(x64, dy64)
    y64 = to_numpy64(y)
    return dy64 * y64 * (1.0 - y64)


@pytest.mark.parametrize("log", [False, True], ids=IDS.get)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,why",
    [((), "0-d"), ((1,), "one element"), ((7,), "odd, one masked program"),
     ((129,), "one past a power of two"), ((4097,), "odd, > 4096: last program 1 element"),
     ((3, 5, 7), "N-d")],
)
def test_sigmoid_matches_reference_fwd_bwd(shape, why, dtype, log, device, rng):
    ours, _, ref = OPS[log]
    x, x64 = make_input(shape, dtype, rng, scale=4.0, device=device)
    dy, dy64 = make_input(shape, dtype, rng, device=device)
    xr = x.clone().requires_grad_()
    y = ours(xr)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert_close_to_reference(y, ref(x64), dtype, "y")
    y.backward(dy)
    assert xr.grad.dtype == dtype
    assert_close_to_reference(xr.grad, _ref_grad(log, x64, y, dy64), dtype, "dx")


@pytest.mark.parametrize("log", [False, True], ids=IDS.get)
@pytest.mark.parametrize(
    "config,numel,why",
    [(ElementwiseConfig(16, 1), 129, "9 programs, last holds 1 element"),
     (ElementwiseConfig(64, 2), 64, "exactly one full program"),
     (ElementwiseConfig(256, 4), 5, "one program, mostly masked")],
)
def test_sigmoid_forced_config_launches_as_asked(config, numel, why, log, device, rng):
    x, x64 = make_input((numel,), torch.float32, rng, scale=3.0, device=device)
    dy, dy64 = make_input((numel,), torch.float32, rng, device=device)
    with record_launches() as launches:
        y = sigmoid_fwd(x, log=log, config=config)
        dx = sigmoid_bwd(x if log else y, dy, log=log, config=config)
    n_programs = -(-numel // config.block)
    assert [(lc.kernel, lc.path, lc.grid) for lc in launches] == [
        ("sigmoid_fwd_kernel", "elementwise", (n_programs,)),
        ("sigmoid_bwd_kernel", "elementwise", (n_programs,)),
    ], why
    assert all(lc.meta["BLOCK"] == config.block and lc.meta["IS_LOG"] == log for lc in launches)
    assert_close_to_reference(y, OPS[log][2](x64), torch.float32, "y")
    assert_close_to_reference(dx, _ref_grad(log, x64, y, dy64), torch.float32, "dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sigmoid_saturates_exactly_without_nan(dtype, device):
    x = torch.tensor([1000.0, -1000.0, 1e4, -1e4, 88.0, -88.0], dtype=dtype, device=device)
    y = pg.sigmoid(x)
    assert y.tolist()[:4] == [1.0, 0.0, 1.0, 0.0]
    assert not torch.isnan(y).any()
    ls = pg.logsigmoid(x)
    # log σ(x) = x exactly for very negative x (−1e4 itself rounds to −9984 in bf16).
    assert ls[1].item() == -1000.0 and ls[3].item() == x[3].item() and ls[0].item() == 0.0
    # The gradients saturate to 0 (sigmoid) and to 1 / 0 (logsigmoid), never NaN.
    xr = x.clone().requires_grad_()
    pg.sigmoid(xr).sum().backward()
    assert xr.grad.tolist()[:4] == [0.0, 0.0, 0.0, 0.0]
    xr.grad = None
    pg.logsigmoid(xr).sum().backward()
    assert xr.grad.tolist()[:4] == [0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("log", [False, True], ids=IDS.get)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sigmoid_special_values_as_torch(log, dtype, device):
    ours, theirs, ref = OPS[log]
    x = torch.tensor([np.inf, -np.inf, np.nan, 0.0, -0.0, 20.0, -20.0, 1e-30],
                     dtype=dtype, device=device)
    y = ours(x)
    # ±inf, NaN and ±0 exactly as torch; the finite tail against the float64 reference.
    torch.testing.assert_close(y[:5], theirs(x)[:5], equal_nan=True, atol=0, rtol=0)
    assert_close_to_reference(y, ref(to_numpy64(x)), dtype)
    # Gradients at ±inf and NaN as torch's: 0 / 1 and NaN propagated.
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(xa).backward(torch.ones_like(x))
    theirs(xb).backward(torch.ones_like(x))
    torch.testing.assert_close(xa.grad[:3], xb.grad[:3], equal_nan=True, atol=0, rtol=0)


def test_logsigmoid_small_tail_has_relative_accuracy(device):
    """log σ(x) ≈ −exp(−x) for large x: log1p, not log(1 + e), keeps it relatively exact."""
    x = torch.tensor([20.0, 30.0, 60.0], dtype=torch.float32, device=device)
    expected = reference.logsigmoid(to_numpy64(x))
    got = to_numpy64(pg.logsigmoid(x))
    assert np.all(np.abs(got - expected) <= 1e-6 * np.abs(expected))


@pytest.mark.parametrize("log", [False, True], ids=IDS.get)
def test_sigmoid_non_contiguous_input(log, device, rng):
    ours, _, ref = OPS[log]
    base, base64 = make_input((9, 33), torch.float32, rng, scale=3.0, device=device)
    for view, view64, why in [(base.t(), base64.T, "transposed"),
                              (base[:, ::3], base64[:, ::3], "column stride 3"),
                              (base[2:5], base64[2:5], "row slice (contiguous, offset)")]:
        xr = view.detach().requires_grad_()
        y = ours(xr)
        assert y.shape == view.shape and y.is_contiguous(), why
        assert_close_to_reference(y, ref(view64), torch.float32, why)
        dy_t, _ = make_input(tuple(view.shape)[::-1], torch.float32, rng, device=device)
        dy = dy_t.t()  # a transposed grad_output too
        y.backward(dy)
        assert_close_to_reference(xr.grad, _ref_grad(log, view64, y, to_numpy64(dy)),
                                  torch.float32, why)


@pytest.mark.parametrize("log", [False, True], ids=IDS.get)
def test_sigmoid_empty_and_0d(log, device):
    ours = OPS[log][0]
    for shape in [(0,), (3, 0), (0, 4, 2)]:
        x = torch.empty(shape, device=device, requires_grad=True)
        with record_launches() as launches:
            y = ours(x)
            y.sum().backward()
        assert y.shape == shape and x.grad.shape == shape
        assert launches == []  # nothing to launch
    x = torch.tensor(0.5, device=device, requires_grad=True)
    y = ours(x)
    assert y.shape == ()
    y.backward()
    expected = 1.0 / (1.0 + np.exp(0.5)) if log else np.exp(-0.5) / (1.0 + np.exp(-0.5)) ** 2
    assert abs(x.grad.item() - expected) < 1e-6


@pytest.mark.parametrize("log", [False, True], ids=IDS.get)
def test_sigmoid_gradcheck_float64(log, device):
    x = torch.linspace(-6, 6, 15, dtype=torch.float64, device=device).reshape(3, 5)
    x.requires_grad_()
    assert torch.autograd.gradcheck(OPS[log][0], (x,))


@pytest.mark.parametrize("log", [False, True], ids=IDS.get)
def test_sigmoid_second_derivatives(log, device):
    """create_graph=True: the backward op has its own autograd formula (it used to raise 'no
    autograd formula was registered'); gradgradcheck in float64 and torch's Hessian-vector."""
    ours_fn, torch_fn, _ = OPS[log]
    x = torch.linspace(-6, 6, 13, dtype=torch.float64, device=device).requires_grad_()
    assert torch.autograd.gradgradcheck(ours_fn, (x,))
    xe = x.detach().clone().requires_grad_()
    (ours,) = torch.autograd.grad(ours_fn(x).sum(), x, create_graph=True)
    (theirs,) = torch.autograd.grad(torch_fn(xe).sum(), xe, create_graph=True)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours.pow(2).sum(), x)[0],
                               torch.autograd.grad(theirs.pow(2).sum(), xe)[0])


def test_sigmoid_does_not_touch_its_input(device, rng):
    x, _ = make_input((33,), torch.float32, rng, device=device)
    before = x.clone()
    pg.sigmoid(x)
    pg.logsigmoid(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_sigmoid_rejects_integer_input(dtype, device):
    x = torch.zeros(3, dtype=dtype, device=device)
    for fn in (pg.sigmoid, pg.logsigmoid):
        with pytest.raises(TypeError, match=str(dtype)):
            fn(x)
    with pytest.raises(TypeError, match="torch.Tensor"):
        pg.sigmoid([1.0, 2.0])


def test_sigmoid_bwd_rejects_mismatched_grad(device):
    with pytest.raises(ValueError, match="grad_output"):
        sigmoid_bwd(torch.zeros(3, device=device), torch.zeros(4, device=device))


def test_sigmoid_modules(device, rng):
    x, x64 = make_input((4, 9), torch.float32, rng, device=device)
    assert_close_to_reference(pg.Sigmoid()(x), reference.sigmoid(x64), torch.float32)
    assert_close_to_reference(pg.LogSigmoid()(x), reference.logsigmoid(x64), torch.float32)


def test_sigmoid_torch_compile_fullgraph_traces(device, rng):
    """fullgraph tracing through the fake kernels (aot_eager: runs on CPU too)."""
    def f(x):
        return pg.sigmoid(x) * 2 + pg.logsigmoid(x)

    x, x64 = make_input((4, 33), torch.float32, rng, device=device)
    xr = x.clone().requires_grad_()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(xr)
    out.sum().backward()
    assert_close_to_reference(out, 2 * reference.sigmoid(x64) + reference.logsigmoid(x64),
                              torch.float32)
    ones = np.ones_like(x64)
    grad_ref = 2 * reference.sigmoid_grad(x64, ones) + reference.logsigmoid_grad(x64, ones)
    assert_close_to_reference(xr.grad, grad_ref, torch.float32)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("log", [False, True], ids=IDS.get)
def test_sigmoid_2_pow_28_bf16_gpu(log, device):
    """The bench shape: 2^28 bf16 elements, checked against float64 on a strided sample."""
    ours, _, ref = OPS[log]
    gen = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(1 << 28, device=device, generator=gen) * 4).to(torch.bfloat16)
    xr = x.requires_grad_()
    y = ours(xr)
    y.backward(torch.ones_like(y))
    sample = slice(0, 1 << 28, 4099)
    x64 = to_numpy64(x[sample])
    assert_close_to_reference(y[sample], ref(x64), torch.bfloat16, "y")
    assert_close_to_reference(xr.grad[sample], _ref_grad(log, x64, y[sample], np.ones_like(x64)),
                              torch.bfloat16, "dx")
    # The very last element (int64 offsets, the last program) too.
    assert_close_to_reference(y[-1:], ref(to_numpy64(x[-1:])), torch.bfloat16, "y[-1]")


@pytest.mark.gpu
def test_sigmoid_torch_compile_fullgraph_gpu(device, rng):
    def f(x):
        return pg.sigmoid(x) * 2 + pg.logsigmoid(x)

    x, _ = make_input((64, 129), torch.float32, rng, device=device)
    x.requires_grad_()
    out = torch.compile(f, fullgraph=True)(x)
    out.sum().backward()
    xe = x.detach().clone().requires_grad_()
    (torch.sigmoid(xe) * 2 + torch_F.logsigmoid(xe)).sum().backward()
    torch.testing.assert_close(out, f(x))
    torch.testing.assert_close(x.grad, xe.grad)


@pytest.mark.gpu
def test_sigmoid_cuda_graph_capture_gpu(device, rng):
    x, _ = make_input((4097,), torch.float32, rng, device=device)
    pg.sigmoid(x)  # warm-up compiles the kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = pg.sigmoid(x)
    x.copy_(x * 2)
    graph.replay()
    torch.testing.assert_close(y, torch.sigmoid(x))
