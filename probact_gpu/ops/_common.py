"""Host-side pieces shared by the fused LM-head ops (linear + cross-entropy, linear token
log-probs, their vocab-parallel forms). Everything here is plain torch on the host side of the
launches: no kernel, no host sync, nothing at import.

Stable surface (other op modules import these names):

``check_chunking(chunk_size, memory_budget, low_memory=False) -> (chunk_size, memory_budget,
low_memory)``
    The chunking knobs validated once, each error naming its argument.
``check_head_inputs(input, linear_weight, target, linear_bias, options, *,
allow_probabilities=True, n_classes=None) -> bool``
    A fused head's tensors validated (shapes, dtypes, devices, the per-class weights' length),
    each error naming its argument; True for class-probability targets.
``flatten_head_input(input, n_hidden) -> (h, batch_shape)``
    ``input`` (…, H) as a 2-D (N, H) view (H = 0 allowed), and the leading shape to restore.
``token_chunk(n_tokens, n_classes, elem_size, chunk_size, memory_budget) -> int``
    Tokens per chunk: ``chunk_size`` when given, else ``tiling.choose_token_chunk``.
``token_chunks(n, chunk)``
    ``(start, end)`` of consecutive chunks of ``chunk`` rows (the last one short); none for
    ``n == 0``.
``chunk_logits(h, weight, bias, out) -> out``
    ``out = h @ weight.T (+ bias)`` by cuBLAS, written into ``out`` (a reused chunk buffer).
``logits_chunks(h, weight, bias, chunk)``
    ``(start, end, logits)`` per token chunk, the logits of ``h[start:end]`` in one reused
    (C, V) buffer: the loop of every token-chunked LM-head forward and backward.
``accumulate_fp32(acc, a, b)``
    ``acc += a @ b`` with ``acc`` fp32 and 16-bit operands, no 16-bit rounding of the product.
``LinearGrads``
    dh, dW, db of a linear head fed one token chunk of dlogits at a time, with the memory and
    rounding model written in its docstring.
``fake_linear_grads(h, weight, bias, need) -> (dh, dW, db)``
    The fake (meta) counterpart of ``LinearGrads.results``, for the ops' fake implementations.
``ce_launch_options(options) -> dict``
    The keywords of the cross-entropy launchers ``cross_entropy_fwd`` and
    ``cross_entropy_grad`` from a ``CrossEntropyOptions`` (the split launchers take a subset:
    ``probact_gpu.distributed`` filters them).
``loss_divisors(options, target, n_classes, dtype) -> (Tensor | None, Tensor | None)``
    The 0-d device tensor the summed loss and its gradient are divided by: the mean's Σ w_t,
    the ``normalizer`` with ``reduction="sum"``, else None; and the z term's scale of a
    weighted mean with a z-loss (``cross_entropy_mean_divisors``), else None.
``reduce_rows(rows, options, divisor)``
    ``rows`` (N,) reduced as ``options.reduction`` says, divided by ``divisor`` when given.
``no_second_derivative(name)``
    Raise when a backward runs with ``create_graph=True`` outside of compilation: these ops'
    gradients are computed by kernels and are not themselves differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from .. import tiling
from .._runtime import accum_dtype, check_float, check_same_device, empty
from ..options import CrossEntropyOptions, as_index

__all__ = [
    "CrossEntropyOutput",
    "LinearGrads",
    "accumulate_fp32",
    "ce_launch_options",
    "cross_entropy_output",
    "check_chunking",
    "check_head_inputs",
    "chunk_logits",
    "fake_linear_grads",
    "flatten_head_input",
    "logits_chunks",
    "loss_divisors",
    "no_second_derivative",
    "reduce_rows",
    "token_chunk",
    "token_chunks",
]


# --------------------------------------------------------------------------- arguments


def check_chunking(chunk_size: Any, memory_budget: Any,
                   low_memory: Any = False) -> tuple[int | None, int | None, bool]:
    """``chunk_size`` (None or an int ≥ 1), ``memory_budget`` (None or an int ≥ 1 of bytes) and
    ``low_memory`` (a bool) validated, with errors naming the argument."""
    if chunk_size is not None:
        chunk_size = as_index("chunk_size", chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int (tokens per chunk), got "
                             f"{chunk_size}")
    if memory_budget is not None:
        memory_budget = as_index("memory_budget", memory_budget)
        if memory_budget < 1:
            raise ValueError(f"memory_budget must be a positive int (bytes of logits per "
                             f"chunk), got {memory_budget}")
    if not isinstance(low_memory, bool):
        raise TypeError(f"low_memory must be a bool, got {low_memory!r} "
                        f"({type(low_memory).__name__})")
    return chunk_size, memory_budget, low_memory


def check_head_inputs(input, linear_weight, target, linear_bias, options, *,
                      allow_probabilities=True, n_classes=None) -> bool:
    """Validate a fused head's tensors (``input`` (…, H), ``linear_weight`` (V, H),
    ``linear_bias`` (V,) or None, ``target`` (…) class indices or, when allowed, (…, V) class
    probabilities) and their devices, naming the offending argument. ``n_classes`` is the
    per-class weights' length (default: V). Returns True for class-probability targets."""
    check_float("input", input)
    check_float("linear_weight", linear_weight)
    if linear_weight.ndim != 2:
        raise ValueError(f"linear_weight must be 2-D (V, H), got shape "
                         f"{tuple(linear_weight.shape)}")
    if input.ndim < 1 or input.shape[-1] != linear_weight.shape[1]:
        raise ValueError(
            f"input's last dim must be the hidden size {linear_weight.shape[1]} of linear_weight "
            f"{tuple(linear_weight.shape)}, got input shape {tuple(input.shape)}")
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"linear_weight dtype {linear_weight.dtype} must match input dtype "
                        f"{input.dtype}")
    v_local = linear_weight.shape[0]
    if linear_bias is not None:
        check_float("linear_bias", linear_bias)
        if tuple(linear_bias.shape) != (v_local,) or linear_bias.dtype != input.dtype:
            raise ValueError(f"linear_bias must be ({v_local},) of dtype {input.dtype}, got "
                             f"shape {tuple(linear_bias.shape)}, dtype {linear_bias.dtype}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    batch = tuple(input.shape[:-1])
    soft = target.dtype.is_floating_point
    if soft:
        if not allow_probabilities:
            raise TypeError(f"target must be an int64 or int32 tensor of class indices, got "
                            f"{target.dtype}")
        if tuple(target.shape) != batch + (v_local,):
            raise ValueError(f"target holds class probabilities (dtype={target.dtype}) so it "
                             f"must have shape {batch + (v_local,)}, got {tuple(target.shape)}")
    elif target.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"target must be an int64 or int32 tensor of class indices or a float "
                        f"tensor of class probabilities, got {target.dtype}")
    elif tuple(target.shape) != batch:
        raise ValueError(f"target shape {tuple(target.shape)} must be input's shape without "
                         f"the hidden dim, {batch}")
    normalizer = options.normalizer if isinstance(options.normalizer, torch.Tensor) else None
    check_same_device(input=input, linear_weight=linear_weight, target=target,
                      linear_bias=linear_bias, weight=options.weight, normalizer=normalizer)
    options.check_weight(v_local if n_classes is None else n_classes, input.device)
    return soft


def flatten_head_input(input: torch.Tensor, n_hidden: int) -> tuple[torch.Tensor, torch.Size]:
    """(N, H) view of ``input`` (…, H) and its leading shape; an H of 0 is allowed (``reshape(-1,
    0)`` is not)."""
    batch_shape = input.shape[:-1]
    return input.reshape(math.prod(batch_shape), n_hidden), batch_shape


def token_chunk(n_tokens: int, n_classes: int, elem_size: int, chunk_size: int | None,
                memory_budget: int | None) -> int:
    """Tokens per chunk: ``chunk_size``, or as many as fit ``memory_budget`` bytes of logits
    (``tiling.choose_token_chunk``)."""
    return chunk_size or tiling.choose_token_chunk(n_tokens, n_classes, elem_size,
                                                   memory_budget)


def token_chunks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of consecutive chunks of ``chunk`` rows of ``n`` (the last one short)."""
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


# --------------------------------------------------------------------------- matmuls


def chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 out: torch.Tensor) -> torch.Tensor:
    """``out = h @ weight.T + bias`` (cuBLAS, fp32 accumulation, one rounding to out's dtype).
    The bias is added before any logit transform (the kernels apply that)."""
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def logits_chunks(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  chunk: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, end, logits)`` for consecutive chunks of ``chunk`` rows of ``h`` (N, H), with
    ``logits = h[start:end] @ weight.T (+ bias)`` (:func:`chunk_logits`) in one (C, V) buffer
    of ``h``'s dtype allocated once: each chunk's logits overwrite the previous chunk's (the
    caller may overwrite them too, e.g. with their gradient). Nothing for N = 0."""
    n_tokens = h.shape[0]
    if n_tokens == 0:
        return
    buffer = torch.empty((min(chunk, n_tokens), weight.shape[0]), dtype=h.dtype, device=h.device)
    for start, end in token_chunks(n_tokens, chunk):
        yield start, end, chunk_logits(h[start:end], weight, bias, buffer[: end - start])


def accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 (or fp64) and ``a``, ``b`` possibly 16-bit, without a
    16-bit rounding of the product: cuBLAS's fp32-output GEMM where torch has it, else fp32
    operands (the interpreter's CPU path, and an exact fallback)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            pass
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class LinearGrads:
    """The gradients of a linear head ``x = h @ W.T + b`` fed one token chunk of ``dlogits`` at a
    time, each allocated only where wanted: ``dh`` (N, H), ``dW`` (V, H), ``db`` (V,).

    - ``dh[chunk] = dlogits @ W``: one GEMM per chunk, written straight into dh.
    - ``db += Σ_rows dlogits`` in an fp32 (V,) accumulator (fp64 for fp64), cast at the end.
    - ``dW``: in the weight's dtype from the start; no (V, H) accumulator of another dtype is
      ever allocated. The first chunk writes ``dW = dlogits.T @ h[chunk]``, each later one
      ``dW.addmm_(dlogits.T, h[chunk])``: cuBLAS (and torch's CPU GEMM) reads the 16-bit dW into
      its fp32 accumulator, adds the chunk's fp32 product and rounds once — fp32 accumulation
      within a chunk, one rounding of dW per chunk, no memory beyond dW itself.

    Memory beyond the returned gradients: the (V,) db accumulator. dW of a 16-bit head is thus
    rounded k times for k token chunks instead of once: at k = 4 (the default chunking of
    8192 × 4096 × 128256 bf16) its largest error against float64 stays within eager bf16's,
    whose logits and dlogits are rounded too (test_linear_ce_bf16_dw_accuracy_vs_eager), while
    its RMS error is ~1.15× eager's; the error grows as √k with smaller chunks (and partial sums
    that cancel lose more). linear_cross_entropy's recomputing backward (``reduction="none"``,
    ``low_memory``) walks the vocabulary instead and rounds dW once.
    """

    def __init__(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 need: tuple[bool, bool, bool]):
        need_dh, need_dw, need_db = need  # need_db implies a bias
        self.dh = empty(h.shape, h.dtype, h.device) if need_dh else None
        self.dw = empty(weight.shape, weight.dtype, weight.device) if need_dw else None
        self.db_acc = None
        if need_db:
            self.db_acc = torch.zeros(bias.shape, dtype=accum_dtype(bias), device=bias.device)
        self._dw_started = False

    def add_chunk(self, start: int, end: int, dlogits: torch.Tensor, h_chunk: torch.Tensor,
                  weight: torch.Tensor) -> None:
        if self.dh is not None:
            torch.mm(dlogits, weight, out=self.dh[start:end])
        if self.dw is not None:
            self._add_dw(dlogits, h_chunk)
        if self.db_acc is not None:
            self.db_acc += dlogits.sum(0, dtype=self.db_acc.dtype)

    def _add_dw(self, dlogits: torch.Tensor, h_chunk: torch.Tensor) -> None:
        if self._dw_started:
            self.dw.addmm_(dlogits.t(), h_chunk)
        else:
            self._dw_started = True
            torch.mm(dlogits.t(), h_chunk, out=self.dw)

    def results(self, h: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dh, dW, db), an empty tensor for each not wanted; a wanted dh/dW over no tokens is
        zeros."""
        dh = weight.new_empty(0) if self.dh is None else self.dh
        if self.dw is None:
            dw = weight.new_empty(0)
        else:
            dw = self.dw if self._dw_started else self.dw.zero_()
        db = weight.new_empty(0) if self.db_acc is None else self.db_acc.to(bias.dtype)
        return dh, dw, db


def fake_linear_grads(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      need) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dW, db) as :meth:`LinearGrads.results` returns them, for fake implementations: each
    gradient in ``need`` shaped like its tensor, else an empty (0,) tensor."""
    dh = torch.empty_like(h) if need[0] else weight.new_empty(0)
    dw = torch.empty_like(weight) if need[1] else weight.new_empty(0)
    db = torch.empty_like(bias) if need[2] else weight.new_empty(0)
    return dh, dw, db


# --------------------------------------------------------------------------- CE options


def ce_launch_options(options: CrossEntropyOptions) -> dict:
    """The cross-entropy launchers' keywords for ``options`` (per-class ``weight``,
    ``ignore_index``, ``label_smoothing``, ``z_loss`` and the logit transform); ``reduction``
    and ``normalizer`` are the caller's (see :func:`loss_divisors`)."""
    t = options.transform
    kw = dict(weight=options.weight, ignore_index=options.ignore_index,
              label_smoothing=options.label_smoothing, z_loss=options.z_loss,
              softcap=t.softcap, logit_scale=t.logit_scale)
    # Passed only when set, so the launchers' defaults stay theirs.
    if t.logit_divisor != 1.0:
        kw["logit_divisor"] = t.logit_divisor
    if t.temperature != 1.0:
        kw["temperature"] = t.temperature
    return kw


def loss_divisors(options: CrossEntropyOptions, target: torch.Tensor, n_classes: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What the summed loss (and so every gradient) is divided by, as a 0-d ``dtype`` tensor on
    the targets' device, with no host sync: Σ w_t over non-ignored class-index targets for
    ``"mean"`` (the row count for class-probability targets, as torch), the ``normalizer`` for
    ``"sum"`` when one is given, else None; and the z term's scale (``z_scale=`` of the CE
    launchers) for a weighted mean of class-index targets with a z-loss, else None."""
    if options.reduction == "mean":
        if target.dtype.is_floating_point:
            return torch.full((), target.numel() // max(n_classes, 1), dtype=dtype,
                              device=target.device), None
        from .cross_entropy import cross_entropy_mean_divisors

        return cross_entropy_mean_divisors(target, n_classes, options, dtype)
    n = options.normalizer
    if n is None:
        return None, None
    if isinstance(n, torch.Tensor):
        return n.to(device=target.device, dtype=dtype), None
    return torch.full((), n, dtype=dtype, device=target.device), None


def reduce_ce_rows(loss_rows: torch.Tensor, zl_rows: torch.Tensor,
                   options: CrossEntropyOptions, target: torch.Tensor, n_classes: int,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, z-loss term) of class-index rows whose loss rows hold ``w_t·nll + λ·lse²`` and
    z-loss rows ``λ·lse²``, reduced as the options say. A weighted mean averages the z term over
    the kept tokens (not over Σ w_t): its rows are scaled by ``Σ w_t / n`` first, as the
    kernels' ``z_scale``."""
    divisor, z_scale = loss_divisors(options, target, n_classes, dtype)
    if z_scale is not None:
        loss_rows = loss_rows + zl_rows * (z_scale - 1.0)
        zl_rows = zl_rows * z_scale
    return reduce_rows(loss_rows, options, divisor), reduce_rows(zl_rows, options, divisor)


def ce_grad_rows(grad_loss: torch.Tensor, target: torch.Tensor, options: CrossEntropyOptions,
                 n_classes: int, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per-row upstream gradient of a class-index cross-entropy (divided by the mean's
    divisor or the normalizer) and the z term's scale (``reduce_ce_rows``) or None."""
    g = grad_loss.to(dtype)
    g = g.reshape(-1) if options.reduction == "none" else g.expand(target.shape[0])
    divisor, z_scale = loss_divisors(options, target, n_classes, dtype)
    return (g if divisor is None else g / divisor), z_scale


def reduce_rows(rows: torch.Tensor, options: CrossEntropyOptions,
                divisor: torch.Tensor | None) -> torch.Tensor:
    """Per-row losses reduced as ``options.reduction`` says, divided by ``divisor`` if any."""
    if options.reduction == "none":
        return rows
    total = rows.sum()
    return total if divisor is None else total / divisor


def no_second_derivative(name: str) -> None:
    """Raise when called in a backward run with ``create_graph=True`` (grad mode on), except
    while torch.compile traces the backward (it runs it with grad mode off anyway)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"{name} does not support second derivatives: its gradients come from kernels and "
            "are not differentiable; backpropagate without create_graph=True (or differentiate "
            "an eager reference for a Hessian)")


# --------------------------------------------------------------------------- CE extra outputs


class CrossEntropyOutput(NamedTuple):
    """What ``cross_entropy`` / ``linear_cross_entropy`` return when ``return_z_loss``,
    ``return_token_accuracy`` or ``return_predicted_tokens`` is set; a field not asked for is
    None. ``loss`` is the loss as without them; ``lse`` per row (with ``return_lse``);
    ``z_loss`` the ``z_loss · lse²`` term reduced as the loss (already inside ``loss``; apart
    for logging); ``token_accuracy`` per row (1.0 where the argmax is the target, 0.0 else and
    on ignored rows) for ``reduction="none"``, else the fraction of non-ignored rows whose
    argmax is the target (NaN with none); ``predicted_tokens`` the argmax of each row (int64).
    Only ``loss`` is differentiable."""

    loss: torch.Tensor
    lse: torch.Tensor | None
    z_loss: torch.Tensor | None
    token_accuracy: torch.Tensor | None
    predicted_tokens: torch.Tensor | None


def cross_entropy_output(loss, lse, target, options: CrossEntropyOptions, n_classes, *,
                         z_loss_term=None, predicted=None, return_lse=False,
                         return_z_loss=False, return_token_accuracy=False,
                         return_predicted_tokens=False) -> CrossEntropyOutput:
    """The extra outputs from the loss, the rows' ``lse`` and ``predicted`` (argmax; shaped like
    ``target``), in torch ops on the device: the z-loss term (``z_loss_term`` when the op formed
    it, else ``λ·lse²`` on non-ignored rows reduced with the loss's divisor) and the accuracy."""
    flat = target.reshape(-1)
    valid = flat != options.ignore_index
    zl = None
    if return_z_loss:
        if z_loss_term is None:
            sdt = lse.dtype
            rows = torch.where(valid, options.z_loss * lse.reshape(-1) ** 2, 0.0)
            if not options.z_loss:
                rows = torch.zeros_like(rows)
            zl = reduce_ce_rows(rows, rows, options, flat, n_classes, sdt)[1]
            zl = zl.reshape(target.shape) if options.reduction == "none" else zl
        else:
            zl = z_loss_term
    acc = None
    if return_token_accuracy:
        correct = (predicted.reshape(-1) == flat) & valid
        if options.reduction == "none":
            acc = correct.to(torch.float32).reshape(target.shape)
        else:
            acc = correct.sum(dtype=torch.float32) / valid.sum(dtype=torch.float32)
    return CrossEntropyOutput(loss, lse if return_lse else None, zl, acc,
                              predicted.reshape(target.shape) if return_predicted_tokens
                              else None)
