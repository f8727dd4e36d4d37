"""Timing, the copy-rate ceiling and peak extra memory, as perf/NOTES.md defines them.

- Time: ``triton.testing.do_bench`` (it flushes L2 between calls), median with the 20th and 80th
  percentiles, after its warm-up.
- Copy rate: ``y.copy_(x)`` on 1 GiB, counting the read and the write (2 GiB a call), measured in
  the same run as the ops it rates.
- Peak extra memory: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``,
  minus what was allocated before the call. It includes what the call returns (an output, a
  gradient), which every provider pays alike, and any scratch it keeps alive meanwhile.

Nothing here runs on the CPU: the bench's CPU mode is an untimed smoke pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

COPY_BYTES = 1 << 30
MIB = float(1 << 20)


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median, 20th and 80th percentiles."""

    ms: float
    p20: float
    p80: float


def measure(fn: Callable[[], object], *, warmup_ms: int = 25, rep_ms: int = 100) -> Timing:
    """Time ``fn`` on the current CUDA device with ``do_bench`` (median, p20, p80 in ms)."""
    from triton.testing import do_bench

    q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(float(q[0]), float(q[1]), float(q[2]))


def copy_rate(device: torch.device, *, nbytes: int = COPY_BYTES, warmup_ms: int = 25,
              rep_ms: int = 100) -> tuple[float, Timing]:
    """Device-to-device copy rate in GB/s (read + write of ``nbytes``) and its timing."""
    x = torch.randn(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t = measure(lambda: y.copy_(x), warmup_ms=warmup_ms, rep_ms=rep_ms)
    return 2 * nbytes / (t.ms * 1e-3) / 1e9, t


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float:
    """MiB allocated at the peak of one call of ``fn`` above what was allocated before it."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return max(0, peak - base) / MIB
