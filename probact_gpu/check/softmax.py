"""check cases: softmax and log_softmax, forward and backward, through the public API (so the
tiling heuristics pick the path, as for a user)."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from .. import reference
from ..ops.softmax import log_softmax, softmax
from ..testing import make_input, to_numpy64
from . import Case, Row, compare

# (shape, dim, scale, why). Small: interpreter-sized, each path reached with the CPU's SM count
# of 4 (split below 8 rows once a row is longer than the single tile).
SMALL = [
    ((1, 1), -1, 1.0, "one element"),
    ((7, 129), -1, 1.0, "odd sizes, single tile"),
    ((5, 4097), -1, 1.0, "4097 columns, single tile"),
    ((16, 9000), -1, 1.0, "16 rows x 9000: multi tile (fp32)"),
    ((3, 20000), -1, 1.0, "3 long rows: split row"),
    ((6, 3, 33), 1, 3.0, "middle dim, strided rows"),
    ((4, 257), -1, 1e4, "±1e4 logits"),
]
LARGE = [
    ((4096, 1024), -1, 1.0, "PERF shape family"),
    ((1024, 32000), -1, 1.0, "LM vocab 32000"),
    ((64, 131072), -1, 1.0, "131072: multi tile"),
    ((8, 262144), -1, 1.0, "few long rows: split"),
    ((2, 1 << 20), -1, 1.0, "1M columns"),
    ((32, 8, 4096), 1, 2.0, "middle dim"),
]

_OPS = {
    "softmax": (softmax, torch.softmax, reference.softmax, reference.softmax_grad),
    "log_softmax": (log_softmax, torch.log_softmax, reference.log_softmax,
                    reference.log_softmax_grad),
}


def _run(name, shape, dim, scale, dtype, device, rng) -> list[Row]:
    ours_fn, torch_fn, ref_fwd, ref_grad = _OPS[name]
    x, x64 = make_input(shape, dtype, rng, scale=scale, device=device)
    dy, dy64 = make_input(shape, dtype, rng, device=device)
    label = "x".join(map(str, shape)) + (f" dim={dim}" if dim != -1 else "")
    if scale != 1.0:
        label += f" scale={scale:g}"
    y_ref = ref_fwd(x64, dim)
    rows = []
    results = []
    for fn in (ours_fn, torch_fn):
        xr = x.clone().requires_grad_()
        y = fn(xr, dim)
        y.backward(dy)
        results.append((y.detach(), xr.grad))
    rows.append(compare(f"{name} fwd", dtype, label, results[0][0], results[1][0], y_ref))
    # The analytic gradient from the *reference* output, so it judges the whole chain.
    g_ref = ref_grad(y_ref, dy64, dim)
    rows.append(compare(f"{name} bwd", dtype, label, results[0][1], results[1][1], g_ref))
    return rows


def _edge_rows(name, dtype, device, rng) -> list[Row]:
    """−inf entries, an all −inf row, equal logits: softmax of [1000, 1000] is [0.5, 0.5]."""
    x = torch.tensor([[1000.0, 1000.0, -np.inf], [-np.inf, -np.inf, -np.inf],
                      [-np.inf, 3.0, 1.0]], dtype=dtype, device=device)
    ours_fn, torch_fn, ref_fwd, _ = _OPS[name]
    return [compare(f"{name} fwd", dtype, "−inf / equal-logit rows", ours_fn(x), torch_fn(x, -1),
                    ref_fwd(to_numpy64(x)))]


def cases(large: bool) -> list[Case]:
    table = LARGE if large else SMALL
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    out = []
    for dtype in dtypes + ((torch.float64,) if not large else ()):
        for name in _OPS:
            for shape, dim, scale, _why in table:
                label = "x".join(map(str, shape))
                out.append(Case(name, dtype, label, partial(_run, name, shape, dim, scale, dtype)))
            out.append(Case(name, dtype, "edge rows", partial(_edge_rows, name, dtype)))
    return out
