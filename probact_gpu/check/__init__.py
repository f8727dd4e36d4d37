"""``probact-gpu check``: every op × dtype × a table of shapes against the NumPy float64
reference, with torch eager's error on the same inputs beside ours, and the accuracy promise
checked in numbers.

Each op family has a module here exposing ``cases(large: bool) -> list[Case]``; the op registry
(:mod:`probact_gpu.registry`) names them (``MODULES``), a module appearing there as soon as its
file exists. A case's ``run(device, rng)`` returns one :class:`Row` per compared output (forward
value, each gradient).

The promise: **no output is worse than torch eager's by more than one ulp of the output dtype.**
A row is *worse than torch* when

    ours_err > torch_err + ulp(dtype, scale)

with ``ours_err`` and ``torch_err`` the max abs errors against the float64 reference on the same
inputs, ``scale`` the largest finite |reference| of that output, and ``ulp(dtype, x)`` the
spacing of ``dtype``'s values at ``x`` (``eps · 2**floor(log2 x)``; the subnormal spacing below
the smallest normal): the one rounding to the output dtype that either side may lose to the
other at the output's largest value. ``check`` exits non-zero on a tolerance failure, a crash, or
a row worse than torch.

One draw's max error is itself a random number: where both sides' errors are several ulps (an
exponent's argument rounded at |z| ~ 10 puts ~8 ulps into the largest gradient, a sum over 20
tokens adds its own), two equally accurate methods differ by more than one ulp on some draws. A
row worse than torch on its first draw is therefore drawn ``REDRAWS`` more times (fresh inputs,
seeded from the case's name): it is WORSE only if the mean over all draws of our max error
exceeds the mean of torch's by more than one ulp (the mean ulp). The table then shows those
means and the draw count, and the summary lists the rows the re-draws cleared with their first
draw's numbers, so nothing is hidden. A tolerance failure on any draw is a failure.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .. import registry
from ..testing import TOLERANCES, Errors, errors

MODULES = registry.check_modules()

REDRAWS = 4  # extra draws of a case with a row worse than torch on its first draw

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.float64: "fp64"}


def ulp(dtype: torch.dtype, x: float) -> float:
    """The spacing of ``dtype``'s values at magnitude ``x``: ``eps · 2**floor(log2 |x|)`` for a
    normal |x|, the subnormal spacing ``eps · tiny`` below the smallest normal (and at 0), the
    spacing at the largest finite value beyond it."""
    finfo = torch.finfo(dtype)
    x = min(abs(x), finfo.max) if math.isfinite(x) else finfo.max
    if x < finfo.tiny:
        return finfo.eps * finfo.tiny
    return finfo.eps * 2.0 ** math.floor(math.log2(x))


@dataclass(frozen=True)
class Row:
    op: str
    dtype: torch.dtype
    shape: str
    ours: Errors
    torch_err: Errors | None  # None where torch has no equivalent
    scale: float = 0.0  # the largest finite |reference| of this output
    draws: int = 1  # > 1: ours / torch_err hold the mean max abs errors over that many draws
    first: Row | None = None  # the first draw's row, when re-drawn
    # False: a row shown beside another for comparison (a path that rounds its logits, as
    # torch does), held to the torch promise only, not to the tolerance
    held_to_tolerance: bool = True

    @property
    def passed(self) -> bool:
        """Within ``TOLERANCES[dtype]`` of the float64 reference (or not held to it)."""
        return self.ours.passed or not self.held_to_tolerance

    @property
    def ulp(self) -> float:
        """One ulp of the output dtype at the output's largest reference value."""
        return ulp(self.dtype, self.scale)

    @property
    def ratio(self) -> float | None:
        """ours / torch max abs error (None without torch; 1 when both are exact)."""
        if self.torch_err is None:
            return None
        ours, theirs = self.ours.max_abs, self.torch_err.max_abs
        if theirs == 0.0:
            return 1.0 if ours == 0.0 else math.inf
        return ours / theirs

    @property
    def worse_than_torch(self) -> bool:
        """Our max abs error exceeds torch eager's by more than one ulp (the module docstring's
        rule); also when torch gets the NaN / ±inf placement right and we do not."""
        if self.torch_err is None:
            return False
        if self.torch_err.special_ok and not self.ours.special_ok:
            return True
        return self.ours.max_abs > self.torch_err.max_abs + self.ulp

    @property
    def verdict(self) -> str:
        if not self.passed:
            return "FAIL"
        word = "WORSE" if self.worse_than_torch else "PASS"
        if not self.held_to_tolerance and not self.ours.passed:
            word += " (vs torch only)"
        return word if self.draws == 1 else f"{word} (mean of {self.draws} draws)"


@dataclass(frozen=True)
class Case:
    op: str
    dtype: torch.dtype
    shape: str
    run: Callable[[torch.device, np.random.Generator], list[Row]]


def merge_draws(draws: list[Row]) -> Row:
    """One row from the same output over several draws: max abs errors (ours, torch's) and the
    scale averaged, max rel the largest, passed only if every draw passed (the first failing
    draw's detail), NaN / ±inf placement right only if right on every draw."""
    def mean(errs: list[Errors]) -> Errors:
        bad = next((e for e in errs if not e.passed), None)
        return Errors(float(np.mean([e.max_abs for e in errs])),
                      float(max(e.max_rel for e in errs)), bad is None,
                      None if bad is None else bad.first_bad,
                      errs[0].detail if bad is None else bad.detail,
                      all(e.special_ok for e in errs))

    first = draws[0]
    theirs = None if first.torch_err is None else mean([r.torch_err for r in draws])
    return dataclasses.replace(first, ours=mean([r.ours for r in draws]), torch_err=theirs,
                               scale=float(np.mean([r.scale for r in draws])),
                               draws=len(draws), first=first)


def run_case(case: Case, device: torch.device, rng: np.random.Generator,
             redraw_seed: list[int]) -> list[Row]:
    """A case's rows; when one is worse than torch, the case drawn ``REDRAWS`` more times
    (generators ``redraw_seed + [i]``) and each row averaged over the draws (module docstring)."""
    rows = case.run(device, rng)
    if not any(r.worse_than_torch for r in rows):
        return rows
    draws = [rows] + [case.run(device, np.random.default_rng(redraw_seed + [i]))
                      for i in range(1, REDRAWS + 1)]
    return [merge_draws(list(same)) for same in zip(*draws, strict=True)]


def _scale(expected: np.ndarray) -> float:
    e = np.abs(np.asarray(expected, dtype=np.float64))
    e = e[np.isfinite(e)]
    return float(e.max()) if e.size else 0.0


def compare(op: str, dtype: torch.dtype, shape: str, ours: torch.Tensor,
            theirs: torch.Tensor | None, expected: np.ndarray) -> Row:
    """One output of one case: our error and torch's against the same float64 reference."""
    torch_err = None if theirs is None else errors(theirs, expected, dtype)
    return Row(op, dtype, shape, errors(ours, expected, dtype), torch_err, _scale(expected))


def collect(large: bool, ops: tuple[str, ...] | None = None) -> list[Case]:
    """The cases of every registered check module (of the ops named in ``ops`` only, by the
    first word of the case's op)."""
    cases: list[Case] = []
    modules = MODULES if ops is None else tuple(
        dict.fromkeys(registry.lookup(op).check_module for op in ops))
    for name in modules:
        module = importlib.import_module(f".{name}", __name__)
        cases += [c for c in module.cases(large) if ops is None or c.op.split()[0] in ops]
    return cases


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.2e}"


def _fmt_ratio(r: float | None) -> str:
    if r is None:
        return "–"
    return "inf" if math.isinf(r) else f"{r:.2f}"


def format_table(rows: list[Row]) -> str:
    head = ("| op | dtype | shape | max abs err | max rel err | torch max abs err | "
            "ours / torch | tolerance (atol, rtol) | result |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        atol, rtol = TOLERANCES[r.dtype]
        theirs = "–" if r.torch_err is None else _fmt(r.torch_err.max_abs)
        lines.append(f"| {r.op} | {DTYPE_NAMES[r.dtype]} | {r.shape} | {_fmt(r.ours.max_abs)} | "
                     f"{_fmt(r.ours.max_rel)} | {theirs} | {_fmt_ratio(r.ratio)} | "
                     f"{atol:g}, {rtol:g} | {r.verdict} |")
    return "\n".join(lines)


def format_summary(rows: list[Row], crashed: int = 0) -> str:
    """Counts: within tolerance, compared with torch (better / equal / worse, within the one-ulp
    allowance or beyond it), and the rows beyond it."""
    compared = [r for r in rows if r.torch_err is not None]
    better = sum(r.ours.max_abs < r.torch_err.max_abs for r in compared)
    equal = sum(r.ours.max_abs == r.torch_err.max_abs for r in compared)
    worse = [r for r in compared if r.worse_than_torch]
    within_ulp = len(compared) - better - equal - len(worse)
    failed = sum(not r.passed for r in rows)
    lines = [
        f"{len(rows)} rows: {len(rows) - failed} within tolerance, {failed} outside"
        + (f", {crashed} cases crashed" if crashed else ""),
        f"against torch eager ({len(compared)} rows with a torch equivalent): {better} better, "
        f"{equal} equal, {within_ulp} worse by at most one ulp, {len(worse)} worse by more",
    ]
    if worse:
        lines.append("worse than torch by more than one ulp of the output dtype:")
        lines += [f"  {r.op} {DTYPE_NAMES[r.dtype]} {r.shape}: ours {_fmt(r.ours.max_abs)}, "
                  f"torch {_fmt(r.torch_err.max_abs)}, one ulp {_fmt(r.ulp)}"
                  + (f" (mean of {r.draws} draws)" if r.draws > 1 else "") for r in worse]
    cleared = [r for r in compared if r.first is not None and r.first.worse_than_torch
               and not r.worse_than_torch]
    if cleared:
        lines.append(f"worse by more than one ulp on the first draw only ({REDRAWS} re-draws, "
                     f"mean errors within the promise):")
        lines += [f"  {r.op} {DTYPE_NAMES[r.dtype]} {r.shape}: first draw ours "
                  f"{_fmt(r.first.ours.max_abs)}, torch {_fmt(r.first.torch_err.max_abs)}; mean "
                  f"ours {_fmt(r.ours.max_abs)}, torch {_fmt(r.torch_err.max_abs)}, one ulp "
                  f"{_fmt(r.ulp)}" for r in cleared]
    return "\n".join(lines)


def run(device: torch.device, large: bool, ops: tuple[str, ...] | None = None,
        seed: int = 0, out=None) -> int:
    """Run every case; print the table, the failures' details and the summary; return the exit
    status: 1 on a tolerance failure, a crash, a row worse than torch by more than one ulp, or
    no rows at all.

    Each case draws its inputs from its own generator, seeded by ``seed`` and the case's name
    (op, dtype, shape and its rank among cases of that name), so ``--op`` reproduces exactly
    the rows the full run prints. The interpreter's NumPy warnings (overflow, inf − inf, log 0
    on the deliberate ±inf / NaN inputs of the edge rows) are silenced: the table reports what
    came out."""
    out = sys.stdout if out is None else out
    rows: list[Row] = []
    crashed: list[str] = []
    seen: Counter[str] = Counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning,
                                module=r"triton\.runtime\.interpreter")
        for case in collect(large, ops):
            name = f"{case.op}|{DTYPE_NAMES[case.dtype]}|{case.shape}"
            seen[name] += 1
            key = [seed, zlib.crc32(f"{name}|{seen[name]}".encode())]
            try:
                rows += run_case(case, device, np.random.default_rng(key), key)
            except Exception as exc:  # a crash is a failure of that case, reported, not a stop
                crashed.append(f"{case.op} {DTYPE_NAMES[case.dtype]} {case.shape}: "
                               f"{type(exc).__name__}: {exc}")
    print(format_table(rows), file=out)
    failed = [r for r in rows if not r.passed]
    for r in failed:
        print(f"FAIL {r.op} {DTYPE_NAMES[r.dtype]} {r.shape}: {r.ours.detail}", file=out)
    for line in crashed:
        print(f"ERROR {line}", file=out)
    print("\n" + format_summary(rows, len(crashed)), file=out)
    worse = any(r.worse_than_torch for r in rows)
    return 1 if failed or crashed or worse or not rows else 0
