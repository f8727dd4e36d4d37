"""Runs the bench: the copy rate first, then every (op, pass, dtype, shape) × provider, one
provider at a time on fresh inputs (Liger's cross-entropy overwrites its logits with the
gradient, so inputs are never shared between providers).

For each provider: resolve its function (a :class:`~.providers.Skip` or any exception is a
skipped row with the reason), call it once (warm-up; torch.compile compiles here), time it with
``do_bench``, then measure the peak extra memory of one more call. On a smoke pass (no CUDA, or
``--smoke``) the call runs once, untimed, and the forward is compared with torch eager's.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

import torch

from . import bytes as bytes_model
from . import providers as prov
from . import shapes as shape_table
from .report import Row
from .timing import copy_rate, measure, peak_extra_mib

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    op: str
    pass_: str
    dtype: str
    shape: tuple[int, ...]


def plan(ops: Iterable[str], dtypes: Iterable[str], passes: Iterable[str] | None,
         size: str) -> tuple[list[Case], list[str]]:
    """The cases to run, in order, and notes on requested passes an op does not have."""
    cases, notes = [], []
    for op in ops:
        wanted = shape_table.DEFAULT_PASSES[op] if passes is None else tuple(passes)
        have = bytes_model.supported_passes(op)
        for p in wanted:
            if p not in have:
                notes.append(f"{op} has no separate {p} pass (it fuses its gradient); not run")
                continue
            for dtype in dtypes:
                for shape in shape_table.shapes(op, size):
                    cases.append(Case(op, p, dtype, shape))
    return cases, notes


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"raised {type(exc).__name__}: {text[:160]}"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(case: Case, provider: str, device: torch.device, *, smoke: bool,
             copy_gbps: float | None, resolve: Callable = prov.resolve,
             warmup_ms: int = 25, rep_ms: int = 100, seed: int = 0) -> Row:
    """One row: ``provider`` on ``case``, timed (or smoke-run), or skipped with the reason."""
    row = Row(case.op, case.pass_, case.dtype, case.shape, provider, "skipped")
    dtype = DTYPES[case.dtype]
    inputs = step = out = None
    try:
        fn = resolve(provider, case.op, device=device, smoke=smoke)
        inputs = prov.make_inputs(case.op, case.shape, dtype, device, seed)
        step = prov.build_step(fn, case.op, case.pass_, inputs)
        out = step.run()  # warm-up; compiles under torch.compile
        if smoke:
            row.status = "smoke"
            row.reason = _smoke_note(case, out, step, device, seed)
            return row
        del out
        out = None
        timing = measure(step.run, warmup_ms=warmup_ms, rep_ms=rep_ms)
        step.reset()
        row.extra_mib = peak_extra_mib(step.run, device)
        row.status = "ok"
        row.ms, row.ms_p20, row.ms_p80 = timing.ms, timing.p20, timing.p80
        if case.op in bytes_model.COMPUTE_BOUND:
            tokens, hidden, vocab = case.shape
            flops = bytes_model.matmul_flops(case.pass_, tokens, hidden, vocab, op=case.op)
            row.tflops = bytes_model.tflops(flops, timing.ms)
        else:
            row.bytes = bytes_model.minimal_bytes(case.op, case.pass_, case.shape,
                                                  dtype.itemsize)
            row.gbps = bytes_model.gbps(row.bytes, timing.ms)
            if copy_gbps:
                row.pct_copy = 100.0 * row.gbps / copy_gbps
    except prov.Skip as skip:
        row.reason = str(skip)
    except Exception as exc:  # a provider that raises on a shape is a skipped row, not a crash
        row.status = "skipped"
        row.reason = _short(exc)
    finally:
        del inputs, step, out
        _free(device)
    return row


def _smoke_note(case: Case, out, step: prov.Step, device: torch.device, seed: int) -> str:
    """What the smoke pass saw: the forward output (fwd) or the gradients (fwd_bwd) against
    torch eager's on the same inputs."""
    inputs = prov.make_inputs(case.op, case.shape, DTYPES[case.dtype], device, seed)
    if case.pass_ == "fwd":
        theirs = prov.TORCH_FNS[case.op](*inputs.values())
        ours = list(out) if isinstance(out, tuple) else [out]
        theirs = list(theirs) if isinstance(theirs, tuple) else [theirs]
    elif case.pass_ == "fwd_bwd":
        ref = prov.build_step(prov.TORCH_FNS[case.op], case.op, case.pass_, inputs)
        ref.run()
        ours, theirs = [t.grad for t in step.leaves], [t.grad for t in ref.leaves]
    else:
        return f"{case.pass_} ran"
    what = "output" if case.pass_ == "fwd" else "gradients"
    worst_abs = worst_rel = 0.0
    for a, b in zip(ours, theirs, strict=True):
        if not isinstance(a, torch.Tensor) or a.shape != b.shape:
            return f"{case.pass_} ran; {what} do not match torch's in shape"
        if not torch.isfinite(a.float()).all():
            return f"{case.pass_} ran; {what} have non-finite values"
        if a.numel():
            diff = (a.float() - b.float()).abs()
            worst_abs = max(worst_abs, diff.max().item())
            scale = b.float().abs().max().item()
            worst_rel = max(worst_rel, diff.max().item() / scale if scale else 0.0)
    return (f"{case.pass_} ran; {what} vs torch: max abs diff {worst_abs:.1e} "
            f"({worst_rel:.1e} of torch's largest magnitude)")


def add_speedups(rows: list[Row]) -> None:
    """On each timed probact row (variants too): the best non-probact provider's median over
    its own."""
    for r in rows:
        if not r.provider.startswith("probact") or r.status != "ok":
            continue
        others = [o for o in rows if o.group == r.group and not o.provider.startswith("probact")
                  and o.status == "ok"]
        if others:
            best = min(others, key=lambda o: o.ms)
            r.speedup = best.ms / r.ms
            r.speedup_vs = best.provider


def run(*, ops: Iterable[str], dtypes: Iterable[str], passes: Iterable[str] | None,
        size: str, device: torch.device, providers: Iterable[str] = prov.PROVIDERS,
        resolve: Callable = prov.resolve, progress: bool = True,
        out: TextIO = sys.stdout) -> tuple[float | None, list[Row], bool]:
    """Run the bench; returns (copy rate in GB/s or None on a smoke pass, rows, whether every
    planned row ran — False after an interrupt)."""
    smoke = size == "smoke"
    cases, notes = plan(ops, dtypes, passes, size)
    for note in notes:
        print(f"note: {note}", file=out)
    providers = tuple(providers)
    warmup_ms, rep_ms = (10, 50) if size == "quick" else (25, 100)
    copy_gbps = None
    if not smoke:
        copy_gbps, _ = copy_rate(device, warmup_ms=warmup_ms, rep_ms=rep_ms)
        print(f"copy rate: {copy_gbps:,.0f} GB/s (y.copy_(x), 1 GiB, read + write)", file=out)
    tasks = [(c, p) for c in cases
             for p in providers + (prov.VARIANTS.get(c.op, ()) if "probact" in providers else ())]
    bar = _progress(len(tasks), enabled=progress and not smoke)
    rows = []
    try:
        for case, provider in tasks:
            if bar is not None:
                bar.set_description(f"{case.op} {case.pass_} {shape_table.label(case.shape)} "
                                    f"{provider}")
            rows.append(run_case(case, provider, device, smoke=smoke, copy_gbps=copy_gbps,
                                 resolve=resolve, warmup_ms=warmup_ms, rep_ms=rep_ms))
            if bar is not None:
                bar.update(1)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (see cli): keep what was measured
        print(f"interrupted after {len(rows)} of {len(tasks)} rows; reporting those", file=out)
    finally:
        if bar is not None:
            bar.close()
    add_speedups(rows)
    return copy_gbps, rows, len(rows) == len(tasks)


def _progress(total: int, enabled: bool):
    """A tqdm bar on stderr when tqdm is installed and stderr is a terminal; else None."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, file=sys.stderr, disable=None, leave=False, unit="row")
