"""``probact-gpu bench --traffic``: what one call moves and launches, counted on the CPU.

Most of what decides a memory-bound kernel's speed can be counted without a GPU. Each op and
path runs through Triton's interpreter at a shape that takes the **full-size launch config**:
the rows are scaled down, the row length is kept, and ``tiling``'s heuristics are asked for the
config of the full shape (the row count or element count multiplied back, 132 SMs, an H200), so
the same kernels, tiles and flags run — only fewer programs. Per call (``fwd``; ``fwd_bwd``
split into its forward and backward halves) it reports:

- **Triton bytes**: every ``tl.load`` / ``tl.store`` the interpreter executes, counting only
  unmasked lanes × the element size, per kernel;
- **re-read bytes**: loads of an address the same program had already loaded (the second sweep
  of a multi-tile row); on a GPU those are L2 hits or HBM traffic, see the L2 model below;
- **launches**: Triton kernels, and torch kernels outside them — a ``TorchDispatchMode`` sees
  every aten op, and the ones that would be GPU kernels are counted (views, metadata and bare
  allocations are not; an op whose outputs all alias its inputs is not); their bytes are
  estimated as each tensor input read once and each output (or mutated argument) written once;
- **allocations** of at least half the main input's size (factory ops and any op's new output),
  in units of that input: the autograd zero-fill of an unused output shows up here (for the
  linear ops: at least half the logits they compute, listed by shape and dtype at the counted
  shape, whose hidden size is scaled down too);
- **host syncs** (``.item()`` and friends), which must be none;
- the **ratio** of the bytes to the minimal-bytes model (``bench/bytes.py``) at the run shape:
  row-proportional, so it is the full shape's ratio up to per-call constants.

The L2 model (``l2_hbm_bytes``) turns a kernel's re-reads into HBM bytes at the full shape: an
LRU cache of ``L2_BYTES`` over ``LINE_BYTES`` lines, fed by ``rows in flight`` programs running
in lockstep, each replaying the access sequence its run-shape counterpart executed (program 0's
trace, on its own lines; accesses under ``TRACE_MIN_BYTES``, the row vectors, left out). Rows in
flight = resident programs per SM (``RESIDENT_PROGRAMS``, from ``scripts/sm90_report.py``'s
static report) × 132 SMs, or the programs of a persistent grid when the config has one.

The interpreter's own host copies (it stages every tensor argument in host memory around a
launch) are not counted; they do not exist on a GPU. Counting patches the interpreter and the
``tiling`` functions inside :func:`counting` / :func:`full_size_configs` only, never at import.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import tiling
from . import bytes as bytes_model
from . import shapes as shape_table

H200_SMS = 132
L2_BYTES = tiling.L2_BYTES  # the H200's 50 MB: one home, beside the heuristics that budget it
LINE_BYTES = 16 * 1024  # one loop tile of 16 KiB: the L2 model's unit
# Resident programs per SM of the bf16 default configs (perf/sm90_static.md, triton 3.9:
# resident warps/SM over warps per program). Unknown kernels get DEFAULT_RESIDENT.
RESIDENT_PROGRAMS = {
    "softmax_fwd_kernel": 3,  # multi tile, 48 warps/SM at 16 warps
    "softmax_bwd_kernel": 3,
    "cross_entropy_fwd_kernel": 2,  # fused gradient, 32 warps/SM at 16 warps
    "cross_entropy_bwd_kernel": 2,
}
# Kernels the static report has not compiled yet (the CE row sweep) are taken at 2, the fused
# cross-entropy forward's.
DEFAULT_RESIDENT = 2
# Accesses smaller than this (a row's target, its loss) stay out of the L2 model's trace: on a GPU
# they share 128-byte lines with their neighbours' instead of taking a 16 KiB line each.
TRACE_MIN_BYTES = 1024
# Allocations at least this fraction of the main input's bytes are listed.
ALLOC_FRACTION = 0.5

# aten ops that launch no kernel: allocation without a fill, storage plumbing, metadata.
_NO_KERNEL = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_",
    "resize_", "detach", "alias", "lift_fresh", "lift_fresh_copy", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type",
})
# aten ops that only write their output (no input read).
_FILLS = frozenset({
    "zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones",
    "new_full", "fill_", "zero_", "scalar_tensor", "arange", "randn", "rand", "randint",
    "randperm", "normal_", "uniform_", "random_",
})
# aten ops that copy a device value to the host.
_SYNCS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal"})


# --------------------------------------------------------------------------- records


@dataclass
class KernelCount:
    """One Triton launch: bytes of unmasked lanes loaded and stored, bytes loaded again by the
    program that had already loaded them, and program 0's access trace (for the L2 model)."""

    name: str
    phase: str
    programs: int = 0
    loaded: int = 0
    stored: int = 0
    reread: int = 0
    persistent: int = 0  # programs of a persistent grid (the config's n_programs), else 0
    trace: list[tuple[bool, tuple[int, ...], int]] = field(default_factory=list, repr=False)


@dataclass
class TorchKernel:
    """One aten op that would be a GPU kernel; bytes estimated (module docstring)."""

    name: str
    phase: str
    read: int
    written: int


@dataclass
class Allocation:
    """A new tensor of at least the threshold: the op that made it, its size."""

    name: str
    phase: str
    nbytes: int
    shape: tuple[int, ...] = ()
    dtype: str = ""


@dataclass
class Counts:
    """What :func:`counting` saw, in order; ``phase`` labels what follows (``fwd``, ``bwd``).
    The underscored fields are the counter's state while a kernel runs."""

    kernels: list[KernelCount] = field(default_factory=list)
    torch_kernels: list[TorchKernel] = field(default_factory=list)
    allocations: list[Allocation] = field(default_factory=list)
    syncs: list[str] = field(default_factory=list)
    phase: str = "fwd"
    alloc_threshold: int = 0
    _depth: int = 0
    _paused: int = 0
    _current: KernelCount | None = None
    _program: list[np.ndarray] = field(default_factory=list)
    _program_index: int = -1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing inside is counted (what the caller, not the op, launches)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    # -- the interpreter's side

    def _end_program(self) -> None:
        k = self._current
        if k is None or self._program_index < 0:
            return
        if self._program:
            addrs = np.concatenate(self._program)
            sizes = addrs & np.uint64(0xF)
            loaded = int(sizes.sum())
            unique, first = np.unique(addrs >> np.uint64(4), return_index=True)
            k.reread += loaded - int(sizes[first].sum())
        self._program = []

    def on_program(self, index: tuple[int, int, int]) -> None:
        self._end_program()
        self._program_index += 1
        if self._current is not None:
            self._current.programs += 1

    def on_access(self, ptrs, mask, dtype, store: bool) -> None:
        k = self._current
        if k is None:
            return
        size = max(1, dtype.primitive_bitwidth // 8)
        addrs = np.asarray(ptrs.data).ravel()
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).ravel()
        live = addrs[m].astype(np.uint64)
        nbytes = live.size * size
        if store:
            k.stored += nbytes
        else:
            k.loaded += nbytes
            # Address and element size packed in one uint64 (sizes < 16, addresses ≪ 2^60).
            self._program.append((live << np.uint64(4)) | np.uint64(size))
        if self._program_index == 0 and nbytes >= TRACE_MIN_BYTES:
            lines = tuple(sorted({int(a) // LINE_BYTES for a in live}))
            k.trace.append((store, lines, nbytes))

    # -- torch's side

    def on_op(self, func, args, kwargs, out) -> None:
        name = func._schema.name.split("::")[-1]
        if name in _SYNCS:
            self.syncs.append(f"{name} ({self.phase})")
            return
        inputs = [t for t in _tensors((args, kwargs))]
        outputs = [t for t in _tensors(out)]
        in_storages = {_storage(t) for t in inputs}
        fresh = [t for t in outputs if _storage(t) not in in_storages]
        for t in fresh:
            nbytes = _nbytes(t)
            if nbytes and nbytes >= self.alloc_threshold:
                self.allocations.append(Allocation(name, self.phase, nbytes, tuple(t.shape),
                                                   str(t.dtype).removeprefix("torch.")))
        if name in _NO_KERNEL or func.is_view:
            return
        mutable = func._schema.is_mutable
        if not mutable and not fresh:
            return  # every output aliases an input: a no-op `to`, `contiguous`, `reshape`
        read = 0 if name in _FILLS else sum(_nbytes(t) for t in inputs)
        if mutable:
            mutated = [a for a, arg in zip(args, func._schema.arguments, strict=False)
                       if isinstance(a, torch.Tensor) and arg.alias_info is not None
                       and arg.alias_info.is_write]
            written = sum(_nbytes(t) for t in mutated) + sum(_nbytes(t) for t in fresh)
        else:
            written = sum(_nbytes(t) for t in fresh)
        self.torch_kernels.append(TorchKernel(name, self.phase, read, written))


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return id(t)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _OpCounter(TorchDispatchMode):
    """Sees every aten op. A custom op (probact_gpu::...) is redispatched to its device kernel
    under this mode again, so the ops inside its implementation are seen too."""

    def __init__(self, counts: Counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.counts._depth or self.counts._paused:  # the interpreter staging a launch
            return func(*args, **kwargs)
        if func.namespace not in ("aten", "prim", "prims"):
            device = next((t.device for t in _tensors((args, kwargs))), torch.device("cpu"))
            key = torch._C.DispatchKey.CUDA if device.type == "cuda" else torch._C.DispatchKey.CPU
            with self:
                return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        out = func(*args, **kwargs)
        self.counts.on_op(func, args, kwargs, out)
        return out


@contextlib.contextmanager
def counting(alloc_threshold: int = 0) -> Iterator[Counts]:
    """Count Triton loads/stores and torch kernels inside the block (interpreter only). Set
    ``counts.phase`` to label what follows (``fwd``, ``bwd``)."""
    from triton.runtime import interpreter

    from .. import _runtime

    if not _runtime.interpreting():
        raise RuntimeError("bench --traffic counts through Triton's interpreter: run it on the "
                           "CPU (TRITON_INTERPRET=1, --device cpu)")
    counts = Counts(alloc_threshold=alloc_threshold)
    builder = interpreter.interpreter_builder
    original_call = interpreter.GridExecutor.__call__

    def grid_call(self, *args, **kwargs):
        if counts._paused:
            return original_call(self, *args, **kwargs)
        counts._current = KernelCount(getattr(self.fn, "__name__", "?"), counts.phase,
                                      persistent=getattr(_last_config[-1], "n_programs", 0)
                                      if _last_config else 0)
        counts._program_index = -1
        counts._depth += 1
        try:
            return original_call(self, *args, **kwargs)
        finally:
            counts._end_program()
            counts._depth -= 1
            counts.kernels.append(counts._current)
            counts._current = None

    def set_grid_idx(x, y, z):
        counts.on_program((x, y, z))
        return type(builder).set_grid_idx(builder, x, y, z)

    def masked_load(ptrs, mask, other, cache_policy, is_volatile):
        counts.on_access(ptrs, mask, ptrs.get_element_ty(), store=False)
        return type(builder).create_masked_load(builder, ptrs, mask, other, cache_policy,
                                                is_volatile)

    def masked_store(ptrs, value, mask, cache_policy):
        counts.on_access(ptrs, mask, ptrs.get_element_ty(), store=True)
        return type(builder).create_masked_store(builder, ptrs, value, mask, cache_policy)

    poisoned = list(_runtime._poison)  # count what production allocates, not the test fill
    _runtime._poison.clear()
    interpreter.GridExecutor.__call__ = grid_call
    builder.set_grid_idx = set_grid_idx
    builder.create_masked_load = masked_load
    builder.create_masked_store = masked_store
    try:
        with _OpCounter(counts):
            yield counts
    finally:
        interpreter.GridExecutor.__call__ = original_call
        for name in ("set_grid_idx", "create_masked_load", "create_masked_store"):
            vars(builder).pop(name, None)
        _runtime._poison.extend(poisoned)


# --------------------------------------------------------------------------- full-size configs

# tiling functions whose first argument is a row or element count, and where the SM count is.
_ROW_CHOOSERS = {"choose_row_config": 3, "choose_cross_entropy_config": 3,
                 "choose_elementwise_config": None, "choose_bce_config": None,
                 "choose_distillation_config": 3}
_CHUNK_CHOOSERS = ("choose_token_chunk", "choose_distillation_token_chunk")


# The config the last chooser answered inside full_size_configs (the launch that follows uses it).
_last_config: list = []


@contextlib.contextmanager
def full_size_configs(scale: float, sms: int = H200_SMS) -> Iterator[list]:
    """Inside the block, ``tiling``'s choosers answer for ``scale`` × the rows (or elements)
    they are asked about and ``sms`` SMs; the token chunk of linear + CE is divided back by
    ``scale``, so a scaled-down call runs as many chunks as the full one. Yields the list of
    the configs they answered, in order."""
    saved = {name: getattr(tiling, name) for name in (*_ROW_CHOOSERS, *_CHUNK_CHOOSERS)}
    depth = [0]

    def rows_wrapper(fn, sm_arg):
        @functools.wraps(fn)
        def wrapper(n, *args, **kwargs):
            if depth[0]:  # a chooser calling another: scale once
                return fn(n, *args, **kwargs)
            depth[0] += 1
            try:
                args = list(args)
                if sm_arg is not None and len(args) >= sm_arg:
                    args[sm_arg - 1] = sms
                config = fn(max(1, round(n * scale)), *args, **kwargs)
                _last_config.append(config)
                return config
            finally:
                depth[0] -= 1
        return wrapper

    def chunk_wrapper(fn):
        @functools.wraps(fn)
        def wrapper(n, *args, **kwargs):
            return max(1, round(fn(max(1, round(n * scale)), *args, **kwargs) / scale))
        return wrapper

    for name, sm_arg in _ROW_CHOOSERS.items():
        setattr(tiling, name, rows_wrapper(saved[name], sm_arg))
    for name in _CHUNK_CHOOSERS:
        setattr(tiling, name, chunk_wrapper(saved[name]))
    _last_config.clear()
    try:
        yield _last_config
    finally:
        for name, fn in saved.items():
            setattr(tiling, name, fn)
        _last_config.clear()


def full_config(op: str, shape: tuple[int, ...], elem_size: int, sms: int = H200_SMS):
    """The launch config ``tiling`` picks for ``op`` at the full ``shape`` (None for the linear
    ops, whose row config follows from their token chunk)."""
    if op in ("softmax", "log_softmax"):
        return tiling.choose_row_config(shape[0], shape[1], elem_size, sms)
    if op in ("cross_entropy", "token_log_probs"):
        return tiling.choose_cross_entropy_config(shape[0], shape[1], elem_size, sms)
    if op in shape_table.DISTILLATION_OPS:
        return tiling.choose_distillation_config(shape[0], shape[1], elem_size, sms)
    if op == "sigmoid":
        return tiling.choose_elementwise_config(shape[0], elem_size)
    if op == "bce":
        return tiling.choose_bce_config(shape[0], elem_size)
    return None


def run_shape(op: str, shape: tuple[int, ...], elem_size: int,
              provider: str = "probact") -> tuple[int, ...]:
    """The scaled-down shape a full ``shape`` is counted at: the row length kept, two programs
    of rows (eight rows of targets, so one in eight can be ignored), four blocks of an
    elementwise op, sixteen tokens × hidden 64 for the linear ops (their matmuls are torch's);
    the fused head (``probact_invariant`` on a linear op), whose GEMM the interpreter runs tile
    by tile, at 640 classes (its full shape is stated by :func:`fused_head_model`)."""
    if provider == "probact_invariant" and op in shape_table.LINEAR_OPS:
        return (16, 64, 5 * tiling.INVARIANT_TILE)
    cfg = full_config(op, shape, elem_size)
    if op in ("softmax", "log_softmax"):
        rows = 2 * cfg.block_m if cfg.path == "single" else 2
        return (min(shape[0], rows), shape[1])
    if op in ("cross_entropy", "token_log_probs") or op in shape_table.DISTILLATION_OPS:
        return (min(shape[0], 8), shape[1])
    if op in ("sigmoid", "bce"):
        return (min(shape[0], 4 * cfg.block),)
    tokens, _hidden, vocab = shape
    return (16, 64, vocab)


def path_of(op: str, provider: str, chosen: list) -> str:
    """A short name of the launch path the full shape took: the first config ``tiling`` chose
    for the call (``chosen``, from :func:`full_size_configs`)."""
    if not provider.startswith("probact"):
        return "eager" if provider == "torch" else provider
    if op in shape_table.LINEAR_OPS:
        return {"probact_low_memory": "low memory",
                "probact_invariant": "fused head"}.get(provider, "token chunks")
    if provider == "probact_invariant":  # fixed 128-class tiles: no tiling choice to name
        return "invariant tiles"
    cfg = chosen[0] if chosen else None
    if cfg is None:
        return "?"
    if not hasattr(cfg, "path"):  # an ElementwiseConfig
        return f"block {cfg.block}"
    name = cfg.path + (f" ×{cfg.n_splits}" if cfg.path == "split" else "")
    if cfg.n_programs:
        name += f", persistent ×{cfg.n_programs}"
    if provider == "probact_inplace":
        name += ", in place"
    return name


# --------------------------------------------------------------------------- one call


@dataclass
class TrafficRow:
    """One (op, pass, dtype, full shape, provider) counted at ``run_shape``. Bytes are per call
    at the run shape; ``*_ratio`` are over the minimal-bytes model at the run shape."""

    op: str
    pass_: str
    dtype: str
    shape: tuple[int, ...]
    provider: str
    status: str
    reason: str | None = None
    run_shape: tuple[int, ...] = ()
    path: str = ""
    minimal: int | None = None
    triton_loaded: int = 0
    triton_stored: int = 0
    reread: int = 0
    torch_bytes: int = 0
    triton_launches: int = 0
    torch_launches: int = 0
    triton_ratio: float | None = None
    total_ratio: float | None = None
    hbm_ratio: float | None = None  # L2 model at the full shape: triton + torch HBM bytes
    kernels: list[str] = field(default_factory=list)
    # Per launch, in order: {"kernel", "phase", "programs", "loaded", "stored", "reread"} for
    # Triton; {"kernel": "aten.<op>", "phase", "read", "written"} (estimated) for torch.
    kernel_bytes: list[dict] = field(default_factory=list)
    allocations: list[str] = field(default_factory=list)
    syncs: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        d["shape"] = list(self.shape)
        d["run_shape"] = list(self.run_shape)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TrafficRow:
        d = dict(d)
        d["pass_"] = d.pop("pass")
        d["shape"] = tuple(d["shape"])
        d["run_shape"] = tuple(d["run_shape"])
        return cls(**d)


def _main_bytes(op: str, inputs: dict[str, torch.Tensor]) -> int:
    """Bytes of the op's big input: the logits (for the linear ops, the logits they compute)."""
    if op in shape_table.LINEAR_OPS:
        return inputs["x"].shape[0] * inputs["weight"].shape[0] * inputs["x"].element_size()
    for name in ("logits", "student", "x"):
        if name in inputs:
            return _nbytes(inputs[name])
    raise ValueError(f"no main input among {tuple(inputs)}")


def count_call(fn: Callable, op: str, pass_: str, inputs: dict[str, torch.Tensor],
               seed: int = 1) -> Counts:
    """Run ``fn`` once on ``inputs`` for ``pass_`` (``fwd`` without autograd; ``fwd_bwd``
    forward, then ``backward()`` labelled ``bwd``; ``bwd`` that backward alone) and count it.
    The ``ones_like`` seed that ``loss.backward()`` would launch for a scalar loss is made
    outside the count: it is the caller's, the same for every provider."""
    from .providers import GRAD_INPUTS, backward, upstream_grads

    args = list(inputs.values())
    threshold = int(ALLOC_FRACTION * _main_bytes(op, inputs))
    if pass_ == "fwd":
        with torch.no_grad(), counting(threshold) as counts:
            fn(*args)
        return counts
    for name in GRAD_INPUTS[op]:
        inputs[name].requires_grad_()
    dy = upstream_grads(op, inputs, seed)
    with counting(threshold) as counts:
        if pass_ == "bwd":  # the backward alone: its forward is not counted
            counts.phase = "bwd"
            with counts.paused():
                out = fn(*args)
        else:
            out = fn(*args)
        counts.phase = "bwd"
        if dy is None:  # the seed of a scalar loss's backward() is the caller's, not the op's
            with counts.paused():
                dy = torch.ones_like(out)
        backward(out, dy)
    return counts


def measure(op: str, pass_: str, dtype: torch.dtype, shape: tuple[int, ...],
            provider: str = "probact", *, run: tuple[int, ...] | None = None,
            seed: int = 0) -> tuple[TrafficRow, Counts]:
    """Count ``provider``'s ``op`` ``pass_`` at the run shape of the full ``shape`` (or ``run``)
    with the full shape's launch config; the row and the raw counts."""
    from . import providers as prov
    from .runner import DTYPES

    dname = next(k for k, v in DTYPES.items() if v == dtype)
    esize = dtype.itemsize
    run = run or run_shape(op, shape, esize, provider)
    row = TrafficRow(op, pass_, dname, tuple(shape), provider, "ok", run_shape=tuple(run))
    scale = shape[0] / run[0]
    device = torch.device("cpu")
    fn = prov.resolve(provider, op, device=device, smoke=True)
    inputs = prov.make_inputs(op, run, dtype, device, seed)
    with full_size_configs(scale) as chosen:
        counts = count_call(fn, op, pass_, inputs)
        row.path = path_of(op, provider, list(chosen))
    row.minimal = bytes_model.minimal_bytes(op, pass_, run, esize)
    row.triton_loaded = sum(k.loaded for k in counts.kernels)
    row.triton_stored = sum(k.stored for k in counts.kernels)
    row.reread = sum(k.reread for k in counts.kernels)
    row.torch_bytes = sum(k.read + k.written for k in counts.torch_kernels)
    row.triton_launches = len(counts.kernels)
    row.torch_launches = len(counts.torch_kernels)
    main_bytes = _main_bytes(op, inputs)
    row.kernels = [f"{k.name} ({k.phase})" for k in counts.kernels] + [
        f"aten.{k.name} ({k.phase})" for k in counts.torch_kernels]
    row.kernel_bytes = [
        {"kernel": k.name, "phase": k.phase, "programs": k.programs, "loaded": k.loaded,
         "stored": k.stored, "reread": k.reread} for k in counts.kernels] + [
        {"kernel": f"aten.{k.name}", "phase": k.phase, "read": k.read, "written": k.written}
        for k in counts.torch_kernels]
    if op in shape_table.LINEAR_OPS:  # hidden is scaled down too: sizes, not ratios
        row.allocations = [f"{a.name} {'×'.join(map(str, a.shape))} {a.dtype} ({a.phase})"
                           for a in counts.allocations]
    else:
        row.allocations = [f"{a.name} {a.nbytes / main_bytes:.2f}× ({a.phase})"
                           for a in counts.allocations]
    row.syncs = list(counts.syncs)
    if row.minimal:
        triton = row.triton_loaded + row.triton_stored
        row.triton_ratio = triton / row.minimal
        row.total_ratio = (triton + row.torch_bytes) / row.minimal
        hits = sum(l2_hits(k, rows_in_flight(k.name, persistent=k.persistent),
                           int(round(k.programs * scale)))
                   for k in counts.kernels if k.reread)
        row.hbm_ratio = (triton + row.torch_bytes - hits) / row.minimal
    return row, counts


# --------------------------------------------------------------------------- L2 model


def rows_in_flight(kernel: str, sms: int = H200_SMS, *, persistent: int = 0) -> int:
    """Programs resident at once on the whole GPU for ``kernel`` (``RESIDENT_PROGRAMS`` × SMs),
    or fewer: the programs of a persistent grid, each looping over rows."""
    resident = RESIDENT_PROGRAMS.get(kernel, DEFAULT_RESIDENT) * sms
    return min(resident, persistent) if persistent else resident


def l2_hbm_bytes(trace: list[tuple[bool, tuple[int, ...], int]], n_programs: int,
                 in_flight: int, *, l2_bytes: int = L2_BYTES,
                 line_bytes: int = LINE_BYTES) -> tuple[int, int]:
    """(bytes served by L2, bytes issued) of ``n_programs`` programs that each replay ``trace``
    (program 0's accesses: store?, lines, bytes) on their own lines, ``in_flight`` at a time in
    lockstep, through an LRU cache of ``l2_bytes`` in ``line_bytes`` lines. A load hits when its
    lines are all resident; a store makes its lines resident. The steady state is reached within
    a few waves, so at most ``4 × in_flight`` programs are simulated and the hit fraction
    scaled to ``n_programs``."""
    if not trace or n_programs <= 0:
        return 0, 0
    capacity = max(1, l2_bytes // line_bytes)
    simulated = min(n_programs, 4 * in_flight)
    cache: OrderedDict[tuple[int, int], None] = OrderedDict()
    hit_bytes = issued = 0
    slots: list[int | None] = list(range(min(in_flight, simulated)))
    steps = [0] * len(slots)
    next_program = len(slots)
    while any(s is not None for s in slots):
        for i, program in enumerate(slots):
            if program is None:
                continue
            store, lines, nbytes = trace[steps[i]]
            keys = [(program, line) for line in lines]
            if not store:
                issued += nbytes
                if all(k in cache for k in keys):
                    hit_bytes += nbytes
            for k in keys:
                cache[k] = None
                cache.move_to_end(k)
            while len(cache) > capacity:
                cache.popitem(last=False)
            steps[i] += 1
            if steps[i] == len(trace):
                steps[i] = 0
                slots[i] = next_program if next_program < simulated else None
                next_program += 1
    return round(hit_bytes * n_programs / simulated), round(issued * n_programs / simulated)


def l2_hits(k: KernelCount, in_flight: int, n_programs_full: int) -> int:
    """Bytes of ``k``'s loads at the run shape that the L2 model serves from cache, at the rows
    in flight of the full shape (the fraction of program 0's loads that hit, times ``k``'s
    loads, at most its re-reads)."""
    hit, issued = l2_hbm_bytes(k.trace, n_programs_full, in_flight)
    if not issued:
        return 0
    # Only a re-read can hit: a first load sharing a line with another tensor's is not one.
    return min(k.reread, round(k.loaded * hit / issued))


# --------------------------------------------------------------------------- the plan


def cases(ops, dtypes, passes, providers=("probact",)) -> list[tuple]:
    """(op, pass, dtype, full shape, provider) for every bench shape (``bench/shapes.py``), with
    probact's variants (in place, low memory) beside probact."""
    from . import providers as prov
    from .runner import DTYPES

    out = []
    for op in ops:
        wanted = ("fwd", "fwd_bwd") if passes is None else passes
        have = bytes_model.supported_passes(op)
        for p in wanted:
            if p not in have:
                continue
            for dname in dtypes:
                for shape in shape_table.shapes(op, "full"):
                    for provider in providers:
                        out.append((op, p, DTYPES[dname], shape, provider))
                        for variant in prov.VARIANTS.get(op, ()):
                            if provider == "probact" and variant.startswith("probact"):
                                out.append((op, p, DTYPES[dname], shape, variant))
    return out


def run(ops, dtypes, passes=None, *, providers=("probact",),
        progress: Callable[[str], None] | None = None) -> list[TrafficRow]:
    """Count every case; a provider that is missing or raises is a skipped row with the reason.
    Any provider can be counted (torch eager's kernels are torch kernels, their bytes estimated
    as the module docstring says); the default is probact and its variants."""
    from . import providers as prov
    from .runner import DTYPES

    rows = []
    for op, pass_, dtype, shape, provider in cases(ops, dtypes, passes, providers):
        dname = next(k for k, v in DTYPES.items() if v == dtype)
        if progress:
            progress(f"{op} {pass_} {dname} {shape_table.label(shape)} {provider}")
        try:
            row, _ = measure(op, pass_, dtype, shape, provider)
        except prov.Skip as skip:
            row = TrafficRow(op, pass_, dname, tuple(shape), provider, "skipped", str(skip))
        except Exception as exc:  # a raising provider is a skipped row, not a crash
            text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            row = TrafficRow(op, pass_, dname, tuple(shape), provider, "skipped",
                             f"raised {type(exc).__name__}: {text}")
        rows.append(row)
    return rows


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.2f}"


# --------------------------------------------------------------------------- the fused head
#
# The fused LM head (``batch_invariant=True`` on the linear ops: kernels/head_gemm.py) is a GEMM:
# counting it through the interpreter at the full shape (1187 vocabulary tiles × 64 tokens a
# program) takes hours, so ``bench --traffic`` counts it at a small shape like the other rows
# and states it at the full shape by this model, whose every term is one kernel's loads or
# stores (tests/test_traffic.py pins the model to the interpreter's counts at a small shape, so
# the full-shape figures are the same arithmetic at a bigger N, H and V).

# The shape docs/rl.md states the fused head at (tokens, hidden, vocabulary: Qwen's 151936).
FUSED_HEAD_SHAPE = (8192, 4096, 151936)


@dataclass
class FusedHeadModel:
    """What the fused head moves and allocates at (``tokens`` × ``hidden`` × ``vocab``), every
    token active: per kernel launch family ``(loaded, stored)`` bytes over the whole call, the
    buffers it allocates beyond inputs, outputs and gradients (name, bytes), and the GEMM FLOPs
    (a multiply-add is 2)."""

    shape: tuple[int, int, int]
    dtype_bytes: int
    kernels: dict[str, tuple[int, int]]
    buffers: list[tuple[str, int]]
    gemm_flops_fwd: int
    gemm_flops_bwd: int
    vocab_chunks: int

    @property
    def loaded(self) -> int:
        return sum(v[0] for v in self.kernels.values())

    @property
    def stored(self) -> int:
        return sum(v[1] for v in self.kernels.values())


def fused_head_model(tokens: int, hidden: int, vocab: int, elem: int, *, entropy: bool = True,
                     bias: bool = False, backward: bool = True, budget: int | None = None,
                     target_bytes: int = 8) -> FusedHeadModel:
    """The fused token log-probs head (logp and entropy; a backward through both when
    ``backward``) at full tiles of ``tiling.head_gemm_config``: the sums of the per-program
    terms of each kernel of kernels/head_gemm.py and kernels/_invariant.py's merge."""
    cfg = tiling.head_gemm_config(elem)
    tile = tiling.INVARIANT_TILE
    n_tiles = tiling.cdiv(vocab, tile)
    m_tiles = tiling.cdiv(tokens, cfg.block_m)
    fields = 3 if entropy else 2
    stat_bytes = 8 if elem == 8 else 4
    k: dict[str, tuple[int, int]] = {}
    # forward: every program loads the active count; the live ones their rows' order and
    # targets, the h and W tiles over the hidden size (and the bias); they store the tile
    # states and the target logit of the token whose target is in the tile
    k["head_gemm_fwd"] = (
        m_tiles * n_tiles * 8 + n_tiles * tokens * (8 + target_bytes)
        + n_tiles * tokens * hidden * elem + m_tiles * vocab * hidden * elem
        + (m_tiles * vocab * elem if bias else 0),
        n_tiles * tokens * fields * stat_bytes + tokens * stat_bytes)
    k["invariant_merge"] = (
        tokens * stat_bytes + tokens * n_tiles * fields * stat_bytes,
        tokens * (16 if elem != 8 else 32) + tokens * stat_bytes)
    buffers = [("tile states (tokens, tiles, fields)", tokens * n_tiles * fields * stat_bytes)]
    flops_fwd = 2 * tokens * hidden * vocab
    chunks = 0
    if backward:
        chunk = tiling.fused_head_vocab_chunk(tokens, vocab, elem, budget)
        chunks = tiling.cdiv(vocab, chunk)
        h_blocks = tiling.cdiv(hidden, cfg.block_h)
        dz_loads = dh_loads = dw_loads = 0
        dz_stores = dh_stores = dw_stores = 0
        for c0 in range(0, vocab, chunk):
            cols = min(chunk, vocab - c0)
            tiles = tiling.cdiv(cols, tile)
            # dz: the forward's loads again, the row statistics (shift, log s, μ) and the
            # coefficients (A, B, D), the dz block's store
            per_row = 8 + target_bytes + stat_bytes * (3 if entropy else 2) + \
                stat_bytes * (3 if entropy else 2)
            dz_loads += (m_tiles * tiles * 8 + tiles * tokens * per_row
                         + tiles * tokens * hidden * elem + m_tiles * cols * hidden * elem
                         + (m_tiles * cols * elem if bias else 0))
            dz_stores += tokens * cols * elem
            first, last = c0 == 0, c0 + cols == vocab
            # dh: the carry (all but the first chunk), dz over the chunk and W's rows a hidden
            # block at a time; the last chunk writes dh, the others the carry
            dh_loads += (m_tiles * h_blocks * 8 + (0 if first else tokens * hidden * stat_bytes)
                         + h_blocks * tokens * cols * elem + m_tiles * cols * hidden * elem
                         + (tokens * 8 * h_blocks if last else 0))
            dh_stores += tokens * hidden * (elem if last else stat_bytes)
            # dW: dz over every token a tile and hidden block, h's rows, their order; dW written
            dw_loads += (tiles * h_blocks * 8 + h_blocks * tokens * cols * elem
                         + tiles * h_blocks * tokens * 8 + tiles * tokens * hidden * elem)
            dw_stores += cols * hidden * elem
        k["head_gemm_bwd_dz"] = (dz_loads, dz_stores)
        k["head_gemm_bwd_dh"] = (dh_loads, dh_stores)
        k["head_gemm_bwd_dw"] = (dw_loads, dw_stores)
        buffers.append(("dz block (tokens, vocabulary chunk)", tokens * min(chunk, vocab) * elem))
        if chunks > 1:
            buffers.append(("dh carry (tokens, hidden) fp32", tokens * hidden * stat_bytes))
    return FusedHeadModel((tokens, hidden, vocab), elem, k, buffers, flops_fwd,
                          3 * flops_fwd if backward else 0, chunks)


def atomic_head_model(tokens: int, hidden: int, vocab: int, elem: int) -> dict[str, int]:
    """What the non-deterministic design adds instead (one backward kernel that recomputes a
    tile and adds ``dz @ W`` into dh and ``dz.T @ h`` into dW with fp32 atomics): the fp32
    accumulators it allocates and the bytes of its atomic read-modify-writes (8 a float: the
    L2 reads and writes one)."""
    cfg = tiling.head_gemm_config(elem)
    m_tiles = tiling.cdiv(tokens, cfg.block_m)
    n_tiles = tiling.cdiv(vocab, tiling.INVARIANT_TILE)
    return {"dW fp32 accumulator": vocab * hidden * 4,
            "dh fp32 accumulator": tokens * hidden * 4,
            "dh atomics": n_tiles * tokens * hidden * 8,
            "dW atomics": m_tiles * vocab * hidden * 8}


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB"


def format_fused_head_model(model: FusedHeadModel) -> str:
    """The model as markdown: bytes a kernel family, buffers, GEMM FLOPs, beside the atomic
    design's extra accumulators and traffic."""
    n, h, v = model.shape
    kind = {2: "16-bit", 4: "fp32", 8: "fp64"}[model.dtype_bytes]
    passes = "forward + backward" if model.gemm_flops_bwd else "forward"
    lines = [f"### the fused head at {n} × {h} × {v} (model; {kind} inputs, logp + entropy, "
             f"{passes})", "",
             "Bytes issued by each kernel's loads and stores (a GEMM re-reads its operand "
             "tiles: from L2 when neighbouring programs share them, else HBM); no logits are "
             "ever stored.", "",
             "| kernel | loaded | stored |", "|---|---|---|"]
    for name, (ld, st) in model.kernels.items():
        lines.append(f"| {name} | {_gb(ld)} | {_gb(st)} |")
    lines.append(f"| total | {_gb(model.loaded)} | {_gb(model.stored)} |")
    lines += ["", "| buffer beyond inputs, outputs, gradients | bytes |", "|---|---|"]
    for name, nbytes in model.buffers:
        lines.append(f"| {name} | {nbytes / 2**20:,.0f} MiB |")
    lines.append(f"| logits (never allocated; for scale) | {n * v * model.dtype_bytes / 2**20:,.0f}"
                 " MiB |")
    flops = model.gemm_flops_fwd + model.gemm_flops_bwd
    if model.gemm_flops_bwd:
        lines += ["", f"GEMMs: 1 forward + 3 backward (recompute, dh, dW), "
                  f"{flops / 1e12:,.1f} TFLOP in all, {flops / n / 1e9:,.2f} GFLOP a token "
                  f"({model.gemm_flops_fwd / n / 1e9:,.2f} forward); "
                  f"{model.vocab_chunks} vocabulary chunks in the backward."]
        atomic = atomic_head_model(n, h, v, model.dtype_bytes)
        lines += ["", "The atomic design instead (no dz block, no dh carry): " + ", ".join(
            f"{k} {v / 2**20:,.0f} MiB" if "accumulator" in k else f"{k} {_gb(v)}"
            for k, v in atomic.items()) + " of read-modify-write."]
    else:
        lines += ["", f"GEMM: 1, {flops / 1e12:,.1f} TFLOP, {flops / n / 1e9:,.2f} GFLOP a "
                  "token."]
    return "\n".join(lines) + "\n"
