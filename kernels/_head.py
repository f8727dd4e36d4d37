"""The LM head's logit transform on the device, shared by every kernel of the cross-entropy
family (cross-entropy, token log-probs, their split and vocab-parallel forms).

In the order ``probact_gpu.options`` documents (the bias, when there is one, is added by the
caller first)::

    z = softcap · tanh(x · pre_scale / softcap) · inv_temp      (softcap given)
    z = x · pre_scale · inv_temp                                (no softcap)

with ``pre_scale = logit_scale / logit_divisor`` and ``inv_temp = 1 / temperature`` formed on
the host in float64. Multiplying by 1.0 is exact, so the identity transform costs no rounding.

The chain rule back to x, from the raw logit x (``head_chain``)::

    dL/dx = dL/dz · inv_temp · pre_scale · sech²(u),   u = x · pre_scale / softcap

``tanh`` here is accurate near 0: ``1 − 2 / (exp(2u) + 1)`` alone cancels for small ``u`` (its
absolute error is about ulp(1), so a softcap of 1000 over logits of a few units lost three
digits), so ``|u|`` below a dtype-dependent bound takes the odd Taylor series through ``u^15``
instead (truncation below half an ulp: fp32 up to 0.5, fp64 up to 0.125).
"""

import triton
import triton.language as tl

from ._online import exp

# Taylor coefficients of tanh(u) = u · Σ_k c_k u^(2k), k = 0..7
_T1: tl.constexpr = tl.constexpr(-1.0 / 3.0)
_T2: tl.constexpr = tl.constexpr(2.0 / 15.0)
_T3: tl.constexpr = tl.constexpr(-17.0 / 315.0)
_T4: tl.constexpr = tl.constexpr(62.0 / 2835.0)
_T5: tl.constexpr = tl.constexpr(-1382.0 / 155925.0)
_T6: tl.constexpr = tl.constexpr(21844.0 / 6081075.0)
_T7: tl.constexpr = tl.constexpr(-929569.0 / 638512875.0)


@triton.jit
def tanh(u):
    """tanh(u) for any u of fp32 or fp64 (±inf gives ±1): the series near 0, else
    ``1 − 2 / (exp(2u) + 1)`` (whose exp overflow gives ±1 exactly)."""
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
    series = u + u * (u2 * p)
    wide = 1.0 - 2.0 / (exp(2.0 * u) + 1.0)
    return tl.where(small, series, wide)


@triton.jit
def head_transform(x, pre_scale, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """z from the upcast logits ``x`` (fp32 or fp64): scale/divide, optional softcap,
    temperature."""
    z = x * pre_scale
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z * inv_temp


@triton.jit
def head_chain(dz, x, pre_scale, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """dL/dx from dL/dz, for ``z = head_transform(x, ...)`` of the upcast logits ``x``.

    With a softcap, ``dz/dx = inv_temp · pre_scale · sech²(u)``, ``u = x · pre_scale / softcap``,
    formed from the raw logit with ``e = exp(−2|u|)``: ``4e / (1 + e)²`` for |u| ≥ 0.5 (products
    and quotients only: ≤ 3 ulps for every u), ``1 − t²`` with ``t = (1 − e) / (1 + e)`` below
    (≤ 1.2 ulps there, where the quotient form's roundings cost up to 1.8; measured in fp32 over
    uniform u). The form ``1 − r²`` from the transformed z (``r = z / (softcap · inv_temp)``)
    cancels as tanh saturates: r carries the roundings of the transform, so ``1 − r²`` has an
    absolute error of ~ulp(1), ~4 ulps of sech² near |u| ~ 2, growing as e^{2|u|} beyond."""
    if HAS_SOFTCAP:
        u = (x * pre_scale) / softcap
        e = exp(-2.0 * tl.abs(u))
        d = 1.0 + e
        t = (1.0 - e) / d  # tanh|u|: ~ulp(1) absolute, harmless in 1 − t² while t² is small
        sech2 = tl.where(tl.abs(u) < 0.5, 1.0 - t * t, (4.0 * e) / (d * d))
        return dz * (inv_temp * pre_scale * sech2)
    else:
        return dz * (inv_temp * pre_scale)
