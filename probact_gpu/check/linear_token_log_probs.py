"""check cases: linear_token_log_probs — log-probs and entropy from hidden states and an LM head,
and the gradients to the hidden states, the head and its bias through both — against the float64
reference (logits formed in float64 from the same rounded inputs); torch eager's unfused
``log_softmax(h @ W.T + b)`` + ``gather`` + entropy beside ours.

The large-logit rows (``LARGE_LOGITS``: bf16 inputs whose logits have a standard deviation of
13) run the fused head (``batch_invariant=True``, which never rounds the logits) and the default
path (whose chunk GEMM rounds them to bf16, ulp 0.25 at 40) on the same inputs, each beside
torch eager (which rounds them too)."""

from __future__ import annotations

import dataclasses
from functools import partial

import torch

from .. import reference_lm_head
from ..ops.linear_token_log_probs import linear_token_log_probs
from ..options import HeadTransform
from ..testing import make_input, to_numpy64
from . import Case, Row
from .token_log_probs import IGNORE, _eager, compare_each, run_both

# (tokens, hidden, vocab, chunk_size, why)
SMALL = [(37, 16, 101, 8, "5 chunks, V odd"), (20, 8, 1000, None, "one chunk")]
LARGE = [(1024, 1024, 32000, 256, "4 chunks of an LM head"),
         (2048, 4096, 128256, None, "Llama-3 vocab, default chunk")]
OPTIONS = {"plain": dict(), "softcap+temperature": dict(softcap=30.0, temperature=0.7)}
# (tokens, hidden, vocab, logit std): the fused head's accuracy against the default path's
LARGE_LOGITS = {False: (64, 64, 1000, 13.0), True: (1024, 1024, 32000, 13.0)}


def _run(n, hidden, vocab, chunk, name, opts, dtype, device, rng) -> list[Row]:
    h, h64 = make_input((n, hidden), dtype, rng, device=device)
    w, w64 = make_input((vocab, hidden), dtype, rng, scale=hidden**-0.5, device=device)
    b, b64 = make_input((vocab,), dtype, rng, device=device)
    t = rng.integers(0, vocab, n)
    t[::8] = IGNORE
    target = torch.from_numpy(t).to(device)
    # Upstream gradients of a token-mean loss (GRPO/PPO average over tokens), so dW and db, sums
    # over tokens, stay O(1) as the tolerances assume.
    g, _ = make_input((n,), torch.float32, rng, scale=1.0 / n, device=device)
    gh, _ = make_input((n,), torch.float32, rng, scale=1.0 / n, device=device)
    expected = reference_lm_head.token_log_probs(
        h64 @ w64.T + b64, t, grad_logp=to_numpy64(g), grad_entropy=to_numpy64(gh), **opts)
    dz = expected["dx"]
    refs = (expected["logp"], expected["entropy"], dz @ w64, dz.T @ h64, dz.sum(axis=0))
    transform = HeadTransform(**opts)
    results = run_both(
        (lambda h, w, b: linear_token_log_probs(h, w, target, linear_bias=b, chunk_size=chunk,
                                                return_entropy=True, **opts)[:2],
         lambda h, w, b: _eager(h @ w.T + b, target, transform)[:2]), (h, w, b), g, gh)
    label = f"{n}x{hidden}x{vocab} {name}" + (f" chunk={chunk}" if chunk else "")
    return compare_each("linear_token_log_probs", dtype, label,
                        ("logp", "entropy", "dh", "dW", "db"), results, refs)


def _run_large_logits(n, hidden, vocab, std, dtype, device, rng) -> list[Row]:
    h, h64 = make_input((n, hidden), dtype, rng, device=device)
    w, w64 = make_input((vocab, hidden), dtype, rng, scale=std * hidden**-0.5, device=device)
    t = rng.integers(0, vocab, n)
    t[::8] = IGNORE
    target = torch.from_numpy(t).to(device)
    g, _ = make_input((n,), torch.float32, rng, scale=1.0 / n, device=device)
    gh, _ = make_input((n,), torch.float32, rng, scale=1.0 / n, device=device)
    expected = reference_lm_head.token_log_probs(
        h64 @ w64.T, t, grad_logp=to_numpy64(g), grad_entropy=to_numpy64(gh))
    dz = expected["dx"]
    refs = (expected["logp"], expected["entropy"], dz @ w64, dz.T @ h64)
    def eager(h, w):
        return _eager(h @ w.T, target, HeadTransform())[:2]

    rows = []
    label = f"{n}x{hidden}x{vocab} logit std {std:g}"
    for name, invariant in (("batch_invariant", True), ("default", False)):
        results = run_both(
            (lambda h, w, inv=invariant: linear_token_log_probs(
                h, w, target, return_entropy=True, batch_invariant=inv)[:2], eager), (h, w),
            g, gh)
        these = compare_each(f"linear_token_log_probs {name}", dtype, label,
                             ("logp", "entropy", "dh", "dW"), results, refs)
        if not invariant:  # it rounds the logits to bf16, as torch: shown, held to torch only
            these = [dataclasses.replace(r, held_to_tolerance=False) for r in these]
        rows += these
    return rows


def cases(large: bool) -> list[Case]:
    n, hidden, vocab, std = LARGE_LOGITS[large]
    out = [Case("linear_token_log_probs large logits", torch.bfloat16,
                f"{n}x{hidden}x{vocab}", partial(_run_large_logits, n, hidden, vocab, std,
                                                 torch.bfloat16))]
    for n, hidden, vocab, chunk, _why in LARGE if large else SMALL:
        for dtype in (torch.float32, torch.bfloat16):
            for name, opts in OPTIONS.items():
                out.append(Case(f"linear_token_log_probs {name}", dtype,
                                f"{n}x{hidden}x{vocab}",
                                partial(_run, n, hidden, vocab, chunk, name, opts, dtype)))
    return out
