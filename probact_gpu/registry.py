"""The op names of the command line: one table for ``probact-gpu check --op`` and
``probact-gpu bench --op`` (and the README), so the two cannot drift apart.

An op's name is what ``--op`` takes, the op ``bench`` times, and the first word of every row
``check`` prints for it. Each op says which module of :mod:`probact_gpu.check` holds its cases
and whether ``bench`` times it. An op whose check module is not there (an op still being added)
is not offered.

Pure Python, no import of torch or the kernels: the parser's ``choices`` come from here, and
``probact-gpu --version`` must stay instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_CHECK_DIR = Path(__file__).with_name("check")


@dataclass(frozen=True)
class Op:
    name: str
    check_module: str  # probact_gpu.check.<check_module> has its cases
    bench: bool  # probact-gpu bench times it

    @property
    def checked(self) -> bool:
        """True when its check module exists."""
        return (_CHECK_DIR / f"{self.check_module}.py").is_file()


OPS: tuple[Op, ...] = (
    Op("softmax", "softmax", bench=True),
    Op("log_softmax", "softmax", bench=True),
    Op("sigmoid", "sigmoid", bench=True),
    Op("logsigmoid", "sigmoid", bench=False),
    Op("bce", "bce", bench=True),
    Op("cross_entropy", "cross_entropy", bench=True),
    Op("linear_cross_entropy", "linear_cross_entropy", bench=True),
    Op("token_log_probs", "token_log_probs", bench=True),
    Op("linear_token_log_probs", "linear_token_log_probs", bench=True),
    Op("distillation_kl", "distillation", bench=True),
    Op("distillation_reverse_kl", "distillation", bench=True),
    Op("distillation_jsd", "distillation", bench=True),
    Op("distillation_tvd", "distillation", bench=True),
    Op("linear_distillation_jsd", "distillation", bench=True),
)


def check_ops() -> tuple[str, ...]:
    """The names ``probact-gpu check --op`` accepts (the ops whose check module exists)."""
    return tuple(op.name for op in OPS if op.checked)


def check_modules() -> tuple[str, ...]:
    """The modules of :mod:`probact_gpu.check` to collect cases from, in table order."""
    return tuple(dict.fromkeys(op.check_module for op in OPS if op.checked))


def bench_ops() -> tuple[str, ...]:
    """The names ``probact-gpu bench --op`` times."""
    return tuple(op.name for op in OPS if op.bench)


def lookup(name: str) -> Op:
    """The entry named ``name``; ValueError listing the known names otherwise."""
    for op in OPS:
        if op.name == name:
            return op
    raise ValueError(f"unknown op {name!r}; expected one of {tuple(op.name for op in OPS)}")
