"""check cases: fused linear + cross-entropy, loss and the three gradients, against the float64
reference (logits formed in float64 from the same rounded inputs); torch eager's
``cross_entropy(h @ W.T + b)`` beside ours."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from .. import reference
from ..ops.linear_cross_entropy import linear_cross_entropy
from ..testing import make_input
from . import Case, Row, compare

# (tokens, hidden, vocab, chunk_size, why)
SMALL = [(37, 16, 101, 8, "5 chunks, V odd"), (20, 8, 1000, None, "one chunk")]
LARGE = [(1024, 1024, 32000, 256, "4 chunks of an LM head"),
         (1000, 512, 50257, None, "GPT-2 vocab, default chunk")]


def _run(n, hidden, vocab, chunk, reduction, low_memory, dtype, device, rng) -> list[Row]:
    h, h64 = make_input((n, hidden), dtype, rng, device=device)
    w, w64 = make_input((vocab, hidden), dtype, rng, scale=hidden**-0.5, device=device)
    b, b64 = make_input((vocab,), dtype, rng, device=device)
    target_np = rng.integers(0, vocab, n)
    target_np[::8] = -100
    target = torch.from_numpy(target_np).to(device)
    # reduction "none": per-token upstream gradients of a token-mean loss (as a trainer weighting
    # tokens), so dW, a sum over tokens, stays O(1) as the tolerances' atol assumes. With dy ~ 1
    # a token, dW summed 37 tokens' errors of the bf16-rounded logits (ulp(logit) · p each,
    # inherent to bf16 logits: torch's are the same) past atol: dW bf16 37x16x101 failed the
    # tolerance for ours and torch's alike (ours / torch 0.86).
    dy_np = rng.standard_normal(n) / n if reduction == "none" else 1.0
    dy = torch.tensor(dy_np, dtype=dtype, device=device)
    dy_np = dy.double().cpu().numpy()  # the reference sees the rounded grad_output too
    logits64 = h64 @ w64.T + b64
    loss_ref, _, dlogits = reference.cross_entropy(logits64, target_np, reduction=reduction,
                                                   label_smoothing=0.05, dy=dy_np)
    refs = (np.asarray(loss_ref), dlogits @ w64, dlogits.T @ h64)
    results = []
    for fn in (
        lambda h, w, b: linear_cross_entropy(h, w, target, linear_bias=b, reduction=reduction,
                                             label_smoothing=0.05, chunk_size=chunk,
                                             low_memory=low_memory),
        lambda h, w, b: torch.nn.functional.cross_entropy(
            h @ w.T + b, target, reduction=reduction, label_smoothing=0.05),
    ):
        hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(hr, wr, b)
        loss.backward(dy)
        results.append((loss.detach(), hr.grad, wr.grad))
    label = f"{n}x{hidden}x{vocab} {reduction}" + (f" chunk={chunk}" if chunk else "")
    label += " low_memory" if low_memory else ""
    names = ("loss", "dh", "dW")
    return [compare(f"linear_cross_entropy {name}", dtype, label, ours, theirs, ref)
            for name, ours, theirs, ref in zip(names, results[0], results[1], refs, strict=True)]


def cases(large: bool) -> list[Case]:
    out = []
    for n, hidden, vocab, chunk, _why in LARGE if large else SMALL:
        for dtype in (torch.float32, torch.bfloat16):
            for reduction, low_memory in (("mean", False), ("none", False), ("mean", True)):
                out.append(Case("linear_cross_entropy", dtype, f"{n}x{hidden}x{vocab}",
                                partial(_run, n, hidden, vocab, chunk, reduction, low_memory,
                                        dtype)))
    return out
