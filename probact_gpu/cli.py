"""The ``probact-gpu`` command (also ``python -m probact_gpu``).

    probact-gpu --version
    probact-gpu check [--large] [--op OP ...] [--seed N]
    probact-gpu bench [--op OP|all ...] [--dtype bf16|fp16|fp32 ...] [--pass fwd|bwd|fwd_bwd ...]
                      [--provider P ...] [--quick] [--smoke] [--traffic] [--out DIR]

On a machine without CUDA the kernels run on the CPU through Triton's interpreter; this module
sets ``TRITON_INTERPRET=1`` before anything imports triton, so it must not import the kernels at
module level.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from pathlib import Path

from . import __version__, registry


def _pick_device(requested: str | None) -> str:
    import torch

    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("probact-gpu: --device cuda, but torch sees no CUDA device "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                         "drop --device to run on the CPU through Triton's interpreter")
    if device == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit(
                "probact-gpu: triton was imported before the CPU interpreter could be chosen"
            )
        os.environ["TRITON_INTERPRET"] = "1"
    return device


def _check_out(out: str | None, *, file_ok: bool = False) -> None:
    """Before any work: ``--out`` must be a folder that exists or can be created (with
    ``file_ok``, a ``.md`` file in one); one line naming the path when it cannot."""
    if not out:
        return
    path = Path(out)
    folder = path.parent if file_ok and path.suffix == ".md" else path
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    if problem:
        raise SystemExit(f"probact-gpu bench: --out {out} cannot be created: {problem}")


def _check(args: argparse.Namespace) -> int:
    device = _pick_device(args.device)
    import torch

    from . import check

    large = args.large if args.large is not None else device == "cuda"
    where = "CUDA: " + torch.cuda.get_device_name() if device == "cuda" else (
        "CPU through the Triton interpreter (small shapes)")
    print(f"probact-gpu check on {where}; reference: NumPy float64\n")
    ops = tuple(dict.fromkeys(args.op)) if args.op else None
    return check.run(torch.device(device), large=large, ops=ops, seed=args.seed)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _traffic(args: argparse.Namespace) -> int:
    _check_out(args.out, file_ok=True)
    if args.device == "cuda":
        raise SystemExit("probact-gpu bench --traffic counts through Triton's interpreter: "
                         "it runs on the CPU (drop --device cuda)")
    _pick_device("cpu")
    from .bench import report, traffic
    from .bench.shapes import OPS

    ops = OPS if not args.op or "all" in args.op else tuple(dict.fromkeys(args.op))
    dtypes = tuple(dict.fromkeys(args.dtype or ["bf16"]))
    passes = tuple(dict.fromkeys(args.passes)) if args.passes else None
    env = report.environment("traffic", "cpu (Triton interpreter)", quick=False,
                             command="probact-gpu " + " ".join(args.argv))
    env["source"] = report.source_revision()
    providers = tuple(dict.fromkeys(args.provider)) if args.provider else ("probact",)
    rows = traffic.run(ops, dtypes, passes, providers=providers,
                       progress=lambda what: print(f"counting {what}", file=sys.stderr))
    print(report.format_traffic_header(env))
    print(report.format_traffic_table(rows))
    appendix = ""
    if "linear_token_log_probs" in ops:  # the fused head at its full shape: counted by a model
        appendix = traffic.format_fused_head_model(traffic.fused_head_model(
            *traffic.FUSED_HEAD_SHAPE, 2))
        print(appendix)
    if args.out:
        for path in report.write_traffic(args.out, env, rows, appendix=appendix):
            print(f"wrote {path}")
    return 0 if any(r.status == "ok" for r in rows) else 1


def _bench(args: argparse.Namespace) -> int:
    if args.traffic:
        return _traffic(args)
    _check_out(args.out)
    device = _pick_device(args.device)
    smoke = args.smoke or device == "cpu"
    if device == "cpu":
        print("probact-gpu bench: no CUDA device, so nothing can be timed. Running a smoke pass of "
              "the harness only: tiny shapes, each provider once on the CPU through the Triton "
              "interpreter, untimed.\n")
    import torch

    from .bench import report, runner
    from .bench.providers import PROVIDERS
    from .bench.shapes import OPS

    ops = OPS if not args.op or "all" in args.op else tuple(dict.fromkeys(args.op))
    dtypes = tuple(dict.fromkeys(args.dtype or ["bf16"]))
    passes = tuple(dict.fromkeys(args.passes)) if args.passes else None
    size = "smoke" if smoke else ("quick" if args.quick else "full")
    providers = tuple(dict.fromkeys(args.provider)) if args.provider else PROVIDERS
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if device == "cuda" else "cpu (Triton interpreter)"
    if smoke and device == "cuda":
        print(f"probact-gpu bench --smoke on {name}: tiny shapes, each provider once, untimed.\n")
    env = report.environment("smoke" if smoke else "cuda", name, quick=args.quick,
                             command="probact-gpu " + " ".join(args.argv))
    # A `timeout` (scripts/gpu_check.sh) sends SIGTERM: stop like Ctrl-C, so the rows measured
    # so far are still printed and written.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        copy_gbps, rows, complete = runner.run(ops=ops, dtypes=dtypes, passes=passes, size=size,
                                               device=dev, providers=providers)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(report.format_header(env, copy_gbps))
    print(report.format_table(rows))
    if args.out:
        written = report.write_results(args.out, env, copy_gbps, rows)
        for path in written:
            print(f"wrote {path}")
        if not smoke and not any(p.suffix == ".png" for p in written):
            print("no plot: matplotlib is not installed (pip install 'probact-gpu[bench]') "
                  "or nothing was timed")
    ran = [r for r in rows if r.status != "skipped"]
    return 0 if ran and complete else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="probact-gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="compare every op with the NumPy float64 reference")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu (interpreter)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--large", dest="large", action="store_true", default=None,
                      help="GPU-sized shapes (default on CUDA)")
    size.add_argument("--small", dest="large", action="store_false",
                      help="interpreter-sized shapes (default on CPU)")
    p.add_argument("--op", action="append", choices=registry.check_ops(),
                   help="only this op (repeatable; default all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_check)

    b = sub.add_parser("bench", help="time every op against torch, torch.compile and Liger")
    b.add_argument("--op", action="append",
                   choices=registry.bench_ops() + ("all",),
                   help="op family (repeatable; default all)")
    b.add_argument("--dtype", action="append", choices=("bf16", "fp16", "fp32"),
                   help="repeatable; default bf16")
    b.add_argument("--pass", dest="passes", action="append", choices=("fwd", "bwd", "fwd_bwd"),
                   help="repeatable; default: fwd and fwd_bwd for softmax/sigmoid, fwd_bwd for "
                        "the losses")
    b.add_argument("--quick", action="store_true", help="a subset of the bench shapes (~1 min)")
    b.add_argument("--smoke", action="store_true",
                   help="tiny shapes, each provider once, untimed (what CI runs)")
    b.add_argument("--provider", action="append",
                   choices=("probact", "torch", "compile", "liger", "torch_chunked", "cce"),
                   help="repeatable; default probact, torch, compile and liger (each op's other "
                        "providers beside probact); with --traffic, default probact")
    b.add_argument("--traffic", action="store_true",
                   help="count bytes, launches and allocations per call through the interpreter "
                        "at the full shapes' launch configs (any machine; nothing timed)")
    b.add_argument("--out", metavar="DIR",
                   help="write DIR/<gpu>/<date>.{md,json,png} (with --traffic: "
                        "DIR/traffic/<date>.{md,json}, or a FILE.md and its .json)")
    b.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu (smoke pass only)")
    b.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():
        # NumPy's warnings from inside Triton's interpreter (overflow, inf − inf on deliberate
        # ±inf / NaN inputs): the command reports results, not the interpreter's arithmetic.
        warnings.filterwarnings("ignore", category=RuntimeWarning,
                                module=r"triton\.runtime\.interpreter")
        return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
