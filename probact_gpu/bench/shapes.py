"""The benchmark's shapes: the full table (perf/NOTES.md), a subset that takes about a minute on
an H200 (``--quick``), and tiny shapes for the interpreter (``--smoke``). The one home of the
bench shapes: ``perf/sweep_tiling.py``, ``scripts/sm90_report.py`` and ``bench --traffic`` read
them from here.

Shapes are tuples: ``(M, N)`` rows × row length for softmax / log_softmax / cross-entropy /
token log-probs / distillation (student and teacher logits of that shape), ``(n,)`` for the
elementwise ops, ``(tokens, hidden, vocab)`` for the linear ops (both heads' hidden size, for
distillation). Full and quick inputs are at least 256 MiB wherever the convention asks for it
(far beyond the 50 MB L2), so timings measure HBM, not cache. The op names are the command line's
(``probact_gpu.registry``: the ops ``bench`` times).
"""

from __future__ import annotations

from ..registry import bench_ops

OPS = bench_ops()
SIZES = ("full", "quick", "smoke")

BUDGET = 1 << 28  # elements of the softmax, sigmoid and BCE inputs (512 MiB in bf16)
SOFTMAX_N = (1024, 4096, 16384, 65536, 131072, 262144)
FEW_ROWS = (32, 262144)  # few long rows must still fill the GPU
CE_TOKENS = 4096
CE_VOCABS = (32000, 50257, 128256, 151936, 262144)
LINEAR_CE = (8192, 4096, 128256)  # tokens, hidden, vocab
CE_IGNORED_FRACTION = 8  # one target in 8 is ignore_index

# The passes each op runs when --pass is not given (the ones perf/NOTES.md compares).
DEFAULT_PASSES = {
    "softmax": ("fwd", "fwd_bwd"),
    "log_softmax": ("fwd", "fwd_bwd"),
    "sigmoid": ("fwd", "fwd_bwd"),
    "cross_entropy": ("fwd_bwd",),
    "bce": ("fwd_bwd",),
    "linear_cross_entropy": ("fwd_bwd",),
    "token_log_probs": ("fwd", "fwd_bwd"),  # fwd alone: the log-probs of a rollout
    "linear_token_log_probs": ("fwd", "fwd_bwd"),
    "distillation_kl": ("fwd", "fwd_bwd"),
    "distillation_reverse_kl": ("fwd", "fwd_bwd"),
    "distillation_jsd": ("fwd", "fwd_bwd"),
    "distillation_tvd": ("fwd", "fwd_bwd"),
    "linear_distillation_jsd": ("fwd_bwd",),
}
LINEAR_OPS = ("linear_cross_entropy", "linear_token_log_probs", "linear_distillation_jsd")
# Distillation on logits, per divergence: student and teacher logits of the CE shapes.
DISTILLATION_OPS = ("distillation_kl", "distillation_reverse_kl", "distillation_jsd",
                    "distillation_tvd")


def _rows_of(ns: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [(BUDGET // n, n) for n in ns]


def shapes(op: str, size: str = "full") -> list[tuple[int, ...]]:
    """The shapes ``op`` is measured on at ``size`` (``full``, ``quick`` or ``smoke``)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    if size == "smoke":
        return {
            "softmax": [(4, 64), (3, 3000)],
            "log_softmax": [(4, 64)],
            "sigmoid": [(1000,)],
            "cross_entropy": [(8, 100)],
            "bce": [(1000,)],
            "linear_cross_entropy": [(16, 32, 100)],
            "token_log_probs": [(8, 100)],
            "linear_token_log_probs": [(16, 32, 100)],
            "linear_distillation_jsd": [(16, 32, 100)],
        }.get(op, [(8, 100)])
    if op in ("softmax", "log_softmax"):
        if size == "quick":  # one short row, one long row, few long rows
            if op == "log_softmax":
                return _rows_of((4096,))
            return _rows_of((4096, 262144)) + [FEW_ROWS]
        return _rows_of(SOFTMAX_N) + [FEW_ROWS]
    if op in ("sigmoid", "bce"):
        return [(BUDGET,)]
    if op in ("cross_entropy", "token_log_probs") or op in DISTILLATION_OPS:
        vocabs = (32000, 128256) if size == "quick" else CE_VOCABS
        return [(CE_TOKENS, v) for v in vocabs]
    return [LINEAR_CE]


def row_length(op: str, shape: tuple[int, ...]) -> int:
    """The x axis of the plots: row length (N or V); the element count for elementwise ops."""
    if op in LINEAR_OPS:
        return shape[2]
    return shape[-1]


def label(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape)
