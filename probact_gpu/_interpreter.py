"""Float conversions for Triton's interpreter that match the GPU's.

Under ``TRITON_INTERPRET=1`` Triton runs a kernel's operations one by one in NumPy, and its
float conversions (``InterpreterBuilder.cast_impl`` / ``create_fp_to_fp``, which every
``x.to(dtype)`` and every store into a narrower tensor goes through) differ from the GPU's:

* fp32 → bf16 *truncates* (the GPU rounds to nearest even): every bf16 output is biased towards
  zero by up to one ulp; sigmoid(14.9375) stores 0.99609375 where the GPU and torch store 1.0.
* fp64 → bf16 is an integer conversion of the value (``astype(uint16)``, bf16 being stored as
  uint16): 0.73 becomes 0, 3.0 a subnormal.
* fp16 → bf16 goes through fp32 and truncates.
* bf16 subnormals are decoded and encoded wrongly in both directions (a bf16 load is not exact).

fp32 / fp64 → fp16 and fp64 → fp32 go through NumPy's ``astype``, which rounds to nearest even
from the source's bits (one rounding), as the GPU does; they are right already.

:func:`install` replaces the two conversion methods of the interpreter's builder, for the four
float formats only, by exact NumPy code: decode the source (bf16 bits → fp32 is a 16-bit shift,
exact), then round once to nearest even into the destination. fp64 → bf16 rounds to fp32 *to odd*
first, which keeps the one rounding to bf16 correct (fp32 carries 16 bits more than bf16).
Anything else (integers, fp8, a rounding mode other than round-to-nearest-even) is left to
Triton.

``tl.fma`` rounds twice under triton 3.6's interpreter (``x · y + z`` in NumPy; 3.9's rounds
once, as the GPU does): error-free transformations built on it (``exp_precise``, the head
transform's ``mul_factor``) then lose the very rounding they recover. :func:`install` replaces
it by :func:`fma_exact` where a probe shows the double rounding.

Speed, not numbers: every call of a ``@triton.jit`` helper from a kernel re-patches the
``triton.language`` modules (``_patch_lang``: ``inspect.getmembers`` over them, about 4 ms a call,
and the patch is never undone), although the launch already patched the same modules for the
whole grid. :func:`install` makes a helper called inside a launch run its rewritten function
directly — the same code under the same patched modules — which makes kernels built from helpers
(the head transform, the online updates) 2–4× faster to interpret.

``tl.dot`` (``create_dot``) runs NumPy's ``matmul`` on the operands' storage: bf16 operands are
multiplied as their uint16 bit patterns, and for the float formats OpenBLAS's blocking makes a
row's result depend on the row's position in the tile (its micro-kernel edges), where the GPU's
MMA gives every row the same sequence of operations. :func:`install` replaces it, for float
operands, by :func:`dot_exact`: each output element an fma chain over k in order, every step
rounded once in the accumulator's dtype — no dependence on the tile's other rows.

The shim is installed the first time a kernel is about to run on the interpreter
(``_runtime.check_runnable``), never at import, and is valid for triton 3.6 and 3.9, whose
builders have the same methods. ``docs/interpreter.md`` has a reproducer for each defect.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

_QUIET_NAN_BF16 = np.uint16(0x7FC0)


# --------------------------------------------------------------------------- exact conversions


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) → their exact float32 values."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(
        np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bf16 bit patterns (uint16), rounded to nearest, ties to even; overflow → ±inf;
    NaN → a quiet NaN of the same sign."""
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = ((bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)
    sign = ((bits >> np.uint32(16)) & np.uint32(0x8000)).astype(np.uint16)
    return np.where(np.isnan(x), sign | _QUIET_NAN_BF16, rounded).astype(np.uint16)


def f64_to_f32_round_to_odd(x: np.ndarray) -> np.ndarray:
    """float64 → float32 rounded *to odd* (truncate, then set the last bit when inexact).

    Rounding to odd onto a format with at least two more bits than the final one makes a second
    rounding to nearest exact: fp64 → (odd) fp32 → (nearest even) bf16 equals fp64 → bf16 rounded
    once. Plain fp64 → fp32 → bf16 would round twice (1 + 2⁻⁸ + 2⁻³⁰ → 1 instead of 1 + 2⁻⁷).
    """
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):  # beyond fp32's range: inf, stepped back to FLT_MAX below
        f = x.astype(np.float32)
    bits = f.view(np.uint32).copy()
    finite = np.isfinite(x)
    inexact = finite & (f.astype(np.float64) != x)
    away = inexact & (np.abs(f.astype(np.float64)) > np.abs(x))  # rounded away from zero
    bits[away] -= np.uint32(1)  # sign-magnitude: one step towards zero
    bits[inexact] |= np.uint32(1)
    return bits.view(np.float32)


def _two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(s, e) with s = fl(a + b) and a + b = s + e exactly (Knuth; NumPy never fuses)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _add_round_to_odd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b (float64) rounded *to odd*: the bracketing neighbour with an odd last bit when
    inexact (see :func:`f64_to_f32_round_to_odd`)."""
    s, e = _two_sum(a, b)
    even = (s.view(np.uint64) & np.uint64(1)) == 0
    step = np.isfinite(s) & (e != 0) & even
    return np.where(step, np.nextafter(s, np.where(e > 0, np.inf, -np.inf)), s)


def _split(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Veltkamp: a = hi + lo exactly, each with at most 26 significant bits."""
    c = a * 134217729.0  # 2^27 + 1
    hi = c - (c - a)
    return hi, a - hi


def fma_exact(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``x · y + z`` rounded once, in the inputs' dtype (fp32 or fp64), as the GPU's fma.

    fp32: the product is exact in float64, the sum rounded to odd there, then once to fp32.
    fp64: Boldo and Melquiond's emulation — the product as an exact pair (Dekker's two-product
    over Veltkamp halves), ``z`` plus its high part as an exact pair, the two low parts added
    rounding to odd, and the last addition rounded to nearest. Non-finite inputs or products
    that overflow or underflow take the plain ``x · y + z``."""
    x, y, z = np.broadcast_arrays(x, y, z)
    with np.errstate(all="ignore"):
        if x.dtype == np.float32:
            x64, y64, z64 = (a.astype(np.float64) for a in (x, y, z))
            return _add_round_to_odd(x64 * y64, z64).astype(np.float32)
        plain = x * y + z
        p = x * y
        xh, xl = _split(x)
        yh, yl = _split(y)
        p_lo = ((xh * yh - p) + xh * yl + xl * yh) + xl * yl
        t_hi, t_lo = _two_sum(z, p)
        out = t_hi + _add_round_to_odd(t_lo, p_lo)
        tiny = np.finfo(np.float64).tiny * 2.0**54
        ok = np.isfinite(plain) & np.isfinite(p) & (np.abs(x) < 2.0**995) \
            & (np.abs(y) < 2.0**995) & ((p == 0) | (np.abs(p) > tiny))
        return np.where(ok, out, plain)


def dot_exact(a: np.ndarray, b: np.ndarray, acc: np.ndarray, *, exact_products: bool = False
              ) -> np.ndarray:
    """``acc + a @ b`` as a chain of fmas over k in order, each rounded once in ``acc``'s dtype
    (:func:`fma_exact`): ``a`` (…, M, K) and ``b`` (…, K, N) already decoded to floats. Every
    output element sees the same operations whatever the other rows and columns hold.
    ``exact_products``: the operands are 16-bit values, whose products are exact in fp32, so
    each fma is the product plus one rounded addition."""
    out = np.array(acc, copy=True)
    wide = out.dtype
    a = np.asarray(a).astype(wide)
    b = np.asarray(b).astype(wide)
    with np.errstate(all="ignore"):
        for k in range(a.shape[-1]):
            if exact_products:
                out = out + a[..., :, k : k + 1] * b[..., k : k + 1, :]
            else:
                out = fma_exact(a[..., :, k : k + 1], b[..., k : k + 1, :], out)
    return out


# --------------------------------------------------------------------------- the shim

_FLOATS = ("fp16", "bf16", "fp32", "fp64")
_NUMPY = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64}


def _name(tl_dtype: Any) -> str | None:
    name = getattr(tl_dtype, "name", None)
    return name if name in _FLOATS else None


def convert(data: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Convert the interpreter's storage of a ``src`` tensor (bf16 as uint16 bits, the others
    as their NumPy float type) to the storage of ``dst``, rounding once to nearest even."""
    if src == "bf16":
        data = bf16_bits_to_f32(data)
    if dst != "bf16":
        # overflow to ±inf is the conversion's result; a signalling NaN becomes a quiet one
        with np.errstate(over="ignore", invalid="ignore"):
            return np.asarray(data).astype(_NUMPY[dst])
    if src == "fp64":
        data = f64_to_f32_round_to_odd(data)
    return f32_to_bf16_bits(np.asarray(data).astype(np.float32))


def _is_rtne(rounding_mode: Any) -> bool:
    from triton._C.libtriton import ir

    return rounding_mode is None or rounding_mode == ir.ROUNDING_MODE.RTNE


@functools.cache
def install() -> None:
    """Replace the interpreter's float ↔ float conversions (idempotent; call only when kernels
    are about to run on the interpreter)."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    handle = interpreter.TensorHandle
    triton_cast = builder.cast_impl
    triton_fp_to_fp = builder.create_fp_to_fp

    def cast_impl(self, src, dst_type):
        s, d = _name(src.dtype.scalar), _name(dst_type.scalar)
        if s is None or d is None or s == d:
            return triton_cast(self, src, dst_type)
        return handle(convert(src.data, s, d), dst_type.scalar)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        s, d = _name(src.dtype.scalar), _name(dst_type.scalar)
        if s is None or d is None or s == d or not _is_rtne(rounding_mode):
            return triton_fp_to_fp(self, src, dst_type, rounding_mode)
        return handle(convert(src.data, s, d), dst_type.scalar)

    cast_impl.__wrapped__ = triton_cast
    create_fp_to_fp.__wrapped__ = triton_fp_to_fp
    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp

    triton_dot = builder.create_dot

    def create_dot(self, a, b, d, *args):
        s_a, s_b, s_d = (_name(t.dtype.scalar) for t in (a, b, d))
        if s_a is None or s_b is None or s_d not in ("fp32", "fp64"):
            return triton_dot(self, a, b, d, *args)
        decoded = [bf16_bits_to_f32(t.data) if s == "bf16" else t.data
                   for t, s in ((a, s_a), (b, s_b))]
        narrow = s_a in ("bf16", "fp16") and s_b in ("bf16", "fp16")
        return handle(dot_exact(*decoded, d.data, exact_products=narrow), d.dtype.scalar)

    create_dot.__wrapped__ = triton_dot
    builder.create_dot = create_dot
    if not _fma_is_exact(builder, handle):
        triton_fma = builder.create_fma

        def create_fma(self, x, y, z):
            if z.data.dtype not in (np.float32, np.float64):
                return triton_fma(self, x, y, z)
            return handle(fma_exact(x.data, y.data, z.data), z.dtype.scalar)

        create_fma.__wrapped__ = triton_fma
        builder.create_fma = create_fma
    _skip_nested_patching(interpreter)


def _skip_nested_patching(interpreter: Any) -> None:
    """Inside a launch (``GridExecutor.__call__``, which patches the ``triton.language`` modules
    the kernel's module sees), a device-function call patches the modules its own module sees
    once per launch — triton's standard library sees ``triton.language.core`` — instead of on
    every call (module docstring). Outside a launch the interpreter's own call runs."""
    grid_cls, fn_cls = interpreter.GridExecutor, interpreter.InterpretedFunction
    patch = getattr(interpreter, "_patch_lang", None)
    if patch is None or not hasattr(fn_cls, "rewrite") or hasattr(fn_cls.__call__,
                                                                   "__wrapped__"):
        return
    running = [0]
    patched: set[int] = set()  # the modules (their globals) patched in this launch
    grid_call, device_call = grid_cls.__call__, fn_cls.__call__

    def launch(self, *args, **kwargs):
        if not running[0]:
            patched.clear()
        running[0] += 1
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            running[0] -= 1

    def call(self, *args, **kwargs):
        if not running[0]:
            return device_call(self, *args, **kwargs)
        key = id(self.fn.__globals__)
        if key not in patched:  # as triton does on every call (and never undoes)
            patched.add(key)
            patch(self.fn)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise interpreter.InterpreterError(repr(exc)) from exc

    launch.__wrapped__ = grid_call
    call.__wrapped__ = device_call
    grid_cls.__call__ = launch
    fn_cls.__call__ = call


def _fma_is_exact(builder: Any, handle: Any) -> bool:
    """Whether the interpreter's ``tl.fma`` rounds once (triton 3.9) or twice (3.6: ``x · y +
    z`` in NumPy). Probe: (1 + 2⁻¹²)² − 1 is 2⁻¹¹ + 2⁻²⁴, but 2⁻¹¹ when the product is rounded
    to fp32 first (a tie to even)."""
    import triton.language as tl

    a = np.array([1.0 + 2.0**-12], dtype=np.float32)
    t = handle(a, tl.float32)
    out = builder.create_fma(None, t, t, handle(np.array([-1.0], dtype=np.float32), tl.float32))
    return float(np.asarray(out.data)[0]) == 2.0**-11 + 2.0**-24


def installed() -> bool:
    """True once :func:`install` has replaced the interpreter's conversions."""
    from triton.runtime import interpreter

    return hasattr(interpreter.InterpreterBuilder.cast_impl, "__wrapped__")
