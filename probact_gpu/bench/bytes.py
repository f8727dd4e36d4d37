"""The minimal-bytes model (perf/NOTES.md): the HBM traffic an op cannot avoid, per pass.

Each input is read once and each output written once, in its own dtype (``e`` bytes an element):

| op | fwd | bwd | fwd_bwd |
|---|---|---|---|
| softmax, log_softmax (M × N) | ``2·M·N·e`` (x, y) | ``3·M·N·e`` (y, dy, dx) | ``5·M·N·e`` |
| sigmoid (n elements) | ``2·n·e`` | ``3·n·e`` | ``5·n·e`` |
| cross_entropy (M × V) | ``M·V·e + 8·M`` | – | ``2·M·V·e + 12·M`` |
| token_log_probs (M × V) | ``M·V·e + 16·M`` | – | ``2·M·V·e + 24·M`` |
| distillation_* (M × V, both heads) | ``2·M·V·e + 8·M`` | – | ``3·M·V·e + 8·M`` |
| bce (n elements) | ``2·n·e`` (+ ``n·e`` weight) | – | ``3·n·e`` (+ ``n·e`` weight) |

Cross-entropy's row vectors: int64 targets (8 B a row) read by every pass, plus the fp32 per-row
log-sum-exp (4 B a row) that fwd+bwd keeps between its two halves. The floor is one read and one
write of the logits. token_log_probs (with the entropy): the int64 target read and the fp32
logp and entropy written (16 B a row); fwd+bwd adds their fp32 gradients read (8 B a row).
Distillation (every divergence): both heads' logits read once and the int64 mask read
(forward), plus the student's gradient written (fwd+bwd); the loss is a scalar. BCE's fwd+bwd
reads x and the target and writes dx; its scalar loss and the upstream gradient
are negligible. ``bwd`` alone is modelled only where the forward's output is
what the backward reads (softmax, sigmoid); the losses fuse their gradient into one pass.

``linear_cross_entropy``, ``linear_token_log_probs`` and ``linear_distillation_jsd`` are compute
bound: they are reported in time, memory and TFLOP/s of their matmuls (``2·T·H·V`` each; one in
fwd, three in fwd_bwd: logits, d input, d weight — a recomputation of the logits is not
counted; distillation: the teacher's logits too, two in fwd, four in fwd_bwd), never GB/s.
"""

from __future__ import annotations

import math

PASSES = ("fwd", "bwd", "fwd_bwd")

# Elementwise ops: element streams per pass (reads + writes of n-element tensors).
_STREAMS = {
    "softmax": {"fwd": 2, "bwd": 3, "fwd_bwd": 5},
    "log_softmax": {"fwd": 2, "bwd": 3, "fwd_bwd": 5},
    "sigmoid": {"fwd": 2, "bwd": 3, "fwd_bwd": 5},
    "bce": {"fwd": 2, "fwd_bwd": 3},
}
CE_TARGET_BYTES = 8  # int64 target, a row
CE_LSE_BYTES = 4  # fp32 log-sum-exp kept between forward and backward, a row
TLP_OUT_BYTES = 8  # fp32 logp and entropy written (fwd), their gradients read (bwd), a row
COMPUTE_BOUND = ("linear_cross_entropy", "linear_token_log_probs", "linear_distillation_jsd")
DISTILLATION = ("distillation_kl", "distillation_reverse_kl", "distillation_jsd",
                "distillation_tvd")


def supported_passes(op: str) -> tuple[str, ...]:
    """The passes the model (and so the bench) defines for ``op``."""
    if op in _STREAMS:
        return tuple(p for p in PASSES if p in _STREAMS[op])
    if op in ("cross_entropy", "token_log_probs") or op in COMPUTE_BOUND or op in DISTILLATION:
        return ("fwd", "fwd_bwd")
    raise ValueError(f"unknown op {op!r}")


def minimal_bytes(op: str, pass_: str, shape: tuple[int, ...], elem_size: int,
                  *, weighted: bool = False) -> int | None:
    """Minimal HBM bytes of one call of ``op`` in ``pass_`` on ``shape`` (``None`` for the
    compute-bound linear ops). ``weighted`` adds BCE's elementwise weight."""
    if pass_ not in supported_passes(op):
        raise ValueError(f"{op} has no {pass_!r} pass in the bytes model")
    if op in COMPUTE_BOUND:
        return None
    n = math.prod(shape)
    if op in DISTILLATION:
        rows = math.prod(shape[:-1])
        streams = 2 if pass_ == "fwd" else 3
        return streams * n * elem_size + CE_TARGET_BYTES * rows
    if op == "token_log_probs":
        rows = math.prod(shape[:-1])
        if pass_ == "fwd":
            return n * elem_size + (CE_TARGET_BYTES + TLP_OUT_BYTES) * rows
        return 2 * n * elem_size + (CE_TARGET_BYTES + 2 * TLP_OUT_BYTES) * rows
    if op == "cross_entropy":
        rows = math.prod(shape[:-1])
        if pass_ == "fwd":
            return n * elem_size + CE_TARGET_BYTES * rows
        return 2 * n * elem_size + (CE_TARGET_BYTES + CE_LSE_BYTES) * rows
    streams = _STREAMS[op][pass_]
    if op == "bce" and weighted:
        streams += 1
    return streams * n * elem_size


def matmul_flops(pass_: str, tokens: int, hidden: int, vocab: int, op: str = "") -> int:
    """FLOPs of a linear op's matmuls: ``2·T·H·V`` each, 1 (fwd) or 3 (fwd_bwd); 2 or 4 for
    the distillation of two heads of hidden size H (the teacher's logits too)."""
    if pass_ not in ("fwd", "fwd_bwd"):
        raise ValueError(f"the linear ops have no {pass_!r} pass")
    if op == "linear_distillation_jsd":
        return (2 if pass_ == "fwd" else 4) * 2 * tokens * hidden * vocab
    return (1 if pass_ == "fwd" else 3) * 2 * tokens * hidden * vocab


def gbps(nbytes: int | None, ms: float | None) -> float | None:
    """Bytes over milliseconds, in GB/s (10^9 bytes a second)."""
    if nbytes is None or ms is None or ms <= 0:
        return None
    return nbytes / (ms * 1e-3) / 1e9


def tflops(flops: int | None, ms: float | None) -> float | None:
    if flops is None or ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12
