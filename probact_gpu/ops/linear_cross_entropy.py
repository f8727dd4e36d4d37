"""Fused linear + cross-entropy for LM heads: ``cross_entropy(input @ weight.T + bias, target)``
without ever holding the (tokens × vocab) logits.

Tokens are processed in chunks of ``C`` rows (``tiling.choose_token_chunk``: ``chunk_size``
tokens, or as many as fit ``memory_budget`` bytes of logits). Per chunk, with ``h`` (C, H),
``W`` (V, H):

    logits = h @ W.T + b               cuBLAS, into one reused (C, V) buffer
    loss, lse, dlogits                 our CE kernel, dlogits written over the logits (in place)
    dh[chunk]  = dlogits @ W           cuBLAS (fp32 accumulation inside, one rounding)
    dW        += dlogits.T @ h         fp32 accumulator across chunks, cast once at the end
    db        += Σ_rows dlogits        fp32

For ``reduction`` "sum"/"mean" the gradients are computed in the forward (3 matmuls in all, as
eager) and the backward only multiplies them by ``grad_output`` on the device, in place (a no-op
kernel when it is 1), so such a loss can be backpropagated once; a second backward through the
same graph raises. For "none" the per-token ``grad_output`` is only known in the backward, which
recomputes each chunk's logits and scales each *row* of dlogits before the two gradient
matmuls (4 matmuls in all) — never scaling after dW was summed over tokens.

Memory beyond inputs and outputs: the (C, V) chunk buffer, plus a (V, H) fp32 dW accumulator
when there is more than one chunk and the weight is not fp32 (for 128256 × 4096 that is 2 GiB:
the price of fp32 accumulation across chunks; a single chunk needs none).

``low_memory=True`` trades one matmul for that accumulator: the forward only computes the loss
and lse (token chunks, 1 matmul); the backward walks the vocabulary in blocks of ``V_c``
classes (``tiling.choose_vocab_chunk``): the (N, V_c) logits block is recomputed (1 matmul),
our CE gradient kernel overwrites it in place (with ``vocab_start``, as one shard of a
vocab-parallel head), and it gives ``dW[v0:v1]`` directly — cuBLAS reduces over all N tokens
in fp32 and rounds once — while ``dh`` accumulates in an (N, H) fp32 buffer. Extra memory:
the (N, V_c) block plus (N, H) fp32; 4 matmuls in all. The gradients then come from the
backward, so any ``grad_output`` and any number of backward passes work. The mean's divisor is
computed on the device before the first chunk, so every chunk's gradient is final: no host sync.
"""

from __future__ import annotations

import torch

from .. import tiling
from .._runtime import accum_dtype, check_float, check_runnable, check_same_device, empty
from .cross_entropy import (
    _check_options,
    cross_entropy_fwd,
    cross_entropy_grad,
    cross_entropy_scale_grad,
    cross_entropy_total_weight,
)

_INT_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------- helpers


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 and ``a``, ``b`` possibly 16-bit, without a 16-bit
    rounding of the product: cuBLAS's fp32-output GEMM where torch has it, else fp32 operands
    (the interpreter's CPU path, and a slow but exact fallback)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):
            pass
    acc.addmm_(a.float(), b.float())


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            out: torch.Tensor) -> torch.Tensor:
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _chunks(n_tokens: int, chunk: int):
    for start in range(0, n_tokens, chunk):
        yield start, min(start + chunk, n_tokens)


class _Grads:
    """The three gradients, allocated only where wanted; dW/db accumulate in fp32 over chunks."""

    def __init__(self, h, weight, bias, need, n_chunks):
        need_dh, need_dw, need_db = need  # need_db implies a bias
        self.dh = empty(h.shape, h.dtype, h.device) if need_dh else None
        self.dw_acc = self.db_acc = None
        if need_dw:
            direct = n_chunks == 1 or weight.dtype in (torch.float32, torch.float64)
            acc_dtype = weight.dtype if direct else torch.float32
            self.dw_acc = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        if need_db:
            self.db_acc = torch.zeros(bias.shape, dtype=accum_dtype(bias), device=bias.device)

    def add_chunk(self, start, end, dlogits, h_chunk, weight):
        if self.dh is not None:
            torch.mm(dlogits, weight, out=self.dh[start:end])
        if self.dw_acc is not None:
            _accumulate_fp32(self.dw_acc, dlogits.t(), h_chunk)
        if self.db_acc is not None:
            self.db_acc += dlogits.sum(0, dtype=self.db_acc.dtype)

    def results(self, weight, bias):
        dh = weight.new_empty(0) if self.dh is None else self.dh
        dw = weight.new_empty(0) if self.dw_acc is None else self.dw_acc.to(weight.dtype)
        db = weight.new_empty(0) if self.db_acc is None else self.db_acc.to(bias.dtype)
        return dh, dw, db


# --------------------------------------------------------------------------- launchers


def linear_cross_entropy_fwd(
    h: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    class_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    low_memory: bool = False,
    need_grads: tuple[bool, bool, bool] = (False, False, False),
) -> tuple[torch.Tensor, ...]:
    """Loss of ``cross_entropy(h @ weight.T + bias, target)`` for 2-D ``h`` (N, H); returns
    ``(loss, lse, dh, dW, db)``. ``loss`` is reduced as ``reduction`` says and ``lse`` is (N,),
    both fp32 (fp64 for fp64 input). With ``need_grads`` (dh, dW, db), reduction "sum"/"mean"
    and not ``low_memory``, those gradients of the reduced loss for grad_output 1; else empty
    tensors (the backward recomputes them)."""
    n_tokens, n_classes = h.shape[0], weight.shape[0]
    chunk = chunk_size or tiling.choose_token_chunk(
        n_tokens, n_classes, h.element_size(), memory_budget)
    grads_now = not low_memory and reduction != "none" and any(need_grads)
    n_chunks = max(1, tiling.cdiv(n_tokens, chunk))
    grads = _Grads(h, weight, bias, need_grads if grads_now else (False,) * 3, n_chunks)
    stats_dtype = accum_dtype(h)
    loss_rows = torch.empty(n_tokens, dtype=stats_dtype, device=h.device)
    lse = torch.empty(n_tokens, dtype=stats_dtype, device=h.device)
    total = None
    if reduction == "mean":
        total = cross_entropy_total_weight(target, n_classes, weight=class_weight,
                                           ignore_index=ignore_index, dtype=stats_dtype)
    buffer = torch.empty((min(chunk, n_tokens), n_classes), dtype=h.dtype, device=h.device)
    for start, end in _chunks(n_tokens, chunk):
        logits = _logits(h[start:end], weight, bias, buffer[: end - start])
        rows, row_lse, dlogits = cross_entropy_fwd(
            logits, target[start:end], weight=class_weight, ignore_index=ignore_index,
            reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, logit_scale=logit_scale, compute_grad=grads_now,
            grad_out=logits if grads_now else None, total_weight=total,
        )
        loss_rows[start:end] = rows
        lse[start:end] = row_lse
        if grads_now:
            grads.add_chunk(start, end, dlogits, h[start:end], weight)
    if reduction == "none":
        loss = loss_rows
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows.sum() / total
    return (loss, lse, *grads.results(weight, bias))


def linear_cross_entropy_bwd(
    h: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    grad_output: torch.Tensor,
    *,
    reduction: str = "none",
    class_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    low_memory: bool = False,
    need_grads: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients recomputed from the forward's ``lse``, for ``grad_output`` (one per token for
    ``reduction="none"``, else 0-d): each chunk's logits are recomputed and each row of dlogits
    is scaled by its grad_output (and the mean's divisor) *before* the gradient matmuls.
    Token chunks (dW accumulated in fp32), or with ``low_memory`` vocabulary chunks: each
    (N, V_chunk) block of logits gives its rows of dW directly (cuBLAS reduces over all tokens
    in fp32), dh accumulates in an (N, H) fp32 buffer, and nothing (V, H)-sized but dW itself is
    allocated. Returns (dh, dW, db), empty where not needed."""
    n_tokens, n_classes = h.shape[0], weight.shape[0]
    divisor = None
    if reduction == "mean":
        divisor = cross_entropy_total_weight(target, n_classes, weight=class_weight,
                                             ignore_index=ignore_index, dtype=lse.dtype)
    ce_opts = dict(weight=class_weight, ignore_index=ignore_index,
                   label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                   logit_scale=logit_scale, divisor=divisor)
    per_token = grad_output.ndim == 1
    if low_memory:
        return _bwd_vocab_chunks(h, weight, target, bias, lse, grad_output, ce_opts,
                                 chunk_size, memory_budget, need_grads)
    chunk = chunk_size or tiling.choose_token_chunk(
        n_tokens, n_classes, h.element_size(), memory_budget)
    grads = _Grads(h, weight, bias, need_grads, max(1, tiling.cdiv(n_tokens, chunk)))
    buffer = torch.empty((min(chunk, n_tokens), n_classes), dtype=h.dtype, device=h.device)
    for start, end in _chunks(n_tokens, chunk):
        logits = _logits(h[start:end], weight, bias, buffer[: end - start])
        dlogits = cross_entropy_grad(
            logits, target[start:end], lse[start:end],
            grad_output[start:end] if per_token else grad_output, out=logits, **ce_opts)
        grads.add_chunk(start, end, dlogits, h[start:end], weight)
    return grads.results(weight, bias)


def _bwd_vocab_chunks(h, weight, target, bias, lse, grad_output, ce_opts, chunk_size,
                      memory_budget, need_grads):
    """The low-memory backward: loop over blocks of classes (see linear_cross_entropy_bwd)."""
    n_tokens, n_classes = h.shape[0], weight.shape[0]
    need_dh, need_dw, need_db = need_grads
    chunk = chunk_size or tiling.choose_vocab_chunk(
        n_tokens, n_classes, h.element_size(), memory_budget)
    wide = h.dtype in (torch.float32, torch.float64)
    dh_acc = torch.zeros(h.shape, dtype=h.dtype if wide else torch.float32,
                         device=h.device) if need_dh else None
    dw = empty(weight.shape, weight.dtype, weight.device) if need_dw else weight.new_empty(0)
    db = empty(bias.shape, bias.dtype, bias.device) if need_db else weight.new_empty(0)
    buffer = torch.empty(n_tokens * min(chunk, n_classes), dtype=h.dtype, device=h.device)
    for v0, v1 in _chunks(n_classes, chunk):
        logits = _logits(h, weight[v0:v1], None if bias is None else bias[v0:v1],
                         buffer[: n_tokens * (v1 - v0)].view(n_tokens, v1 - v0))
        dlogits = cross_entropy_grad(logits, target, lse, grad_output, vocab_start=v0,
                                     n_classes=n_classes, out=logits, **ce_opts)
        if need_dw:
            torch.mm(dlogits.t(), h, out=dw[v0:v1])
        if need_db:
            db[v0:v1] = dlogits.sum(0, dtype=torch.float64 if bias.dtype == torch.float64
                                    else torch.float32)
        if need_dh:
            _accumulate_fp32(dh_acc, dlogits, weight[v0:v1])
    dh = h.new_empty(0) if dh_acc is None else dh_acc.to(h.dtype)
    return dh, dw, db


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("probact_gpu::linear_cross_entropy", mutates_args=())
def _lce_op(
    h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
    class_weight: torch.Tensor | None, ignore_index: int, reduction: str,
    label_smoothing: float, z_loss: float, softcap: float | None, logit_scale: float,
    chunk_size: int | None, memory_budget: int | None, low_memory: bool, need_grads: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return linear_cross_entropy_fwd(
        h, weight, target, bias, class_weight=class_weight, ignore_index=ignore_index,
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        logit_scale=logit_scale, chunk_size=chunk_size, memory_budget=memory_budget,
        low_memory=low_memory, need_grads=tuple(need_grads))


@_lce_op.register_fake
def _(h, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing, z_loss,
      softcap, logit_scale, chunk_size, memory_budget, low_memory, need_grads):
    n = h.shape[0]
    now = not low_memory and reduction != "none"
    stats_dtype = accum_dtype(h)
    loss = h.new_empty((n,) if reduction == "none" else (), dtype=stats_dtype)
    lse = h.new_empty((n,), dtype=stats_dtype)
    return (loss, lse, *_fake_grads(h, weight, bias, [now and g for g in need_grads]))


def _fake_grads(h, weight, bias, need):
    dh = torch.empty_like(h) if need[0] else weight.new_empty(0)
    dw = torch.empty_like(weight) if need[1] else weight.new_empty(0)
    db = torch.empty_like(bias) if need[2] else weight.new_empty(0)
    return dh, dw, db


@torch.library.custom_op("probact_gpu::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd_op(
    h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
    lse: torch.Tensor, grad_output: torch.Tensor, class_weight: torch.Tensor | None,
    ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
    softcap: float | None, logit_scale: float, chunk_size: int | None,
    memory_budget: int | None, low_memory: bool, need_grads: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return linear_cross_entropy_bwd(
        h, weight, target, bias, lse, grad_output, reduction=reduction,
        class_weight=class_weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap, logit_scale=logit_scale, chunk_size=chunk_size,
        memory_budget=memory_budget, low_memory=low_memory, need_grads=tuple(need_grads))


@_lce_bwd_op.register_fake
def _(h, weight, target, bias, lse, grad_output, class_weight, ignore_index, reduction,
      label_smoothing, z_loss, softcap, logit_scale, chunk_size, memory_budget, low_memory,
      need_grads):
    return _fake_grads(h, weight, bias, need_grads)


@torch.library.custom_op("probact_gpu::scale_grads", mutates_args=("dh", "dw", "db"))
def _scale_grads_op(
    dh: torch.Tensor, dw: torch.Tensor, db: torch.Tensor, grad_output: torch.Tensor
) -> None:
    for g in (dh, dw, db):
        cross_entropy_scale_grad(g, grad_output)


@_scale_grads_op.register_fake
def _(dh, dw, db, grad_output):
    return None


_OPTION_NAMES = ("class_weight", "ignore_index", "reduction", "label_smoothing", "z_loss",
                 "softcap", "logit_scale", "chunk_size", "memory_budget", "low_memory",
                 "need_grads")


def _setup_context(ctx, inputs, output):
    h, weight, target, bias = inputs[:4]
    ctx.options = dict(zip(_OPTION_NAMES, inputs[4:], strict=True))
    ctx.has_bias = bias is not None
    _, lse, dh, dw, db = output
    ctx.mark_non_differentiable(lse, dh, dw, db)
    ctx.recompute = ctx.options["reduction"] == "none" or ctx.options["low_memory"]
    if ctx.recompute:
        ctx.save_for_backward(h, weight, target, bias, lse)
    else:
        ctx.save_for_backward(dh, dw, db)


def _backward(ctx, grad_loss, _grad_lse, _gdh, _gdw, _gdb):
    opts = ctx.options
    need = opts["need_grads"]
    if ctx.recompute:
        h, weight, target, bias, lse = ctx.saved_tensors
        dh, dw, db = _lce_bwd_op(
            h, weight, target, bias, lse, grad_loss.to(lse.dtype), opts["class_weight"],
            opts["ignore_index"], opts["reduction"], opts["label_smoothing"], opts["z_loss"],
            opts["softcap"], opts["logit_scale"], opts["chunk_size"], opts["memory_budget"],
            opts["low_memory"], need)
    else:
        # The saved gradients are for grad_output 1; they are scaled in place (no new dW-sized
        # buffer) and handed to autograd, which can then keep them as .grad without a copy.
        try:
            dh, dw, db = ctx.saved_tensors
        except RuntimeError as exc:
            raise RuntimeError(
                "linear_cross_entropy with reduction='sum'/'mean' computes its gradients in the "
                "forward and scales them in place in the backward, so it can be backpropagated "
                "once (no retain_graph re-use); use reduction='none' and reduce outside to "
                "backpropagate several times") from exc
        _scale_grads_op(dh, dw, db, grad_loss)
    return (dh if need[0] else None, dw if need[1] else None, None,
            db if need[2] and ctx.has_bias else None) + (None,) * len(_OPTION_NAMES)


torch.library.register_autograd(
    "probact_gpu::linear_cross_entropy", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def _validate(input, weight, target, bias, class_weight, reduction, label_smoothing, z_loss,
              softcap, logit_scale, chunk_size, memory_budget):
    check_float("input", input)
    check_float("weight", weight)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    if input.ndim < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"input's last dim must be the hidden size {weight.shape[1]} of weight "
            f"{tuple(weight.shape)}, got input shape {tuple(input.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match input dtype {input.dtype}")
    if not isinstance(target, torch.Tensor) or target.dtype not in _INT_DTYPES:
        got = target.dtype if isinstance(target, torch.Tensor) else type(target).__name__
        raise TypeError(f"target must be an int64 or int32 tensor of class indices, got {got}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} must be input's shape without "
                         f"the hidden dim, {tuple(input.shape[:-1])}")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],) or bias.dtype != input.dtype:
            raise ValueError(f"bias must be ({weight.shape[0]},) of dtype {input.dtype}, got "
                             f"shape {tuple(bias.shape)}, dtype {bias.dtype}")
    if class_weight is not None:
        check_float("class_weight", class_weight)
        if tuple(class_weight.shape) != (weight.shape[0],):
            raise ValueError(f"class_weight must have shape ({weight.shape[0]},), got "
                             f"{tuple(class_weight.shape)}")
    # reduction, label_smoothing, z_loss, softcap, logit_scale: cross_entropy's own rules
    _check_options(input, None, None, reduction, label_smoothing, z_loss, softcap, logit_scale)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if memory_budget is not None and memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
    check_same_device(input=input, weight=weight, target=target, bias=bias,
                      class_weight=class_weight)


def linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    class_weight: torch.Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    low_memory: bool = False,
) -> torch.Tensor:
    """``probact_gpu.cross_entropy(input @ weight.T + bias, target, ...)`` without holding the
    logits. ``input`` (…, H), ``weight`` (V, H) (``nn.Linear`` layout), ``target`` (…) class
    indices; every cross-entropy option (``class_weight`` is cross_entropy's ``weight``).
    ``chunk_size`` or ``memory_budget`` (bytes of logits per chunk) trade speed for memory;
    ``low_memory=True`` computes the gradients in the backward over vocabulary chunks (4
    matmuls instead of 3, no fp32 (V, H) accumulator, any number of backward passes). Returns
    the loss in ``input``'s dtype (per token for ``reduction="none"``)."""
    _validate(input, weight, target, bias, class_weight, reduction, label_smoothing, z_loss,
              softcap, logit_scale, chunk_size, memory_budget)
    h = input.reshape(-1, input.shape[-1])
    flat_target = target.reshape(-1)
    if h.shape[0] > 0:
        check_runnable(h)
    grad_on = torch.is_grad_enabled()
    need = [grad_on and input.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad]
    loss, *_ = _lce_op(
        h, weight, flat_target, bias, class_weight, ignore_index, reduction,
        float(label_smoothing), float(z_loss), None if softcap is None else float(softcap),
        float(logit_scale), chunk_size, None if memory_budget is None else int(memory_budget),
        bool(low_memory), need)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss.to(input.dtype)
