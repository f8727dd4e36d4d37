"""Device helpers shared by the row-reduction kernels: the online (max, sum of exp) update and
merge, fp32/fp64 upcast, and the strided row offset.

The online softmax keeps, for a row seen so far, ``m`` (the running max) and ``s = Σ exp(x − m)``.
A new tile with max ``m_t`` and ``s_t = Σ exp(x − m_t)`` merges as

    m' = max(m, m_t),   s' = s · exp(m − m') + s_t · exp(m_t − m')

Exponentials are ``exp2((x − m) · log2(e))``: one multiply and the fast ex2 unit. A tile (or a
whole prefix) that is all −inf has ``m = −inf``, and ``(−inf) − (−inf)`` is NaN, so every
rescale below subtracts a *safe* max (0 where the max is −inf): ``exp(−inf − 0) = 0``, and the
all-−inf row ends with ``m = −inf, s = 0`` — its softmax is ``0 / 0 = NaN``, as torch gives.
"""

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln(2)


@triton.jit
def probe_kernel(x_ptr):
    """Launched by nothing: the host checks its type to learn whether kernels are interpreted."""
    tl.store(x_ptr, tl.load(x_ptr))


@triton.jit
def upcast(x):
    """fp16/bf16/fp32 → fp32; fp64 stays fp64 (math runs in the wider of fp32 and the input)."""
    if x.dtype == tl.float64:
        return x
    else:
        return x.to(tl.float32)


@triton.jit
def row_offset(row, n_inner, outer_stride, inner_stride):
    """Element offset (int64) of the first column of ``row`` in a (outer, cols, inner) view."""
    row = tl.cast(row, tl.int64)  # a plain int under the interpreter's loops
    return (row // n_inner) * outer_stride + (row % n_inner) * inner_stride


@triton.jit
def safe_max(m):
    """``m`` where finite or +inf/NaN, 0 where −inf: the shift that keeps exp2 of −inf at 0."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def online_update(m, s, x, axis: tl.constexpr):
    """Fold tile ``x`` (already upcast, −inf in masked lanes) into the running ``(m, s)``."""
    m_new = tl.maximum(m, tl.max(x, axis=axis))
    shift = safe_max(m_new)
    s = s * tl.exp2((m - shift) * LOG2E) + tl.sum(tl.exp2((x - shift) * LOG2E), axis=axis)
    return m_new, s


@triton.jit
def online_merge(m_a, s_a, m_b, s_b):
    """Merge two partial ``(m, s)`` states (elementwise: scalars or per-row vectors)."""
    m = tl.maximum(m_a, m_b)
    shift = safe_max(m)
    s = s_a * tl.exp2((m_a - shift) * LOG2E) + s_b * tl.exp2((m_b - shift) * LOG2E)
    return m, s
