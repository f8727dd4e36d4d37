"""sigmoid / logsigmoid forward and backward kernels, and the stable helpers BCE shares.

Elementwise over a flattened contiguous tensor of ``numel`` elements: program ``p`` handles
elements ``[p·BLOCK, (p+1)·BLOCK)`` (int64 offsets, so ``numel > 2^31`` works). Maths in fp32
(fp64 for fp64 input), cast only at the store:

    e = exp(−|x|) ∈ [0, 1]                       (never overflows)
    sigmoid:     y = 1 / (1 + e)      for x ≥ 0,   e / (1 + e)   for x < 0
    logsigmoid:  y = min(x, 0) − log1p(e),   log1p(e) = log(u) − ((u − 1) − e)/u,  u = 1 + e
    backward:    dx = dy · y · (1 − y)            (sigmoid, from the saved output y)
                 dx = dy · σ(−x)                  (logsigmoid, from the saved input x)

so ``sigmoid(±1000)`` is exactly 1 / 0 (``e`` underflows to 0), ``logsigmoid(−1000) = −1000``,
±inf give torch's 1 / 0 and 0 / −inf, and NaN propagates (``|NaN|`` is NaN).

HBM bytes per element (``e`` = element size): forward reads x, writes y (2·e); backward reads
the saved tensor and dy, writes dx (3·e).
"""

import triton
import triton.language as tl

from ._online import upcast


@triton.jit
def sigmoid_parts(x):
    """The shared pieces: e = exp(−|x|) ∈ [0, 1], u = 1 + e (rounded) and r = 1 / u — one exp
    and one reciprocal serve both σ(x) and log1p(e)."""
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    r = 1.0 / u
    return e, u, r


@triton.jit
def sigmoid_from_parts(x, e, r):
    """σ(x) = 1 / (1 + e) for x ≥ 0, e / (1 + e) for x < 0: exact 1 / 0 at large |x|; NaN for
    NaN (the comparison is false, e·r is NaN)."""
    return tl.where(x >= 0, r, e * r)


@triton.jit
def log1p_from_parts(e, u, r):
    """log1p(e) = log(u) − ((u − 1) − e) / u: the second term removes the rounding of u = 1 + e
    to first order, so the result stays relatively accurate when e is tiny (it is exactly e
    when u rounds to 1)."""
    return tl.log(u) - ((u - 1.0) - e) * r


@triton.jit
def stable_sigmoid(x):
    """σ(x) without overflow."""
    e, u, r = sigmoid_parts(x)
    return sigmoid_from_parts(x, e, r)


@triton.jit
def sigmoid_fwd_kernel(
    # data
    x_ptr, y_ptr,
    # shape
    numel,
    # tiling and flavour
    BLOCK: tl.constexpr, IS_LOG: tl.constexpr,
):
    """y = σ(x) (``IS_LOG``: log σ(x)) over one BLOCK of the flattened tensor."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = upcast(tl.load(x_ptr + offs, mask=mask, other=0.0))
    e, u, r = sigmoid_parts(x)
    if IS_LOG:
        y = tl.minimum(x, 0.0) - log1p_from_parts(e, u, r)
    else:
        y = sigmoid_from_parts(x, e, r)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sigmoid_bwd_kernel(
    # data: saved is y = σ(x) (sigmoid) or x (logsigmoid); all three contiguous
    saved_ptr, dy_ptr, dx_ptr,
    # shape
    numel,
    # tiling and flavour
    BLOCK: tl.constexpr, IS_LOG: tl.constexpr,
):
    """dx = dy·y·(1 − y) (sigmoid) or dy·σ(−x) (logsigmoid) over one BLOCK."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    saved = upcast(tl.load(saved_ptr + offs, mask=mask, other=0.0))
    dy = upcast(tl.load(dy_ptr + offs, mask=mask, other=0.0))
    if IS_LOG:
        dx = dy * stable_sigmoid(-saved)
    else:
        dx = dy * saved * (1.0 - saved)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
