"""The ``probact-gpu`` command (also ``python -m probact_gpu``).

    probact-gpu check [--large] [--op OP ...] [--seed N]

On a machine without CUDA the kernels run on the CPU through Triton's interpreter; this module
sets ``TRITON_INTERPRET=1`` before anything imports triton, so it must not import the kernels at
module level.
"""

from __future__ import annotations

import argparse
import os
import sys


def _pick_device(requested: str | None) -> str:
    import torch

    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("probact-gpu: triton was imported before the CPU interpreter could be chosen")
        os.environ["TRITON_INTERPRET"] = "1"
    return device


def _check(args: argparse.Namespace) -> int:
    device = _pick_device(args.device)
    import torch

    from . import check

    large = args.large if args.large is not None else device == "cuda"
    where = "CUDA: " + torch.cuda.get_device_name() if device == "cuda" else (
        "CPU through the Triton interpreter (small shapes)")
    print(f"probact-gpu check on {where}; reference: NumPy float64\n")
    ops = tuple(args.op) if args.op else None
    return check.run(torch.device(device), large=large, ops=ops, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="probact-gpu", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="compare every op with the NumPy float64 reference")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu (interpreter)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--large", dest="large", action="store_true", default=None,
                      help="GPU-sized shapes (default on CUDA)")
    size.add_argument("--small", dest="large", action="store_false",
                      help="interpreter-sized shapes (default on CPU)")
    p.add_argument("--op", action="append", help="only this op family (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_check)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
