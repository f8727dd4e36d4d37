"""Fused linear + cross-entropy: loss and the three gradients against float64 references, chunk
sizes around N, every option, per-token grad_output, frozen heads, no_grad, bad input."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import probact_gpu as pg
from probact_gpu import reference, tiling
from probact_gpu.ops import linear_cross_entropy as lce_module
from probact_gpu.ops.linear_cross_entropy import linear_cross_entropy_fwd
from probact_gpu.testing import assert_close_to_reference, make_input, record_launches, to_numpy64

N, H, V = 37, 16, 101  # odd token count, V not a power of two


def _problem(rng, device, dtype=torch.float32, bias=True, ignore_every=5):
    h, h64 = make_input((N, H), dtype, rng, device=device)
    w, w64 = make_input((V, H), dtype, rng, scale=0.5, device=device)
    b, b64 = make_input((V,), dtype, rng, device=device) if bias else (None, None)
    target = torch.from_numpy(rng.integers(0, V, N)).to(device)
    if ignore_every:
        target[::ignore_every] = -100
    return (h, h64), (w, w64), (b, b64), target


def _reference(h64, w64, b64, target, reduction, dy, **opts):
    """Loss and (dh, dW, db) in float64 from the CE reference's dlogits."""
    logits = h64 @ w64.T + (0.0 if b64 is None else b64)
    loss, _, dlogits = reference.cross_entropy(logits, target.cpu().numpy(),
                                               reduction=reduction, dy=dy, **opts)
    return loss, dlogits @ w64, dlogits.T @ h64, dlogits.sum(0)


def _run(h, w, b, target, reduction, dy, **kw):
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    br = None if b is None else b.clone().requires_grad_()
    loss = pg.linear_cross_entropy(hr, wr, target, linear_bias=br, reduction=reduction, **kw)
    loss.backward(dy)
    return loss, hr.grad, wr.grad, None if br is None else br.grad


_CHUNKS = [(None, "default: one chunk at this size"),
           (8, "5 token chunks (13 vocab chunks), the last one short"),
           (1, "one token (class) a chunk"), (200, "a chunk larger than N and V")]
# Every (chunk, reduction) with the fused path; the same with low_memory, except one class a
# chunk (101 backward launches under the interpreter) for "mean" only, to bound CI time.
_REFERENCE_CASES = [(c, why, r, lm) for lm in (False, True) for r in ("mean", "sum", "none")
                    for c, why in _CHUNKS if not (lm and c == 1 and r != "mean")]


@pytest.mark.parametrize(
    "chunk_size,why,reduction,low_memory", _REFERENCE_CASES,
    ids=[f"{c}-{r}-{'low_memory' if lm else 'fused'}" for c, _, r, lm in _REFERENCE_CASES])
def test_linear_ce_matches_float64_reference(chunk_size, why, reduction, low_memory, device,
                                             rng):
    (h, h64), (w, w64), (b, b64), target = _problem(rng, device)
    dy_np = rng.standard_normal(N) if reduction == "none" else 0.75
    dy = torch.tensor(dy_np, dtype=torch.float32, device=device)
    loss, dh, dw, db = _run(h, w, b, target, reduction, dy, chunk_size=chunk_size,
                            low_memory=low_memory)
    ref_loss, ref_dh, ref_dw, ref_db = _reference(h64, w64, b64, target, reduction, dy_np)
    assert_close_to_reference(loss, np.asarray(ref_loss), torch.float32, "loss")
    assert_close_to_reference(dh, ref_dh, torch.float32, "dh")
    assert_close_to_reference(dw, ref_dw, torch.float32, "dW")
    assert_close_to_reference(db, ref_db, torch.float32, "db")


@pytest.mark.parametrize(
    "opts",
    [dict(label_smoothing=0.1), dict(z_loss=1e-3), dict(softcap=3.0), dict(logit_scale=0.5),
     dict(label_smoothing=0.2, weight=True), dict(softcap=2.0, z_loss=1e-2,
                                                         logit_scale=1.5)],
    ids=lambda o: ",".join(o),
)
def test_linear_ce_options(opts, device, rng):
    (h, h64), (w, w64), (b, b64), target = _problem(rng, device)
    opts = dict(opts)
    ref_opts = {k: v for k, v in opts.items() if k != "weight"}
    if opts.pop("weight", False):
        cw, cw64 = make_input((V,), torch.float32, rng, device=device)
        cw, cw64 = cw.abs(), np.abs(cw64)
        opts["weight"], ref_opts["weight"] = cw, cw64
    for reduction, dy_np in (("mean", 1.0), ("none", rng.standard_normal(N))):
        dy = torch.tensor(dy_np, dtype=torch.float32, device=device)
        loss, dh, dw, db = _run(h, w, b, target, reduction, dy, chunk_size=16, **opts)
        ref = _reference(h64, w64, b64, target, reduction, dy_np, **ref_opts)
        names = ("loss", "dh", "dW", "db")
        for name, ours, theirs in zip(names, (loss, dh, dw, db), ref, strict=True):
            assert_close_to_reference(ours, np.asarray(theirs), torch.float32, name)


def test_linear_ce_bf16_accumulates_dw_in_fp32(device, rng):
    """bf16 head, 37 one-token chunks: each chunk added to dW by a GEMM that accumulates in fp32
    and rounds once stays within bf16 tolerance of float64."""
    (h, h64), (w, w64), (b, b64), target = _problem(rng, device, dtype=torch.bfloat16)
    loss, dh, dw, db = _run(h, w, b, target, "sum", torch.tensor(1.0, device=device), chunk_size=1)
    # The reference sees the bf16-rounded logits the kernel saw.
    logits = (h.float() @ w.float().T + b.float()).to(torch.bfloat16)
    _, _, dlogits = reference.cross_entropy(to_numpy64(logits), target.cpu().numpy(),
                                            reduction="sum")
    assert loss.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    assert_close_to_reference(dw, dlogits.T @ h64, torch.bfloat16, "dW")
    assert_close_to_reference(db, dlogits.sum(0), torch.bfloat16, "db")


def _soft_problem(rng, device, dtype, lead=(N,)):
    h = torch.from_numpy(rng.standard_normal(lead + (H,))).to(device, dtype)
    w = torch.from_numpy(rng.standard_normal((V, H)) * 0.5).to(device, dtype)
    b = torch.from_numpy(rng.standard_normal(V)).to(device, dtype)
    probs = torch.from_numpy(rng.dirichlet(np.full(V, 0.3), size=lead)).to(device, dtype)
    cw = torch.from_numpy(rng.uniform(0.5, 2.0, V)).to(device, dtype)
    return h, w, b, probs, cw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_ce_class_probabilities_match_torch(reduction, dtype, device, rng):
    """Float (N, V) targets (torch's class probabilities), with class weights and smoothing,
    over 5 token chunks: loss and the three gradients against torch's F.linear_cross_entropy
    (reference path) in float64 on the same rounded inputs."""
    h, w, b, probs, cw = _soft_problem(rng, device, dtype)
    dy = torch.from_numpy(rng.standard_normal(N) if reduction == "none" else np.array(0.5))
    kw = dict(weight=cw, reduction=reduction, label_smoothing=0.1)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = pg.linear_cross_entropy(leaves[0], leaves[1], probs, linear_bias=leaves[2],
                                   chunk_size=8, **kw)
    loss.backward(dy.to(device, dtype))
    ref_leaves = [t.detach().double().requires_grad_() for t in (h, w, b)]
    ref = torch.nn.functional.linear_cross_entropy(
        ref_leaves[0], ref_leaves[1], probs.double(), linear_bias=ref_leaves[2],
        **dict(kw, weight=cw.double()))
    ref.backward(dy.to(device, torch.float64))
    assert loss.dtype == dtype and loss.shape == ref.shape
    assert_close_to_reference(loss, to_numpy64(ref), dtype, "loss")
    for name, ours, theirs in zip(("dh", "dW", "db"), leaves, ref_leaves, strict=True):
        assert_close_to_reference(ours.grad, to_numpy64(theirs.grad), dtype, name)


def test_linear_ce_class_probabilities_options_and_shapes(device, rng):
    """Soft targets with the logit transform and z-loss (against the transform composed in
    float64 torch ops), a (3, 4, H) input, repeated backward (the path recomputes)."""
    h, w, b, probs, _ = _soft_problem(rng, device, torch.float64, lead=(3, 4))
    opts = dict(softcap=2.0, logit_scale=1.5, z_loss=1e-2)
    hr = h.clone().requires_grad_()
    loss = pg.linear_cross_entropy(hr, w, probs, linear_bias=b, reduction="sum", chunk_size=5,
                                   **opts)
    (g1,) = torch.autograd.grad(loss, hr, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 2.0, hr)
    ref_h = h.clone().requires_grad_()
    z = 2.0 * torch.tanh((ref_h @ w.T + b) * 1.5 / 2.0)
    lse = torch.logsumexp(z, -1)
    ref = -(probs * torch.log_softmax(z, -1)).sum() + 1e-2 * (lse * lse).sum()
    (ref_g,) = torch.autograd.grad(ref, ref_h)
    assert_close_to_reference(loss, to_numpy64(ref), torch.float64, "loss")
    assert_close_to_reference(g1, to_numpy64(ref_g), torch.float64, "dh")
    assert_close_to_reference(g2, 2.0 * to_numpy64(ref_g), torch.float64, "dh, second backward")


def test_linear_ce_ignore_index_none_is_torch_default(device, rng):
    (h, _), (w, _), (b, _), target = _problem(rng, device)
    default = pg.linear_cross_entropy(h, w, target, linear_bias=b)
    torch.testing.assert_close(pg.linear_cross_entropy(h, w, target, linear_bias=b,
                                                       ignore_index=None), default)


def _torch_reference(h, w, b, target, reduction, dy, weight=None, label_smoothing=0.0,
                     normalizer=None, **transform):
    """Loss and (dh, dW, db) from float64 torch autograd: the head, the logit transform in
    options.py's order, torch's cross_entropy; the normalizer divides the sum."""
    from probact_gpu.options import HeadTransform

    leaves = [t.detach().double().requires_grad_() for t in (h, w, b)]
    z = HeadTransform(**transform).apply(leaves[0] @ leaves[1].T + leaves[2])
    loss = torch.nn.functional.cross_entropy(
        z, target, weight=None if weight is None else weight.double(), reduction=reduction,
        label_smoothing=label_smoothing)
    if normalizer is not None:
        loss = loss / normalizer
    loss.backward(dy.double())
    return loss.detach(), *(t.grad for t in leaves)


_TRANSFORMS = [dict(logit_divisor=2.5), dict(temperature=0.7),
               dict(softcap=3.0, temperature=1.7, logit_divisor=0.8, logit_scale=1.2)]


@pytest.mark.parametrize("low_memory", [False, True], ids=["fused", "low_memory"])
@pytest.mark.parametrize("transform", _TRANSFORMS, ids=lambda t: ",".join(t))
def test_linear_ce_logit_divisor_and_temperature(transform, low_memory, device, rng):
    """logit_divisor and temperature reach the kernels (after the bias, in options.py's order),
    forward and every backward path, against float64 torch."""
    (h, _), (w, _), (b, _), target = _problem(rng, device)
    for reduction, dy_np in (("mean", 0.5), ("none", rng.standard_normal(N))):
        dy = torch.tensor(dy_np, dtype=torch.float32, device=device)
        ours = _run(h, w, b, target, reduction, dy, chunk_size=16, low_memory=low_memory,
                    label_smoothing=0.1, **transform)
        ref = _torch_reference(h, w, b, target, reduction, dy, label_smoothing=0.1, **transform)
        for name, a, r in zip(("loss", "dh", "dW", "db"), ours, ref, strict=True):
            assert_close_to_reference(a, to_numpy64(r), torch.float32, f"{reduction} {name}")


@pytest.mark.parametrize("low_memory", [False, True], ids=["fused", "low_memory"])
def test_linear_ce_normalizer_divides_the_sum(low_memory, device, rng):
    """reduction="sum" with a normalizer (a number, or a 0-d int tensor on the device as
    Hugging Face's num_items_in_batch): loss and gradients divided by it."""
    (h, _), (w, _), (b, _), target = _problem(rng, device)
    dy = torch.tensor(1.5, device=device)
    for normalizer in (7.0, torch.tensor(7, device=device)):
        ours = _run(h, w, b, target, "sum", dy, chunk_size=8, low_memory=low_memory,
                    normalizer=normalizer)
        ref = _torch_reference(h, w, b, target, "sum", dy, normalizer=7.0)
        for name, a, r in zip(("loss", "dh", "dW", "db"), ours, ref, strict=True):
            assert_close_to_reference(a, to_numpy64(r), torch.float32, name)


def test_linear_ce_hidden_size_zero_is_torch(device):
    """input (N, 0): every logit is the bias (or 0), so the loss is torch's (log V without a
    bias), with (N, 0) and (V, 0) gradients and a bias gradient."""
    t = torch.tensor([0, 3, -100, 9], device=device)
    for bias in (None, torch.linspace(-1.0, 1.0, 10, device=device)):
        h = torch.zeros(4, 0, device=device, requires_grad=True)
        w = torch.zeros(10, 0, device=device, requires_grad=True)
        b = None if bias is None else bias.clone().requires_grad_()
        loss = pg.linear_cross_entropy(h, w, t, linear_bias=b)
        loss.backward()
        ref = torch.nn.functional.linear_cross_entropy(h.detach(), w.detach(), t,
                                                       linear_bias=bias)
        torch.testing.assert_close(loss, ref)
        if bias is None:
            torch.testing.assert_close(loss, torch.tensor(np.log(10.0), device=device).float())
        assert h.grad.shape == (4, 0) and w.grad.shape == (10, 0)
    assert b.grad is not None and b.grad.shape == (10,)


class _LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage that ops inside the block allocate and that are still alive, and
    their peak: a storage counts from the op that returned it (not an alias of an input) until
    it is freed (a weakref finalizer on the storage). probact's own custom ops are entered (their
    Python implementation runs under the mode), so the buffers inside them count too. The
    Triton interpreter's host copies are not torch allocations and are not seen."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.allocs: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        self._seen: dict[int, int] = {}
        # torch.library.custom_op keeps the Python function and the op it registered.
        ops = (lce_module._lce_op, lce_module._lce_bwd_op, lce_module._scale_grads_op)
        self._impls = {op._opoverload: op._init_fn for op in ops}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = self._impls.get(func)
        if impl is not None:
            with self:
                return impl(*args, **kwargs)
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, n = storage.data_ptr(), storage.nbytes()
            if n == 0 or key in inputs or key in self._seen:
                continue
            self._seen[key] = n
            self.live += n
            self.peak = max(self.peak, self.live)
            self.allocs.append((str(func), tuple(t.shape), t.dtype))
            weakref.finalize(storage, self._free, key, n)
        return out

    def _free(self, key, n):
        self.live -= n
        self._seen.pop(key, None)


def test_linear_ce_default_mode_memory_model(device, rng):
    """The module docstring's memory model at a scaled-down LM head (bf16, 4 token chunks, H/C
    as at 8192 × 4096 × 128256 with 2048-token chunks): beyond the returned gradients, the peak
    is the (C, V) logits buffer plus O(V + N) — no (V, H) fp32 accumulator, no (V, H) zero
    gradient from autograd, no copy of dW into .grad; under the scaled 1 GiB goal (the bf16
    weight's size: 1002 MiB at the full shape)."""
    if device.type != "cpu":
        pytest.skip("counts allocations under the interpreter; the GPU tier measures memory")
    n, hidden, vocab, chunk = 256, 128, 1000, 64
    h = torch.from_numpy(rng.standard_normal((n, hidden))).bfloat16().requires_grad_()
    w = torch.from_numpy(rng.standard_normal((vocab, hidden)) * 0.1).bfloat16()
    w.requires_grad_()
    b = torch.from_numpy(rng.standard_normal(vocab)).bfloat16().requires_grad_()
    target = torch.from_numpy(rng.integers(0, vocab, n))
    with _LiveBytes() as mem:
        loss = pg.linear_cross_entropy(h, w, target, linear_bias=b, chunk_size=chunk)
        loss.backward()
        del loss
    returned = h.grad.nbytes + w.grad.nbytes + b.grad.nbytes
    extra = mem.peak - returned
    model = chunk * vocab * 2 + vocab * 4 + n * 8 + 4096  # buffer, db (fp32), rows + lse, scalars
    assert extra <= model, (extra, model, mem.allocs)
    assert extra <= w.nbytes, (extra, w.nbytes)
    weight_sized = [a for a in mem.allocs if a[1] == (vocab, hidden)]
    assert [a[2] for a in weight_sized] == [torch.bfloat16], weight_sized  # dW itself, once


def test_linear_ce_bf16_dw_accuracy_vs_eager(rng, device):
    """bf16 dW rounded once per token chunk (4 chunks, the default's count at the bench shape):
    its largest error against float64 (exact logits from the same rounded inputs) is within
    eager bf16's (``cross_entropy(h @ W.T)``, whose logits and dlogits are rounded) plus one bf16
    ulp of the largest dW; the low-memory mode (one rounding) too."""
    n, hidden, vocab = 256, 64, 1000
    h = torch.from_numpy(rng.standard_normal((n, hidden))).to(device, torch.bfloat16)
    w = torch.from_numpy(rng.standard_normal((vocab, hidden)) * 0.3).to(device, torch.bfloat16)
    target = torch.from_numpy(rng.integers(0, vocab, n)).to(device)
    h64, w64 = to_numpy64(h), to_numpy64(w)
    _, _, dlogits = reference.cross_entropy(h64 @ w64.T, target.cpu().numpy())
    ref = dlogits.T @ h64

    def dw_error(fn):
        wr = w.clone().requires_grad_()
        fn(wr).backward()
        return np.abs(to_numpy64(wr.grad) - ref).max()

    eager = dw_error(lambda wr: torch.nn.functional.cross_entropy(h @ wr.T, target))
    ulp = 2.0 ** (np.floor(np.log2(np.abs(ref).max())) - 7)
    for low_memory in (False, True):
        ours = dw_error(lambda wr, lm=low_memory: pg.linear_cross_entropy(
            h, wr, target, chunk_size=n // 4, low_memory=lm))
        assert ours <= eager + ulp, (low_memory, ours, eager, ulp)


def test_linear_ce_second_derivatives_raise(device, rng):
    """Every path's gradients come from kernels: a backward with create_graph=True raises
    instead of returning a constant."""
    (h, _), (w, _), (b, _), target = _problem(rng, device)
    probs = torch.softmax(torch.randn(N, V, device=device), -1)
    cases = [(target, dict()), (target, dict(reduction="none")), (target, dict(low_memory=True)),
             (probs, dict())]
    for tgt, kw in cases:
        hr = h.clone().requires_grad_()
        loss = pg.linear_cross_entropy(hr, w, tgt, linear_bias=b, chunk_size=16, **kw)
        with pytest.raises(RuntimeError, match="does not support second derivatives"):
            torch.autograd.grad(loss.sum(), hr, create_graph=True)


def test_linear_ce_mutated_gradient_and_retained_graph(device, rng):
    """sum/mean hand out their saved gradient buffers: after the caller mutates one, a later
    backward of the retained graph raises (clearly) instead of using it. The recomputing paths
    hand out fresh tensors, so a second backward is unaffected."""
    (h, _), (w, _), (b, _), target = _problem(rng, device)
    wr = w.clone().requires_grad_()
    loss = pg.linear_cross_entropy(h, wr, target, linear_bias=b)
    (dw,) = torch.autograd.grad(loss, wr, retain_graph=True)
    dw.zero_()
    with pytest.raises(RuntimeError, match="backpropagated\\s+once"):
        torch.autograd.grad(loss, wr)
    for kw in (dict(reduction="none"), dict(low_memory=True)):
        loss = pg.linear_cross_entropy(h, wr, target, linear_bias=b, **kw).sum()
        (first,) = torch.autograd.grad(loss, wr, retain_graph=True)
        expected = first.clone()
        first.mul_(-3.0)
        (second,) = torch.autograd.grad(loss, wr)
        torch.testing.assert_close(second, expected)


def test_linear_ce_float64_gradcheck(device, rng):
    h = torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.tensor([0, 3, -100, 6, 2], device=device)
    # The default sum/mean path scales its saved gradients in place and allows one backward
    # (test_linear_ce_backward_twice_raises): gradcheck the paths that recompute.
    for reduction, low_memory in (("none", False), ("mean", True)):
        assert torch.autograd.gradcheck(
            lambda h, w, b, reduction=reduction, low_memory=low_memory: pg.linear_cross_entropy(
                h, w, target, linear_bias=b, reduction=reduction, chunk_size=4,
                label_smoothing=0.125,
                weight=torch.linspace(0.5, 2.0, 7, dtype=torch.float64, device=device),
                low_memory=low_memory),
            (h, w, b))


def test_linear_ce_only_required_grads(device, rng):
    (h, _), (w, _), (b, _), target = _problem(rng, device)
    hr = h.clone().requires_grad_()
    loss = pg.linear_cross_entropy(hr, w, target, linear_bias=b)  # frozen head
    loss.backward()
    assert hr.grad is not None
    with torch.no_grad():
        out = pg.linear_cross_entropy(h.clone().requires_grad_(), w, target, linear_bias=b)
    assert not out.requires_grad
    wr = w.clone().requires_grad_()
    pg.linear_cross_entropy(h, wr, target).backward()  # frozen input, no bias
    assert wr.grad is not None and wr.grad.shape == w.shape


def test_linear_ce_shapes_and_module(device, rng):
    (h, h64), (w, w64), (b, b64), target = _problem(rng, device, ignore_every=0)
    h3, t3 = h[:36].reshape(4, 9, H), target[:36].reshape(4, 9)
    per_token = pg.linear_cross_entropy(h3, w, t3, linear_bias=b, reduction="none")
    assert per_token.shape == (4, 9)
    module = pg.LinearCrossEntropyLoss(reduction="sum", chunk_size=10)
    total = module(h3, w, t3, b)
    torch.testing.assert_close(total, per_token.sum(), rtol=1e-5, atol=1e-5)


def test_linear_ce_memory_budget_sets_the_chunk(device, rng):
    (h, _), (w, _), (b, _), target = _problem(rng, device)
    budget = 10 * V * h.element_size()  # 10 tokens of logits per chunk
    assert tiling.choose_token_chunk(N, V, h.element_size(), budget) == 10
    with record_launches() as launches:
        linear_cross_entropy_fwd(h, w, target, b, memory_budget=budget)
    ce_launches = [x for x in launches if x.kernel == "cross_entropy_fwd_kernel"]
    assert len(ce_launches) == 4  # ceil(37 / 10)


def test_linear_ce_low_memory_walks_the_vocabulary(device, rng):
    """low_memory: the forward runs token chunks without gradients, the backward one gradient
    launch per block of classes, with each block's vocab_start."""
    (h, _), (w, _), (b, _), target = _problem(rng, device)
    hr = h.clone().requires_grad_()
    with record_launches() as launches:
        loss = pg.linear_cross_entropy(hr, w, target, linear_bias=b, low_memory=True,
                                       chunk_size=30)
    assert all(not x.meta.get("COMPUTE_GRAD", False) for x in launches)
    with record_launches() as launches:
        loss.backward()
    grads = [x for x in launches if x.kernel == "cross_entropy_bwd_kernel"]
    assert len(grads) == 4  # ceil(101 classes / 30)


def test_linear_ce_none_backward_walks_the_vocabulary(device, rng):
    """reduction="none": the backward recomputes the logits in blocks of classes as large as a
    token chunk's buffer (10 tokens × 101 classes = 27 classes × 37 tokens), so dW is one GEMM
    per block over every token, rounded once."""
    (h, _), (w, _), (b, _), target = _problem(rng, device)
    wr = w.clone().requires_grad_()
    loss = pg.linear_cross_entropy(h, wr, target, linear_bias=b, reduction="none", chunk_size=10)
    with record_launches() as launches:
        loss.sum().backward()
    grads = [x for x in launches if x.kernel == "cross_entropy_bwd_kernel"]
    assert len(grads) == 4  # ceil(101 / 27)


def test_linear_ce_token_chunk_heuristic():
    assert tiling.choose_token_chunk(8192, 128256, 2) == 2048  # 512 MiB of bf16 logits
    assert tiling.choose_token_chunk(100, 128256, 2) == 100
    assert tiling.choose_token_chunk(10, 1 << 40, 2) == 1
    assert tiling.choose_vocab_chunk(8192, 128256, 2) == 32768  # (8192 x 32768) bf16 = 512 MiB
    with pytest.raises(ValueError, match="memory budget"):
        tiling.choose_token_chunk(10, 10, 2, 0)


def test_linear_ce_backward_twice_raises(device, rng):
    """sum/mean scale the forward's gradients in place: a second backward must raise, not
    silently return gradients scaled twice."""
    (h, _), (w, _), (b, _), target = _problem(rng, device)
    hr = h.clone().requires_grad_()
    loss = pg.linear_cross_entropy(hr, w, target, linear_bias=b)
    torch.autograd.grad(loss * 3.0, hr, retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated\\s+once"):
        torch.autograd.grad(loss * -0.5, hr)


def test_linear_ce_bad_input(device):
    h = torch.randn(4, 8, device=device)
    w = torch.randn(10, 8, device=device)
    t = torch.zeros(4, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="hidden size 8"):
        pg.linear_cross_entropy(torch.randn(4, 7, device=device), w, t)
    with pytest.raises(TypeError, match="linear_weight dtype torch.float16 must match"):
        pg.linear_cross_entropy(h, w.half(), t)
    with pytest.raises(ValueError, match="target shape"):
        pg.linear_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError, match="class probabilities .* must have shape \\(4, 10\\)"):
        pg.linear_cross_entropy(h, w, t.float())
    with pytest.raises(TypeError, match="target must be an int64 or int32"):
        pg.linear_cross_entropy(h, w, t.bool())
    with pytest.raises(ValueError, match="linear_bias must be"):
        pg.linear_cross_entropy(h, w, t, linear_bias=torch.randn(9, device=device))
    with pytest.raises(ValueError, match="reduction must be one of"):
        pg.linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        pg.linear_cross_entropy(h, w, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        pg.linear_cross_entropy(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="softcap must be in"):
        pg.linear_cross_entropy(h, w, t, softcap=0.0)
    with pytest.raises(ValueError, match="z_loss must be in"):
        pg.linear_cross_entropy(h, w, t, z_loss=-1.0)
    with pytest.raises(ValueError, match="per-class weights\\) must have shape \\(10,\\)"):
        pg.linear_cross_entropy(h, w, t, weight=torch.ones(3, device=device))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        pg.linear_cross_entropy(h, w, t, ignore_index=-100.0)
    with pytest.raises(TypeError, match="memory_budget must be an int"):
        pg.linear_cross_entropy(h, w, t, memory_budget="1")
    with pytest.raises(ValueError, match="memory_budget must be a positive int"):
        pg.linear_cross_entropy(h, w, t, memory_budget=0)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        pg.linear_cross_entropy(h, w, t, chunk_size=2.0)
    with pytest.raises(TypeError, match="low_memory must be a bool"):
        pg.linear_cross_entropy(h, w, t, low_memory=1)
    with pytest.raises(ValueError, match="logit_divisor must be a nonzero"):
        pg.linear_cross_entropy(h, w, t, logit_divisor=0.0)
    with pytest.raises(ValueError, match="temperature must be in"):
        pg.linear_cross_entropy(h, w, t, temperature=-1.0)
    with pytest.raises(ValueError, match="normalizer divides the summed loss"):
        pg.linear_cross_entropy(h, w, t, normalizer=2.0)


@pytest.mark.gpu
def test_linear_ce_default_mode_peak_memory_gpu(device):
    """The memory goal at the bench shape (8192 × 4096 × 128256 bf16, default mode): the peak
    beyond the inputs and the returned gradients is at most 1 GiB (the model says ~0.5)."""
    torch.manual_seed(0)
    n, hidden, vocab = 8192, 4096, 128256
    h = (torch.randn(n, hidden, device=device) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, device=device) * 0.02).bfloat16().requires_grad_()
    target = torch.randint(0, vocab, (n,), device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    pg.linear_cross_entropy(h, w, target).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - h.grad.nbytes - w.grad.nbytes
    assert extra <= 1 << 30, f"{extra / 2**20:.0f} MiB beyond the inputs and gradients"


@pytest.mark.gpu
def test_linear_ce_lm_head_shape_gpu(device):
    """The bench shape at a quarter of the tokens: loss and gradients vs eager in fp32."""
    torch.manual_seed(0)
    n, hidden, vocab = 2048, 4096, 128256
    h = (torch.randn(n, hidden, device=device) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, device=device) * 0.02).bfloat16().requires_grad_()
    target = torch.randint(0, vocab, (n,), device=device)
    target[::8] = -100
    loss = pg.linear_cross_entropy(h, w, target, memory_budget=256 << 20)
    loss.backward()
    h2, w2 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h2 @ w2.T, target)
    ref.backward()
    torch.testing.assert_close(loss.float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(h.grad.float(), h2.grad, atol=2e-3, rtol=5e-2)
    torch.testing.assert_close(w.grad.float(), w2.grad, atol=2e-3, rtol=5e-2)


def test_linear_ce_probabilities_refuse_an_explicit_ignore_index():
    """As torch's F.linear_cross_entropy (one of its OpInfo error inputs): class-probability
    targets with an ignore_index given raise, before anything runs; left None it is accepted."""
    torch.manual_seed(0)
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    probs = torch.softmax(torch.randn(3, 5), -1)
    for ignore_index in (-100, 2):
        with pytest.raises(ValueError, match="ignore_index cannot be specified when target "
                                             "contains probabilities"):
            pg.linear_cross_entropy(h, w, probs, ignore_index=ignore_index)
    want = torch.nn.functional.linear_cross_entropy(h, w, probs)
    torch.testing.assert_close(pg.linear_cross_entropy(h, w, probs), want)
