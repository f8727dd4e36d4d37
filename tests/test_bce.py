"""binary_cross_entropy_with_logits: loss and input gradient against NumPy float64 for every
option alone and together and every dtype; both gradient paths reached and asserted; broadcast
operands addressed without materialisation; extreme logits; determinism; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as torch_F
from torch.utils._python_dispatch import TorchDispatchMode

import probact_gpu as pg
from probact_gpu import reference
from probact_gpu._runtime import sm_count
from probact_gpu.ops.bce import (
    bce_bwd,
    bce_fwd,
    bce_regrad_,
    bce_scale_grad_,
    broadcast_terms,
)
from probact_gpu.testing import (
    assert_close_to_reference,
    errors,
    make_bce_inputs,
    make_input,
    record_launches,
    to_numpy64,
)
from probact_gpu.tiling import ElementwiseConfig

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
REDUCTIONS = ["mean", "sum", "none"]


def _np(t):
    return None if t is None else to_numpy64(t)


def _check(x, t, w, pw, reduction, dy, loss, grad, dtype):
    """Compare a loss (stored in ``dtype``) and a gradient with the float64 reference."""
    kw = {"weight": _np(w), "pos_weight": _np(pw), "reduction": reduction}
    loss_ref = reference.bce_with_logits(to_numpy64(x), to_numpy64(t), **kw)
    # Rounded to the loss dtype, so a sum beyond fp16's range is expected as inf.
    loss_ref = to_numpy64(torch.from_numpy(np.array(loss_ref)).to(dtype))
    assert_close_to_reference(loss, loss_ref, dtype, "loss")
    if grad is not None:
        grad_ref = reference.bce_with_logits_grad(to_numpy64(x), to_numpy64(t), to_numpy64(dy),
                                                  **kw)
        assert_close_to_reference(grad, grad_ref, dtype, "dx")


def _run(x, t, w, pw, reduction, dy):
    xr = x.clone().requires_grad_()
    loss = pg.binary_cross_entropy_with_logits(xr, t, w, reduction=reduction, pos_weight=pw)
    loss.backward(dy)
    return loss.detach(), xr.grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,options,why",
    [((1,), "", "one element"),
     ((7,), "s", "odd, soft targets"),
     ((3, 129), "w", "per-class weight"),
     ((129, 3), "r", "per-row weight (N, 1)"),
     ((5, 33), "p", "pos_weight"),
     ((4097,), "sp", "odd, > 4096: several programs"),
     ((2, 5, 7), "wps", "every option together, 3-d"),
     ((6, 9), "rps", "per-row weight with pos_weight")],
)
def test_bce_matches_reference(shape, options, why, dtype, reduction, device, rng):
    x, t, w, pw = make_bce_inputs(shape, dtype, rng, device, options=options)
    out_shape = shape if reduction == "none" else ()
    dy, _ = make_input(out_shape, dtype, rng, device=device)  # non-uniform for 'none'
    loss, grad = _run(x, t, w, pw, reduction, dy)
    assert loss.shape == out_shape and loss.dtype == t.dtype and grad.dtype == x.dtype
    _check(x, t, w, pw, reduction, dy, loss, grad, dtype)


# --------------------------------------------------------------------------- gradient paths


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce_in_forward_gradient_path(reduction, device, rng):
    """sum / mean with an input that needs a gradient: the forward kernel writes dx, backward
    keeps it for grad_output 1 and recomputes it for any other (read on the device), on a grid
    of about one program per SM."""
    x, t, w, pw = make_bce_inputs((9, 37), torch.float32, rng, device, options="wps")
    config = ElementwiseConfig(64, 2)
    for scale in (1.0, 2.5):  # 1.0: the plain loss.backward(); 2.5: the kernel must recompute
        xr = x.clone().requires_grad_()
        with record_launches() as launches:
            loss, dx = bce_fwd(xr.detach(), t, w, pw, reduction=reduction, compute_grad=True,
                               config=config)
            bce_regrad_(dx, torch.tensor(scale, device=device), x, t, w, pw,
                        reduction=reduction, config=config)
        assert [(lc.kernel, lc.path) for lc in launches] == [
            ("bce_fwd_kernel", "fused_grad"), ("bce_finish_kernel", "fused_grad"),
            ("bce_bwd_kernel", "fused_grad")]
        assert launches[0].grid == (-(-9 * 37 // 64),)
        # The regrad: one program per SM, no more than the 6 blocks of 64 (4 SMs on CPU: loops).
        assert launches[2].grid == (min(sm_count(device), 6),)
        assert launches[2].meta["UNLESS_ONE"]
        dy = torch.tensor(scale, dtype=torch.float32, device=device)
        _check(x, t, w, pw, reduction, dy, loss, dx, torch.float32)
    # Through the public API and autograd: the same kernels.
    xr = x.clone().requires_grad_()
    with record_launches() as launches:
        loss = pg.binary_cross_entropy_with_logits(xr, t, w, reduction=reduction, pos_weight=pw)
        (loss * 3.0).backward()
    kernels = [lc.kernel for lc in launches]
    assert kernels == ["bce_fwd_kernel", "bce_finish_kernel", "bce_bwd_kernel"]
    _check(x, t, w, pw, reduction, torch.tensor(3.0, device=device), loss.detach(), xr.grad,
           torch.float32)


def test_bce_scale_grad_is_identity_at_one_and_scales_otherwise(device, rng):
    dx, _ = make_input((100,), torch.float32, rng, device=device)
    before = dx.clone()
    bce_scale_grad_(dx, torch.tensor(1.0, device=device), config=ElementwiseConfig(16, 1))
    assert torch.equal(dx, before)
    bce_scale_grad_(dx, torch.tensor(-0.5, dtype=torch.float64, device=device))
    assert torch.equal(dx, before * -0.5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_recompute_gradient_path(reduction, device, rng):
    """reduction none (per-element grad_output), or a second backward through a retained graph
    (the forward's dx buffer was handed out by the first): backward recomputes from x, t."""
    x, t, w, pw = make_bce_inputs((7, 19), torch.float32, rng, device, options="wps")
    out_shape = (7, 19) if reduction == "none" else ()
    dy, _ = make_input(out_shape, torch.float32, rng, device=device)
    xr = x.clone().requires_grad_()
    loss = pg.binary_cross_entropy_with_logits(xr, t, w, reduction=reduction, pos_weight=pw)
    with record_launches() as launches:
        loss.backward(dy, retain_graph=True)
    first = xr.grad.clone()
    _check(x, t, w, pw, reduction, dy, loss.detach(), first, torch.float32)
    xr.grad = None
    with record_launches() as again:
        loss.backward(dy)
    assert [lc.kernel for lc in again] == ["bce_bwd_kernel"]
    assert again[0].path == "recompute"
    torch.testing.assert_close(xr.grad, first, rtol=1e-6, atol=1e-7)
    assert [lc.kernel for lc in launches] == ["bce_bwd_kernel"]
    assert launches[0].meta.get("UNLESS_ONE", False) == (reduction != "none")


def test_bce_bwd_launcher_scalar_and_per_element_grad(device, rng):
    x, t, w, pw = make_bce_inputs((5, 21), torch.float64, rng, device, options="rps")
    config = ElementwiseConfig(16, 1)
    g = torch.tensor(-1.5, dtype=torch.float64, device=device)
    for reduction in ("mean", "sum"):
        with record_launches() as launches:
            dx = bce_bwd(g, x, t, w, pw, reduction=reduction, config=config)
        assert launches[0].grid == (-(-105 // 16),) and launches[0].path == "recompute"
        _check(x, t, w, pw, reduction, g, bce_fwd(x, t, w, pw, reduction=reduction)[0], dx,
               torch.float64)
    dy, _ = make_input((5, 21), torch.float64, rng, device=device)
    dx = bce_bwd(dy.t().contiguous().t(), x, t, w, pw, reduction="none", config=config)
    _check(x, t, w, pw, "none", dy, bce_fwd(x, t, w, pw, reduction="none")[0], dx,
           torch.float64)


def test_bce_no_gradient_means_no_gradient_work(device, rng):
    """An input that needs no gradient (or no_grad) runs the plain reducing forward: no dx."""
    x, t, _, _ = make_bce_inputs((9, 10), torch.float32, rng, device)
    for ctx in (torch.enable_grad(), torch.no_grad()):
        xr = x.clone().requires_grad_(isinstance(ctx, torch.no_grad))
        with ctx, record_launches() as launches:
            pg.binary_cross_entropy_with_logits(xr, t)
        assert [(lc.kernel, lc.path) for lc in launches] == [
            ("bce_fwd_kernel", "reduce"), ("bce_finish_kernel", "reduce")]


# --------------------------------------------------------------------------- autograd glue


class _AtenLog(TorchDispatchMode):
    """Every aten op run inside the block with the element count of its (first) output."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        numel = first.numel() if isinstance(first, torch.Tensor) else 0
        self.ops.append((str(func.overloadpacket), numel))
        return out


# Ops that launch no kernel: allocation, views, metadata.
_NO_KERNEL = {"aten.empty", "aten.empty_strided", "aten.detach", "aten.view", "aten._unsafe_view",
              "aten.as_strided", "aten.expand", "aten.t", "aten.reshape", "aten.alias",
              "aten.empty_like", "aten.clone_view"}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce_fwd_bwd_launches_three_kernels_and_no_zero_fill(reduction, device, rng,
                                                             monkeypatch):
    """The whole forward + backward of a reduced loss: bce_fwd_kernel, bce_finish_kernel,
    bce_bwd_kernel (returning at once for grad_output 1) and no torch kernel -- in particular no
    input-sized zeros for the non-differentiable fused-gradient output
    (ctx.set_materialize_grads(False))."""
    from probact_gpu import _runtime

    monkeypatch.setattr(_runtime, "_poison", [])  # plain torch.empty, as outside the tests
    x, t, w, pw = make_bce_inputs((16, 33), torch.float32, rng, device, options="wps")
    xr = x.clone().requires_grad_()
    g = torch.tensor(1.0, device=device)
    with record_launches() as launches, _AtenLog() as fwd_log:
        loss = pg.binary_cross_entropy_with_logits(xr, t, w, reduction=reduction, pos_weight=pw)
    with record_launches() as bwd_launches, _AtenLog() as bwd_log:
        loss.backward(g)
    kernels = [lc.kernel for lc in launches + bwd_launches]
    assert kernels == ["bce_fwd_kernel", "bce_finish_kernel", "bce_bwd_kernel"]
    torch_ops = [(op, n) for op, n in fwd_log.ops + bwd_log.ops
                 if not op.startswith("probact_gpu.") and op not in _NO_KERNEL]
    assert torch_ops == [], torch_ops
    assert not [op for op, n in bwd_log.ops
                if n == x.numel() and any(k in op for k in ("zero", "fill", "full"))]
    _check(x, t, w, pw, reduction, g, loss.detach(), xr.grad, torch.float32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_second_derivatives_are_exact(reduction, device):
    """create_graph=True used to hand back the forward's gradient as a constant (its second
    derivative silently 0); now backward recomputes through a differentiable op."""
    x = torch.linspace(-3, 3, 12, dtype=torch.float64, device=device).reshape(3, 4)
    x.requires_grad_()
    t = torch.tensor([[0.0, 1.0, 0.3, 0.9]] * 3, dtype=torch.float64, device=device)
    w = torch.tensor([[0.5], [1.0], [2.0]], dtype=torch.float64, device=device)
    pw = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64, device=device)

    def f(x):
        return pg.binary_cross_entropy_with_logits(x, t, w, reduction=reduction, pos_weight=pw)

    assert torch.autograd.gradgradcheck(f, (x,))
    # Against torch's own second derivative, through sum/mean's autograd.grad(create_graph).
    (ours,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    xe = x.detach().clone().requires_grad_()
    ref = torch_F.binary_cross_entropy_with_logits(xe, t, w, reduction=reduction, pos_weight=pw)
    (theirs,) = torch.autograd.grad(ref.sum(), xe, create_graph=True)
    torch.testing.assert_close(ours, theirs)
    hess_ours = torch.autograd.grad(ours.pow(2).sum(), x)[0]
    hess_theirs = torch.autograd.grad(theirs.pow(2).sum(), xe)[0]
    assert hess_ours.abs().sum() > 0
    torch.testing.assert_close(hess_ours, hess_theirs)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
def test_bce_mutating_a_returned_gradient_spares_later_backwards(compiled, device, rng):
    """autograd.grad on a retained graph hands out the forward-written buffer once; mutating it
    must not change what a second backward through the same graph returns."""
    x, t, w, pw = make_bce_inputs((5, 17), torch.float32, rng, device, options="wps")

    def f(x):
        return pg.binary_cross_entropy_with_logits(x, t, w, pos_weight=pw)

    fn = torch.compile(f, fullgraph=True, backend="aot_eager") if compiled else f
    xr = x.clone().requires_grad_()
    loss = fn(xr)
    (first,) = torch.autograd.grad(loss, xr, retain_graph=True)
    expected = first.clone()
    first.mul_(-7.0).add_(3.0)
    (second,) = torch.autograd.grad(loss, xr, retain_graph=True)
    torch.testing.assert_close(second, expected)
    (third,) = torch.autograd.grad(loss * 2.0, xr)
    torch.testing.assert_close(third, 2.0 * expected)


# --------------------------------------------------------------------------- reduction


def test_bce_reduction_is_deterministic(device, rng):
    """Many programs' partial sums, combined in a fixed order: bit-identical between runs."""
    x, t, w, pw = make_bce_inputs((4097,), torch.float32, rng, device, options="sp", scale=5.0)
    config = ElementwiseConfig(16, 1)  # 257 partials, summed in 1024-lane tiles
    runs = []
    for _ in range(2):
        with record_launches() as launches:
            loss, dx = bce_fwd(x, t, None, pw, reduction="sum", compute_grad=True, config=config)
        runs.append((loss, dx))
        assert launches[0].grid == (257,)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    _check(x, t, None, pw, "sum", torch.tensor(1.0), runs[0][0], runs[0][1], torch.float32)


def test_bce_finish_kernel_loops_over_many_partials(device, rng, monkeypatch):
    """More partials than the finishing program has lanes: it loops (lanes narrowed to 16 here;
    by default 16384 fp32 lanes, so 2^28 elements take 4 trips)."""
    from probact_gpu import tiling

    monkeypatch.setattr(tiling, "BCE_FINISH_BYTES", 64)
    x, t, _, _ = make_bce_inputs((2100,), torch.float32, rng, device)
    with record_launches() as launches:
        loss, _ = bce_fwd(x, t, reduction="mean", config=ElementwiseConfig(16, 1))
    assert launches[0].grid == (132,) and launches[1].meta["BLOCK"] == 16  # 9 trips
    _check(x, t, None, None, "mean", None, loss, None, torch.float32)
    assert tiling.choose_bce_finish_config(1 << 16, 4).block == 16
    monkeypatch.undo()
    assert tiling.choose_bce_finish_config(1 << 16, 4) == ElementwiseConfig(16384, 16)
    assert tiling.choose_bce_finish_config(1 << 16, 8) == ElementwiseConfig(8192, 16)
    assert tiling.choose_bce_finish_config(3, 4) == ElementwiseConfig(16, 4)


# --------------------------------------------------------------------------- broadcast operands


@pytest.mark.parametrize(
    "operand_shape,input_shape,n_terms,why",
    [((), (4, 6), 0, "scalar: one value"),
     ((1,), (4, 6), 0, "one-element tensor"),
     ((6,), (4, 6), 1, "per class"),
     ((4, 1), (4, 6), 1, "per row"),
     ((4, 6), (4, 6), 1, "full, contiguous"),
     ((3, 1, 5), (3, 4, 5), 2, "(B, 1, C) against (B, T, C)"),
     ((3, 4, 1), (3, 4, 5), 1, "per (B, T) row: merged"),
     ((2, 1, 3, 1, 2), (2, 2, 3, 2, 2), 3, "three separate groups: materialised")],
)
def test_bce_broadcast_terms(operand_shape, input_shape, n_terms, why, device, rng):
    operand = torch.from_numpy(np.asarray(rng.random(operand_shape) + 0.5)).float().to(device)
    tensor, (terms, flat) = broadcast_terms(operand, torch.Size(input_shape))
    if n_terms <= 2:
        assert terms == n_terms, why
        assert tensor.data_ptr() == operand.data_ptr()  # the operand itself, no copy
    else:
        assert terms == 1 and tensor.is_contiguous() and tensor.shape == input_shape
    # The terms address exactly the broadcast values.
    idx = np.arange(int(np.prod(input_shape)))
    offset = np.zeros_like(idx)
    for k in range(max(terms, 0)):
        inner, size, stride = flat[3 * k: 3 * k + 3]
        offset += ((idx // inner) % size) * stride
    storage = torch.as_strided(tensor, (int(offset.max()) + 1,), (1,), tensor.storage_offset())
    np.testing.assert_array_equal(
        to_numpy64(storage)[offset], to_numpy64(operand.expand(input_shape)).reshape(-1))
    # And the loss through the kernel agrees with the reference, as weight and as pos_weight.
    x, t, _, _ = make_bce_inputs(input_shape, torch.float32, rng, device, options="s")
    for w, pw in ((operand, None), (None, operand)):
        loss = pg.binary_cross_entropy_with_logits(x, t, w, reduction="none", pos_weight=pw)
        _check(x, t, w, pw, "none", None, loss, None, torch.float32)


def test_bce_transposed_weight_is_read_in_place(device, rng):
    x, t, _, _ = make_bce_inputs((6, 5), torch.float32, rng, device, options="s")
    w = torch.from_numpy(rng.random((5, 6)) + 0.5).float().to(device).t()  # (6, 5), strided
    tensor, (terms, _) = broadcast_terms(w, x.shape)
    assert terms == 2 and tensor.data_ptr() == w.data_ptr()
    xr = x.clone().requires_grad_()
    loss = pg.binary_cross_entropy_with_logits(xr, t, w, reduction="sum")
    loss.backward()
    _check(x, t, w, None, "sum", torch.tensor(1.0), loss.detach(), xr.grad, torch.float32)


# --------------------------------------------------------------------------- edge values


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bce_extreme_logits_as_torch(dtype, device):
    inf, nan = np.inf, np.nan
    x = torch.tensor([1e4, -1e4, 1000.0, -1000.0, 1e4, -1e4, inf, inf, -inf, -inf, nan, 0.0],
                     dtype=dtype, device=device)
    t = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.3, 0.7, 0.0, 1.0, 1.0, 0.0, 1.0, 0.5],
                     dtype=dtype, device=device)
    pw = torch.tensor(3.0, dtype=dtype, device=device)
    for pos_weight in (None, pw):
        ours = pg.binary_cross_entropy_with_logits(x, t, reduction="none", pos_weight=pos_weight)
        theirs = torch_F.binary_cross_entropy_with_logits(x, t, reduction="none",
                                                          pos_weight=pos_weight)
        # Same NaN / inf pattern as torch (NaN only where torch's own form is inf − inf, 0·inf
        # or NaN input); finite values against float64.
        assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        assert not torch.isnan(ours[:6]).any() and torch.isfinite(ours[:6]).all()
        _check(x, t, None, pos_weight, "none", None, ours, None, dtype)
        # Gradients: finite (0 or ±pw-ish) at every finite or infinite logit; NaN only for NaN.
        xr = x.clone().requires_grad_()
        pg.binary_cross_entropy_with_logits(xr, t, reduction="sum", pos_weight=pos_weight
                                            ).backward()
        xe = x.clone().requires_grad_()
        torch_F.binary_cross_entropy_with_logits(xe, t, reduction="sum", pos_weight=pos_weight
                                                 ).backward()
        torch.testing.assert_close(xr.grad, xe.grad, equal_nan=True)
        assert torch.isnan(xr.grad).tolist() == [False] * 10 + [True, False]


def test_bce_large_logits_soft_targets_no_cancellation(device):
    """(1 − t)·x − x in torch's form cancels at |x| = 1e4; the folded form does not."""
    x = torch.tensor([-1e4 + 0.5, -5000.25, 7000.5], dtype=torch.float32, device=device)
    t = torch.tensor([1e-4, 0.3, 0.9999], dtype=torch.float32, device=device)
    loss = pg.binary_cross_entropy_with_logits(x, t, reduction="none")
    expected = reference.bce_with_logits(to_numpy64(x), to_numpy64(t), reduction="none")
    assert np.all(np.abs(to_numpy64(loss) - expected) <= 2e-7 * np.abs(expected))


def test_bce_empty_as_torch(device):
    for shape in [(0,), (3, 0)]:
        x = torch.empty(shape, device=device, requires_grad=True)
        t = torch.empty(shape, device=device)
        with record_launches() as launches:
            mean = pg.binary_cross_entropy_with_logits(x, t)
            total = pg.binary_cross_entropy_with_logits(x, t, reduction="sum")
            none = pg.binary_cross_entropy_with_logits(x, t, reduction="none")
        assert launches == []
        assert torch.isnan(mean).item() and mean.shape == ()  # torch: mean of nothing is NaN
        assert total.item() == 0.0 and none.shape == shape
        total.backward()
        assert x.grad.shape == shape


def test_bce_0d(device):
    x = torch.tensor(0.7, device=device, requires_grad=True)
    t = torch.tensor(1.0, device=device)
    for reduction in REDUCTIONS:
        x.grad = None
        loss = pg.binary_cross_entropy_with_logits(x, t, reduction=reduction)
        assert loss.shape == ()
        loss.backward()
        assert abs(loss.item() - np.log1p(np.exp(-0.7))) < 1e-6
        assert abs(x.grad.item() - (1.0 / (1.0 + np.exp(-0.7)) - 1.0)) < 1e-6


def test_bce_non_contiguous_input_and_target(device, rng):
    base, _ = make_input((33, 10), torch.float32, rng, scale=3.0, device=device)
    x = base.t()  # (10, 33) transposed
    t = torch.from_numpy(rng.random((10, 66))).float().to(device)[:, ::2]  # column stride 2
    pw = torch.from_numpy(rng.random(33) * 2).float().to(device)
    for reduction in REDUCTIONS:
        dy = torch.ones(x.shape if reduction == "none" else (), device=device) * 0.5
        loss, grad = _run(x, t, None, pw, reduction, dy)
        assert grad.shape == x.shape
        _check(x, t, None, pw, reduction, dy, loss, grad, torch.float32)


def test_bce_mixed_dtypes_follow_torch(device, rng):
    """torch: the loss has the target's dtype, the gradient the input's."""
    x, _ = make_input((4, 9), torch.float16, rng, device=device)
    t = torch.from_numpy(rng.random((4, 9))).float().to(device)
    for reduction in REDUCTIONS:
        theirs = torch_F.binary_cross_entropy_with_logits(x, t, reduction=reduction)
        ours = pg.binary_cross_entropy_with_logits(x, t, reduction=reduction)
        assert ours.dtype == theirs.dtype == torch.float32
        ours16 = pg.binary_cross_entropy_with_logits(t, x, reduction=reduction)
        assert ours16.dtype == torch.float16
    xr = x.clone().requires_grad_()
    loss = pg.binary_cross_entropy_with_logits(xr, t.double(), reduction="sum")
    assert loss.dtype == torch.float64
    loss.backward()
    assert xr.grad.dtype == torch.float16
    _check(x, t.double(), None, None, "sum", torch.tensor(1.0), loss.detach(), xr.grad,
           torch.float16)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_gradcheck_float64(reduction, device):
    x = torch.linspace(-4, 4, 12, dtype=torch.float64, device=device).reshape(3, 4)
    x.requires_grad_()
    t = torch.tensor([[0.0, 1.0, 0.3, 0.9]] * 3, dtype=torch.float64, device=device)
    w = torch.tensor([[0.5], [1.0], [2.0]], dtype=torch.float64, device=device)
    pw = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64, device=device)

    def f(x):
        return pg.binary_cross_entropy_with_logits(x, t, w, reduction=reduction, pos_weight=pw)

    assert torch.autograd.gradcheck(f, (x,))


def test_bce_does_not_touch_its_inputs(device, rng):
    x, t, w, pw = make_bce_inputs((5, 8), torch.float32, rng, device, options="wps")
    copies = [v.clone() for v in (x, t, w, pw)]
    xr = x.requires_grad_()
    pg.binary_cross_entropy_with_logits(xr, t, w, pos_weight=pw).backward()
    for before, after in zip(copies, (x, t, w, pw), strict=True):
        assert torch.equal(before, after.detach())


def test_bce_module(device, rng):
    x, t, w, pw = make_bce_inputs((6, 7), torch.float32, rng, device, options="wps")
    for reduction in REDUCTIONS:
        module = pg.BCEWithLogitsLoss(weight=w, reduction=reduction, pos_weight=pw)
        assert dict(module.named_buffers()).keys() == {"weight", "pos_weight"}
        loss = module(x, t)
        _check(x, t, w, pw, reduction, None, loss, None, torch.float32)
    assert "reduction='sum'" in repr(pg.BCEWithLogitsLoss(reduction="sum"))


def test_bce_torch_compile_fullgraph_traces_both_paths(device, rng):
    """fullgraph tracing (aot_eager: no codegen, so it runs on CPU too) through the fake
    kernels, including the in-place scaling op of the in-forward gradient path."""
    x, t, w, pw = make_bce_inputs((8, 33), torch.float32, rng, device, options="wps")
    for reduction in REDUCTIONS:
        def f(x, reduction=reduction):
            return pg.binary_cross_entropy_with_logits(x, t, w, reduction=reduction,
                                                       pos_weight=pw)

        xr = x.clone().requires_grad_()
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(xr)
        (out.sum() * 2.0).backward()
        dy = torch.full(out.shape, 2.0, device=device)
        _check(x, t, w, pw, reduction, dy, out.detach(), xr.grad, torch.float32)


# --------------------------------------------------------------------------- bad input


def test_bce_rejects_bad_input(device):
    x = torch.zeros(2, 3, device=device)
    t = torch.zeros(2, 3, device=device)
    f = pg.binary_cross_entropy_with_logits
    with pytest.raises(ValueError, match=r"target size \(\(2, 4\)\)"):
        f(x, torch.zeros(2, 4, device=device))
    with pytest.raises(TypeError, match="target.*torch.int64"):
        f(x, torch.zeros(2, 3, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="input.*torch.int32"):
        f(torch.zeros(2, 3, dtype=torch.int32, device=device), t)
    with pytest.raises(ValueError, match=r"pos_weight of shape \(2,\) does not broadcast"):
        f(x, t, pos_weight=torch.ones(2, device=device))
    with pytest.raises(ValueError, match=r"weight of shape \(2, 2, 3\) does not broadcast"):
        f(x, t, weight=torch.ones(2, 2, 3, device=device))
    with pytest.raises(ValueError, match="'avg' is not a valid value"):
        f(x, t, reduction="avg")
    with pytest.raises(TypeError, match="weight.*torch.int64"):
        f(x, t, weight=torch.ones(3, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="positional"):  # the target API: keyword-only options
        f(x, t, None, "sum")
    with pytest.raises(ValueError, match="compute_grad=True needs reduction"):
        bce_fwd(x, t, reduction="none", compute_grad=True)
    with pytest.raises(ValueError, match="dx must be contiguous"):
        bce_scale_grad_(torch.zeros(3, 2, device=device).t(), torch.tensor(1.0, device=device))
    with pytest.raises(ValueError, match="grad_output must hold one value"):
        bce_scale_grad_(torch.zeros(3, device=device), torch.ones(2, device=device))
    with pytest.raises(NotImplementedError, match="target requires grad"):
        f(x, t.clone().requires_grad_())
    if device.type == "cpu" and torch.cuda.is_available():  # pragma: no cover - needs both
        with pytest.raises(ValueError, match="one device"):
            f(x, t.cuda())
    with pytest.raises(ValueError, match="device"):
        f(x, torch.zeros(2, 3, device="meta"))


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_bce_2_pow_28_bf16_gpu(device):
    """The bench shape, bf16, mean with the in-forward gradient: a strided sample against
    float64; the loss against a float64 torch evaluation of the whole tensor."""
    gen = torch.Generator(device=device).manual_seed(0)
    n = 1 << 28
    x = (torch.randn(n, device=device, generator=gen) * 3).to(torch.bfloat16)
    t = torch.rand(n, device=device, generator=gen).to(torch.bfloat16)
    xr = x.requires_grad_()
    loss = pg.binary_cross_entropy_with_logits(xr, t)
    loss.backward()
    expected = torch_F.binary_cross_entropy_with_logits(x.detach().double(), t.double())
    assert abs(loss.double().item() - expected.item()) <= 8e-3 * abs(expected.item())
    sample = slice(0, n, 4099)
    grad_ref = reference.bce_with_logits_grad(to_numpy64(x[sample]), to_numpy64(t[sample]),
                                              np.float64(1.0), reduction="sum") / n
    err = errors(xr.grad[sample], grad_ref, torch.bfloat16)
    assert err.passed, err.detail


@pytest.mark.gpu
def test_bce_torch_compile_fullgraph_gpu(device, rng):
    x, t, w, pw = make_bce_inputs((64, 129), torch.float32, rng, device, options="wps")
    for reduction in REDUCTIONS:
        def f(x, reduction=reduction):
            return pg.binary_cross_entropy_with_logits(x, t, w, reduction=reduction,
                                                       pos_weight=pw)

        xr = x.clone().requires_grad_()
        out = torch.compile(f, fullgraph=True)(xr)
        out.sum().backward()
        xe = x.clone().requires_grad_()
        ref = torch_F.binary_cross_entropy_with_logits(xe, t, w, reduction=reduction,
                                                       pos_weight=pw)
        ref.sum().backward()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(xr.grad, xe.grad)


@pytest.mark.gpu
def test_bce_cuda_graph_capture_gpu(device, rng):
    x, t, _, pw = make_bce_inputs((64, 129), torch.float32, rng, device, options="p")
    xr = x.clone().requires_grad_()
    pg.binary_cross_entropy_with_logits(xr, t, pos_weight=pw).backward()  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, dx = bce_fwd(x, t, None, pw, reduction="mean", compute_grad=True)
    graph.replay()
    ref = torch_F.binary_cross_entropy_with_logits(xr.detach(), t, pos_weight=pw)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(dx, xr.grad)
