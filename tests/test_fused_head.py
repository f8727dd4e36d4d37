"""The fused LM head (kernels/head_gemm.py, probact_gpu.ops.fused_head): logits formed by
``tl.dot`` tile by tile and consumed on chip, against the NumPy float64 reference on the same
(rounded) inputs; its accuracy where the default path rounds the logits; the fp32 splits; the
skipped ignored tokens; ``logp ≤ 0``; edge cases.

Shapes are small for the interpreter (one ``tl.dot`` tile is 64 tokens × 128 classes) but odd:
13 tokens, hidden 40 (not a multiple of the k step), 300 classes (two whole tiles and a partial
one). The bitwise contract (batch, chunk, TP, run-to-run) is tests/test_batch_invariant.py's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probact_gpu import reference_lm_head as ref
from probact_gpu.ops.fused_head import active_order, fused_token_log_probs
from probact_gpu.ops.linear_token_log_probs import linear_token_log_probs
from probact_gpu.ops.token_log_probs import token_log_probs
from probact_gpu.options import HeadTransform
from probact_gpu.testing import assert_close_to_reference, make_input, record_launches, to_numpy64

IGNORE = -100
N, HIDDEN, VOCAB = 13, 40, 300


def _head(rng, dtype, device, *, n=N, hidden=HIDDEN, vocab=VOCAB, logit_std=3.0, bias=True):
    """h (n, hidden), W (vocab, hidden), b: logits of about ``logit_std``; float64 copies."""
    h, h64 = make_input((n, hidden), dtype, rng, device=device)
    w, w64 = make_input((vocab, hidden), dtype, rng, scale=logit_std / np.sqrt(hidden),
                        device=device)
    b, b64 = make_input((vocab,), dtype, rng, device=device) if bias else (None, None)
    return h, h64, w, w64, b, b64


IDENTITY = HeadTransform()


def _fused(h, w, t, b=None, *, transform=IDENTITY, entropy=True, argmax=False,
           all_rows=False, needs_grad=False, fp32_precision="ieee", chunk_size=None,
           budget=None):
    return fused_token_log_probs(h, w, t, b, ignore_index=IGNORE, transform=transform,
                                 compute_entropy=entropy, compute_argmax=argmax,
                                 all_rows=all_rows, needs_grad=needs_grad,
                                 fp32_precision=fp32_precision, chunk_size=chunk_size,
                                 budget=budget)


def _expected(h64, w64, b64, t, g=None, gh=None, **kw):
    logits = h64 @ w64.T + (0.0 if b64 is None else b64)
    out = ref.token_log_probs(logits, t, ignore_index=IGNORE, grad_logp=g, grad_entropy=gh,
                              **kw)
    if "dx" in out:
        out["dh"], out["dw"], out["db"] = out["dx"] @ w64, out["dx"].T @ h64, out["dx"].sum(0)
    return out


@pytest.mark.parametrize("dtype,transform,why", [
    (torch.bfloat16, dict(softcap=8.0, temperature=0.7), "bf16 operands on the tensor cores, "
     "softcap and temperature through the chain rule"),
    (torch.float32, dict(logit_scale=1.3), "fp32 operands by IEEE fmas, a scale"),
])
def test_fused_head_matches_reference(dtype, transform, why, device, rng):
    h, h64, w, w64, b, b64 = _head(rng, dtype, device)
    t = torch.from_numpy(rng.integers(0, VOCAB, N)).to(device)
    t[[2, 9]] = IGNORE
    g, gh = rng.standard_normal(N), rng.standard_normal(N)
    expected = _expected(h64, w64, b64, to_numpy64(t), g, gh, **transform)
    hr, wr, br = (x.clone().requires_grad_() for x in (h, w, b))
    with record_launches() as log:
        logp, entropy, lse, arg, _ = _fused(hr, wr, t, br, transform=HeadTransform(**transform),
                                            argmax=True, all_rows=True, needs_grad=True)
    assert {launch.kernel for launch in log} >= {"head_gemm_fwd_kernel",
                                                  "invariant_merge_kernel"}
    # the fp32 math's rounding on logits of a few units (not the output dtype's tolerance)
    for name, value in (("logp", logp), ("entropy", entropy), ("lse", lse)):
        assert_close_to_reference(value, expected[name], torch.float32, name)
    np.testing.assert_array_equal(arg.cpu().numpy(), expected["argmax"])
    ((logp * torch.from_numpy(g).float().to(device)).sum()
     + (entropy * torch.from_numpy(gh).float().to(device)).sum()).backward()
    for name, grad in (("dh", hr.grad), ("dw", wr.grad), ("db", br.grad)):
        # one rounding of dz and one of the result to the input's dtype
        assert_close_to_reference(grad, expected[name], dtype, name)
    assert bool((hr.grad[[2, 9]] == 0).all())


def test_fused_head_accuracy_where_the_default_path_rounds_logits(device, rng):
    """bf16 hidden states and head with logits of std 13: the default path rounds the chunk's
    logits to bf16 (ulp 0.25 at 40) and misses float64 of the same inputs by ~0.1 nat; the
    fused head keeps them in fp32 and stays within 1e-4 nat."""
    n, hidden, vocab = 64, 64, 1000
    h, h64, w, w64, _, _ = _head(rng, torch.bfloat16, device, n=n, hidden=hidden, vocab=vocab,
                                 logit_std=13.0, bias=False)
    t = torch.from_numpy(rng.integers(0, vocab, n)).to(device)
    expected = _expected(h64, w64, None, to_numpy64(t))
    assert 12.0 < float(np.std(h64 @ w64.T)) < 14.0
    default = linear_token_log_probs(h, w, t, return_entropy=True)
    logp, entropy, *_ = _fused(h, w, t)
    default_err = np.abs(to_numpy64(default.logprobs) - expected["logp"]).max()
    fused_err = np.abs(to_numpy64(logp) - expected["logp"]).max()
    assert default_err > 0.05, default_err
    assert fused_err <= 1e-4, fused_err
    assert np.abs(to_numpy64(entropy) - expected["entropy"]).max() <= 1e-4


@pytest.mark.parametrize("precision,bound,why", [
    ("bf16x3", 1e-3, "16 of fp32's 24 bits a product: ~1e-5 relative"),
    ("bf16x6", 1e-4, "all 24 bits, six products: fp32's own rounding"),
])
def test_fused_head_fp32_master_weights_split(precision, bound, why, device, rng):
    """fp32 hidden states and head multiplied on the bf16 tensor cores (the split's launches
    carry its SPLIT), within ``bound`` nat of float64 at logits of std 13."""
    n, hidden, vocab = 64, 64, 300
    h, h64, w, w64, _, _ = _head(rng, torch.float32, device, n=n, hidden=hidden, vocab=vocab,
                                 logit_std=13.0, bias=False)
    t = torch.from_numpy(rng.integers(0, vocab, n)).to(device)
    expected = _expected(h64, w64, None, to_numpy64(t))
    with record_launches() as log:
        logp, *_ = _fused(h, w, t, fp32_precision=precision)
    split = {"bf16x3": 1, "bf16x6": 2}[precision]
    assert [launch.meta["SPLIT"] for launch in log if launch.kernel == "head_gemm_fwd_kernel"] \
        == [split]
    assert np.abs(to_numpy64(logp) - expected["logp"]).max() <= bound


def test_fused_head_ignored_tokens_cost_no_work(device, rng):
    """Ignored tokens are sorted behind the others and never computed: NaN hidden states there
    reach no output or gradient, and every other token's outputs and dW, db are those of the
    batch without them, bit for bit (the same tokens in the same order)."""
    h, _, w, _, b, _ = _head(rng, torch.bfloat16, device)
    t = torch.from_numpy(rng.integers(0, VOCAB, N)).to(device)
    ignored = torch.tensor([0, 4, 5, 11], device=device)
    t[ignored] = IGNORE
    order, count = active_order(t, IGNORE, all_rows=False)
    keep = torch.ones(N, dtype=torch.bool, device=device)
    keep[ignored] = False
    assert int(count) == N - 4 and bool(keep[order[: N - 4]].all())
    h_nan = h.clone()
    h_nan[ignored] = float("nan")

    def run(hh, tt):
        hr, wr, br = (x.clone().requires_grad_() for x in (hh, w, b))
        logp, entropy, *_ = _fused(hr, wr, tt, br, needs_grad=True)
        (logp.sum() + entropy.sum()).backward()
        return logp, entropy, hr.grad, wr.grad, br.grad

    logp, entropy, dh, dw, db = run(h_nan, t)
    sub = run(h[keep], t[keep])
    assert bool((logp[ignored] == 0).all() and (entropy[ignored] == 0).all())
    assert bool((dh[ignored] == 0).all())
    for full, part in ((logp[keep], sub[0]), (entropy[keep], sub[1]), (dh[keep], sub[2]),
                       (dw, sub[3]), (db, sub[4])):
        assert torch.equal(full, part)


def test_fused_head_logp_never_positive(device, rng):
    """Rows whose target's logit dominates the others by 30 to 90: p_t rounds to 1 in fp32, and
    a rounded log-prob above 0 would break an importance ratio; the exact sum keeps S ≥ 1, so
    logp ≤ 0 (and entropy ≥ 0) on every row, bf16 and fp32."""
    n, hidden, vocab = 16, 32, 200
    t = torch.from_numpy(rng.choice(vocab, n, replace=False)).to(device)
    for dtype in (torch.bfloat16, torch.float32):
        h = torch.eye(n, hidden, dtype=dtype, device=device)  # token i reads hidden unit i
        w, _ = make_input((vocab, hidden), dtype, rng, scale=0.5, device=device)
        w[t, torch.arange(n, device=device)] = torch.linspace(30.0, 90.0, n).to(dtype)
        logp, entropy, *_ = _fused(h, w, t)
        assert bool((logp <= 0).all()), logp.max()
        assert bool((entropy >= 0).all())
        assert float(logp.min()) > -1e-9
        # the default paths keep it too: the row max's term makes Σexp ≥ 1 there as well
        default = linear_token_log_probs(h, w, t, return_entropy=True)
        assert bool((default.logprobs <= 0).all()) and bool((default.entropy >= 0).all())
        assert bool((token_log_probs(h @ w.T, t) <= 0).all())


def test_fused_head_masked_classes_and_edges(device, rng):
    """A bias of −inf masks classes (their p is 0, their gradient 0, never NaN); a vocabulary
    of 37 (one partial tile); no tokens; every token ignored."""
    h, h64, w, w64, b, b64 = _head(rng, torch.float32, device, vocab=37)
    b[::3] = float("-inf")
    b64 = to_numpy64(b)
    t = torch.from_numpy(rng.integers(0, 12, N) * 3 + 1).to(device)  # never a masked class
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp, entropy, *_ = _fused(hr, wr, t, b, needs_grad=True)
    expected = _expected(h64, w64, b64, to_numpy64(t), np.ones(N), np.ones(N))
    assert_close_to_reference(logp, expected["logp"], torch.float32, "logp")
    assert_close_to_reference(entropy, expected["entropy"], torch.float32, "entropy")
    (logp.sum() + entropy.sum()).backward()
    assert_close_to_reference(wr.grad, expected["dw"], torch.float32, "dw")
    assert bool((wr.grad[::3] == 0).all())
    empty = _fused(h[:0], w, t[:0], b)
    assert empty[0].shape == (0,)
    all_ignored = torch.full((N,), IGNORE, device=device)
    hr = h.clone().requires_grad_()
    logp, entropy, *_ = _fused(hr, w, all_ignored, b, needs_grad=True)
    (logp.sum() + entropy.sum()).backward()
    assert bool((logp == 0).all() and (hr.grad == 0).all())


def test_fused_head_fp64_and_no_hidden_units(device, rng):
    """fp64 (fp64 products, the merge's second limb) against float64 to fp64's tolerance; and a
    hidden size of 0 (the logits are the bias: db is still formed)."""
    n, hidden, vocab = 5, 8, 130
    h, h64, w, w64, b, b64 = _head(rng, torch.float64, device, n=n, hidden=hidden, vocab=vocab)
    t = torch.from_numpy(rng.integers(0, vocab, n)).to(device)
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp, entropy, *_ = _fused(hr, wr, t, b, needs_grad=True)
    expected = _expected(h64, w64, b64, to_numpy64(t), np.ones(n), np.ones(n))
    assert_close_to_reference(logp, expected["logp"], torch.float64, "logp")
    assert_close_to_reference(entropy, expected["entropy"], torch.float64, "entropy")
    (logp.sum() + entropy.sum()).backward()
    assert_close_to_reference(wr.grad, expected["dw"], torch.float64, "dw")
    h0 = torch.zeros(n, 0, device=device)
    w0 = torch.zeros(vocab, 0, device=device)
    b0 = torch.from_numpy(rng.standard_normal(vocab)).float().to(device).requires_grad_()
    logp, entropy, *_ = _fused(h0, w0, t, b0, needs_grad=True)
    expected = _expected(np.zeros((n, 0)), np.zeros((vocab, 0)), to_numpy64(b0), to_numpy64(t),
                         np.ones(n), np.ones(n))
    (logp.sum() + entropy.sum()).backward()
    assert_close_to_reference(b0.grad, expected["db"], torch.float32, "db")
