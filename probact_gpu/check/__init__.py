"""``probact-gpu check``: every op × dtype × a table of shapes against the NumPy float64
reference, with torch eager's error on the same inputs printed beside ours.

Each op family has a module here exposing ``cases(large: bool) -> list[Case]``; ``MODULES``
lists them. A case's ``run(device, rng)`` returns one :class:`Row` per compared output (forward
value, each gradient).
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..testing import TOLERANCES, Errors, errors

MODULES = ("softmax", "sigmoid", "bce", "cross_entropy", "linear_cross_entropy")

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.float64: "fp64"}


@dataclass(frozen=True)
class Row:
    op: str
    dtype: torch.dtype
    shape: str
    ours: Errors
    torch_err: Errors | None  # None where torch has no equivalent

    @property
    def passed(self) -> bool:
        return self.ours.passed


@dataclass(frozen=True)
class Case:
    op: str
    dtype: torch.dtype
    shape: str
    run: Callable[[torch.device, np.random.Generator], list[Row]]


def compare(op: str, dtype: torch.dtype, shape: str, ours: torch.Tensor,
            theirs: torch.Tensor | None, expected: np.ndarray) -> Row:
    """One output of one case: our error and torch's against the same float64 reference."""
    torch_err = None if theirs is None else errors(theirs, expected, dtype)
    return Row(op, dtype, shape, errors(ours, expected, dtype), torch_err)


def collect(large: bool, ops: tuple[str, ...] | None = None) -> list[Case]:
    cases: list[Case] = []
    for name in MODULES:
        module = importlib.import_module(f".{name}", __name__)
        cases += [c for c in module.cases(large) if ops is None or c.op.split()[0] in ops]
    return cases


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.2e}"


def format_table(rows: list[Row]) -> str:
    head = ("| op | dtype | shape | max abs err | max rel err | torch max abs err | "
            "tolerance (atol, rtol) | result |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        atol, rtol = TOLERANCES[r.dtype]
        theirs = "–" if r.torch_err is None else _fmt(r.torch_err.max_abs)
        verdict = "PASS" if r.passed else "FAIL"
        lines.append(f"| {r.op} | {DTYPE_NAMES[r.dtype]} | {r.shape} | {_fmt(r.ours.max_abs)} | "
                     f"{_fmt(r.ours.max_rel)} | {theirs} | {atol:g}, {rtol:g} | {verdict} |")
    return "\n".join(lines)


def run(device: torch.device, large: bool, ops: tuple[str, ...] | None = None,
        seed: int = 0, out=sys.stdout) -> int:
    """Run every case; print the table (and the failures' details); return the exit status."""
    rng = np.random.default_rng(seed)
    rows: list[Row] = []
    crashed: list[str] = []
    for case in collect(large, ops):
        try:
            rows += case.run(device, rng)
        except Exception as exc:  # a crash is a failure of that case, reported, not a stop
            crashed.append(f"{case.op} {DTYPE_NAMES[case.dtype]} {case.shape}: "
                           f"{type(exc).__name__}: {exc}")
    print(format_table(rows), file=out)
    failed = [r for r in rows if not r.passed]
    for r in failed:
        print(f"FAIL {r.op} {DTYPE_NAMES[r.dtype]} {r.shape}: {r.ours.detail}", file=out)
    for line in crashed:
        print(f"ERROR {line}", file=out)
    print(f"\n{len(rows) - len(failed)} passed, {len(failed) + len(crashed)} failed", file=out)
    return 1 if failed or crashed or not rows else 0
