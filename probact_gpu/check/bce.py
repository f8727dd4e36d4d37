"""check cases: ``bce``, binary_cross_entropy_with_logits (loss and input gradient) through the
public API, each option alone and together."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as torch_F

from .. import reference
from ..ops.bce import binary_cross_entropy_with_logits
from ..testing import make_bce_inputs, make_input, to_numpy64
from . import Case, Row, compare

# (shape, options, scale, why); options: w = weight (per class), r = per-row weight,
# p = pos_weight, s = soft targets, T = transposed input.
SMALL = [
    ((), "", 1.0, "0-d"),
    ((7,), "", 1.0, "odd size"),
    ((9, 129), "s", 2.0, "soft targets"),
    ((5, 33), "w", 1.0, "per-class weight"),
    ((5, 33), "r", 1.0, "per-row weight (N, 1)"),
    ((5, 33), "p", 1.0, "pos_weight"),
    ((4, 7, 33), "wps", 1.0, "every option"),
    ((33, 65), "Tp", 1.0, "transposed input"),
    ((4097,), "s", 1e4, "±1e4 logits: never NaN"),
]
LARGE = [
    ((1 << 14, 1 << 14), "", 2.0, "PERF shape: 2^28 elements"),
    ((4096, 4097), "wps", 2.0, "every option, odd"),
    ((8192, 1000), "Tp", 1.0, "transposed"),
]


def _inputs(shape, options, scale, dtype, device, rng):
    if "T" in options:  # the reversed shape, with the logits laid out transposed
        shape = tuple(reversed(shape))
    x, t, w, pw = make_bce_inputs(shape, dtype, rng, device, options=options, scale=scale)
    if "T" in options:
        x = x.t().contiguous().t()
    return x, t, w, pw


def _np(t):
    return None if t is None else to_numpy64(t)


def _run(shape, options, scale, reduction, dtype, device, rng) -> list[Row]:
    x, t, w, pw = _inputs(shape, options, scale, dtype, device, rng)
    out_shape = tuple(x.shape) if reduction == "none" else ()
    dy, dy64 = make_input(out_shape, dtype, rng, device=device)
    label = ("x".join(map(str, shape)) or "0-d") + f" {reduction}" + (
        f" [{options}]" if options else "")
    if scale != 1.0:
        label += f" scale={scale:g}"
    results = []
    for fn in (binary_cross_entropy_with_logits, torch_F.binary_cross_entropy_with_logits):
        xr = x.clone().requires_grad_()
        loss = fn(xr, t, w, reduction=reduction, pos_weight=pw)
        loss.backward(dy)
        results.append((loss.detach(), xr.grad))
    args = (to_numpy64(x), to_numpy64(t))
    kw = {"weight": _np(w), "pos_weight": _np(pw), "reduction": reduction}
    loss_ref = reference.bce_with_logits(*args, **kw)
    # The loss is stored in the dtype: a sum beyond its range is inf (fp16 at 1e4 logits).
    loss_ref = to_numpy64(torch.from_numpy(np.array(loss_ref)).to(dtype))
    grad_ref = reference.bce_with_logits_grad(*args, dy64, **kw)
    return [
        compare("bce fwd", dtype, label, results[0][0], results[1][0], loss_ref),
        compare("bce bwd", dtype, label, results[0][1], results[1][1], grad_ref),
    ]


def _edge_rows(dtype, device, rng) -> list[Row]:
    """±1000, ±1e4, ±inf, NaN logits against hard and soft labels, with pos_weight."""
    x = torch.tensor([1000.0, -1000.0, 1e4, -1e4, np.inf, np.inf, -np.inf, -np.inf, np.nan],
                     dtype=dtype, device=device)
    t = torch.tensor([0.0, 1.0, 0.3, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5], dtype=dtype, device=device)
    pw = torch.tensor(3.0, dtype=dtype, device=device)
    ref = reference.bce_with_logits(to_numpy64(x), to_numpy64(t), pos_weight=3.0,
                                    reduction="none")
    ours = binary_cross_entropy_with_logits(x, t, reduction="none", pos_weight=pw)
    theirs = torch_F.binary_cross_entropy_with_logits(x, t, reduction="none", pos_weight=pw)
    return [compare("bce fwd", dtype, "±1000, ±1e4, ±inf, NaN", ours, theirs, ref)]


def cases(large: bool) -> list[Case]:
    table = LARGE if large else SMALL
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    out = []
    for dtype in dtypes:
        for shape, options, scale, _why in table:
            for reduction in ("mean", "sum", "none"):
                label = "x".join(map(str, shape)) or "0-d"
                out.append(Case("bce", dtype, label,
                                partial(_run, shape, options, scale, reduction, dtype)))
        out.append(Case("bce", dtype, "edge values", partial(_edge_rows, dtype)))
    return out
