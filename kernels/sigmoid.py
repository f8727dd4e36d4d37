"""sigmoid / logsigmoid forward and backward kernels, and the stable helpers BCE shares.

Elementwise over a flattened contiguous tensor of ``numel`` elements: program ``p`` handles
elements ``[p·BLOCK, (p+1)·BLOCK)`` (int64 offsets, so ``numel > 2^31`` works). Maths in fp32
(fp64 for fp64 input), cast only at the store:

    e = exp(−|x|) ∈ [0, 1]                       (never overflows)
    sigmoid:     y = 1 / (1 + e)      for x ≥ 0,   e / (1 + e)   for x < 0
    logsigmoid:  y = min(x, 0) − log1p(e)
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
def log1p_small(e):
    """log(1 + e) for e ≥ 0, accurate where 1 + e rounds to 1 (Goldberg's correction: the
    rounding error of u = 1 + e cancels in log(u) · e / (u − 1))."""
    u = 1.0 + e
    denom = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, e, tl.log(u) * (e / denom))


@triton.jit
def stable_sigmoid(x):
    """σ(x) from e = exp(−|x|): exact 1 / 0 at large |x|, NaN for NaN."""
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@triton.jit
def softplus_neg_abs(x):
    """log1p(exp(−|x|)) ∈ [0, log 2]: the part of log σ(x) that never overflows."""
    return log1p_small(tl.exp(-tl.abs(x)))


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
    if IS_LOG:
        y = tl.minimum(x, 0.0) - softplus_neg_abs(x)
    else:
        y = stable_sigmoid(x)
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
