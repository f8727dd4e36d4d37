"""Autograd at the edges, for every op: inputs that can require grad (class weights, soft
targets, tensor options) get their gradient or a clear error, as torch does. Tiny shapes, float64
where gradients are checked (gradcheck and the float64 reference)."""

from __future__ import annotations

import pytest
import torch

import probact_gpu
import probact_gpu.distributed
from probact_gpu.testing import make_input

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter's inf − inf lanes

IGNORE = -100


def _targets(rng, n, c, device, ignore=True):
    t = torch.from_numpy(rng.integers(0, c, n)).to(device)
    if ignore:
        t[0] = IGNORE
    return t


def _probs(rng, n, c, device, dtype=torch.float64):
    p = torch.from_numpy(rng.dirichlet([1.0] * c, n)).to(dtype).to(device)
    return p


# ----------------------------------------------------------------------------- class weights


def test_class_weight_requiring_grad_raises_with_class_indices_as_torch(device, rng):
    """torch refuses a class weight that requires grad with class-index targets (its nll_loss
    is not differentiable w.r.t. it), at the call, whether or not the input requires grad; it
    is accepted under no_grad. Silently giving it no gradient was the bug."""
    n, c, h = 4, 7, 5
    x, _ = make_input((n, c), torch.float32, rng, device=device)
    t = _targets(rng, n, c, device)
    w = torch.rand(c, device=device).add_(0.5).requires_grad_()
    hidden, _ = make_input((n, h), torch.float32, rng, device=device)
    head, _ = make_input((c, h), torch.float32, rng, device=device)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument"):
        torch.nn.functional.cross_entropy(x, t, w)
    calls = {
        "cross_entropy": lambda: probact_gpu.cross_entropy(x.requires_grad_(), t, w),
        "cross_entropy (input without grad)": lambda: probact_gpu.cross_entropy(
            x.detach(), t, w, reduction="sum"),
        "CrossEntropyLoss": lambda: probact_gpu.CrossEntropyLoss(weight=w)(x, t),
        "linear_cross_entropy": lambda: probact_gpu.linear_cross_entropy(
            hidden, head, t, weight=w),
        "vocab_parallel_cross_entropy": lambda: probact_gpu.distributed.
        vocab_parallel_cross_entropy(x, t, weight=w),
        "vocab_parallel_linear_cross_entropy": lambda: probact_gpu.distributed.
        vocab_parallel_linear_cross_entropy(hidden, head, t, weight=w),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="weight .*requires grad"):
            call()
        with torch.no_grad():  # as torch: nothing to differentiate, nothing refused
            call()
        assert w.grad is None, name


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_weight_requiring_grad_with_probabilities_gets_torchs_gradient(device, rng,
                                                                             reduction):
    """With class-probability targets torch differentiates w.r.t. the class weights: so do we,
    through cross_entropy and linear_cross_entropy (the latter gave none)."""
    n, c, h = 5, 6, 4
    x, _ = make_input((n, c), torch.float64, rng, device=device)
    hidden, _ = make_input((n, h), torch.float64, rng, device=device)
    head, _ = make_input((c, h), torch.float64, rng, device=device)
    p = _probs(rng, n, c, device)
    w0 = torch.rand(c, dtype=torch.float64, device=device) + 0.5
    kw = dict(reduction=reduction, label_smoothing=0.1)
    pairs = [
        (lambda w: probact_gpu.cross_entropy(x, p, w, **kw),
         lambda w: torch.nn.functional.cross_entropy(x, p, w, **kw)),
        (lambda w: probact_gpu.linear_cross_entropy(hidden, head, p, weight=w, **kw),
         lambda w: torch.nn.functional.cross_entropy(hidden @ head.T, p, w, **kw)),
    ]
    dy = torch.rand((n,) if reduction == "none" else (), dtype=torch.float64, device=device)
    for f_ours, f_torch in pairs:
        w_a, w_b = w0.clone().requires_grad_(), w0.clone().requires_grad_()
        f_ours(w_a).backward(dy)
        f_torch(w_b).backward(dy)
        torch.testing.assert_close(w_a.grad, w_b.grad, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- soft targets


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_ce_probability_targets_requiring_grad_get_their_gradient(device, rng, reduction):
    """Class-probability targets that require grad get d loss / d target through
    linear_cross_entropy, as through cross_entropy on the materialised logits and torch's
    F.linear_cross_entropy (it was None). Token chunks of 2 rows, every option that reaches the
    soft path, float64."""
    n, c, h = 5, 7, 4
    hidden, _ = make_input((n, h), torch.float64, rng, device=device)
    head, _ = make_input((c, h), torch.float64, rng, device=device)
    bias, _ = make_input((c,), torch.float64, rng, device=device)
    p0 = _probs(rng, n, c, device)
    w = torch.rand(c, dtype=torch.float64, device=device) + 0.5
    dy = torch.rand((n,) if reduction == "none" else (), dtype=torch.float64, device=device)
    options = [dict(), dict(weight=w, label_smoothing=0.2, z_loss=1e-2, softcap=3.0,
                            temperature=0.7, logit_scale=1.5)]
    for kw in options:
        kw = dict(kw, reduction=reduction)
        p_ours, p_ref = p0.clone().requires_grad_(), p0.clone().requires_grad_()
        probact_gpu.linear_cross_entropy(hidden, head, p_ours, linear_bias=bias, chunk_size=2,
                                         **kw).backward(dy)
        probact_gpu.cross_entropy(hidden @ head.T + bias, p_ref, **kw).backward(dy)
        assert p_ours.grad is not None
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-9, atol=1e-12)
    p_torch = p0.clone().requires_grad_()
    torch.nn.functional.linear_cross_entropy(hidden, head, p_torch, linear_bias=bias,
                                             reduction=reduction).backward(dy)
    p_ours = p0.clone().requires_grad_()
    probact_gpu.linear_cross_entropy(hidden, head, p_ours, linear_bias=bias,
                                     reduction=reduction).backward(dy)
    torch.testing.assert_close(p_ours.grad, p_torch.grad, rtol=1e-9, atol=1e-12)
