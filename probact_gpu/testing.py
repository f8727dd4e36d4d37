"""Test helpers shared by the test suite and ``probact-gpu check``: the one tolerance table,
input makers that hand both sides identical (rounded) values, and the comparison that explains
its failures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._runtime import Launch, poison_outputs, record_launches

__all__ = [
    "TOLERANCES",
    "Errors",
    "assert_close_to_reference",
    "errors",
    "make_bce_inputs",
    "make_input",
    "poison_outputs",
    "record_launches",
    "Launch",
    "to_numpy64",
]

# (atol, rtol) of a result computed in fp32 and rounded to the dtype, against float64. The
# 16-bit rows are a few ulps of the output format; fp32 allows the fp32 math's rounding.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 5e-3),
    torch.bfloat16: (8e-3, 2e-2),
}


def to_numpy64(t: torch.Tensor) -> np.ndarray:
    """The tensor's exact values as a float64 array (bf16/fp16 upcast losslessly)."""
    return t.detach().to("cpu", torch.float64).numpy()


def make_input(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    rng: np.random.Generator,
    *,
    scale: float = 1.0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, np.ndarray]:
    """Gaussian values × ``scale``, cast to ``dtype``; returns the tensor and the *rounded* values
    in float64, so the reference sees exactly what the kernel sees."""
    values = rng.standard_normal(shape) * scale
    t = torch.from_numpy(np.asarray(values, dtype=np.float64)).to(dtype).to(device)
    return t, to_numpy64(t)


def make_bce_inputs(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    rng: np.random.Generator,
    device: torch.device | str = "cpu",
    *,
    options: str = "",
    scale: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """BCE operands: logits, targets (hard 0/1; soft in [0, 1) with 's' in ``options``) and
    the operands named in ``options``: 'w' a per-class weight, 'r' a per-row weight (N, 1),
    'p' a per-class pos_weight; absent ones are None."""
    x, _ = make_input(shape, dtype, rng, scale=scale, device=device)
    values = rng.random(shape) if "s" in options else (rng.random(shape) < 0.5).astype(float)
    t = torch.from_numpy(np.asarray(values, dtype=np.float64)).to(dtype).to(device)
    n_classes = shape[-1] if shape else 1
    w = pw = None
    if "w" in options:
        w = torch.from_numpy(rng.random(n_classes) + 0.5).to(dtype).to(device)
    if "r" in options:
        w = torch.from_numpy(rng.random((shape[0], 1)) + 0.5).to(dtype).to(device)
    if "p" in options:
        pw = torch.from_numpy(rng.random(n_classes) * 3.0).to(dtype).to(device)
    return x, t, w, pw


@dataclass(frozen=True)
class Errors:
    max_abs: float
    max_rel: float
    passed: bool
    first_bad: tuple[int, ...] | None
    detail: str
    special_ok: bool = True  # NaN and ±inf in the reference's places (always True when passed)


def errors(actual: torch.Tensor | np.ndarray, expected: np.ndarray, dtype: torch.dtype) -> Errors:
    """Compare against a float64 reference with ``TOLERANCES[dtype]``: |a − e| <= atol + rtol·|e|
    elementwise; NaN and ±inf must sit in the same places with the same sign. ``max_rel`` is
    over elements with |e| > atol."""
    atol, rtol = TOLERANCES[dtype]
    a = to_numpy64(actual) if isinstance(actual, torch.Tensor) else np.asarray(actual, np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return Errors(float("inf"), float("inf"), False, None,
                      f"shape {a.shape} != reference shape {e.shape}")
    if a.size == 0:
        return Errors(0.0, 0.0, True, None, "empty")
    same_special = (np.isnan(a) == np.isnan(e)) & (np.isposinf(a) == np.isposinf(e)) & (
        np.isneginf(a) == np.isneginf(e)
    )
    finite = np.isfinite(a) & np.isfinite(e)
    with np.errstate(invalid="ignore", over="ignore"):  # inf − inf where neither is finite
        diff = np.where(finite, np.abs(a - e), 0.0)
    ok = same_special & (diff <= atol + rtol * np.abs(np.where(finite, e, 0.0)))
    max_abs = float(diff.max())
    big = finite & (np.abs(e) > atol)
    max_rel = float((diff[big] / np.abs(e[big])).max()) if big.any() else 0.0
    bad = np.argwhere(~ok)
    first = tuple(int(i) for i in bad[0]) if len(bad) else None
    detail = (
        f"max abs err {max_abs:.3e}, max rel err {max_rel:.3e} (atol {atol:g}, rtol {rtol:g}); "
        + (f"{len(bad)} bad, first at {first}: got {a[first]!r}, expected {e[first]!r}"
           if first is not None else "all within tolerance")
    )
    return Errors(max_abs, max_rel, first is None, first, detail, bool(same_special.all()))


def assert_close_to_reference(
    actual: torch.Tensor | np.ndarray,
    expected: np.ndarray,
    dtype: torch.dtype,
    name: str = "output",
) -> None:
    """Assert ``errors(...)`` passes; the message carries the max errors and the first bad index."""
    err = errors(actual, expected, dtype)
    if not err.passed:
        raise AssertionError(f"{name} ({dtype}): {err.detail}")
