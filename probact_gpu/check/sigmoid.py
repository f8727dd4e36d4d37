"""check cases: sigmoid and logsigmoid, forward and backward, through the public API."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as torch_F

from .. import reference
from ..ops.sigmoid import logsigmoid, sigmoid
from ..testing import make_input, to_numpy64
from . import Case, Row, compare

# (shape, scale, transpose, why)
SMALL = [
    ((), 1.0, False, "0-d"),
    ((1,), 1.0, False, "one element"),
    ((7,), 1.0, False, "odd size, one masked tile"),
    ((4097,), 4.0, False, "4097: several programs, last one masked"),
    ((33, 65), 1.0, True, "transposed input (made contiguous)"),
    ((3, 129), 1e3, False, "±1e3 logits: saturation"),
]
LARGE = [
    ((1 << 28,), 4.0, False, "PERF shape: 2^28 elements"),
    ((8192, 4097), 1.0, True, "transposed, odd"),
    ((3, 1 << 20), 1e3, False, "saturation"),
]

_OPS = {
    "sigmoid": (sigmoid, torch.sigmoid, reference.sigmoid, reference.sigmoid_grad),
    "logsigmoid": (logsigmoid, torch_F.logsigmoid, reference.logsigmoid,
                   reference.logsigmoid_grad),
}


def _run(name, shape, scale, transpose, dtype, device, rng) -> list[Row]:
    ours_fn, torch_fn, ref_fwd, ref_grad = _OPS[name]
    x, _ = make_input(shape, dtype, rng, scale=scale, device=device)
    if transpose:
        x = x.t()
    x64 = to_numpy64(x)
    dy, dy64 = make_input(tuple(x.shape), dtype, rng, device=device)
    label = "x".join(map(str, shape)) or "0-d"
    label += (" (T)" if transpose else "") + (f" scale={scale:g}" if scale != 1.0 else "")
    results = []
    for fn in (ours_fn, torch_fn):
        xr = x.clone().requires_grad_()
        y = fn(xr)
        y.backward(dy)
        results.append((y.detach(), xr.grad))
    if name == "sigmoid":
        # Backward is defined on the saved output y (dx = dy·y·(1 − y), as torch's): judge it
        # on the y it was given, rounded to the dtype, not on the exact σ(x) (near y = 1 the
        # rounding of y alone moves 1 − y by an ulp of 1).
        y64 = to_numpy64(results[0][0])
        g_ref = dy64 * y64 * (1.0 - y64)
    else:
        g_ref = ref_grad(x64, dy64)
    return [
        compare(f"{name} fwd", dtype, label, results[0][0], results[1][0], ref_fwd(x64)),
        compare(f"{name} bwd", dtype, label, results[0][1], results[1][1], g_ref),
    ]


def _edge_rows(name, dtype, device, rng) -> list[Row]:
    """±1000, ±1e4, ±inf, NaN: sigmoid exactly 1 / 0, logsigmoid(−1000) = −1000."""
    x = torch.tensor([1000.0, -1000.0, 1e4, -1e4, np.inf, -np.inf, np.nan, 0.0, 20.0, -20.0],
                     dtype=dtype, device=device)
    ours, theirs, ref, _ = _OPS[name]
    return [compare(f"{name} fwd", dtype, "±1000, ±1e4, ±inf, NaN", ours(x), theirs(x),
                    ref(to_numpy64(x)))]


def cases(large: bool) -> list[Case]:
    table = LARGE if large else SMALL
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    out = []
    for dtype in dtypes:
        for name in _OPS:
            for shape, scale, transpose, _why in table:
                label = "x".join(map(str, shape)) or "0-d"
                out.append(Case(name, dtype, label,
                                partial(_run, name, shape, scale, transpose, dtype)))
            out.append(Case(name, dtype, "edge values", partial(_edge_rows, name, dtype)))
    return out
