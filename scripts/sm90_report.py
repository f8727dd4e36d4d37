"""Static Hopper (sm_90) compile report of every Triton kernel in ``kernels/``, without a GPU.

    python scripts/sm90_report.py                      # every case -> perf/sm90_static.md
    python scripts/sm90_report.py --smoke --json r.json --out -   # the CI subset (tests/)

What it does, per case:

1. Runs the real launchers of ``probact_gpu.ops`` on ``meta`` tensors of the bench shapes
   (``probact_gpu.bench.shapes``, their one home), with
   every kernel object of the ops modules replaced by a recorder, ``sm_count`` fixed at an
   H200's 132 SMs and ``check_runnable`` off. So the arguments, constexpr flags and the configs
   ``probact_gpu.tiling`` picks are exactly the launchers' (nothing is restated here).
2. Specialises each recorded launch with Triton's own launch-time binder
   (``create_function_from_signature`` + ``JITFunction._pack_args``) built for a ``cuda:90``
   backend: ints equal to 1 become constexpr 1, pointers and ints divisible by 16 carry
   ``tt.divisibility = 16`` -- what a launch on an H200 does (meta tensors report address 0,
   i.e. aligned, as fresh CUDA allocations are).
3. Compiles it with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` (the
   ptxas shipped in the triton wheel) and reads the cubin with ``cuobjdump``: registers, stack
   and local memory (spills), and the global load/store instructions of the SASS with their
   vector width (``LDG.E.128`` = 16 bytes per thread).

Launches that specialise identically are compiled once and listed together. The result is a
measurement of the compiled code, not a timing. Exit status: 1 when a kernel failed to compile,
a kernel of ``kernels/`` was reached by no case, or a launch passes a float argument as fp32
(its parameter not annotated ``tl.float64``: ``narrow_floats``), else 0 -- also when nothing
could be checked (no ptxas/cuobjdump, an unknown triton API): then it prints ``SKIPPED:
<reason>`` (and writes ``{"skipped": reason}`` to ``--json``) instead of a report.

Must run WITHOUT ``TRITON_INTERPRET`` (interpreted kernels are not ``JITFunction``\\ s): the
variable is removed from this process's environment before triton is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
# Triton 3.9 warns that its fp-fusion default will change; 1 is the default both 3.6 and 3.9 use.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

H200_SMS = 132
ARCH = 90
KERNEL_MODULES = ("softmax", "sigmoid", "bce", "cross_entropy", "token_log_probs",
                  "distillation", "_invariant", "head_gemm")
# The modules that launch kernels (their launch-time names are replaced while recording).
OPS_MODULES = ("softmax", "sigmoid", "bce", "cross_entropy.launch", "cross_entropy.custom_ops",
               "token_log_probs", "distillation", "_invariant", "batch_invariant", "fused_head")
# Names of @jit functions in kernels/ that no launcher calls (compiled directly below).
UNLAUNCHED = ("probe_kernel",)
# Int arguments that take part in addresses or masks: their 16-divisibility decides vector width.
ADDRESS_INTS = ("stride", "n_cols", "n_rows", "numel", "chunk", "n_inner", "vocab_start")


# --------------------------------------------------------------------------- tools


def tool(name: str) -> str | None:
    """``name`` from the triton wheel's ``backends/nvidia/bin``, else from PATH."""
    import triton

    shipped = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if shipped.is_file():
        return str(shipped)
    return shutil.which(name)


def ptxas_for_sm90() -> tuple[str | None, str]:
    """(path, version line) of the ptxas Triton uses for sm_90 (3.9: ``ptxas-blackwell``)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        found = get_ptxas(ARCH)
        path = found.path
    except Exception:  # an older layout: the plain ptxas
        path = tool("ptxas")
    if path is None or not Path(path).is_file():
        return None, ""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        version = next((ln for ln in out.splitlines() if "release" in ln), out.strip())
    except OSError:
        return None, ""
    return path, f"{Path(path).name} {version.strip()}"


# --------------------------------------------------------------------------- recording


@dataclasses.dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict
    case: str  # e.g. "softmax bf16 65536 x 4096"
    dtype: str


class _Recorder:
    """Stands in for a kernel object in an ops module: ``k[grid](*args, **kw)`` records."""

    def __init__(self, kernel, sink: list, context: dict):
        self.kernel, self.sink, self.context = kernel, sink, context
        self.fn = kernel.fn
        self.__name__ = kernel.fn.__name__

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.kernel, args, kwargs, self.context["case"],
                                    self.context["dtype"]))
        return launch


@contextlib.contextmanager
def recording(sink: list, context: dict) -> Iterator[None]:
    """Replace every JITFunction of the ops modules by a recorder; fix the SM count at 132."""
    from triton.runtime.jit import JITFunction

    saved = []
    for name in OPS_MODULES:
        mod = importlib.import_module(f"probact_gpu.ops.{name}")
        for attr, obj in list(vars(mod).items()):
            if isinstance(obj, JITFunction):
                saved.append((mod, attr, obj))
                setattr(mod, attr, _Recorder(obj, sink, context))
        for attr, repl in (("sm_count", lambda device: H200_SMS),
                           ("check_runnable", lambda *a, **k: None)):
            if hasattr(mod, attr):
                saved.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, repl)
    try:
        yield
    finally:
        for mod, attr, obj in reversed(saved):
            setattr(mod, attr, obj)


# --------------------------------------------------------------------------- cases

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}


def _meta(shape, dtype):
    import torch

    return torch.empty(shape, dtype=getattr(torch, DTYPES.get(dtype, dtype)), device="meta")


def softmax_case(dtype: str, m: int, n: int, logs=(False, True),
                 variant: str = "default") -> Callable[[], None]:
    """The launchers' default configs (long rows: the persistent grid ``tiling`` picks), or the
    multi-tile alternatives ``config=`` reaches: ``per_row`` (one program per row, 16 KiB
    tiles) and ``pipelined`` (the default's grid and tiles, sweeps pipelined 2 deep)."""
    def run():
        import dataclasses as dc

        from probact_gpu import tiling
        from probact_gpu.ops.softmax import softmax_bwd, softmax_fwd
        from probact_gpu.tiling import RowConfig

        e = 8 if dtype == "fp64" else 2 if dtype == "bf16" else 4
        x = _meta((m, n), dtype)
        for log in logs:
            configs = [None, None]
            if variant == "per_row":
                width = tiling.loop_block(e)
                configs = [RowConfig("multi", width, tiling.warps_for(width))] * 2
            elif variant == "pipelined":
                configs = [dc.replace(tiling.choose_row_config(m, n, e, H200_SMS,
                                                               reread_tensors=reread),
                                      num_stages=2) for reread in (1, 2)]
            y = softmax_fwd(x, log=log, config=configs[0])
            softmax_bwd(y, _meta((m, n), dtype), log=log, config=configs[1])
    return run


CE_VARIANTS = ("perf", "off", "on")


def ce_case(dtype: str, m: int, v: int, variant: str) -> Callable[[], None]:
    """``perf``: the bench's CE fwd+bwd (mean, fused gradient, backward scales it in place);
    ``off``: every flag off (reduction none, gradient recomputed by the backward kernel from lse);
    ``on``: weight + label smoothing + z-loss + softcap, mean, fused gradient, then the
    recompute backward with the same options."""
    def run():
        import torch

        from probact_gpu.ops import cross_entropy as ce

        x = _meta((m, v), dtype)
        t = torch.empty(m, dtype=torch.int64, device="meta")
        sdt = torch.float64 if dtype == "fp64" else torch.float32
        g0 = torch.empty((), dtype=sdt, device="meta")
        if variant == "perf":
            rows, _, dx = ce.cross_entropy_fwd(x, t, reduction="mean", compute_grad=True)
            ce.cross_entropy_finish(rows, divisor=g0, dtype=x.dtype)
            ce.cross_entropy_scale_grad(dx, _meta((), dtype))
        elif variant == "off":
            _, lse, _ = ce.cross_entropy_fwd(x, t, reduction="none")
            ce.cross_entropy_grad(x, t, lse, torch.empty(m, dtype=sdt, device="meta"))
        else:
            opts = dict(weight=_meta((v,), dtype), label_smoothing=0.1, z_loss=1e-4,
                        softcap=30.0)
            _, lse, dx = ce.cross_entropy_fwd(x, t, reduction="mean", compute_grad=True, **opts)
            divisor = ce.cross_entropy_total_weight(t, v, weight=opts["weight"], dtype=sdt)
            ce.cross_entropy_grad(x, t, lse, g0, divisor=divisor, **opts)
    return run


def tlp_case(dtype: str, m: int, v: int, variant: str) -> Callable[[], None]:
    """Token log-probs. ``off``: logp alone, forward-only, then with saved statistics and the
    backward of logp; ``on``: softcap + temperature, entropy, argmax, saved statistics, and the
    backward of logp and entropy together; ``rl``: an RL trainer's call, temperature alone (a
    scale: ``HEAD=1``), entropy, saved statistics and the backward of both."""
    def run():
        import torch

        from probact_gpu.ops import token_log_probs as tlp
        from probact_gpu.options import HeadTransform

        x = _meta((m, v), dtype)
        t = torch.empty(m, dtype=torch.int64, device="meta")
        g = torch.empty(m, dtype=torch.float64 if dtype == "fp64" else torch.float32,
                        device="meta")
        on, rl = variant == "on", variant == "rl"
        transform = {"on": HeadTransform(softcap=30.0, temperature=0.7),
                     "rl": HeadTransform(temperature=0.7)}.get(variant, HeadTransform())
        if variant == "off":
            tlp.token_log_probs_fwd(x, t)
        *_, stats = tlp.token_log_probs_fwd(x, t, transform=transform,
                                            compute_entropy=on or rl, compute_argmax=on,
                                            save_stats=True)
        tlp.token_log_probs_bwd(x, t, stats, g, g if on or rl else None, transform=transform)
    return run


DISTILL_VARIANTS = ("kl", "reverse_kl", "jsd", "tvd")


def distill_case(dtype: str, m: int, v: int, variant: str) -> Callable[[], None]:
    """Distillation on logits, forward with saved statistics then the backward. ``kl`` /
    ``reverse_kl``: the one-sweep divergences, identity heads; ``jsd``: the two-sweep forward
    with a student softcap, a teacher scale, a temperature and the hard term (every flag on);
    ``tvd``: the other two-sweep divergence; ``topk``: a sparse top-64 teacher (a temperature-
    free softcapped student, the hard term). Few long rows take the split path (partials,
    terms)."""
    def run():
        import torch

        from probact_gpu.ops import distillation as dist
        from probact_gpu.options import DistillationOptions

        x = _meta((m, v), dtype)
        t = torch.empty(m, dtype=torch.int64, device="meta")
        g = torch.empty((), dtype=torch.float64 if dtype == "fp64" else torch.float32,
                        device="meta")
        if variant == "topk":
            opts = DistillationOptions.from_kwargs(divergence="kl", hard_weight=0.5,
                                                   student_softcap=30.0)
            idx = torch.empty((m, 64), dtype=torch.int64, device="meta")
            lp = _meta((m, 64), "fp32" if dtype != "fp64" else "fp64")
            _, stats = dist.distillation_topk_fwd(x, idx, lp, t, options=opts, save_stats=True)
            dist.distillation_topk_bwd(x, idx, lp, t, stats, g, options=opts)
            return
        extra = dict(beta=0.5, temperature=2.0, hard_weight=0.5, student_softcap=30.0,
                     teacher_logit_scale=0.5) if variant == "jsd" else {}
        opts = DistillationOptions.from_kwargs(divergence=variant, **extra)
        y = _meta((m, v), dtype)
        _, stats = dist.distillation_fwd(x, y, t, options=opts, n_cols=v, save_stats=True)
        dist.distillation_bwd(x, y, t, stats, g, options=opts, n_cols=v)
    return run


def sigmoid_case(dtype: str, n: int) -> Callable[[], None]:
    def run():
        from probact_gpu.ops.sigmoid import sigmoid_bwd, sigmoid_fwd

        x = _meta((n,), dtype)
        for log in (False, True):
            y = sigmoid_fwd(x, log=log)
            sigmoid_bwd(y, _meta((n,), dtype), log=log)
    return run


BCE_VARIANTS = ("perf", "off", "on", "terms")


def bce_case(dtype: str, n: int, variant: str) -> Callable[[], None]:
    """``perf``: the bench's BCE fwd+bwd (mean, fused gradient, in-place rescale);
    ``off``: reduction none, no weights, recompute backward with a per-element grad;
    ``on``: per-class weight and pos_weight (one index term each), mean, fused gradient and its
    rescale, and the recompute backward with a scalar grad; ``terms``: a weight needing two index
    terms and a single-value pos_weight (TERMS = 2 and 0)."""
    def run():
        from probact_gpu.ops import bce

        c = 1024
        shape = (n // c, c)
        x, t = _meta(shape, dtype), _meta(shape, dtype)
        if variant == "perf":
            _, dx = bce.bce_fwd(x, t, reduction="mean", compute_grad=True)
            bce.bce_scale_grad_(dx, _meta((), dtype))
        elif variant == "off":
            bce.bce_fwd(x, t, reduction="none")
            bce.bce_bwd(_meta(shape, dtype), x, t, reduction="none")
        elif variant == "on":
            w, pw = _meta((c,), dtype), _meta((c,), dtype)
            _, dx = bce.bce_fwd(x, t, w, pw, reduction="mean", compute_grad=True)
            bce.bce_scale_grad_(dx, _meta((), dtype))
            bce.bce_bwd(_meta((), dtype), x, t, w, pw, reduction="mean")
        else:
            shape3 = (64, n // (64 * c), c)
            x3, t3 = _meta(shape3, dtype), _meta(shape3, dtype)
            w, pw = _meta((64, 1, c), dtype), _meta((1,), dtype)
            bce.bce_fwd(x3, t3, w, pw, reduction="sum", compute_grad=True)
    return run


def fused_case(dtype: str, n: int, hidden: int, v: int,
               precision: str = "ieee") -> Callable[[], None]:
    """The fused head (``batch_invariant=True`` on the linear ops): the forward of log-probs and
    entropy (GEMM tiles, tile states, exact merge) and the backward of both (dz, dh, dW with
    db), at the launchers' fixed tiles; ``precision``: the fp32 split."""
    def run():
        import torch

        from probact_gpu.ops import fused_head as fh
        from probact_gpu.options import HeadTransform

        h, w, b = _meta((n, hidden), dtype), _meta((v, hidden), dtype), _meta((v,), dtype)
        t = torch.empty(n, dtype=torch.int64, device="meta")
        sdt = torch.float64 if dtype == "fp64" else torch.float32
        tr = HeadTransform(temperature=0.7)
        fh.fused_head_fwd(h, w, b, t, ignore_index=-100, transform=tr, compute_entropy=True,
                          compute_argmax=False, all_rows=False, fp32_precision=precision)
        stats = torch.empty((n, 3), dtype=sdt, device="meta")
        coef = torch.empty((n, 3), dtype=sdt, device="meta")
        fh.fused_head_bwd(h, w, b, t, stats, coef, ignore_index=-100, transform=tr,
                          need=(True, True, True), has_entropy_term=True,
                          fp32_precision=precision)
    return run


def invariant_case(dtype: str, m: int, v: int) -> Callable[[], None]:
    """``batch_invariant=True`` on given logits: the tile statistics (with entropy and
    argmax), the exact merge, the elementwise backward, and the (…, K) index's logit gather."""
    def run():
        import torch

        from probact_gpu.ops import _invariant as inv
        from probact_gpu.ops import batch_invariant as bi
        from probact_gpu.options import HeadTransform

        x = _meta((m, v), dtype)
        t = torch.empty(m, dtype=torch.int64, device="meta")
        sdt = torch.float64 if dtype == "fp64" else torch.float32
        tr = HeadTransform(softcap=30.0, temperature=0.7)
        states = inv.invariant_tile_stats(x, t, transform=tr, compute_entropy=True,
                                          compute_argmax=True)
        inv.reduce_tile_states(states, compute_entropy=True, compute_argmax=True)
        stats = torch.empty((m, 3), dtype=sdt, device="meta")
        coef = torch.empty((m, 3), dtype=sdt, device="meta")
        bi.coef_bwd(x, t[:, None], stats, coef, coef[:, 1:2], transform=tr,
                    has_entropy_term=True)
        bi.target_logits(x, torch.empty((m, 4), dtype=torch.int64, device="meta"), tr)
    return run


@dataclasses.dataclass
class Case:
    name: str
    dtype: str
    run: Callable[[], None]


def full_cases() -> list[Case]:
    """Every bench shape (``probact_gpu.bench.shapes``) in bf16 and fp32, each CE and BCE flag
    variant, the paths the bench shapes do not reach, and each kernel once in fp64."""
    from probact_gpu.bench.shapes import BUDGET, CE_TOKENS, CE_VOCABS, FEW_ROWS, SOFTMAX_N

    few_m, few_n = FEW_ROWS
    cases = []
    for dtype in ("bf16", "fp32"):
        for n in SOFTMAX_N:
            cases.append(Case(f"softmax {BUDGET // n}x{n}", dtype,
                              softmax_case(dtype, BUDGET // n, n)))
        cases.append(Case(f"softmax {few_m}x{few_n}", dtype, softmax_case(dtype, few_m, few_n)))
        for variant in ("per_row", "pipelined"):
            cases.append(Case(f"softmax 4096x65536 ({variant})", dtype,
                              softmax_case(dtype, 4096, 65536, variant=variant)))
        for v in CE_VOCABS:
            for variant in CE_VARIANTS:
                cases.append(Case(f"CE {CE_TOKENS}x{v} {variant}", dtype,
                                  ce_case(dtype, CE_TOKENS, v, variant)))
        # Not bench shapes: the CE single-tile limit and the split path (few rows x huge V).
        for variant in CE_VARIANTS:
            cases.append(Case(f"CE {CE_TOKENS}x8192 {variant} (single tile)", dtype,
                              ce_case(dtype, CE_TOKENS, 8192, variant)))
            cases.append(Case(f"CE 32x262144 {variant} (split)", dtype,
                              ce_case(dtype, 32, 262144, variant)))
        for v in CE_VOCABS:
            for variant in ("off", "on", "rl"):
                cases.append(Case(f"TLP {CE_TOKENS}x{v} {variant}", dtype,
                                  tlp_case(dtype, CE_TOKENS, v, variant)))
        cases.append(Case(f"TLP {CE_TOKENS}x8192 on (single tile)", dtype,
                          tlp_case(dtype, CE_TOKENS, 8192, "on")))
        cases.append(Case("TLP 32x262144 on (split)", dtype, tlp_case(dtype, 32, 262144, "on")))
        for v in CE_VOCABS:
            for variant in DISTILL_VARIANTS:
                cases.append(Case(f"distill {CE_TOKENS}x{v} {variant}", dtype,
                                  distill_case(dtype, CE_TOKENS, v, variant)))
        cases.append(Case(f"distill {CE_TOKENS}x128256 topk", dtype,
                          distill_case(dtype, CE_TOKENS, 128256, "topk")))
        cases.append(Case("distill 32x262144 jsd (split)", dtype,
                          distill_case(dtype, 32, 262144, "jsd")))


        cases.append(Case(f"invariant {CE_TOKENS}x151936", dtype,
                          invariant_case(dtype, CE_TOKENS, 151936)))
        cases.append(Case("fused head 8192x4096x151936", dtype,
                          fused_case(dtype, 8192, 4096, 151936)))
        cases.append(Case("sigmoid 2^28", dtype, sigmoid_case(dtype, BUDGET)))
        for variant in BCE_VARIANTS:
            cases.append(Case(f"BCE 2^28 {variant}", dtype, bce_case(dtype, BUDGET, variant)))
    # fp64: each kernel and path at least once.
    cases += [
        Case("softmax 4096x1024", "fp64", softmax_case("fp64", 4096, 1024)),
        Case("softmax 4096x65536", "fp64", softmax_case("fp64", 4096, 65536)),
        Case("softmax 32x262144", "fp64", softmax_case("fp64", 32, 262144)),
        Case("CE 4096x4096 on (single tile)", "fp64", ce_case("fp64", 4096, 4096, "on")),
        Case("CE 4096x32000 on", "fp64", ce_case("fp64", 4096, 32000, "on")),
        Case("CE 4096x32000 perf", "fp64", ce_case("fp64", 4096, 32000, "perf")),
        Case("CE 32x262144 on (split)", "fp64", ce_case("fp64", 32, 262144, "on")),
        Case("distill 4096x32000 jsd", "fp64", distill_case("fp64", 4096, 32000, "jsd")),
        Case("distill 4096x32000 topk", "fp64", distill_case("fp64", 4096, 32000, "topk")),
        Case("sigmoid 2^28", "fp64", sigmoid_case("fp64", BUDGET)),
        Case("BCE 2^28 perf", "fp64", bce_case("fp64", BUDGET, "perf")),
        Case("BCE 2^28 on", "fp64", bce_case("fp64", BUDGET, "on")),
        Case("invariant 4096x32000", "fp64", invariant_case("fp64", 4096, 32000)),
        Case("fused head 8192x4096x32000", "fp64", fused_case("fp64", 8192, 4096, 32000)),
    ]
    # fp32 master weights on the bf16 tensor cores: the two splits
    cases += [Case(f"fused head 8192x4096x151936 {p}", "fp32",
                   fused_case("fp32", 8192, 4096, 151936, p)) for p in ("bf16x3", "bf16x6")]
    return cases


def smoke_cases() -> list[Case]:
    """The CI subset: every kernel at least once, each path of the row kernels, the bench's
    default launches of each op family in bf16, every flag on once, one fp64 split."""
    from probact_gpu.bench.shapes import BUDGET

    return [
        Case("softmax 65536x4096", "bf16", softmax_case("bf16", 65536, 4096, logs=(True,))),
        Case("softmax 4096x65536", "bf16", softmax_case("bf16", 4096, 65536, logs=(False,))),
        Case("softmax 32x262144", "bf16", softmax_case("bf16", 32, 262144, logs=(True,))),
        Case("softmax 4096x65536 (per_row)", "bf16",
             softmax_case("bf16", 4096, 65536, logs=(False,), variant="per_row")),
        Case("CE 4096x128256 perf", "bf16", ce_case("bf16", 4096, 128256, "perf")),
        Case("CE 4096x50257 perf", "bf16", ce_case("bf16", 4096, 50257, "perf")),
        Case("CE 4096x128256 on", "bf16", ce_case("bf16", 4096, 128256, "on")),
        Case("CE 4096x8192 on (single tile)", "bf16", ce_case("bf16", 4096, 8192, "on")),
        Case("CE 32x262144 on (split)", "fp64", ce_case("fp64", 32, 262144, "on")),
        Case("TLP 4096x128256 on", "bf16", tlp_case("bf16", 4096, 128256, "on")),
        Case("TLP 4096x128256 rl", "bf16", tlp_case("bf16", 4096, 128256, "rl")),
        Case("TLP 4096x4096 off (single tile)", "bf16", tlp_case("bf16", 4096, 4096, "off")),
        Case("TLP 32x262144 on (split)", "fp64", tlp_case("fp64", 32, 262144, "on")),
        Case("distill 4096x128256 kl", "bf16", distill_case("bf16", 4096, 128256, "kl")),
        Case("distill 4096x128256 jsd", "bf16", distill_case("bf16", 4096, 128256, "jsd")),
        Case("distill 4096x128256 topk", "bf16", distill_case("bf16", 4096, 128256, "topk")),
        Case("distill 32x262144 tvd (split)", "bf16", distill_case("bf16", 32, 262144, "tvd")),


        Case("invariant 4096x151936", "bf16", invariant_case("bf16", 4096, 151936)),
        # one vocabulary chunk: each fused-head kernel once (the full run has the carry's too)
        Case("fused head 8192x4096x16384", "bf16", fused_case("bf16", 8192, 4096, 16384)),
        Case("sigmoid 2^28", "fp32", sigmoid_case("fp32", BUDGET)),
        Case("BCE 2^28 perf", "bf16", bce_case("bf16", BUDGET, "perf")),
        Case("BCE 2^28 on", "bf16", bce_case("bf16", BUDGET, "on")),
    ]


def unlaunched() -> list[Launch]:
    """Kernels no launcher calls, compiled with a plausible argument so they are checked too."""
    from probact_gpu.kernels import _online

    x = _meta((16,), "fp32")
    return [Launch(_online.probe_kernel, (x,), {"num_warps": 1}, "(launched by nothing)",
                   "fp32")]


def record_cases(cases: list[Case]) -> list[Launch]:
    sink: list[Launch] = []
    context = {"case": "", "dtype": ""}
    with recording(sink, context):
        for case in cases:
            context.update(case=case.name, dtype=case.dtype)
            case.run()
    return sink


# --------------------------------------------------------------------------- specialisation


@dataclasses.dataclass
class Job:
    module: str
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict  # launch kwargs (num_warps, ...)
    unaligned: list  # runtime int args without the 16-divisibility hint
    narrow_floats: list  # runtime float args a launch passes narrower than fp64

    def key(self) -> str:
        return repr((self.module, self.kernel, sorted(self.signature.items()),
                     sorted(self.constexprs.items()), sorted(self.attrs.items()),
                     sorted(self.options.items())))


def specialise(launch: Launch, backend) -> Job:
    """The (signature, constexprs, attrs) Triton's launcher derives from these arguments."""
    from triton.runtime.jit import create_function_from_signature

    k = launch.kernel
    binder = create_function_from_signature(k.signature, k.params, backend)
    bound, spec, opts = binder(*launch.args, **launch.kwargs)
    if hasattr(k, "_pack_args"):
        _, signature, constexprs, attrs = k._pack_args(backend, dict(launch.kwargs), bound,
                                                      spec, opts)
    else:  # the same derivation, for a triton without _pack_args
        names = [p.name for p in k.params]
        signature = {n: s[0] for n, s in zip(names, spec, strict=True)}
        values = list(bound.values())
        constexprs = {(i,): values[i] for i, s in enumerate(spec) if s[0] == "constexpr"}
        attrs = {(i,): backend.parse_attr(s[1]) for i, s in enumerate(spec)
                 if s[0] != "constexpr" and isinstance(s[1], str)}
    unaligned = [p.name for i, (p, s) in enumerate(zip(k.params, spec, strict=True))
                 if s[0][0] == "i" and s[0] != "constexpr" and not attrs.get((i,))
                 and any(word in p.name for word in ADDRESS_INTS)]
    options = {key: val for key, val in launch.kwargs.items() if key not in signature}
    return Job(k.fn.__module__, k.fn.__name__, signature, constexprs, attrs, options, unaligned,
               narrow_floats(k.params, spec))


def narrow_floats(params, spec) -> list[str]:
    """Runtime float arguments the launcher passes as fp32 (or narrower), tuple members named
    ``param[i]``. Triton types a Python float argument fp32 unless its parameter is annotated
    ``tl.float64``: an fp64 kernel would then compute with its scalars rounded to fp32, which the
    interpreter (it keeps the Python float) does not show."""
    def walk(name, ty):
        if isinstance(ty, tuple):
            return [n for i, t in enumerate(ty) for n in walk(f"{name}[{i}]", t)]
        return [name] if ty in ("fp32", "fp16", "bf16") else []

    return [n for p, s in zip(params, spec, strict=True) for n in walk(p.name, s[0])]


# --------------------------------------------------------------------------- compile + read

_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}
_MEM_OPS = ("LDG", "STG", "LDGSTS", "LDL", "STL", "UTMALDG", "UBLKCP", "ATOMG", "REDG")


def _sass_ops(sass: str) -> dict[str, int]:
    """Global/local memory instructions of the SASS, by opcode and access width in bits."""
    counts: dict[str, int] = {}
    for line in sass.splitlines():
        # longest names first: LDGSTS (cp.async) is not an LDG
        names = sorted(_MEM_OPS, key=len, reverse=True)
        m = re.search(r"\b(" + "|".join(names) + r")((?:\.[A-Z0-9_]+)*)\b", line)
        if not m or "/*" not in line:
            continue
        mods = m.group(2).split(".")[1:]
        width = next((_WIDTH[x] for x in mods if x in _WIDTH), 32)
        key = f"{m.group(1)}.{width}"
        counts[key] = counts.get(key, 0) + 1
    return counts


# Tensor-core instructions: wgmma (HGMMA on sm_90), mma.sync (HMMA; DMMA for fp64).
_MMA_OPS = ("HGMMA", "HMMA", "DMMA", "IMMA")


def _mma_ops(sass: str) -> dict[str, int]:
    """Tensor-core instructions of the SASS, by opcode (the fused head's GEMM tiles)."""
    counts: dict[str, int] = {}
    for line in sass.splitlines():
        m = re.search(r"\b(" + "|".join(_MMA_OPS) + r")\.", line)
        if m and "/*" in line:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def _res_usage(text: str) -> dict[str, int]:
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{text}")
    reg, stack, shared, local = map(int, m.groups())
    return {"reg": reg, "stack": stack, "static_shared": shared, "local": local}


def compile_job(job: Job, cuobjdump: str) -> dict:
    """Compile one specialisation for sm_90; read registers, spills and memory ops."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(job.module), job.kernel)
        src = ASTSource(fn, dict(job.signature), dict(job.constexprs), dict(job.attrs))
        compiled = triton.compile(src, target=GPUTarget("cuda", ARCH, 32),
                                  options=dict(job.options))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "k.cubin"
            path.write_bytes(compiled.asm["cubin"])
            res = subprocess.run([cuobjdump, "-res-usage", str(path)], capture_output=True,
                                 text=True, check=True).stdout
            sass = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True,
                                  text=True, check=True).stdout
        out = _res_usage(res)
        out["shared"] = int(getattr(compiled.metadata, "shared", 0))
        out["ops"] = _sass_ops(sass)
        out["mma"] = _mma_ops(sass)
        out["error"] = None
    except Exception as exc:  # a compile failure is the finding: keep its message
        lines = [ln for ln in f"{type(exc).__name__}: {exc}".splitlines() if ln.strip()]
        out = {"error": "\n".join(lines[:12])}
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


# --------------------------------------------------------------------------- report

_SHORT = {"BLOCK_M": "BM", "BLOCK_N": "BN", "BLOCK": "B", "BLOCK_S": "BS"}


def config_text(job: Job) -> str:
    parts, flags = [], []
    names = list(job.signature)
    for key, value in sorted(job.constexprs.items()):
        if len(key) != 1:  # an element of a tuple argument (BCE's index terms), not a flag
            continue
        name = names[key[0]]
        if name.startswith("BLOCK"):
            parts.append(f"{_SHORT.get(name, name)}={value}")
        elif name.isupper() and isinstance(value, bool):
            if value:
                flags.append(name)
        elif name.isupper():
            parts.append(f"{name}={value}")
    parts.append(f"w={job.options.get('num_warps', 4)}")
    return " ".join(parts) + (" " + ",".join(flags) if flags else "")


def ops_text(ops: dict[str, int], prefixes: tuple[str, ...]) -> str:
    items = [(k, v) for k, v in ops.items() if k.split(".")[0] in prefixes]
    items.sort(key=lambda kv: (kv[0].split(".")[0], -int(kv[0].split(".")[1])))
    out = []
    for key, count in items:
        op, width = key.split(".")
        suffix = {"128": ".128", "64": ".64", "32": "", "16": ".U16", "8": ".U8"}[width]
        out.append(f"{op}.E{suffix} ×{count}")
    return ", ".join(out) or "–"


# sm_90 per-SM limits (CUDA occupancy calculator): 64K registers allocated per warp in units of
# 256, 64 warps, 32 CTAs, 228 KiB shared memory of which each CTA also reserves 1 KiB.
SM_REGS, REG_UNIT, SM_WARPS, SM_CTAS, SM_SMEM, CTA_SMEM_RESERVED = 65536, 256, 64, 32, 233472, 1024


def resident_warps(reg: int, num_warps: int, smem: int) -> int:
    """Warps resident per SM (of 64) as registers and shared memory allow: theoretical occupancy.
    The bytes a memory-bound kernel keeps in flight per SM scale with it."""
    per_warp = -(-reg * 32 // REG_UNIT) * REG_UNIT
    ctas = min(SM_REGS // per_warp // num_warps, SM_WARPS // num_warps, SM_CTAS,
               SM_SMEM // (smem + CTA_SMEM_RESERVED))
    return ctas * num_warps


def spills(result: dict) -> bool:
    """Spilled registers: a stack frame, local memory, or local loads/stores in the SASS."""
    return bool(result["stack"] or result["local"]
                or any(k.split(".")[0] in ("LDL", "STL") for k in result["ops"]))


@dataclasses.dataclass
class Row:
    job: Job
    result: dict
    cases: list  # (case name, dtype)

    @property
    def dtype(self) -> str:
        dtypes = sorted({d for _, d in self.cases})
        return "/".join(dtypes)

    def as_dict(self) -> dict:
        out = {"kernel": self.job.kernel, "dtype": self.dtype, "config": config_text(self.job),
               "cases": [c for c, _ in self.cases], "unaligned": self.job.unaligned,
               "narrow_floats": self.job.narrow_floats,
               **self.result}
        if not self.result.get("error"):
            out["spills"] = spills(self.result)
            out["warps_per_sm"] = occupancy(self)
        return out


def occupancy(row: Row) -> int:
    r = row.result
    return resident_warps(r["reg"], row.job.options.get("num_warps", 4), r["shared"])


def _wants_mma(row: Row) -> bool:
    """A fused-head kernel whose products run on the tensor cores: 16-bit operands, or fp32
    split into bf16 (``SPLIT`` > 0)."""
    split = next((v for k, v in row.job.constexprs.items()
                  if list(row.job.signature)[k[0]] == "SPLIT"), 0)
    return "bf16" in row.dtype or bool(split)


def _scalarised(row: Row) -> bool:
    """An address int without the 16-divisibility hint, and not one 128-bit global load."""
    return bool(row.job.unaligned) and "LDG.128" not in row.result["ops"]


def findings(rows: list[Row]) -> list[str]:
    """The rows worth a look, picked by fixed rules (no judgement here)."""
    def name(row: Row) -> str:
        cases = sorted({c for c, _ in row.cases})
        more = f" (+{len(cases) - 1} more)" if len(cases) > 1 else ""
        return f"`{row.job.kernel}` {row.dtype} {config_text(row.job)} — {cases[0]}{more}"

    ok = [row for row in rows if not row.result["error"]]
    groups = [
        ("Compile failures", [row for row in rows if row.result["error"]],
         lambda row: row.result["error"].splitlines()[0]),
        ("Float arguments passed as fp32 (an fp64 kernel would compute with them rounded)",
         [row for row in rows if row.job.narrow_floats],
         lambda row: ", ".join(row.job.narrow_floats)),
        ("Register spills (stack frame / STL, LDL in the SASS)",
         [r for r in ok if spills(r.result)],
         lambda row: f"{row.result['reg']} registers, {row.result['stack']} B stack"),
        ("200 registers or more (no spill yet)",
         [r for r in ok if r.result["reg"] >= 200 and not spills(r.result)],
         lambda row: f"{row.result['reg']} registers"),
        ("Not vectorised: an address int not divisible by 16, no 128-bit load",
         [r for r in ok if _scalarised(r)],
         lambda row: f"{ops_text(row.result['ops'], ('LDG',))}; unaligned ints: "
                     f"{', '.join(row.job.unaligned) or '–'}"),
        ("Fused-head GEMM kernels (bf16, or fp32 with a bf16 split) without tensor-core "
         "instructions",
         [r for r in ok if r.job.kernel.startswith("head_gemm") and _wants_mma(r)
          and not r.result.get("mma")],
         lambda row: config_text(row.job)),
        ("bf16/fp32: 16 resident warps per SM or fewer (by registers)",
         [r for r in ok if occupancy(r) <= 16 and "fp64" not in r.dtype],
         lambda row: f"{row.result['reg']} registers × {row.job.options.get('num_warps', 4)} "
                     f"warps → {occupancy(row)} warps/SM"),
    ]
    lines = ["## Findings (fixed rules over the table below)", ""]
    for title, picked, detail in groups:
        lines.append(f"- **{title}**: " + ("none" if not picked else f"{len(picked)}"))
        lines += [f"  - {name(row)}: {detail(row)}" for row in picked]
    return lines + [""]


def markdown(rows: list[Row], header: dict, smoke: bool) -> str:
    lines = [
        "# Static sm_90 (Hopper) compile report" + (" — smoke subset" if smoke else ""),
        "",
        "**A measurement of the compiled code, not a timing.** Generated by "
        "`python scripts/sm90_report.py` on a machine without a GPU: every kernel is compiled "
        "for `cuda:90` by the ptxas of the triton wheel and its cubin read with `cuobjdump`.",
        "",
        f"- triton {header['triton']} ({header['ptxas']}), torch {header['torch']}, "
        f"{header['date']}; {header['n_compiles']} compiles in {header['seconds']:.0f} s.",
        "- Arguments, flags and configs are the launchers' own (`probact_gpu/ops/*.py` run on "
        "`meta` tensors, kernels recorded; `tiling` sees 132 SMs, an H200). Integer and pointer "
        "specialisation is Triton's launch-time binder for a `cuda:90` backend: ints equal to 1 "
        "become constexpr 1 (contiguous rows: `*_col_stride`, `n_inner`), pointers and ints "
        "divisible by 16 get `tt.divisibility=16` (pointers assumed 16-byte aligned, as fresh "
        "CUDA allocations are). *unaligned ints* lists runtime ints without that hint.",
        "- REG: registers per thread (255 max; 65536 per SM). STACK / LOCAL: per-thread stack "
        "frame and local memory bytes; a register spill shows as a stack frame with `STL`/`LDL` "
        "(local stores/loads) in the SASS — marked **SPILL**. smem: the dynamic shared memory "
        "Triton requests per program (reductions, layout changes, pipelining).",
        "- Loads/stores: global memory instructions in the SASS by access width per thread "
        "(`.128` = 16 B, `.64` = 8 B, none = 4 B, `.U16` = 2 B). `LDGSTS` = cp.async into shared "
        "memory (software pipelining of loop loads).",
        "- tensor cores: the MMA instructions in the SASS (`HGMMA` = wgmma, `HMMA` = mma.sync, "
        "`DMMA` = fp64): the fused head's `tl.dot` tiles must show them.",
        "- warps/SM: resident warps per SM (of 64) that these registers and this shared memory "
        "allow — theoretical occupancy; a memory-bound kernel's bytes in flight scale with it.",
        "- Same kernel source, other ptxas, other registers: the GPU image's triton 3.6 ships "
        "ptxas 12.8 and allocates differently (run this script there to see its numbers).",
        "",
    ]
    lines += findings(rows)
    lines += [
        "## Every compiled specialisation",
        "",
        "| kernel | dtype | cases | config | REG | STACK/LOCAL | smem | warps/SM | loads | stores "
        "| tensor cores | unaligned ints |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row.result
        cases = "; ".join(sorted({c for c, _ in row.cases}))
        if r["error"]:
            err = r["error"].splitlines()[0].replace("|", "\\|")[:160]
            lines.append(f"| `{row.job.kernel}` | {row.dtype} | {cases} | {config_text(row.job)} "
                         f"| **FAILED** | | | | {err} | | | |")
            continue
        spill = f"{r['stack']}/{r['local']}"
        if spills(r):
            n_st, n_ld = r["ops"].get("STL.32", 0), r["ops"].get("LDL.32", 0)
            spill = f"**{spill} SPILL** (STL ×{n_st}, LDL ×{n_ld})"
        loads = ops_text(r["ops"], ("LDG", "LDGSTS", "UTMALDG"))
        stores = ops_text(r["ops"], ("STG", "ATOMG", "REDG"))
        unaligned = ", ".join(row.job.unaligned) or "–"
        mma = ", ".join(f"{k} ×{v}" for k, v in sorted(r.get("mma", {}).items())) or "–"
        lines.append(f"| `{row.job.kernel}` | {row.dtype} | {cases} | {config_text(row.job)} | "
                     f"{r['reg']} | {spill} | {r['shared']} | {occupancy(row)} | {loads} | "
                     f"{stores} | {mma} | {unaligned} |")
    failed = [row for row in rows if row.result["error"]]
    if failed:
        lines += ["", "## Compile failures", ""]
        for row in failed:
            lines += [f"### `{row.job.kernel}` {row.dtype} {config_text(row.job)}", "", "```",
                      row.result["error"], "```", ""]
    if header.get("missing"):
        lines += ["", "## Kernels no case reached", "", ", ".join(header["missing"])]
    return "\n".join(lines) + "\n"


def all_kernels() -> list[str]:
    from triton.runtime.jit import JITFunction

    names = []
    for name in KERNEL_MODULES + ("_online",):
        mod = importlib.import_module(f"probact_gpu.kernels.{name}")
        names += [a for a, o in vars(mod).items()
                  if isinstance(o, JITFunction) and a.endswith("_kernel")
                  and o.fn.__module__ == mod.__name__]
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the small CI subset")
    parser.add_argument("--out", default="perf/sm90_static.md",
                        help="markdown output ('-' for stdout only)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    args = parser.parse_args(argv)

    def skip(reason: str) -> int:
        """Nothing can be checked here: say so, and leave the exit status for real failures."""
        print(f"SKIPPED: {reason}", file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps({"skipped": reason}))
        return 0

    import torch
    import triton
    from probact_gpu.kernels import _online
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction

    if not isinstance(_online.probe_kernel, JITFunction):
        return skip("the kernels are not JITFunctions (was triton imported under "
                    "TRITON_INTERPRET?)")
    (ptxas, ptxas_version), cuobjdump = ptxas_for_sm90(), tool("cuobjdump")
    if ptxas is None or cuobjdump is None:
        return skip(f"ptxas ({ptxas}) or cuobjdump ({cuobjdump}) not found in the triton "
                    "package or on PATH")
    params = list(inspect.signature(ASTSource.__init__).parameters)
    if params[:5] != ["self", "fn", "signature", "constexprs", "attrs"]:
        return skip(f"triton {triton.__version__}: ASTSource{tuple(params[1:])} is not the "
                    "(fn, signature, constexprs, attrs) this script knows (triton 3.6 - 3.9)")

    start = time.perf_counter()
    launches = record_cases(smoke_cases() if args.smoke else full_cases()) + unlaunched()
    backend = make_backend(GPUTarget("cuda", ARCH, 32))
    rows: dict[str, Row] = {}
    for launch in launches:
        job = specialise(launch, backend)
        row = rows.setdefault(job.key(), Row(job, {}, []))
        if (launch.case, launch.dtype) not in row.cases:
            row.cases.append((launch.case, launch.dtype))
    reached = {row.job.kernel for row in rows.values()}
    missing = sorted(set(all_kernels()) - reached)

    ordered = list(rows.values())
    if args.jobs > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(compile_job, [r.job for r in ordered],
                                    [cuobjdump] * len(ordered)))
    else:
        results = [compile_job(r.job, cuobjdump) for r in ordered]
    for row, result in zip(ordered, results, strict=True):
        row.result = result

    header = {
        "triton": triton.__version__, "torch": torch.__version__.split("+")[0],
        "ptxas": ptxas_version,
        "date": datetime.date.today().isoformat(), "n_compiles": len(ordered),
        "seconds": time.perf_counter() - start, "missing": missing,
    }
    text = markdown(ordered, header, args.smoke)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(text)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"header": header, "rows": [r.as_dict() for r in ordered]}, indent=1, default=str))
    failed = [r for r in ordered if r.result["error"]]
    for row in failed:
        print(f"FAILED {row.job.kernel} {config_text(row.job)}:\n{row.result['error']}",
              file=sys.stderr)
    if missing:
        print(f"not reached by any case: {', '.join(missing)}", file=sys.stderr)
    narrow = sorted({f"{r.job.kernel}: {', '.join(r.job.narrow_floats)}" for r in ordered
                     if r.job.narrow_floats})
    for line in narrow:
        print(f"FP32 SCALARS {line}", file=sys.stderr)
    return 1 if failed or missing or narrow else 0


if __name__ == "__main__":
    sys.exit(main())
