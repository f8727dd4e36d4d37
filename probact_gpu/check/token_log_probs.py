"""check cases: token_log_probs — log-prob of the chosen token, entropy, lse, and the gradient of
``Σ g·logp + Σ h·entropy`` through both — against the float64 reference, through the public API
(the tiling heuristics pick the path, as for a user); torch eager's unfused path beside ours:
``log_softmax`` + ``gather`` for logp, ``−Σ softmax · log_softmax`` for the entropy,
``logsumexp`` for lse, all in the logits' dtype (what an RL trainer writes by hand)."""

from __future__ import annotations

from functools import partial

import torch

from .. import reference_lm_head
from ..ops.token_log_probs import token_log_probs
from ..options import HeadTransform
from ..testing import make_input, to_numpy64
from . import Case, Row, compare

IGNORE = -100

# (shape (N, V), scale, why). Small: interpreter-sized; with the CPU's 4 "SMs" 3 rows of 9000
# split, 16 rows of 9000 run multi tile, the rest single tile.
SMALL = [
    ((6, 1), 1.0, "one class"),
    ((9, 7), 2.0, "odd width, several rows per program"),
    ((3, 4097), 2.0, "one past a power of two"),
    ((16, 9000), 2.0, "multi tile"),
    ((3, 9000), 2.0, "few long rows: split"),
    ((4, 257), 1e4, "±1e4 logits"),
]
LARGE = [
    ((4096, 32000), 2.0, "LM vocab 32000"),
    ((4096, 128256), 2.0, "LM vocab 128256"),
    ((1024, 151936), 2.0, "LM vocab 151936"),
    ((8, 262144), 2.0, "few long rows: split"),
]

OPTIONS = [
    ("plain", dict()),
    ("temperature", dict(temperature=0.7)),
    ("softcap+temperature+scale", dict(softcap=30.0, temperature=1.3, logit_scale=0.5)),
]


def _eager(x, target, transform: HeadTransform):
    """torch's unfused path in the logits' dtype: log_softmax + gather, entropy from softmax
    and log_softmax, logsumexp; ignored rows 0."""
    z = transform.apply(x)
    logp_all = torch.log_softmax(z, dim=-1)
    valid = target != IGNORE
    safe = torch.where(valid, target, 0)
    logp = torch.where(valid, logp_all.gather(-1, safe[:, None])[:, 0], 0.0)
    entropy = torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    return logp, entropy, torch.logsumexp(z, dim=-1)


def _run(shape, scale, name, opts, dtype, device, rng) -> list[Row]:
    n, v = shape
    x, x64 = make_input(shape, dtype, rng, scale=scale, device=device)
    t = rng.integers(0, v, n)
    t[rng.random(n) < 0.125] = IGNORE
    target = torch.from_numpy(t).to(device)
    g, _ = make_input((n,), torch.float32, rng, device=device)
    h, _ = make_input((n,), torch.float32, rng, device=device)
    transform = HeadTransform(**opts)
    expected = reference_lm_head.token_log_probs(
        x64, t, grad_logp=to_numpy64(g), grad_entropy=to_numpy64(h), **opts)
    ours = partial(token_log_probs, target=target, return_entropy=True, return_lse=True, **opts)
    results = run_both((lambda x: ours(x)[:3], lambda x: _eager(x, target, transform)), (x,),
                       g, h)
    label = f"{n}x{v} {name}" + (f" scale={scale:g}" if scale != 1.0 else "")
    refs = (expected["logp"], expected["entropy"], expected["lse"], expected["dx"])
    return compare_each("token_log_probs", dtype, label, ("logp", "entropy", "lse", "bwd"),
                        results, refs)


def run_both(fns, leaves, grad_logp, grad_entropy) -> list[tuple]:
    """Ours and torch's: each ``fn(*leaves)`` (logp, entropy first among its outputs) on fresh
    copies of ``leaves`` that require grad, backpropagating ``Σ g·logp + Σ g_H·entropy``;
    per fn, its outputs detached then the leaves' gradients."""
    results = []
    for fn in fns:
        copies = [t.clone().requires_grad_() for t in leaves]
        outs = fn(*copies)
        logp, entropy = outs[0], outs[1]
        ((logp * grad_logp.to(logp.dtype)).sum()
         + (entropy * grad_entropy.to(entropy.dtype)).sum()).backward()
        results.append((*(o.detach() for o in outs), *(c.grad for c in copies)))
    return results


def compare_each(op: str, dtype, label: str, names, results, refs) -> list[Row]:
    """One row per named output: ours (``results[0]``) and torch's (``results[1]``) against the
    reference."""
    return [compare(f"{op} {what}", dtype, label, ours, theirs, ref)
            for what, ours, theirs, ref in zip(names, results[0], results[1], refs, strict=True)]


def cases(large: bool) -> list[Case]:
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape, scale, _why in LARGE if large else SMALL:
            label = "x".join(map(str, shape))
            for name, opts in OPTIONS:
                out.append(Case(f"token_log_probs {name}", dtype, label,
                                partial(_run, shape, scale, name, opts, dtype)))
    return out
