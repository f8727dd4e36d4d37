"""check cases: distillation — every divergence's per-token value and the gradient of
``Σ g·loss`` to the student's logits, on logits (dense teacher, and a sparse top-k teacher on
the KL rows) and from both heads' hidden states — against the float64 reference
(``probact_gpu.reference_distillation``), through the public API (the tiling heuristics pick the
path). torch's route beside ours: both heads' ``log_softmax`` on float32 and ``F.kl_div``
(``log_target=True``) for the KLs, TRL's mixture for JSD, ``½ Σ|p − q|`` for TVD, rounded to
the logits' dtype like ours (what a trainer writes by hand); the fused linear form against the
same route over ``h @ W.T``."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from .. import reference_distillation
from ..ops.distillation import TopKTeacher, distillation_loss
from ..ops.linear_distillation import linear_distillation_loss
from ..testing import make_input, to_numpy64
from . import Case, Row
from .token_log_probs import compare_each

IGNORE = -100

# (bench op name, keywords): the registry's names for the rows' first word
DIVERGENCES = {
    "distillation_kl": dict(divergence="kl"),
    "distillation_reverse_kl": dict(divergence="reverse_kl"),
    "distillation_jsd": dict(divergence="jsd", beta=0.5),
    "distillation_tvd": dict(divergence="tvd"),
}
# (shape (N, V), scale, why). Small: interpreter-sized; with the CPU's 4 "SMs" 3 rows of 9000
# split, 16 rows run one program a row over several tiles.
SMALL = [
    ((9, 7), 2.0, "odd width"),
    ((3, 4097), 2.0, "one past a power of two"),
    ((16, 9000), 2.0, "several tiles"),
    ((3, 9000), 2.0, "few long rows: split"),
    ((4, 257), 1e4, "±1e4 logits"),
]
LARGE = [
    ((4096, 32000), 2.0, "LM vocab 32000"),
    ((4096, 128256), 2.0, "LM vocab 128256"),
    ((1024, 151936), 2.0, "LM vocab 151936"),
    ((8, 262144), 2.0, "few long rows: split"),
]
OPTIONS = {
    "plain": dict(),
    "T=2 softcap": dict(temperature=2.0, student_softcap=30.0),
}


def _torch_rows(student, teacher, kw):
    """torch's route per token (float32 log_softmax, F.kl_div / TRL's mixture / ½|p − q|)."""
    temperature = kw.get("temperature", 1.0)
    s = student.float()
    if kw.get("student_softcap"):
        cap = kw["student_softcap"]
        s = cap * torch.tanh(s / cap)
    ls = torch.log_softmax(s / temperature, -1)
    lt = torch.log_softmax(teacher.float() / temperature, -1)
    name = kw["divergence"]
    if name == "kl":
        rows = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    elif name == "reverse_kl":
        rows = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    elif name == "tvd":
        rows = 0.5 * (ls.exp() - lt.exp()).abs().sum(-1)
    else:
        beta = kw["beta"]
        lm = torch.logsumexp(torch.stack([ls + torch.log1p(torch.tensor(-beta)),
                                          lt + torch.log(torch.tensor(beta))]), 0)
        rows = (beta * F.kl_div(lm, lt, reduction="none", log_target=True)
                + (1 - beta) * F.kl_div(lm, ls, reduction="none", log_target=True)).sum(-1)
    return rows.to(student.dtype)


def _grads(fn, leaves, g):
    """(rows detached, grads of the leaves) of ``Σ g·fn(*leaves)`` on fresh copies."""
    copies = [t.clone().requires_grad_() for t in leaves]
    rows = fn(*copies)
    (rows.float() * g).sum().backward()
    return (rows.detach(), *(c.grad for c in copies))


def _ref_kw(kw):
    out = {k: v for k, v in kw.items() if k in ("divergence", "beta", "temperature")}
    if kw.get("student_softcap"):
        out["student"] = dict(softcap=kw["student_softcap"])
    return out


def _run(op, shape, scale, opt, dtype, device, rng) -> list[Row]:
    n, v = shape
    kw = dict(DIVERGENCES[op], **OPTIONS[opt])
    xs, xs64 = make_input(shape, dtype, rng, scale=scale, device=device)
    xt, xt64 = make_input(shape, dtype, rng, scale=scale, device=device)
    t = rng.integers(0, v, n)
    t[rng.random(n) < 0.125] = IGNORE
    target = torch.from_numpy(t).to(device)
    g, g64 = make_input((n,), torch.float32, rng, device=device)
    expected = reference_distillation.distillation(xs64, xt64, t, grad_rows=g64,
                                                   **_ref_kw(kw))
    kept = torch.from_numpy(t != IGNORE).to(device)
    results = [
        _grads(lambda s: distillation_loss(s, xt, target, reduction="none", **kw), (xs,), g),
        _grads(lambda s: torch.where(kept, _torch_rows(s, xt, kw), 0.0), (xs,), g),
    ]
    label = f"{n}x{v} {opt}" + (f" scale={scale:g}" if scale != 1.0 else "")
    return compare_each(op, dtype, label, ("loss", "bwd"), results,
                        (expected["loss"], expected["dx"]))


def _run_topk(shape, k, dtype, device, rng) -> list[Row]:
    """A sparse top-k teacher (KL over the k classes and the tail); no torch equivalent."""
    n, v = shape
    xs, xs64 = make_input(shape, dtype, rng, scale=2.0, device=device)
    full = torch.log_softmax(torch.from_numpy(rng.standard_normal(shape) * 3.0), -1)
    lp, idx = full.topk(k, -1)
    lp, idx = lp.float().to(device), idx.to(device)
    g, g64 = make_input((n,), torch.float32, rng, device=device)
    expected = reference_distillation.topk_distillation(
        xs64, to_numpy64(idx).astype(int), to_numpy64(lp), grad_rows=g64)
    ours = _grads(lambda s: distillation_loss(s, TopKTeacher(idx, lp), reduction="none"),
                  (xs,), g)
    return compare_each("distillation_kl", dtype, f"{n}x{v} top-{k} teacher",
                        ("topk loss", "topk bwd"), [ours, (None, None)],
                        (expected["loss"], expected["dx"]))


def _run_linear(n, hidden, vocab, chunk, dtype, device, rng) -> list[Row]:
    """The fused linear JSD against the reference on float64 logits from the same rounded
    inputs; torch's route over ``h @ W.T`` (per token, so the tolerances hold)."""
    hs, hs64 = make_input((n, hidden), dtype, rng, device=device)
    ws, ws64 = make_input((vocab, hidden), dtype, rng, scale=hidden**-0.5, device=device)
    ht, ht64 = make_input((n, 2 * hidden), dtype, rng, device=device)
    wt, wt64 = make_input((vocab, 2 * hidden), dtype, rng, scale=(2 * hidden)**-0.5,
                          device=device)
    g, g64 = make_input((n,), torch.float32, rng, scale=1.0 / n, device=device)
    kw = dict(divergence="jsd", beta=0.5, temperature=1.5)
    expected = reference_distillation.distillation(hs64 @ ws64.T, ht64 @ wt64.T, grad_rows=g64,
                                                   **_ref_kw(kw))
    dz = expected["dx"]
    results = [
        _grads(lambda h, w: linear_distillation_loss(h, w, ht, wt, reduction="none",
                                                     chunk_size=chunk, **kw), (hs, ws), g),
        _grads(lambda h, w: _torch_rows(h @ w.T, ht @ wt.T, kw), (hs, ws), g),
    ]
    return compare_each("linear_distillation_jsd", dtype,
                        f"{n}x{hidden}/{2 * hidden}x{vocab}" + (f" chunk={chunk}" if chunk
                                                                else ""),
                        ("loss", "dh", "dW"), results,
                        (expected["loss"], dz @ ws64, dz.T @ hs64))


def cases(large: bool) -> list[Case]:
    out = []
    for op in DIVERGENCES:
        for dtype in (torch.float32, torch.bfloat16):
            for shape, scale, _why in LARGE if large else SMALL:
                label = "x".join(map(str, shape))
                for opt in OPTIONS:
                    if scale != 2.0 and opt != "plain":
                        continue
                    out.append(Case(f"{op} {opt}", dtype, label,
                                    partial(_run, op, shape, scale, opt, dtype)))
    topk = ((4096, 128256), 64) if large else ((6, 300), 8)
    for dtype in (torch.float32, torch.bfloat16):
        out.append(Case("distillation_kl top-k", dtype, "x".join(map(str, topk[0])),
                        partial(_run_topk, topk[0], topk[1], dtype)))
    linear = [(1024, 1024, 32000, 256)] if large else [(20, 16, 301, 8)]
    for n, hidden, vocab, chunk in linear:
        for dtype in (torch.float32, torch.bfloat16):
            out.append(Case("linear_distillation_jsd", dtype, f"{n}x{hidden}x{vocab}",
                            partial(_run_linear, n, hidden, vocab, chunk, dtype)))
    return out
