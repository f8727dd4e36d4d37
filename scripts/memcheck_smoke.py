"""A few small launches of every probact op, for ``compute-sanitizer --tool memcheck``.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python3 scripts/memcheck_smoke.py

(With torch's caching allocator off, an access past a tensor's end is outside any allocation, so
memcheck sees it.)

Odd sizes (masked tails), each softmax path forced through ``config=`` (single tile, multi tile,
split row) in fp32 and bf16, and the public ops in bf16, forward and backward. Ops not in
``probact_gpu.functional`` yet are listed as skipped. Exits non-zero if any call raises;
memcheck itself reports bad accesses. Needs a CUDA device (``--cpu`` dry-runs the script
through the Triton interpreter).
"""

from __future__ import annotations

import os
import sys

# --cpu: a dry run of this script through the Triton interpreter (to check the script itself).
DEVICE = "cpu" if "--cpu" in sys.argv else "cuda"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402


def _softmax_paths(dtype: torch.dtype) -> None:
    from probact_gpu.ops.softmax import softmax_bwd, softmax_fwd
    from probact_gpu.tiling import RowConfig

    for shape, config in (
        ((7, 129), RowConfig("single", 256, 4, block_m=2)),
        ((5, 5000), RowConfig("multi", 1024, 4)),
        ((2, 5001), RowConfig("split", 1024, 4, n_splits=3)),
    ):
        for log in (False, True):
            x = torch.randn(shape, device=DEVICE, dtype=dtype)
            y = softmax_fwd(x, log=log, config=config)
            softmax_bwd(y, torch.randn_like(y), log=log, config=config)


def _public(dtype: torch.dtype) -> list[str]:
    import probact_gpu.functional as F

    skipped = []

    def grad_of(fn, *args, leaves):
        out = fn(*args)
        out.backward(torch.randn_like(out) if out.dim() else None)
        return [t.grad for t in leaves]

    def x(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=True)

    for name in ("softmax", "log_softmax", "sigmoid", "logsigmoid"):
        fn = getattr(F, name, None)
        if fn is None:
            skipped.append(name)
            continue
        for shape in ((3, 1000), (1, 70001), (4097,)):
            t = x(*shape)
            grad_of(fn, t, leaves=[t])
    target = torch.randint(0, 1000, (6,), device=DEVICE)
    target[1] = -100
    if hasattr(F, "cross_entropy"):
        t = x(6, 1000)
        grad_of(F.cross_entropy, t, target, leaves=[t])
        long_target = torch.randint(0, 70001, (3,), device=DEVICE)
        long_target[1] = -100
        t = x(3, 70001)
        grad_of(F.cross_entropy, t, long_target, leaves=[t])
    else:
        skipped.append("cross_entropy")
    if hasattr(F, "binary_cross_entropy_with_logits"):
        t = x(5, 999)
        grad_of(F.binary_cross_entropy_with_logits, t, torch.rand_like(t.detach()), leaves=[t])
    else:
        skipped.append("binary_cross_entropy_with_logits")
    if hasattr(F, "linear_cross_entropy"):
        h, w = x(6, 64), x(1000, 64)
        grad_of(F.linear_cross_entropy, h, w, target, leaves=[h, w])
    else:
        skipped.append("linear_cross_entropy")
    return skipped


def main() -> int:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("memcheck_smoke: needs a CUDA device", file=sys.stderr)
        return 2
    for dtype in (torch.float32, torch.bfloat16):
        _softmax_paths(dtype)
    skipped = _public(torch.bfloat16)  # one dtype: every extra kernel compile costs time here
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    print("memcheck_smoke: all launches returned" +
          (f"; not in probact_gpu.functional yet: {', '.join(skipped)}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
