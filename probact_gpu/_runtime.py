"""Host-side plumbing shared by every launcher: input validation, where kernels may run, the
(2-D or 3-D) strided view of a tensor around a reduced dim, and a record of launches so tests can
prove which kernel and which path ran.

Nothing here reads tensor *values*: every check is on metadata, so none of it synchronizes the
host with the device.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import _interpreter

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CPU_SM_COUNT = 4  # what tiling sees under the interpreter: small, so multi-program paths are cheap


# --------------------------------------------------------------------------- validation


def check_float(name: str, t: Any) -> None:
    """Raise TypeError unless ``t`` is a floating tensor of a dtype the kernels support."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got dtype={t.dtype}"
        )


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Raise ValueError when the given tensors are not all on one device; return that device."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    device = named[0][1].device
    for name, t in named[1:]:
        if t.device != device:
            first = named[0][0]
            raise ValueError(
                f"{name} is on {t.device} but {first} is on {device}: "
                "all tensors must be on one device"
            )
    return device


def normalize_dim(dim: int, ndim: int, name: str = "dim") -> int:
    """torch's rule: a 0-d tensor accepts dim in {-1, 0}; otherwise dim in [-ndim, ndim)."""
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"{name} must be an int, got {dim!r}")
    rank = max(ndim, 1)
    if not -rank <= dim < rank:
        raise IndexError(
            f"{name}={dim} is out of range for a tensor of {ndim} dimension(s) "
            f"(expected in [{-rank}, {rank - 1}])"
        )
    return dim % rank


def accum_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype kernels accumulate in and keep row statistics in: float64 when any of the given
    tensors is float64, else float32."""
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if wide else torch.float32


def interpreting() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .kernels import _online

    return isinstance(_online.probe_kernel, InterpretedFunction)


def check_runnable(t: torch.Tensor, name: str = "input") -> None:
    """Kernels run on CUDA tensors, or on CPU tensors through the Triton interpreter. Before the
    first kernel runs on the interpreter, its float conversions are made to round as the GPU's
    do (:mod:`probact_gpu._interpreter`); every launcher calls this first."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreting():
        # Not while torch.compile traces a public function (the install probes the interpreter
        # with NumPy, which Dynamo cannot trace): the launchers inside the ops, which run
        # untraced, call this again before their first kernel.
        if not torch.compiler.is_compiling():
            _interpreter.install()
        return
    if t.device.type == "cpu":
        raise RuntimeError(
            f"{name} is a CPU tensor: probact_gpu runs Triton kernels, which need a CUDA device. "
            "Move the tensor to CUDA, or set TRITON_INTERPRET=1 before triton is first imported "
            "to run the same kernels on the CPU through Triton's interpreter (slow; for testing)."
        )
    raise RuntimeError(f"{name} is on {t.device}: probact_gpu supports CUDA devices only")


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s CUDA device current for a launch (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@functools.cache
def _sm_count(device_type: str, index: int | None) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index or 0).multi_processor_count
    return _CPU_SM_COUNT


def sm_count(device: torch.device) -> int:
    """Number of streaming multiprocessors (cached; a fixed small number for CPU tensors)."""
    index = device.index if device.index is not None else None
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return _sm_count(device.type, index)


# --------------------------------------------------------------------------- autocast

# The ops torch's autocast runs in float32, per device type (its autocast op reference: the
# float32 lists of CUDA and CPU; the distillation losses are kl_div there);
# tests/test_edges.py checks this table against the policies torch's dispatcher registers.
# Everything else keeps its dtypes, except F.linear (the fused
# heads' GEMMs), which autocast casts down to the autocast dtype on both.
AUTOCAST_FP32_OPS: dict[str, frozenset[str]] = {
    "cuda": frozenset({"softmax", "log_softmax", "cross_entropy",
                       "binary_cross_entropy_with_logits", "distillation_loss"}),
    "cpu": frozenset({"cross_entropy", "binary_cross_entropy_with_logits",
                      "distillation_loss"}),
}
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _autocast_on(device: torch.device) -> bool:
    return device.type in AUTOCAST_FP32_OPS and torch.is_autocast_enabled(device.type)


def autocast_fp32(op: str, *tensors: torch.Tensor | None) -> bool:
    """True when autocast is on for the tensors' device, runs ``op`` in float32 there and one
    of ``tensors`` is 16-bit: torch's op would then take them as float32 and return float32
    (the kernels compute in float32 anyway: only the result's dtype changes, nothing is
    copied). Float64 tensors are left alone, as autocast does."""
    present = [t for t in tensors if t is not None]
    if not present or not _autocast_on(present[0].device):
        return False
    return (op in AUTOCAST_FP32_OPS[present[0].device.type]
            and any(t.dtype in _HALF_DTYPES for t in present))


def autocast_linear(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The operands of a linear layer as autocast gives them to ``F.linear``: where autocast is
    on for their device, each floating tensor that is not float64 cast (differentiably) to the
    autocast dtype; else unchanged."""
    present = [t for t in tensors if t is not None]
    if not present or not _autocast_on(present[0].device):
        return tensors
    dtype = torch.get_autocast_dtype(present[0].device.type)

    def cast(t):
        if t is None or not t.dtype.is_floating_point or t.dtype == torch.float64:
            return t
        return t.to(dtype)

    return tuple(cast(t) for t in tensors)


# --------------------------------------------------------------------------- strided views


@dataclass(frozen=True)
class RowView:
    """A tensor seen as ``n_rows`` rows of ``n_cols`` along one dim, without a copy.

    Row ``r`` starts at ``(r // n_inner) * outer_stride + (r % n_inner) * inner_stride`` and its
    columns are ``col_stride`` apart (all in elements). A contiguous tensor reduced over its last
    dim has ``n_inner == 1`` and ``col_stride == 1``.
    """

    tensor: torch.Tensor
    n_rows: int
    n_cols: int
    n_inner: int
    outer_stride: int
    inner_stride: int
    col_stride: int

    @property
    def strides(self) -> tuple[int, int, int]:
        return self.outer_stride, self.inner_stride, self.col_stride


def _merged_stride(shape: Sequence[int], strides: Sequence[int]) -> int | None:
    """The single stride of dims that merge into one (None if they do not merge)."""
    dims = [(n, s) for n, s in zip(shape, strides, strict=False) if n != 1]
    if not dims:
        return 0
    for (_n_outer, s_outer), (n_inner, s_inner) in zip(dims, dims[1:], strict=False):
        if s_outer != n_inner * s_inner:
            return None
    return dims[-1][1]


def row_view(t: torch.Tensor, dim: int) -> RowView:
    """View ``t`` as rows along ``dim`` (already normalised). Copies only when the dims before or
    after ``dim`` cannot be merged into one stride each (an arbitrary permutation). An empty
    ``t`` (a size-0 dim anywhere) is its own view, with zero row strides: there is nothing to
    address, and its strides need not merge (torch gives a (2, 0, 5) tensor strides (5, 5, 1))."""
    shape = list(t.shape) or [1]
    strides = list(t.stride()) or [1]
    n_outer = 1
    for n in shape[:dim]:
        n_outer *= n
    n_inner = 1
    for n in shape[dim + 1 :]:
        n_inner *= n
    if t.numel() == 0:  # nothing to address (and .contiguous() of an empty tensor keeps its
        return RowView(t, n_outer * n_inner, shape[dim], n_inner, 0, 0, strides[dim])  # strides)
    outer = _merged_stride(shape[:dim], strides[:dim])
    inner = _merged_stride(shape[dim + 1 :], strides[dim + 1 :])
    if outer is None or inner is None:
        return row_view(t.contiguous(), dim)
    return RowView(t, n_outer * n_inner, shape[dim], n_inner, outer, inner, strides[dim])


# --------------------------------------------------------------------------- outputs

_poison: list[bool] = []


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel's output. Inside :func:`poison_outputs` float outputs start as NaN, so
    an element a kernel forgot to write shows up in any comparison (the test suite poisons
    every output); otherwise this is ``torch.empty``."""
    if _poison and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Fill every output allocated by a launcher inside the block with NaN first."""
    _poison.append(True)
    try:
        yield
    finally:
        _poison.pop()


# --------------------------------------------------------------------------- launch record


@dataclass(frozen=True)
class Launch:
    kernel: str
    path: str
    grid: tuple[int, ...]
    meta: dict


_recorders: list[list[Launch]] = []


def record(kernel: Any, path: str, grid: tuple[int, ...], **meta: Any) -> None:
    """Note one launch for any active :func:`record_launches` block (free when none is)."""
    if _recorders:
        fn = getattr(kernel, "fn", None)
        name = getattr(kernel, "__name__", None) or getattr(fn, "__name__", "?")
        launch = Launch(name, path, tuple(grid), meta)
        for log in _recorders:
            log.append(launch)


def launch(
    kernel: Any,
    grid: tuple[int, ...],
    args: Sequence[Any],
    *,
    path: str,
    num_warps: int,
    num_stages: int | None = None,
    **constexprs: Any,
) -> None:
    """``kernel[grid](*args, **constexprs)`` on the device of its first tensor argument, then
    :func:`record` it with exactly the constexprs (and ``num_warps`` / ``num_stages``) it was
    launched with, so the record cannot drift from the launch."""
    first = next(a for a in args if isinstance(a, torch.Tensor))
    tuning = {"num_warps": num_warps}
    if num_stages is not None:
        tuning["num_stages"] = num_stages
    with device_guard(first):
        kernel[grid](*args, **constexprs, **tuning)
    record(kernel, path, grid, **constexprs, **tuning)


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Collect every kernel launch made inside the block (kernel name, path, grid, constexprs)."""
    log: list[Launch] = []
    _recorders.append(log)
    try:
        yield log
    finally:
        _recorders.remove(log)
