"""Device helpers shared by the row-reduction kernels: the online (max, sum of exp) update and
merge, fp32/fp64 upcast, and the strided row offset.

The online softmax keeps, for a row seen so far, ``m`` (the running max) and ``s = Σ exp(x − m)``.
A new tile with max ``m_t`` and ``s_t = Σ exp(x − m_t)`` merges as

    m' = max(m, m_t),   s' = s · exp(m − m') + s_t · exp(m_t − m')

Exponentials go through ``exp``: ``exp2((x − m) · log2(e))`` in fp32 (one multiply and the fast
ex2 unit), ``tl.exp`` in fp64 (where that product's rounding costs ulps). A tile (or a
whole prefix) that is all −inf has ``m = −inf``, and ``(−inf) − (−inf)`` is NaN, so every
rescale below subtracts a *safe* max (0 where the max is −inf): ``exp(−inf − 0) = 0``, and the
all-−inf row ends with ``m = −inf, s = 0`` — its softmax is ``0 / 0 = NaN``, as torch gives.
"""

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln(2)
# log2(e) − fp32(log2(e)): the part of log2(e) an fp32 multiply by LOG2E drops
LOG2E_LO: tl.constexpr = tl.constexpr(1.92596298909109e-08)


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
def math_arg(s, like_ptr):
    """A float kernel argument in the math dtype of the data ``like_ptr`` points at: fp64 for
    fp64 data, else rounded once to fp32. Every float parameter of the kernels is annotated
    ``tl.float64``: unannotated, Triton's launcher types a Python float fp32, so an fp64 kernel
    on the GPU would see its scalars rounded to fp32 while the interpreter (which keeps the
    Python float) would not. ``tl.full`` takes the interpreter's Python float and the GPU's fp64
    scalar alike."""
    if like_ptr.dtype.element_ty == tl.float64:
        return tl.full((), s, tl.float64)
    else:
        return tl.full((), s, tl.float32)


@triton.jit
def row_offset(row, n_inner, outer_stride, inner_stride):
    """Element offset (int64) of the first column of ``row`` in a (outer, cols, inner) view."""
    row = tl.cast(row, tl.int64)  # a plain int under the interpreter's loops
    return (row // n_inner) * outer_stride + (row % n_inner) * inner_stride


@triton.jit
def exp(x):
    """e^x in x's dtype: ``exp2(x · log2 e)`` for fp32 (one multiply and the fast ex2 unit),
    ``tl.exp`` for fp64. In fp64 the product ``x · log2 e`` rounds with a relative error of
    ~1e-16, an absolute error of ~|x| · 1e-16 in the exponent: at |x| ≈ 345 that is ~18 ulps of
    the result, where ``tl.exp`` (libdevice's ``exp``) is correctly rounded to ~1 ulp. In fp32
    the same rounding is ~|x| · 6e-8 relative, below the ex2 unit's own error for the |x| the
    shifted exponents of a softmax take where the result is not negligible."""
    if x.dtype == tl.float64:
        return tl.exp(x)
    else:
        return tl.exp2(x * LOG2E)


@triton.jit
def exp_precise(x):
    """e^x to a few ulps for every x, also fp32 with large |x|: ``exp`` plus the rounding of
    ``t = x · log2 e``, recovered exactly by an fma (``fma(x, log2e, −t)``, and the constant's
    own rounding ``x · LOG2E_LO``), applied as ``2^t · (1 + r · ln 2)``. Plain ``exp`` loses
    ~|x| · 6e-8 relative in fp32: 5e-6 at x = −80, which is all of a row's entropy when one
    logit dominates by ~80 (H ≈ Σ p·|z − m| over p ~ e^−80). Three flops more an element."""
    if x.dtype == tl.float64:
        return tl.exp(x)
    else:
        t = x * LOG2E
        r = tl.fma(x, LOG2E, -t) + x * LOG2E_LO
        e = tl.exp2(t)
        # Past |t| = 160, 2^t is 0 or inf in fp32 anyway: 2^t itself, also for ±inf and NaN x
        # (whose r is NaN, and whose fma(inf, 0, inf) would be NaN: exp(+inf) is +inf).
        return tl.where(tl.abs(t) < 160.0, tl.fma(e, r * LN2, e), e)


@triton.jit
def safe_max(m):
    """``m`` where finite or +inf/NaN, 0 where −inf: the shift that keeps exp2 of −inf at 0."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def lse_shift(m):
    """The shift an lse is formed around (torch.logsumexp's): ``m`` where finite or NaN, 0 where
    ±inf. An all −inf row keeps ``s = 0`` (lse −inf); a row with a +inf logit sums
    ``exp(+inf) = +inf`` (lse +inf, or NaN if the row also holds a NaN) instead of forming
    ``(+inf) − (+inf) = NaN``. A finite row's shift is its max, as ``safe_max``'s."""
    return tl.where(tl.abs(m) == float("inf"), 0.0, m)


@triton.jit
def online_update(m, s, x, axis: tl.constexpr):
    """Fold tile ``x`` (already upcast, −inf in masked lanes) into the running ``(m, s)``."""
    m_new = tl.maximum(m, tl.max(x, axis=axis))
    shift = safe_max(m_new)
    s = s * exp(m - shift) + tl.sum(exp(x - shift), axis=axis)
    return m_new, s


@triton.jit
def online_update_lse(m, s, x, axis: tl.constexpr):
    """``online_update`` around ``lse_shift``: ``s`` becomes +inf (not NaN) once a +inf lane is
    folded in (then ``m = +inf``), so the row's lse is +inf as torch.logsumexp's."""
    m_new = tl.maximum(m, tl.max(x, axis=axis))
    shift = lse_shift(m_new)
    s = s * exp(m - shift) + tl.sum(exp(x - shift), axis=axis)
    return m_new, s


@triton.jit
def online_merge(m_a, s_a, m_b, s_b):
    """Merge two partial ``(m, s)`` states (elementwise: scalars or per-row vectors)."""
    m = tl.maximum(m_a, m_b)
    shift = safe_max(m)
    s = s_a * exp(m_a - shift) + s_b * exp(m_b - shift)
    return m, s
