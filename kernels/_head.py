"""The LM head's logit transform on the device, shared by every kernel of the cross-entropy
family (cross-entropy, token log-probs, their split and vocab-parallel forms).

In the order ``probact_gpu.options`` documents (the bias, when there is one, is added by the
caller first)::

    z = cap_scale · tanh(x · u_scale)       (softcap given; tanh(u) = u·(1 + u²·P(u²)) near 0)
    z = x · scale                           (no softcap)

    scale = logit_scale / logit_divisor / temperature,   u_scale = logit_scale / logit_divisor /
    softcap,   cap_scale = softcap / temperature

The three factors are formed on the host in float64 (``HeadTransform.kernel_factors``) and
reach the kernel as fp64 arguments. In fp32 math each is split into ``hi + lo`` (``factor``:
hi the fp32 rounding, lo the remainder) and a product ``x · factor`` is ``fma(x, hi, x · lo)``
(``mul_factor``): correctly rounded but for ties, with no bias. The plain ``x · fp32(1/0.7)``
carries the factor's own rounding (up to half an ulp, the same sign in every element), which
sums coherently in anything summed over elements or tokens (an entropy, a dW): torch's
``x / fp32(0.7)`` has the same defect. The identity transform (the ``HEAD`` constexpr
``HEAD_IDENTITY``) does no arithmetic at all.

Near 0 the softcapped logit is formed as ``x · scale · (1 + u²·P(u²))`` (``cap_scale · u``
without the rounding of u) by one fma whose addend holds the small terms: about half an ulp in
all, where torch's ``softcap · tanh(x / softcap) / T`` rounds four times. (``1 − 2 / (exp(2u) +
1)`` alone would cancel for small ``u``: its absolute error is about ulp(1), so a softcap of
1000 over logits of a few units lost three digits.) ``|u|`` below a dtype-dependent bound takes
that odd Taylor series through ``u^15`` (truncation below half an ulp: fp32 up to 0.5, fp64 up
to 0.125), the rest ``cap_scale · (1 − e) / (1 + e)``, ``e = exp(−2|u|)``, with u's rounding
and the quotient's remainder carried into the last fma: within 2 ulps (measured; e's own error
is what remains, amplified ~0.85× at |u| = 0.5), where torch's libm tanh gives 1.5.

The chain rule back to x (``head_chain``, with ``head_slope``'s sech², which
``head_transform_slope`` forms with z from the same exponential)::

    dL/dx = dL/dz · scale · sech²(u)         (sech² = 1 without a softcap)
"""

import triton
import triton.language as tl

from ._online import exp_precise, math_arg

# The transform's kind, the kernels' ``HEAD`` constexpr (``HeadTransform.kernel_mode``): none
# (z = x, no multiply), a scale, a softcap (with any scale).
HEAD_IDENTITY: tl.constexpr = tl.constexpr(0)
HEAD_SCALE: tl.constexpr = tl.constexpr(1)
HEAD_SOFTCAP: tl.constexpr = tl.constexpr(2)

# Taylor coefficients of tanh(u) = u · Σ_k c_k u^(2k), k = 0..7
_T1: tl.constexpr = tl.constexpr(-1.0 / 3.0)
_T2: tl.constexpr = tl.constexpr(2.0 / 15.0)
_T3: tl.constexpr = tl.constexpr(-17.0 / 315.0)
_T4: tl.constexpr = tl.constexpr(62.0 / 2835.0)
_T5: tl.constexpr = tl.constexpr(-1382.0 / 155925.0)
_T6: tl.constexpr = tl.constexpr(21844.0 / 6081075.0)
_T7: tl.constexpr = tl.constexpr(-929569.0 / 638512875.0)


@triton.jit
def factor(s, like_ptr):
    """``(hi, lo)`` of the fp64 argument ``s`` in the math dtype of the data ``like_ptr`` points
    at: hi is ``_online.math_arg``'s s (rounded once to fp32, or s itself for fp64 data), lo the
    remainder ``s − hi`` in the same dtype (0 for fp64 data, and where hi overflowed)."""
    hi = math_arg(s, like_ptr)
    lo = (tl.full((), s, tl.float64) - hi.to(tl.float64)).to(hi.dtype)
    return hi, tl.where(tl.abs(hi) < float("inf"), lo, 0.0)


@triton.jit
def head_factors(scale, u_scale, cap_scale, like_ptr):
    """The kernels' ``head``: the transform's three fp64 arguments split by ``factor``, as
    ``(scale_hi, scale_lo, u_hi, u_lo, cap_hi, cap_lo)``."""
    s_hi, s_lo = factor(scale, like_ptr)
    u_hi, u_lo = factor(u_scale, like_ptr)
    c_hi, c_lo = factor(cap_scale, like_ptr)
    return (s_hi, s_lo, u_hi, u_lo, c_hi, c_lo)


@triton.jit
def mul_factor(x, hi, lo):
    """``x · (hi + lo)`` rounded once (but for ties): ``fma(x, hi, x · lo)``, straight-line (a
    uniform branch on ``lo = 0`` kept both forms' registers live: 40 → 80 a thread at sm_90);
    ``x · hi`` where x is ±inf or NaN (``inf · lo`` could meet ``−inf`` in the fma), and in fp64,
    where the factor is exact."""
    if x.dtype == tl.float64:  # lo is 0: the fp64 factor is exact
        return x * hi
    else:
        return tl.where(tl.abs(x) < float("inf"), tl.fma(x, hi, x * lo), x * hi)


@triton.jit
def head_transform_slope(x, head, HEAD: tl.constexpr):
    """``(z, slope)`` of the upcast logits ``x``: z (module docstring) and, with a softcap,
    ``sech²(u)`` for the chain rule (``head_chain``), from the same u and e; without one the
    slope is unused (1.0). Callers that need one of the two take ``head_transform`` or
    ``head_slope``: the compiler drops the other's arithmetic.

    sech²(u): ``1 − t²`` with t the near-0 series' tanh below |u| = 0.5 (t² < 0.22: no
    cancellation), ``4e / (1 + e)²`` above (products and quotients only: ≤ 3 ulps for every u).
    The form ``1 − r²`` from the transformed z (``r = z / cap_scale``) would cancel as tanh
    saturates (~4 ulps of sech² near |u| ~ 2, growing as e^{2|u|} beyond)."""
    if HEAD == HEAD_SOFTCAP:
        u = mul_factor(x, head[2], head[3])
        if u.dtype == tl.float64:
            small = tl.abs(u) < 0.125
        else:
            small = tl.abs(u) < 0.5
        u2 = u * u
        p = _T7
        p = p * u2 + _T6
        p = p * u2 + _T5
        p = p * u2 + _T4
        p = p * u2 + _T3
        p = p * u2 + _T2
        p = p * u2 + _T1
        t_near = tl.fma(u, u2 * p, u)  # tanh u below the bound
        if x.dtype == tl.float64:  # exact factors, correctly rounded division: plain forms
            w = x * head[0]
            e = tl.exp(-2.0 * tl.abs(u))
            den = 1.0 + e
            t = (1.0 - e) / den
            z = tl.where(small, tl.fma(w, u2 * p, w), tl.where(u < 0.0, -t, t) * head[4])
        else:
            # z = fma(a, hi, c·hi + a·lo): a plus a small correction c, times (hi, lo), rounded
            # once. Near 0: a = x, c = x·u²P, (hi, lo) = scale (z = x·scale·(1 + u²P)). Else
            # a + c = tanh|u| = (1 − e) / (1 + e), e = exp(−2|u|) of the exact u (u's rounding
            # error, by an fma, moves e by the factor 1 − 2·sgn(u)·err: without it 0.85 of u's
            # half ulp reached z at |u| = 0.5); numerator and denominator as exact pairs (1 ± e
            # rounded, plus what the rounding dropped), a their rounded quotient, c its remainder
            # (fma) over the denominator; (hi, lo) = cap_scale; the sign of u applied. ±inf u
            # gives e = 0: a = ±1, c = 0 — a and c are finite for every non-NaN u.
            u_err = tl.fma(x, head[2], -u) + x * head[3]
            u_err = tl.where(tl.abs(u) < float("inf"), u_err, 0.0)
            e = exp_precise(-2.0 * tl.abs(u))
            e = tl.fma(e, tl.where(u < 0.0, 2.0, -2.0) * u_err, e)
            den = 1.0 + e
            den_lo = e - (den - 1.0)
            num = 1.0 - e
            num_lo = (1.0 - num) - e
            q = num / den
            q_lo = (tl.fma(-q, den, num) + num_lo - q * den_lo) / den
            neg = u < 0.0
            a = tl.where(small, x, tl.where(neg, -q, q))
            c = tl.where(small, x * (u2 * p), tl.where(neg, -q_lo, q_lo))
            hi = tl.where(small, head[0], head[4])
            lo = tl.where(small, head[1], head[5])
            z = tl.fma(a, hi, tl.fma(c, hi, a * lo))
        slope = tl.where(small, 1.0 - t_near * t_near, (4.0 * e) / (den * den))
        return z, slope
    elif HEAD == HEAD_SCALE:
        return mul_factor(x, head[0], head[1]), 1.0
    else:
        return x, 1.0


@triton.jit
def head_transform(x, head, HEAD: tl.constexpr):
    """z from the upcast logits ``x`` (fp32 or fp64), ``head`` (``head_factors``) and the
    transform's kind ``HEAD``."""
    z, _ = head_transform_slope(x, head, HEAD)
    return z


@triton.jit
def head_slope(x, head, HEAD: tl.constexpr):
    """The chain rule's ``sech²(u)`` of the upcast logits ``x`` (1.0 without a softcap), for
    ``head_chain``; ``head_transform_slope`` gives z with it for the work of one."""
    _, slope = head_transform_slope(x, head, HEAD)
    return slope


@triton.jit
def head_chain(dz, slope, head, HEAD: tl.constexpr):
    """dL/dx from dL/dz and ``slope = head_slope(x)``: ``dz · sech²(u) · scale`` (with a softcap),
    ``dz · scale`` (a scale), dz (the identity). The multiply by ``scale`` is ``mul_factor``'s:
    no bias from the factor's rounding."""
    if HEAD == HEAD_SOFTCAP:
        return mul_factor(dz * slope, head[0], head[1])
    elif HEAD == HEAD_SCALE:
        return mul_factor(dz, head[0], head[1])
    else:
        return dz
