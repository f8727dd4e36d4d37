"""linear_distillation_loss: distillation from both heads' hidden states equals the logits form
(distillation_loss on ``h @ W.T + b``) in value and gradient, for every reduction, with heads of
different hidden sizes and vocabularies; its GEMM count per token chunk and its memory model are
pinned; the teacher gets no gradient."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import probact_gpu as pg
from probact_gpu.ops import linear_cross_entropy as lce_module
from probact_gpu.ops import linear_distillation as ld_module

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter's masked lanes

IGNORE = -100


def _heads(rng, device, n=6, hs=8, ht=12, vs=37, vt=37, dtype=torch.float32):
    def t(*shape, scale=1.0):
        return torch.from_numpy(rng.standard_normal(shape) * scale).to(device, dtype)

    return (t(n, hs), t(vs, hs, scale=hs ** -0.5), t(vs), t(n, ht), t(vt, ht, scale=ht ** -0.5),
            t(vt))


def _both(rng, device, reduction, kw, chunk=4, heads=None, grad_out=None):
    """(loss, grads of h_s, W_s, b_s) of the fused op and of the logits form's autograd."""
    hs, ws, bs, ht, wt, bt = heads or _heads(rng, device)
    target = torch.from_numpy(rng.integers(0, ws.shape[0], hs.shape[0])).to(device)
    target[2] = IGNORE
    out = []
    for fused in (True, False):
        leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
        if fused:
            loss = pg.linear_distillation_loss(leaves[0], leaves[1], ht, wt, target,
                                               student_bias=leaves[2], teacher_bias=bt,
                                               reduction=reduction, chunk_size=chunk, **kw)
        else:
            loss = pg.distillation_loss(leaves[0] @ leaves[1].T + leaves[2], ht @ wt.T + bt,
                                        target, reduction=reduction, **kw)
        g = grad_out if grad_out is not None else torch.ones_like(loss)
        loss.backward(g)
        out.append((loss.detach(), *(x.grad for x in leaves)))
    return out


@pytest.mark.parametrize("reduction,kw", [
    ("mean", dict(divergence="kl", temperature=1.4, student_softcap=5.0)),
    ("mean", dict(divergence="jsd", beta=0.3, hard_weight=0.5, teacher_logit_scale=1.3)),
    ("none", dict(divergence="tvd")),
    ("sum", dict(divergence="reverse_kl", normalizer=4.0)),
], ids=["mean-kl", "mean-jsd-hard", "none-tvd", "sum-rkl"])
def test_linear_distillation_equals_logits_form(reduction, kw, device, rng):
    """2 token chunks (the last short), student hidden 8, teacher hidden 12, biases, each head's
    transform; a random per-token upstream gradient for ``none``, 2.5 for the reduced losses
    (the in-place scale of the gradients computed in the forward)."""
    grad = torch.from_numpy(rng.standard_normal(6)).float().to(device) \
        if reduction == "none" else torch.tensor(2.5, device=device)
    fused, eager = _both(rng, device, reduction, kw, grad_out=grad)
    for name, a, b in zip(("loss", "dh", "dW", "db"), fused, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=name)


def test_linear_distillation_vocab_sizes_and_padding(device, rng):
    """A teacher padded past the student's vocabulary and a student padded past the shared
    classes: only the shared rows are multiplied, the student's other rows get zero dW / db."""
    heads = _heads(rng, device, vs=40, vt=44)
    with pytest.raises(ValueError, match="shared_vocab=40"):
        pg.linear_distillation_loss(heads[0], heads[1], heads[3], heads[4])
    kw = dict(divergence="kl", shared_vocab=33)
    fused, eager = _both(rng, device, "mean", kw, heads=heads, chunk=4)
    for name, a, b in zip(("loss", "dh", "dW", "db"), fused, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=name)
    assert not bool(fused[2][33:].any()) and not bool(fused[3][33:].any())


class _Gemms(TorchDispatchMode):
    """Counts matmuls (mm / addmm) by phase, entering the fused ops' Python implementations."""

    def __init__(self):
        super().__init__()
        self.counts = {"fwd": 0, "bwd": 0}
        self.phase = "fwd"
        ops = (ld_module._ld_op, ld_module._ld_bwd_op, lce_module._scale_grads_op)
        self._impls = {op._opoverload: op._init_fn for op in ops}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = self._impls.get(func)
        if impl is not None:
            with self:
                return impl(*args, **kwargs)
        if func.__name__.split(".")[0] in ("mm", "addmm", "addmm_"):
            self.counts[self.phase] += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("reduction,grad,fwd,bwd", [
    ("mean", True, 4, 0),  # logits ×2, dh, dW per chunk; the backward scales in place
    ("none", True, 2, 4),  # logits ×2; the backward: logits ×2 again, dh, dW
    ("mean", False, 2, 0),  # no gradient: the two heads' logits only
])
def test_linear_distillation_gemm_count_per_chunk(reduction, grad, fwd, bwd, device, rng):
    hs, ws, bs, ht, wt, bt = _heads(rng, device, n=4)
    h = hs.clone().requires_grad_(grad)
    w = ws.clone().requires_grad_(grad)
    mode = _Gemms()
    with mode:
        loss = pg.linear_distillation_loss(h, w, ht, wt, chunk_size=2, reduction=reduction)
        mode.phase = "bwd"
        if grad:
            loss.backward(torch.ones_like(loss))
    assert mode.counts == {"fwd": 2 * fwd, "bwd": 2 * bwd}


class _LiveBytes(TorchDispatchMode):
    """Live bytes of the storages ops allocate inside the block, and their peak (the fused ops'
    Python implementations are entered, so their buffers count)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.allocs: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        self._seen: set[int] = set()
        ops = (ld_module._ld_op, ld_module._ld_bwd_op, lce_module._scale_grads_op)
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
            self._seen.add(key)
            self.live += n
            self.peak = max(self.peak, self.live)
            self.allocs.append((str(func), tuple(t.shape), t.dtype))
            weakref.finalize(storage, self._free, n)
        return out

    def _free(self, n):
        self.live -= n


def test_linear_distillation_memory_model(device, rng):
    """The module docstring's model at a scaled-down pair of heads (bf16, 4 token chunks):
    beyond the returned gradients, the peak is the two (C, V) buffers plus O(V + N); the only
    (V, H)-sized allocation is dW itself, and nothing of the teacher's size but its logits."""
    if device.type != "cpu":
        pytest.skip("counts allocations under the interpreter; the GPU tier measures memory")
    n, hidden, vocab, chunk = 16, 32, 300, 4
    hs, ws, bs, ht, wt, _ = _heads(rng, device, n=n, hs=hidden, ht=2 * hidden, vs=vocab,
                                   vt=vocab, dtype=torch.bfloat16)
    h, w, b = (x.clone().requires_grad_() for x in (hs, ws, bs))
    target = torch.from_numpy(rng.integers(0, vocab, n))
    with _LiveBytes() as mem:
        loss = pg.linear_distillation_loss(h, w, ht, wt, target, student_bias=b,
                                           chunk_size=chunk, divergence="jsd")
        loss.backward()
        del loss
    returned = h.grad.nbytes + w.grad.nbytes + b.grad.nbytes
    extra = mem.peak - returned
    model = 2 * chunk * vocab * 2 + vocab * 4 + n * 4 + chunk * 8 * 4 + 4096
    assert extra <= model, (extra, model, mem.allocs)
    weight_sized = [a for a in mem.allocs if len(a[1]) == 2 and a[1][0] == vocab
                    and a[1][1] in (hidden, 2 * hidden)]
    assert [a[2] for a in weight_sized] == [torch.bfloat16], weight_sized  # dW, once


def test_linear_distillation_backward_once_and_teacher_no_grad(device, rng):
    hs, ws, bs, ht, wt, bt = _heads(rng, device, n=3)
    h = hs.clone().requires_grad_()
    loss = pg.linear_distillation_loss(h, ws, ht, wt, chunk_size=2)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()
    rows = pg.linear_distillation_loss(h, ws, ht, wt, reduction="none", chunk_size=2)
    rows.sum().backward(retain_graph=True)
    rows.sum().backward()  # the recomputing backward: any number of times
    with pytest.raises(ValueError, match=r"teacher_weight requires grad.*detach"):
        pg.linear_distillation_loss(h, ws, ht, wt.clone().requires_grad_())
    with torch.no_grad():
        pg.linear_distillation_loss(h, ws, ht, wt.clone().requires_grad_())
    with pytest.raises(ValueError, match="hidden size 12"):
        pg.linear_distillation_loss(h, ws, ht[:, :8], wt)
    module = pg.LinearDistillationLoss("tvd", chunk_size=2)
    torch.testing.assert_close(module(h, ws, ht, wt), pg.linear_distillation_loss(
        h, ws, ht, wt, divergence="tvd", chunk_size=2), rtol=0, atol=0)
    assert np.isfinite(float(module(h, ws, ht, wt, None, bs, bt).detach()))
