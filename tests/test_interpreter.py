"""The CPU tier computes what the GPU computes: float conversions inside kernels round once to
nearest even (ties to even), as the GPU does, including the ones Triton's interpreter gets wrong
on its own (fp32 → bf16 truncates, fp64 → bf16 is an integer conversion, bf16 subnormals);
``probact_gpu._interpreter`` is the shim, ``docs/interpreter.md`` the reproducers.

The conversion tests go through a one-line copy kernel whose store converts, so on a GPU they
pin the hardware's behaviour to the same expected values; the op tests pin the cases where the
interpreter's conversions had made real results wrong.
"""

import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from probact_gpu import _interpreter, _runtime, reference
from probact_gpu.ops.bce import binary_cross_entropy_with_logits
from probact_gpu.ops.cross_entropy import cross_entropy
from probact_gpu.ops.sigmoid import sigmoid
from probact_gpu.ops.softmax import log_softmax, softmax
from probact_gpu.testing import assert_close_to_reference, make_input, to_numpy64

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y = x: the store converts x's element type to y's, as every kernel's store does."""
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _upcast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y = float32(x): an explicit ``.to`` (what kernels do after a load), stored as fp32."""
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(tl.float32), mask=mask)


@triton.jit
def _rtz_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y = bf16(x) rounded towards zero (a rounding mode the shim leaves to Triton)."""
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, x.to(tl.bfloat16, fp_downcast_rounding="rtz"), mask=mask)


@triton.jit
def _fma_kernel(x_ptr, y_ptr, z_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = fma(x, y, z)."""
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    z = tl.load(z_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, tl.fma(x, y, z), mask=mask)


def kernel_convert(x: torch.Tensor, dtype: torch.dtype, kernel=_copy_kernel) -> torch.Tensor:
    _runtime.check_runnable(x)  # where the shim is installed, as for every launcher
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(max(x.numel(), 1)))
    return y


def _bits(t: torch.Tensor) -> np.ndarray:
    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.cpu().view(int_type).numpy()


def assert_same_floats(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-identical, except that any NaN matches any NaN (payloads differ between devices)."""
    assert actual.dtype == expected.dtype
    a, e = actual.cpu(), expected.cpu()
    nan = torch.isnan(e)
    assert torch.equal(torch.isnan(a), nan), (a[torch.isnan(a) != nan], e[torch.isnan(a) != nan])
    same = _bits(a) == _bits(e)
    bad = np.flatnonzero(~same & ~nan.numpy())
    assert not len(bad), f"{len(bad)} differ, first at {bad[0]}: got {a[bad[0]]!r}, " \
        f"expected {e[bad[0]]!r}"


# --------------------------------------------------------------------------- exact references


def _nearest_even(x: float, dtype: torch.dtype) -> float:
    """x rounded once to nearest, ties to even, into ``dtype`` (subnormals and overflow to inf
    included), in exact rational arithmetic: slow, for a few hundred values."""
    if not isinstance(x, Fraction) and (not np.isfinite(x) or x == 0.0):
        return x
    finfo = torch.finfo(dtype)
    mant_bits = round(-np.log2(finfo.eps))
    min_exp = round(np.log2(finfo.tiny))
    a = abs(Fraction(x))
    e = a.numerator.bit_length() - a.denominator.bit_length()  # within one of floor(log2 a)
    while Fraction(2) ** e > a:
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    ulp = Fraction(2) ** (max(e, min_exp) - mant_bits)
    q, r = divmod(a, ulp)
    if 2 * r > ulp or (2 * r == ulp and q % 2 == 1):
        q += 1
    if q * ulp > Fraction(finfo.max):
        return float(np.copysign(np.inf, float(x)))
    return float(np.copysign(float(q * ulp), float(x)))


def test_nearest_even_reference_agrees_with_torch_from_fp32():
    """The exact reference above agrees with torch's fp32 → bf16 / fp16 (one rounding) on
    random fp32 values, so it can judge fp64 → bf16 / fp16, where torch rounds twice."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(300) * 2.0 ** rng.integers(-20, 20, 300)).astype(np.float32)
    for dtype in (torch.bfloat16, torch.float16):
        expected = torch.from_numpy(x).to(dtype).double().numpy()
        got = np.array([_nearest_even(float(v), dtype) for v in x])
        np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------- the conversions

# Ties and near-ties of each narrow format at 1.0 and 0.99609375, spelled in the source format.
BF16_TIES = [1 + 2**-8, 1 + 3 * 2**-8, 0.99609375 + 2**-9, -(1 + 3 * 2**-8), 1 + 2**-8 + 2**-20]
FP16_TIES = [1 + 2**-11, 1 + 3 * 2**-11, -(1 + 3 * 2**-11), 2**-25, 3 * 2**-25, 65519.0]


def test_fp32_to_bf16_rounds_to_nearest_even(device):
    """Every store of an fp32 value into a bf16 tensor rounds to nearest, ties to even (the
    interpreter truncated): sigmoid(14.9375) = 0.99999967 stores as 1.0, as torch."""
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, 3.3961e38, -3.4e38, 1e-40, -1e-45,
                0.9999996721, 14.9375]
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([np.array(BF16_TIES + specials, np.float32), bits.view(np.float32)])
    xt = torch.from_numpy(x).to(device)
    assert_same_floats(kernel_convert(xt, torch.bfloat16), xt.to(torch.bfloat16))
    tie = torch.tensor([1 + 3 * 2**-8], device=device)
    assert kernel_convert(tie, torch.bfloat16).item() == 1 + 2**-6


def test_fp32_to_fp16_rounds_to_nearest_even(device):
    """Right on the interpreter already (NumPy's astype); pinned so it stays so on both tiers:
    ties, the overflow threshold 65520, fp16 subnormals."""
    rng = np.random.default_rng(2)
    bits = rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([np.array(FP16_TIES + [65520.0, np.nan, -np.inf], np.float32),
                        bits.view(np.float32), rng.standard_normal(500).astype(np.float32)])
    xt = torch.from_numpy(x).to(device)
    assert_same_floats(kernel_convert(xt, torch.float16), xt.to(torch.float16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp64_to_narrow_rounds_once(dtype, device):
    """fp64 → bf16 / fp16 / fp32 rounds once, from the fp64 value (the interpreter's fp64 → bf16
    was an integer conversion: 0.73 → 0). 1 + 2⁻⁸ + 2⁻³⁰ is just above a bf16 tie: one rounding
    gives 1 + 2⁻⁷, two (through fp32, as torch's CPU cast) give 1."""
    finfo = torch.finfo(dtype)
    eps = finfo.eps
    near = [1 + eps / 2 + eps * 2**-22, 1 + eps / 2 - eps * 2**-22, 1 + eps / 2,
            1 + 1.5 * eps, -(1 + 1.5 * eps + eps * 2**-30), 0.73, 3.0, -2.5e-3]
    edges = [finfo.tiny / 2, finfo.tiny * 1.5, finfo.max, finfo.max * (1 + eps / 4),
             finfo.max * (1 + eps), 1e300, -1e-300, 0.0, -0.0]
    rng = np.random.default_rng(3)
    rand = rng.standard_normal(200) * 2.0 ** rng.integers(-30, 30, 200)
    x = np.array(near + edges + rand.tolist(), np.float64)
    expected = torch.tensor([_nearest_even(float(v), dtype) for v in x], dtype=torch.float64)
    xt = torch.from_numpy(x).to(device)
    got = kernel_convert(xt, dtype)
    assert_same_floats(got, expected.to(dtype).to(device))  # exact: already representable
    assert got[0].item() == 1 + eps  # the near-tie that double rounding gets wrong
    specials = torch.tensor([np.inf, -np.inf, np.nan], dtype=torch.float64, device=device)
    assert_same_floats(kernel_convert(specials, dtype), specials.to(dtype))


def test_fp16_to_bf16_rounds_to_nearest_even(device):
    """Every fp16 bit pattern to bf16: fp16 → fp32 is exact, so torch's cast is the truth."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    x = x.to(device)
    assert_same_floats(kernel_convert(x, torch.bfloat16), x.to(torch.bfloat16))


@pytest.mark.parametrize("kernel", [_copy_kernel, _upcast_kernel], ids=["store", "to"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_bf16_widening_is_exact(kernel, dtype, device):
    """Every bf16 bit pattern (subnormals, ±0, ±inf, NaNs) loads and widens exactly; the
    interpreter had decoded bf16 subnormals wrong."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = x.to(device)
    want = x.to(torch.float32) if kernel is _upcast_kernel else x
    got = kernel_convert(x, dtype, kernel=kernel)
    assert_same_floats(got, want.to(dtype))


@pytest.mark.parametrize("src", FLOATS, ids=str)
@pytest.mark.parametrize("dst", FLOATS, ids=str)
def test_every_float_pair_is_handled(src, dst, device):
    """All 16 pairs on ordinary values: equal to the exactly rounded source value."""
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.standard_normal(257) * 8).to(src).to(device)
    expected = [_nearest_even(v, dst) for v in x.double().tolist()]
    got = kernel_convert(x, dst)
    assert_same_floats(got, torch.tensor(expected, dtype=torch.float64).to(dst).to(device))


# --------------------------------------------------------------------------- the shim itself


def test_shim_helpers_against_torch():
    """The NumPy helpers on their own: every bf16 pattern decodes as torch's; fp32 → bf16 bits
    equal torch's on random bit patterns (NaNs aside)."""
    patterns = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    decoded = _interpreter.bf16_bits_to_f32(patterns)
    want = torch.from_numpy(patterns.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(decoded.view(np.uint32), want.view(np.uint32))
    rng = np.random.default_rng(5)
    x = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    ours = _interpreter.f32_to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    keep = ~np.isnan(x)
    np.testing.assert_array_equal(ours[keep], theirs[keep])
    assert np.isnan(_interpreter.bf16_bits_to_f32(ours[~keep])).all()


def test_round_to_odd_makes_the_second_rounding_exact():
    x = np.array([1 + 2**-8 + 2**-30, 1 + 2**-8 - 2**-30, 1 + 2**-8, 1e39, -1e39, 1e-50, 0.0])
    odd = _interpreter.f64_to_f32_round_to_odd(x)
    bf16 = _interpreter.bf16_bits_to_f32(_interpreter.f32_to_bf16_bits(odd))
    np.testing.assert_array_equal(bf16, [1 + 2**-7, 1.0, 1.0, np.inf, -np.inf, 0.0, 0.0])
    assert odd[3] == np.finfo(np.float32).max  # rounded towards zero, then odd


def _exact_fma(x: float, y: float, z: float, dtype: torch.dtype) -> float:
    """x·y + z rounded once (finite inputs; an exact 0 is +0, as round-to-nearest gives)."""
    exact = Fraction(x) * Fraction(y) + Fraction(z)
    return 0.0 if exact == 0 else _nearest_even(exact, dtype)


def _fma_cases(dtype: torch.dtype, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Products whose rounding an fma must keep: ``z = −fl(x·y)`` (the result is the rounding
    error itself), near-cancelling sums, a tie of the rounded product ((1 + 2⁻¹²)² in fp32),
    and plain random triples."""
    np_t = np.float32 if dtype == torch.float32 else np.float64
    x = rng.standard_normal(300).astype(np_t)
    y = rng.standard_normal(300).astype(np_t)
    z = rng.standard_normal(300).astype(np_t)
    z[:100] = -(x[:100] * y[:100])
    z[100:200] = -(x[100:200] * y[100:200]) * np_t(1 + 2.0**-20)
    half = 2.0**-12 if dtype == torch.float32 else 2.0**-27
    x[0] = y[0] = 1.0 + half
    z[0] = -1.0
    return x, y, z


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fma_exact_against_rationals(dtype, rng):
    """The shim's fma (installed where the interpreter's rounds twice) rounds once."""
    x, y, z = _fma_cases(dtype, rng)
    got = _interpreter.fma_exact(x, y, z)
    expected = [_exact_fma(float(a), float(b), float(c), dtype) for a, b, c in
                zip(x, y, z, strict=True)]
    np.testing.assert_array_equal(got.astype(np.float64), expected)
    assert got.dtype == x.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fma_in_a_kernel_rounds_once(dtype, rng, device):
    """``tl.fma`` in a kernel rounds once, as the GPU's: triton 3.9's interpreter does, 3.6's
    rounds the product first (the shim replaces it there). ``exp_precise`` and the head
    transform's products recover a rounding through it."""
    x, y, z = (torch.from_numpy(a).to(device) for a in _fma_cases(dtype, rng))
    _runtime.check_runnable(x)
    out = torch.empty_like(x)
    _fma_kernel[(1,)](x, y, z, out, x.numel(), BLOCK=512)
    expected = [_exact_fma(a, b, c, dtype) for a, b, c in
                zip(x.tolist(), y.tolist(), z.tolist(), strict=True)]
    assert_same_floats(out, torch.tensor(expected, dtype=dtype))


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                PRECISION: tl.constexpr):
    """c = a @ b (fp32 accumulator) over whole (M, K) and (K, N) tiles."""
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    acc = tl.zeros((M, N), tl.float32)
    if PRECISION:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _runtime.check_runnable(a)
    c = torch.empty((a.shape[0], b.shape[1]), dtype=torch.float32, device=a.device)
    _dot_kernel[(1,)](a, b, c, M=a.shape[0], N=b.shape[1], K=a.shape[1],
                      PRECISION=a.dtype == torch.float32)
    return c


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dot_is_exact_products_and_per_row(dtype, rng, device):
    """``tl.dot`` (the fused head's GEMM tiles): bf16 operands are multiplied as values, not as
    their bit patterns (2·I @ ones gave 266338304 for 2); a row's result is the same bits
    wherever it sits in the tile and whatever the other rows hold (OpenBLAS's matmul, which the
    interpreter called, changed them with the row's place; the GPU's MMA does not); and it is
    float64's to fp32 rounding."""
    eye = (2.0 * torch.eye(32)).to(dtype).to(device)
    ones = torch.ones(32, 32, dtype=dtype, device=device)
    assert bool((_dot(eye, ones) == 2.0).all())
    a, a64 = make_input((64, 64), dtype, rng, device=device)
    b, b64 = make_input((64, 32), dtype, rng, device=device)
    full = _dot(a, b)
    perm = torch.from_numpy(rng.permutation(64)).to(device)
    assert torch.equal(_dot(a[perm], b), full[perm])
    lone = torch.zeros_like(a)
    lone[17] = a[3]
    assert torch.equal(_dot(lone, b)[17], full[3])
    assert_close_to_reference(full, a64 @ b64, torch.float32, "a @ b")


_FRESH = """
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch
from probact_gpu import _interpreter, _runtime
from probact_gpu.ops import cross_entropy, sigmoid, softmax
assert not _interpreter.installed(), "installed at import"
_runtime.check_runnable(torch.zeros(1))
assert _interpreter.installed(), "not installed by check_runnable"
"""


def test_shim_installed_by_the_first_launcher_not_at_import():
    """In a fresh process: importing the ops patches nothing; the first check_runnable on a CPU
    tensor under the interpreter installs the shim."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", _FRESH], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.skipif(not _runtime.interpreting(), reason="the interpreter's shim (CPU tier)")
def test_shim_leaves_integer_casts_to_triton():
    """Installed (by the test set-up or the first launcher); integer casts still go to Triton's
    own code."""
    _runtime.check_runnable(torch.zeros(1))
    assert _interpreter.installed()
    x = torch.tensor([-3, 7, 40000], dtype=torch.int32)
    assert kernel_convert(x, torch.int64).tolist() == [-3, 7, 40000]
    assert kernel_convert(x, torch.float32).tolist() == [-3.0, 7.0, 40000.0]
    assert kernel_convert(torch.tensor([2.75, -2.75]), torch.int32).tolist() == [2, -2]


def test_round_towards_zero_is_left_to_triton(device):
    """An explicit fp_downcast_rounding="rtz" still truncates (Triton's own conversion)."""
    x = torch.tensor([1 + 3 * 2**-8, -(1 + 3 * 2**-8), 0.99609375 + 2**-9], device=device)
    got = kernel_convert(x, torch.bfloat16, kernel=_rtz_kernel)
    assert got.tolist() == [1 + 2**-7, -(1 + 2**-7), 0.99609375]


# --------------------------------------------------------------------------- through real ops


def test_sigmoid_bf16_rounds_like_torch(device):
    """sigmoid(14.9375) = 0.99999967: 1.0 in bf16 (the interpreter had stored 0.99609375)."""
    x = torch.tensor([14.9375, -14.9375, 5.5, 0.1], dtype=torch.bfloat16, device=device)
    assert sigmoid(x)[0].item() == 1.0
    assert_same_floats(sigmoid(x), torch.sigmoid(x))


def test_sigmoid_bf16_has_no_downward_bias(rng, device):
    """Over many values the bf16 outputs are as often above the exact result as below it
    (truncation had put every inexact one below)."""
    x, x64 = make_input((20000,), torch.bfloat16, rng, scale=3.0, device=device)
    err = to_numpy64(sigmoid(x)) - reference.sigmoid(x64)
    above, below = int((err > 0).sum()), int((err < 0).sum())
    assert abs(above - below) < 0.1 * (above + below), (above, below)


def test_softmax_fp64_input_bf16_output(rng, device):
    """softmax(x64, dtype=bf16): fp64 math stored as bf16 (the interpreter had stored zeros)."""
    x = torch.from_numpy(rng.standard_normal((5, 33))).to(device)
    y = softmax(x, -1, dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert_close_to_reference(y, reference.softmax(to_numpy64(x)), torch.bfloat16)
    assert_same_floats(y, torch.softmax(x, -1).to(torch.bfloat16))


def test_log_softmax_bf16_input_fp64_output_backward(rng, device):
    """log_softmax(x_bf16, dtype=fp64) backward: the fp64 gradient stored into bf16 (it had been
    NaN or zero)."""
    x, x64 = make_input((4, 65), torch.bfloat16, rng, device=device)
    dy64 = rng.standard_normal((4, 65))
    xr = x.clone().requires_grad_()
    y = log_softmax(xr, -1, dtype=torch.float64)
    y.backward(torch.from_numpy(dy64).to(device))
    assert y.dtype == torch.float64 and xr.grad.dtype == torch.bfloat16
    expected = reference.log_softmax_grad(reference.log_softmax(x64), dy64)
    assert torch.isfinite(xr.grad).all()
    assert_close_to_reference(xr.grad, expected, torch.bfloat16, "dx")


def test_bce_bf16_logits_fp64_targets(rng, device):
    """BCE with bf16 logits and fp64 targets: the gradient (computed in fp64) stored as bf16
    (it had been all zeros)."""
    x, x64 = make_input((6, 40), torch.bfloat16, rng, scale=2.0, device=device)
    t64 = rng.random((6, 40))
    xr = x.clone().requires_grad_()
    loss = binary_cross_entropy_with_logits(xr, torch.from_numpy(t64).to(device))
    loss.backward()
    expected = reference.bce_with_logits_grad(x64, t64, np.float64(1.0))
    assert (xr.grad != 0).any()
    assert_close_to_reference(xr.grad, expected, torch.bfloat16, "dx")
    assert_close_to_reference(loss.detach().double(), reference.bce_with_logits(x64, t64),
                              torch.bfloat16, "loss")


def test_cross_entropy_bf16_logits_fp64_weight(rng, device):
    """CE with bf16 logits and an fp64 class weight: the gradient had been all zeros."""
    x, x64 = make_input((8, 50), torch.bfloat16, rng, scale=2.0, device=device)
    w64 = rng.uniform(0.5, 2.0, 50)
    t = rng.integers(0, 50, 8)
    xr = x.clone().requires_grad_()
    loss = cross_entropy(xr, torch.from_numpy(t).to(device), torch.from_numpy(w64).to(device))
    loss.backward()
    loss_ref, _, grad_ref = reference.cross_entropy(x64, t, w64)
    assert (xr.grad != 0).any()
    assert_close_to_reference(xr.grad, grad_ref, torch.bfloat16, "dlogits")
    assert_close_to_reference(loss.detach().double(), np.asarray(loss_ref), torch.bfloat16,
                              "loss")


@triton.jit
def _twice(x):
    return x * 2.0


@triton.jit
def _helpers_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y = max(8·x over the block) via a helper called three times and triton's tl.max (whose
    standard-library module sees triton.language.core, not the kernel module's tl)."""
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=float("-inf"))
    for _ in range(3):
        x = _twice(x)
    tl.store(y_ptr, tl.max(x, axis=0))


def test_interpreter_patches_language_once_per_module_and_launch(monkeypatch):
    """A helper called inside a launch no longer re-patches triton.language on every call (the
    interpreter's ~4 ms a call): once per module a launch calls into; outside a launch the
    interpreter's own call runs."""
    if not _runtime.interpreting():
        pytest.skip("the interpreter's call path (CPU tier)")
    from triton.runtime import interpreter

    _interpreter.install()
    calls = []
    original = interpreter._patch_lang
    monkeypatch.setattr(interpreter, "_patch_lang", lambda fn: calls.append(fn) or original(fn))
    x = torch.arange(5, dtype=torch.float32)
    y = torch.empty(1)
    _helpers_kernel[(2,)](x, y, 5, BLOCK=8)
    assert float(y) == 32.0
    # the launch's own patch, then once for this module's helpers and once for triton's
    # standard library (not 2 programs × 3 helper calls + the reductions)
    assert len(calls) <= 3, [c.__name__ for c in calls]
