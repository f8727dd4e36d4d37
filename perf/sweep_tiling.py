"""Sweep the launch configurations behind ``probact_gpu.tiling`` on a GPU, so its thresholds can
cite a measurement. One call times every candidate config of the hot paths through the
launchers' ``config=`` override, beside the config the heuristics pick today:

- softmax fwd (bf16): single tile vs multi tile at 16k-64k columns, tile width and warps at 256k,
  a persistent grid (``n_programs`` = 1, 2, 4 per SM) for many long rows, split counts for few
  long rows;
- cross-entropy fwd with the fused gradient written in place (bf16, 4096 rows): tile width,
  warps of the multi-tile path at 32k and 128k classes, single tile at 32k;
- BCE fused forward (bf16, 2^28): block size and warps.

``--smoke`` runs every candidate once, untimed, on tiny shapes through the interpreter (CI).
Reports ms (``probact_gpu.bench.timing``: do_bench median), GB/s on the minimal-bytes model and %
of the copy rate measured in the same run (the bench's ``copy_rate``); marks the heuristic's
current choice with ``*``. Writes markdown (stdout and ``--out``) and JSON. Needs CUDA (exits 2
without)::

    python perf/sweep_tiling.py --out perf/results/sweep.md
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch

from probact_gpu.bench.timing import copy_rate, measure


@dataclass
class Result:
    family: str
    shape: str
    config: str
    current: bool
    ms: float | None
    gbps: float | None
    pct_copy: float | None
    note: str = ""


def _sm_count(device: str) -> int:
    from probact_gpu._runtime import sm_count

    return sm_count(torch.device(device))


def _softmax_cases(device: str, small: bool):
    from probact_gpu import tiling
    from probact_gpu.ops.softmax import softmax_fwd
    from probact_gpu.tiling import RowConfig

    shapes = [(1 << 14, 1 << 14), (1 << 13, 1 << 15), (1 << 12, 1 << 16), (1 << 10, 1 << 18),
              (32, 1 << 18), (8, 1 << 18)]
    if small:  # the smoke pass: every kind of config, interpreter-sized
        shapes = [(4, 1 << 14), (2, 1 << 18)]
    for m, n in shapes:
        x = torch.randn(m, n, device=device, dtype=torch.bfloat16)
        nbytes = 2 * m * n * 2
        current = tiling.choose_row_config(m, n, 2, _sm_count(device))
        configs = []
        if n <= 1 << 16:
            configs += [RowConfig("single", n, w) for w in (8, 16, 32)]
        configs += [RowConfig("multi", b, w) for b in (4096, 8192, 16384) for w in (8, 16)
                    if b <= n]
        if small or (m >= 1024 and n >= 1 << 16):  # a persistent grid: fewer rows in flight
            sms = _sm_count(device)
            configs += [RowConfig("multi", min(8192, n), 16, n_programs=k * sms)
                        for k in (1, 2, 4)]
        if m < 512:
            configs += [RowConfig("split", b, w, n_splits=s) for b in (4096, 8192)
                        for w in (8, 16) for s in (8, 16, 32, 64, 128) if s * b <= n]
        if current not in configs:
            configs.append(current)
        for cfg in configs:
            yield ("softmax fwd", f"{m}x{n}", cfg, cfg == current, nbytes,
                   lambda x=x, cfg=cfg: softmax_fwd(x, config=cfg))
        del x


def _ce_cases(device: str, small: bool):
    from probact_gpu import tiling
    from probact_gpu.ops.cross_entropy import cross_entropy_fwd
    from probact_gpu.tiling import RowConfig

    sms = _sm_count(device)
    for v in (32000, 128256):
        m = 2 if small else 4096
        x = torch.randn(m, v, device=device, dtype=torch.bfloat16)
        t = torch.randint(0, v, (m,), device=device)
        t[::8] = -100
        nbytes = 2 * m * v * 2
        current = tiling.choose_cross_entropy_config(m, v, 2, sms)
        configs = [RowConfig("multi", b, w) for b in (4096, 8192, 16384) for w in (8, 16, 32)]
        if v <= 32768:
            configs += [RowConfig("single", tiling.next_power_of_2(v), w) for w in (16, 32)]
        if current not in configs:
            configs.append(current)
        for cfg in configs:
            yield ("CE fwd+grad in place", f"{m}x{v}", cfg, cfg == current, nbytes,
                   lambda x=x, t=t, cfg=cfg: cross_entropy_fwd(
                       x, t, compute_grad=True, grad_out=x, config=cfg))
        del x


def _bce_cases(device: str, small: bool):
    from probact_gpu import tiling
    from probact_gpu.ops.bce import bce_fwd
    from probact_gpu.tiling import ElementwiseConfig

    n = 1 << 14 if small else 1 << 28
    x = torch.randn(n, device=device, dtype=torch.bfloat16)
    t = torch.rand(n, device=device, dtype=torch.bfloat16)
    current = tiling.choose_bce_config(n, 2)
    configs = [ElementwiseConfig(b, w) for b in (1024, 2048, 4096, 8192) for w in (4, 8)]
    if current not in configs:
        configs.append(current)
    for cfg in configs:
        yield ("BCE fused fwd", f"{n}", cfg, cfg == current, 3 * n * 2,
               lambda cfg=cfg: bce_fwd(x, t, reduction="mean", compute_grad=True, config=cfg))


def _describe(cfg) -> str:
    fields = {k: v for k, v in asdict(cfg).items() if v not in (None, 1) or k == "num_warps"}
    return " ".join(f"{k}={v}" for k, v in fields.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="markdown file (JSON beside it)")
    parser.add_argument("--family", action="append", choices=("softmax", "ce", "bce"))
    parser.add_argument("--smoke", action="store_true",
                        help="no GPU needed: run every candidate config once on tiny shapes "
                             "through the interpreter (TRITON_INTERPRET=1), untimed")
    args = parser.parse_args(argv)
    families = args.family or ["softmax", "ce", "bce"]
    makers = {"softmax": _softmax_cases, "ce": _ce_cases, "bce": _bce_cases}
    if args.smoke:
        n = 0
        for fam in families:
            for _family, _shape, _cfg, _current, _nbytes, fn in makers[fam]("cpu", True):
                fn()
                n += 1
        print(f"sweep_tiling --smoke: {n} configs ran (untimed)")
        return 0
    if not torch.cuda.is_available():
        print("sweep_tiling: needs a CUDA device; nothing measured (--smoke runs without one)")
        return 2
    copy, _ = copy_rate(torch.device("cuda"))
    results: list[Result] = []
    for fam in families:
        for family, shape, cfg, current, nbytes, fn in makers[fam]("cuda", False):
            try:
                ms = measure(fn).ms
                gbps = nbytes / ms / 1e6
                results.append(Result(family, shape, _describe(cfg), current, ms, gbps,
                                      100 * gbps / copy))
            except Exception as exc:  # a config that does not compile or fit is a row, not a stop
                results.append(Result(family, shape, _describe(cfg), current, None, None, None,
                                      f"{type(exc).__name__}: {str(exc)[:80]}"))
            print(f"{family} {shape} {results[-1].config}: {results[-1].ms}", file=sys.stderr)
            torch.cuda.empty_cache()
    lines = [f"# tiling sweep on {torch.cuda.get_device_name()} (torch {torch.__version__}, "
             f"copy rate {copy:,.0f} GB/s); * = the config tiling.py picks today", "",
             "| family | shape | config | ms | GB/s | % copy | note |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        ms = "–" if r.ms is None else f"{r.ms:.3f}"
        gb = "–" if r.gbps is None else f"{r.gbps:,.0f}"
        pct = "–" if r.pct_copy is None else f"{r.pct_copy:.0f} %"
        lines.append(f"| {r.family} | {r.shape} | {'* ' if r.current else ''}{r.config} | {ms} "
                     f"| {gb} | {pct} | {r.note} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump({"copy_gbps": copy, "rows": [asdict(r) for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
