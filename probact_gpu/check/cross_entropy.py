"""check cases: cross_entropy forward (loss) and backward (dlogits) through the public API (the
tiling heuristics pick the path, as for a user), over a representative grid of options; torch's
error on the same inputs beside ours wherever torch has every option of the case."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from .. import reference
from ..ops.cross_entropy import cross_entropy
from ..testing import make_input, to_numpy64
from . import Case, Row, compare

IGNORE = -100

# (shape (N, C), scale, why). Small: interpreter-sized; with the CPU's 4 "SMs" 3 rows of 9000
# split, 16 rows of 9000 run multi tile, the rest single tile.
SMALL = [
    ((6, 1), 1.0, "one class"),
    ((9, 7), 2.0, "odd width, several rows per program"),
    ((6, 1000), 2.0, "small vocab"),
    ((3, 4097), 2.0, "one past a power of two"),
    ((16, 9000), 2.0, "multi tile"),
    ((3, 9000), 2.0, "few long rows: split"),
    ((4, 257), 1e4, "±1e4 logits"),
]
LARGE = [
    ((4096, 32000), 2.0, "LM vocab 32000"),
    ((4096, 128256), 2.0, "LM vocab 128256"),
    ((8, 262144), 2.0, "few long rows: split"),
    ((2, 1 << 20), 2.0, "1M classes"),
]

# Representative option sets: each option alone, the common pairs, everything at once.
OPTIONS = [
    ("mean", dict()),
    ("sum", dict(reduction="sum")),
    ("none", dict(reduction="none")),
    ("weight+ignore", dict(weight=True, ignore=True)),
    ("smoothing", dict(label_smoothing=0.1)),
    ("weight+smoothing+ignore", dict(weight=True, label_smoothing=0.1, ignore=True)),
    ("z_loss", dict(z_loss=1e-4)),
    # grad_output ≠ 1 (a loss scale, an accumulation divisor): the gradient recomputed for it
    ("mean grad_output=0.37", dict(grad_output=0.37)),
    ("softcap+scale", dict(softcap=30.0, logit_scale=0.5)),
    ("all", dict(weight=True, ignore=True, label_smoothing=0.1, z_loss=1e-4, softcap=30.0,
                 logit_scale=0.5)),
]
_EXTRAS = {"z_loss", "softcap", "logit_scale"}
_OVERFLOW_16BIT = {"sum", "z_loss", "all"}


def _run(shape, scale, name, opts, dtype, device, rng) -> list[Row]:
    opts = dict(opts)
    n, c = shape
    x, x64 = make_input(shape, dtype, rng, scale=scale, device=device)
    t = rng.integers(0, c, n)
    if opts.pop("ignore", False):
        t[rng.random(n) < 0.125] = IGNORE
    target = torch.from_numpy(t).to(device)
    if opts.pop("weight", False):
        opts["weight"] = torch.from_numpy(rng.uniform(0.5, 2.0, c)).to(dtype).to(device)
    red = opts.get("reduction", "mean")
    dy = torch.full((), opts.pop("grad_output", 1.0), dtype=dtype, device=device)
    if red == "none":
        dy, _ = make_input((n,), dtype, rng, device=device)
    w64 = None if "weight" not in opts else to_numpy64(opts["weight"])
    ref_opts = {k: v for k, v in opts.items() if k != "weight"}
    loss_ref, _, grad_ref = reference.cross_entropy(
        x64, t, w64, IGNORE, dy=to_numpy64(dy), **ref_opts)
    label = f"{n}x{c} {name}" + (f" scale={scale:g}" if scale != 1.0 else "")
    fns = [cross_entropy]
    if not _EXTRAS & set(opts):
        fns.append(torch.nn.functional.cross_entropy)
    results = []
    for fn in fns:
        xr = x.clone().requires_grad_()
        loss = fn(xr, target, **opts)
        loss.backward(dy)
        results.append((loss.detach(), xr.grad))
    theirs = results[1] if len(results) > 1 else (None, None)
    return [
        compare("cross_entropy fwd", dtype, label, results[0][0], theirs[0], loss_ref),
        compare("cross_entropy bwd", dtype, label, results[0][1], theirs[1], grad_ref),
    ]


def _soft_rows(dtype, device, rng) -> list[Row]:
    """Class-probability targets with smoothing and weights (torch has both)."""
    x, x64 = make_input((8, 50), dtype, rng, scale=2.0, device=device)
    p = rng.dirichlet(np.ones(50), 8)
    target = torch.from_numpy(p).to(dtype).to(device)
    w = torch.from_numpy(rng.uniform(0.5, 2.0, 50)).to(dtype).to(device)
    loss_ref, _, grad_ref = reference.cross_entropy_soft(
        x64, to_numpy64(target), to_numpy64(w), label_smoothing=0.1)
    results = []
    for fn in (cross_entropy, torch.nn.functional.cross_entropy):
        xr = x.clone().requires_grad_()
        loss = fn(xr, target, w, label_smoothing=0.1)
        loss.backward()
        results.append((loss.detach(), xr.grad))
    label = "8x50 soft targets"
    return [compare("cross_entropy fwd", dtype, label, results[0][0], results[1][0], loss_ref),
            compare("cross_entropy bwd", dtype, label, results[0][1], results[1][1], grad_ref)]


def cases(large: bool) -> list[Case]:
    table = LARGE if large else SMALL
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape, scale, _why in table:
            label = "x".join(map(str, shape))
            # Every option set on the first shapes, the plain and "all" sets on the rest.
            for name, opts in OPTIONS:
                if shape[1] > 1000 and name not in ("mean", "all"):
                    continue
                if scale >= 1e4 and name in _OVERFLOW_16BIT:
                    continue  # a loss ~1e5 is past fp16's range (65504) whoever computes it
                out.append(Case(f"cross_entropy {name}", dtype, label,
                                partial(_run, shape, scale, name, opts, dtype)))
        out.append(Case("cross_entropy soft", dtype, "8x50", partial(_soft_rows, dtype)))
    return out
