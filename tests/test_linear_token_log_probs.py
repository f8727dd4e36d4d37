"""linear_token_log_probs: token log-probs, entropy, lse and argmax from hidden states and an LM
head, by token chunks, and the gradients to the hidden states, the head and its bias, against
the NumPy float64 reference on ``h @ W.T + b`` (probact_gpu.reference_lm_head)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probact_gpu import reference_lm_head as ref
from probact_gpu.ops.linear_token_log_probs import linear_token_log_probs
from probact_gpu.ops.token_log_probs import TokenLogProbs, token_log_probs
from probact_gpu.testing import assert_close_to_reference, make_input, record_launches, to_numpy64

IGNORE = -100


def _head(rng, n_hidden, n_classes, dtype, device, bias=True):
    w, w64 = make_input((n_classes, n_hidden), dtype, rng, scale=0.5, device=device)
    b, b64 = make_input((n_classes,), dtype, rng, device=device) if bias else (None, None)
    return w, w64, b, b64


def _expected(h64, w64, b64, t, g, gh, **kw):
    """Forward values and (dh, dW, db) of the float64 reference."""
    logits = h64 @ w64.T + (0.0 if b64 is None else b64)
    out = ref.token_log_probs(logits, t, grad_logp=g, grad_entropy=gh, **kw)
    dz = out["dx"].reshape(-1, w64.shape[0])
    out["dh"] = (dz @ w64).reshape(h64.shape)
    out["dw"] = dz.T @ h64.reshape(-1, w64.shape[1])
    out["db"] = dz.sum(axis=0)
    return out


@pytest.mark.parametrize("chunk_size,why", [(3, "3 chunks, the last one short"),
                                            (None, "one chunk")])
def test_linear_token_log_probs_matches_reference(chunk_size, why, device, rng):
    n, hidden, vocab = 7, 12, 37
    h, h64 = make_input((n, hidden), torch.float32, rng, device=device)
    w, w64, b, b64 = _head(rng, hidden, vocab, torch.float32, device)
    t = torch.from_numpy(rng.integers(0, vocab, n)).to(device)
    t[2] = IGNORE
    kw = dict(logit_scale=1.2, softcap=5.0, temperature=0.8)
    g, gh = rng.standard_normal(n), rng.standard_normal(n)
    expected = _expected(h64, w64, b64, to_numpy64(t), g, gh, **kw)
    hr, wr, br = (x.clone().requires_grad_() for x in (h, w, b))
    out = linear_token_log_probs(hr, wr, t, linear_bias=br, chunk_size=chunk_size,
                                 return_entropy=True, return_lse=True, return_argmax=True, **kw)
    assert isinstance(out, TokenLogProbs)
    for name, value in (("logp", out.logprobs), ("entropy", out.entropy), ("lse", out.lse)):
        assert_close_to_reference(value, expected[name], torch.float32, name)
    np.testing.assert_array_equal(out.argmax.cpu().numpy(), expected["argmax"])
    with record_launches() as log:
        ((out.logprobs * torch.from_numpy(g).float().to(device)).sum()
         + (out.entropy * torch.from_numpy(gh).float().to(device)).sum()).backward()
    assert len(log) == (1 if chunk_size is None else 3)
    assert_close_to_reference(hr.grad, expected["dh"], torch.float32, "dh")
    assert_close_to_reference(wr.grad, expected["dw"], torch.float32, "dW")
    assert_close_to_reference(br.grad, expected["db"], torch.float32, "db")
    assert bool((hr.grad[2] == 0).all())


def test_linear_token_log_probs_bf16_btv_equals_unfused(device, rng):
    """(B, T, H) bf16 hidden states, a memory budget of 4 tokens of logits: logp and entropy
    equal token_log_probs on the bf16 logits exactly (the same kernel on the same rounded
    logits), and the gradients match the float64 reference at bf16's tolerance."""
    hidden, vocab = 16, 50
    h, h64 = make_input((2, 5, hidden), torch.bfloat16, rng, device=device)
    w, w64, _, _ = _head(rng, hidden, vocab, torch.bfloat16, device, bias=False)
    t = torch.from_numpy(rng.integers(0, vocab, (2, 5))).to(device)
    t[1, 0] = IGNORE
    budget = 4 * vocab * 2
    out = linear_token_log_probs(h, w, t, memory_budget=budget, return_entropy=True,
                                 temperature=1.3)
    logits = h @ w.T
    unfused = token_log_probs(logits, t, return_entropy=True, temperature=1.3)
    assert out.logprobs.shape == (2, 5)
    torch.testing.assert_close(out.logprobs, unfused.logprobs, rtol=0, atol=0)
    torch.testing.assert_close(out.entropy, unfused.entropy, rtol=0, atol=0)
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = linear_token_log_probs(hr, wr, t, memory_budget=budget, return_entropy=True,
                                 temperature=1.3)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    expected = _expected(to_numpy64(h), to_numpy64(w), None, to_numpy64(t), np.ones((2, 5)),
                         np.ones((2, 5)), temperature=1.3)
    # the bf16 logits are rounded before the kernel: hold the gradients to bf16's tolerance
    assert_close_to_reference(hr.grad, expected["dh"], torch.bfloat16, "dh")
    assert_close_to_reference(wr.grad, expected["dw"], torch.bfloat16, "dW")


def test_linear_token_log_probs_entropy_gradient_alone_weight_only(device, rng):
    """Only the head requires grad and only the entropy is used: dW alone, no dh buffer."""
    n, hidden, vocab = 6, 8, 21
    h, h64 = make_input((n, hidden), torch.float32, rng, device=device)
    w, w64, _, _ = _head(rng, hidden, vocab, torch.float32, device, bias=False)
    t = torch.from_numpy(rng.integers(0, vocab, n)).to(device)
    wr = w.clone().requires_grad_()
    out = linear_token_log_probs(h, wr, t, return_entropy=True, chunk_size=4)
    out.entropy.sum().backward()
    expected = _expected(h64, w64, None, to_numpy64(t), None, np.ones(n))
    assert float(wr.grad.abs().max()) > 1e-3
    assert_close_to_reference(wr.grad, expected["dw"], torch.float32, "dW")


def test_linear_token_log_probs_no_grad_saves_nothing(device, rng):
    h, _ = make_input((5, 8), torch.float32, rng, device=device)
    w, _, _, _ = _head(rng, 8, 9, torch.float32, device, bias=False)
    t = torch.from_numpy(rng.integers(0, 9, 5)).to(device)
    with torch.no_grad(), record_launches() as log:
        logp = linear_token_log_probs(h, w.requires_grad_(), t, chunk_size=2)
    assert logp.shape == (5,) and not logp.requires_grad
    assert [launch.meta["SAVE_STATS"] for launch in log] == [False] * 3


def test_linear_token_log_probs_lse_and_argmax_get_no_zero_gradient(device, rng):
    """Only logp is used although lse and argmax are returned (and entropy computed): the
    backward kernel runs without an entropy gradient (none is zero-filled for it)."""
    h, _ = make_input((5, 8), torch.float32, rng, device=device)
    w, _, _, _ = _head(rng, 8, 9, torch.float32, device, bias=False)
    t = torch.from_numpy(rng.integers(0, 9, 5)).to(device)
    out = linear_token_log_probs(h.requires_grad_(), w, t, return_entropy=True,
                                 return_lse=True, return_argmax=True, chunk_size=3)
    assert not out.lse.requires_grad and not out.argmax.requires_grad
    with record_launches() as log:
        out.logprobs.sum().backward()
    bwd = [launch.meta for launch in log if launch.kernel == "token_log_probs_bwd_kernel"]
    assert len(bwd) == 2
    assert all(m["HAS_GRAD_LOGP"] and not m["HAS_GRAD_ENTROPY"] for m in bwd)


def test_linear_token_log_probs_double_backward_raises(device, rng):
    h, _ = make_input((3, 4), torch.float32, rng, device=device)
    w, _, _, _ = _head(rng, 4, 6, torch.float32, device, bias=False)
    hr = h.clone().requires_grad_()
    logp = linear_token_log_probs(hr, w, torch.tensor([0, 5, 2], device=device))
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(logp.sum(), hr, create_graph=True)


def test_linear_token_log_probs_gradcheck_fp64(device, rng):
    h = torch.from_numpy(rng.standard_normal((4, 3))).to(device).requires_grad_()
    w = torch.from_numpy(rng.standard_normal((5, 3))).to(device).requires_grad_()
    b = torch.from_numpy(rng.standard_normal(5)).to(device).requires_grad_()
    t = torch.tensor([0, 4, IGNORE, 2], device=device)

    def f(h, w, b):
        out = linear_token_log_probs(h, w, t, linear_bias=b, chunk_size=3, softcap=2.0,
                                     return_entropy=True)
        return out.logprobs, out.entropy

    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("change,error,match", [
    (dict(linear_weight=torch.zeros(5, 4, dtype=torch.float64)), TypeError, "dtype"),
    (dict(target=torch.zeros(2, dtype=torch.int64)), ValueError, "target shape"),
    (dict(target=torch.zeros(3, 5)), TypeError, "class indices"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(memory_budget=-1), ValueError, "memory_budget"),
    (dict(linear_weight=torch.zeros(0, 4)), ValueError, "at least one class"),
    (dict(linear_bias=torch.zeros(4)), ValueError, "linear_bias"),
    (dict(temperature=-1.0), ValueError, "temperature"),
])
def test_linear_token_log_probs_rejects_bad_arguments(change, error, match, device):
    args = dict(input=torch.zeros(3, 4), linear_weight=torch.zeros(5, 4),
                target=torch.zeros(3, dtype=torch.int64))
    args.update(change)
    tensors = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=match):
        linear_token_log_probs(tensors.pop("input"), tensors.pop("linear_weight"),
                               tensors.pop("target"), **tensors)


def test_linear_token_log_probs_empty_input(device):
    w = torch.zeros(5, 4, device=device)
    out = linear_token_log_probs(torch.zeros(0, 4, device=device), w,
                                 torch.zeros(0, dtype=torch.int64, device=device),
                                 return_entropy=True)
    assert out.logprobs.shape == (0,) and out.entropy.shape == (0,)


def test_linear_token_log_probs_check_cases_pass(device, rng):
    """``probact-gpu check``'s linear_token_log_probs cases on the chunked shape, bf16, every
    transform: every row passes, torch's unfused error beside."""
    from probact_gpu.check import linear_token_log_probs as check_module

    chosen = [c for c in check_module.cases(False)
              if c.dtype == torch.bfloat16 and c.shape == "37x16x101"]
    assert len(chosen) == 2
    rows = [row for case in chosen for row in case.run(device, rng)]
    assert len(rows) == 10 and all(row.passed for row in rows), [r.ours.detail for r in rows]
    assert all(row.torch_err is not None for row in rows)


def test_check_rows_softcap_temperature_fp32_hold_the_promise(device):
    """The check's fp32 20×8×1000 softcap + temperature rows, with the check's own inputs: dW and
    db were worse than torch's by more than one ulp (1.04e-7 against 7.2e-8, 6.2e-8 against
    3.8e-8). The cause was in the transform: x · fp32(1/T) and the chain rule's · fp32(scale)
    carry the factor's rounding with one sign in every element, which sums coherently over the
    tokens; the factors are now applied as fma(x, hi, x · lo) from fp64 (kernels/_head.py)."""
    import zlib

    from probact_gpu import check

    name = "linear_token_log_probs softcap+temperature"
    case = next(c for c in check.collect(False, ("linear_token_log_probs",))
                if c.op == name and c.dtype == torch.float32 and c.shape == "20x8x1000")
    rng = np.random.default_rng([0, zlib.crc32(f"{name}|fp32|20x8x1000|1".encode())])
    rows = case.run(device, rng)
    assert len(rows) == 5 and not any(r.worse_than_torch for r in rows), rows
