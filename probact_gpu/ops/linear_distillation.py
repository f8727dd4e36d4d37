"""Distillation from both heads' hidden states: ``distillation_loss(student_input @
student_weight.T + student_bias, teacher_input @ teacher_weight.T + teacher_bias, target, ...)``
without ever holding either head's (tokens × V) logits. The student's and the teacher's hidden
sizes may differ.

Tokens are processed in chunks of ``C`` rows (``chunk_size``, or as many as fit ``memory_budget``
bytes of *both* heads' logits: ``tiling.choose_distillation_token_chunk``). With ``h_s`` (N, H_s),
``W_s`` (V, H_s), ``h_t`` (N, H_t), ``W_t`` (V, H_t), per chunk ``c``:

Forward (2 GEMMs; 4 with the gradients of a reduced loss)::

    s = h_s[c] @ W_s.T (+ b_s)        torch matmul into a reused (C, V) buffer of h_s's dtype
    t = h_t[c] @ W_t.T (+ b_t)        into a second (C, V) buffer of h_t's dtype
    loss rows, stats                  our distillation kernel: one read of both buffers
    dz  (reduction mean / sum)        our backward kernel over both buffers, written over s,
                                      for grad_output 1 (the mean's 1/count folded in)
    dh_s[c] = dz @ W_s                written straight into dh_s
    dW_s   += dz.T @ h_s[c]           ``ops._common.LinearGrads`` (fp32 addition, the weight's
                                      dtype between chunks); db_s += Σ_rows dz in fp32

so a reduced loss costs **4 GEMMs per token chunk** (2 logits, dh, dW) and its backward only
multiplies the saved gradients by ``grad_output`` in place (``probact_gpu::scale_grads``, a
no-op kernel when it is 1): it can be backpropagated once. ``reduction="none"`` learns its
per-token upstream gradient only in the backward, which recomputes both chunks' logits (2
GEMMs) before dz, dh, dW: **2 + 4 GEMMs per chunk**, any number of backward passes. Under
``torch.no_grad`` (or nothing requiring grad) the forward is 2 GEMMs per chunk and saves nothing.

Memory beyond the inputs and the returned gradients dh_s (N, H_s), dW_s (V, H_s), db_s (V,):
the two (C, V) buffers (``memory_budget`` bounds them together; default
``tiling.LINEAR_CE_LOGITS_BUDGET`` = 512 MiB), the (N,) fp32 loss rows, a (V,) fp32 db
accumulator, and with ``reduction="none"`` the (N, 8) fp32 statistics. At 8192 tokens × 4096
(both hidden sizes) × 128256 classes in bf16: C = 1024 tokens, two 250.5 MiB buffers = 501 MiB,
plus < 1 MiB of row vectors — the teacher's gradients are never formed (it gets none).

``shared_vocab`` (heads of different sizes): only the first ``shared_vocab`` rows of each head
are multiplied (a view of the weights, no copy); the student's other rows get a zero gradient.

Read top-down: the launchers, the ``probact_gpu::linear_distillation`` and
``probact_gpu::linear_distillation_bwd`` torch.library ops with fake implementations, autograd,
and the public function.
"""

from __future__ import annotations

import torch

from .. import tiling
from .._runtime import (
    accum_dtype,
    autocast_fp32,
    autocast_linear,
    check_runnable,
    check_same_device,
    empty,
)
from ..options import DistillationOptions, fold_head_factor, split_student_factors
from ._autograd import refuse_transforms
from ._common import (
    LinearGrads,
    check_chunking,
    chunk_logits,
    fake_linear_grads,
    flatten_head_input,
    no_second_derivative,
    token_chunks,
)
from .distillation import (
    N_STATS,
    check_math_dtypes,
    check_target_mask,
    check_teacher_no_grad,
    distillation_bwd,
    distillation_fwd,
    shared_classes,
)
from .linear_cross_entropy import _scale_grads_op

__all__ = ["linear_distillation_bwd", "linear_distillation_fwd", "linear_distillation_loss"]

_NO_GRADS = (False, False, False)


class _HeadGrads(LinearGrads):
    """:class:`LinearGrads` of a head of which only the first ``n`` rows make logits: dW and db
    are allocated at the head's full size, rows past ``n`` zero, and the chunks write into the
    first ``n`` rows (no second (V, H) buffer)."""

    def __init__(self, h, weight, bias, need, n: int):
        super().__init__(h, weight[:n], None if bias is None else bias[:n],
                         (need[0], False, need[2]))
        self.n = n
        self.full_dw = None
        if need[1]:
            self.full_dw = empty(weight.shape, weight.dtype, weight.device)
            if n < weight.shape[0]:
                self.full_dw[n:].zero_()
            self.dw = self.full_dw[:n]

    def results(self, h, weight, bias):
        n = self.n
        dh, dw, db = super().results(h, weight[:n], None if bias is None else bias[:n])
        if self.full_dw is not None:
            dw = self.full_dw
        if self.db_acc is not None and n < bias.shape[0]:
            db = torch.cat([db, db.new_zeros(bias.shape[0] - n)])
        return dh, dw, db


def _divisor(options: DistillationOptions, target: torch.Tensor | None, n_tokens: int,
             dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """What the summed loss and its gradient are divided by, a 0-d device tensor (no sync):
    the kept tokens (at least 1) for ``mean``, the ``normalizer`` for ``sum``, else None."""
    if options.reduction == "mean":
        if target is None:
            return torch.full((), max(n_tokens, 1), dtype=dtype, device=device)
        return (target != options.ignore_index).sum().clamp_min(1).to(dtype)
    n = options.normalizer
    if options.reduction == "none" or n is None:
        return None
    if isinstance(n, torch.Tensor):
        return n.to(device=device, dtype=dtype)
    return torch.full((), n, dtype=dtype, device=device)


def _buffers(h_s, h_t, n, chunk):
    c = min(chunk, h_s.shape[0])
    return (torch.empty((c, n), dtype=h_s.dtype, device=h_s.device),
            torch.empty((c, n), dtype=h_t.dtype, device=h_t.device))


def _chunk_pair(h_s, w_s, b_s, h_t, w_t, b_t, start, end, bufs):
    """Both heads' logits of tokens ``[start, end)`` in the reused buffers."""
    return (chunk_logits(h_s[start:end], w_s, b_s, bufs[0][: end - start]),
            chunk_logits(h_t[start:end], w_t, b_t, bufs[1][: end - start]))


def _heads(n, *tensors):
    return tuple(None if t is None else t[:n] for t in tensors)


def linear_distillation_fwd(h_s, w_s, b_s, h_t, w_t, b_t, target, *,
                            options: DistillationOptions, n_cols: int, chunk: int,
                            need: tuple[bool, bool, bool] = _NO_GRADS):
    """``(loss, stats, dh_s, dW_s, db_s)`` of 2-D hidden states: ``loss`` reduced as
    ``options.reduction`` says (rows (N,) for ``none``); with ``need`` and a reduced loss the
    student's gradients for grad_output 1, else empty tensors; ``stats`` (N, 8) for the
    recomputing backward of ``none`` when a gradient is needed, else empty."""
    n_tokens = h_s.shape[0]
    sdt, device = accum_dtype(h_s), h_s.device
    ws, bs, wt, bt = _heads(n_cols, w_s, b_s, w_t, b_t)
    grads_now = options.reduction != "none" and any(need)
    keep_stats = options.reduction == "none" and any(need)
    grads = _HeadGrads(h_s, w_s, b_s, need if grads_now else _NO_GRADS, n_cols)
    rows = empty((n_tokens,), sdt, device)
    stats = empty((n_tokens, N_STATS), sdt, device) if keep_stats else None
    divisor = _divisor(options, target, n_tokens, sdt, device)
    g = (torch.ones((), dtype=sdt, device=device) if divisor is None
         else torch.reciprocal(divisor)) if grads_now else None
    if n_tokens:
        bufs = _buffers(h_s, h_t, n_cols, chunk)
        for start, end in token_chunks(n_tokens, chunk):
            s, t = _chunk_pair(h_s, ws, bs, h_t, wt, bt, start, end, bufs)
            tgt = None if target is None else target[start:end]
            part, part_stats = distillation_fwd(s, t, tgt, options=options, n_cols=n_cols,
                                                save_stats=grads_now or keep_stats)
            rows[start:end] = part
            if keep_stats:
                stats[start:end] = part_stats
            if grads_now:
                dz = distillation_bwd(s, t, tgt, part_stats, g, options=options,
                                      n_cols=n_cols, out=s)
                grads.add_chunk(start, end, dz, h_s[start:end], ws)
    if options.reduction == "none":
        loss = rows
    else:
        loss = rows.sum() if divisor is None else rows.sum() / divisor
    return (loss, h_s.new_empty(0, dtype=sdt) if stats is None else stats,
            *grads.results(h_s, w_s, b_s))


def linear_distillation_bwd(h_s, w_s, b_s, h_t, w_t, b_t, target, stats, grad_rows, *,
                            options: DistillationOptions, n_cols: int, chunk: int,
                            need: tuple[bool, bool, bool]):
    """(dh_s, dW_s, db_s) for per-token ``grad_rows`` (N,) from the saved ``stats``, both
    chunks' logits recomputed, the student's overwritten with dz (module docstring)."""
    ws, bs, wt, bt = _heads(n_cols, w_s, b_s, w_t, b_t)
    grads = _HeadGrads(h_s, w_s, b_s, need, n_cols)
    if any(need) and h_s.shape[0]:
        bufs = _buffers(h_s, h_t, n_cols, chunk)
        for start, end in token_chunks(h_s.shape[0], chunk):
            s, t = _chunk_pair(h_s, ws, bs, h_t, wt, bt, start, end, bufs)
            dz = distillation_bwd(s, t, None if target is None else target[start:end],
                                  stats[start:end], grad_rows[start:end], options=options,
                                  n_cols=n_cols, out=s)
            grads.add_chunk(start, end, dz, h_s[start:end], ws)
    return grads.results(h_s, w_s, b_s)


# --------------------------------------------------------------------------- custom ops
# The options cross as DistillationOptions.schema_args() (13 values), then the reduction, the
# normalizer (tensor or number), the token chunk and the gradients wanted.


def _options(schema, reduction, normalizer, normalizer_value) -> DistillationOptions:
    return DistillationOptions.from_schema(
        *schema, reduction=reduction,
        normalizer=normalizer if normalizer is not None else normalizer_value)


@torch.library.custom_op("probact_gpu::linear_distillation", mutates_args=())
def _ld_op(
    h_s: torch.Tensor, w_s: torch.Tensor, b_s: torch.Tensor | None, h_t: torch.Tensor,
    w_t: torch.Tensor, b_t: torch.Tensor | None, target: torch.Tensor | None, divergence: str,
    beta: float, temperature: float, ignore_index: int, hard_weight: float,
    temperature_squared: bool, shared_vocab: int | None, s_logit_scale: float,
    s_logit_divisor: float, s_softcap: float | None, t_logit_scale: float,
    t_logit_divisor: float, t_softcap: float | None, reduction: str,
    normalizer: torch.Tensor | None, normalizer_value: float | None, chunk: int,
    need_grads: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats, dh_s, dW_s, db_s) of 2-D hidden states (module docstring)."""
    options = _options((divergence, beta, temperature, ignore_index, hard_weight,
                        temperature_squared, shared_vocab, s_logit_scale, s_logit_divisor,
                        s_softcap, t_logit_scale, t_logit_divisor, t_softcap), reduction,
                       normalizer, normalizer_value)
    if h_s.shape[0] > 0:
        check_runnable(h_s, "student_input")
    n_cols = shared_vocab or w_s.shape[0]
    return linear_distillation_fwd(h_s, w_s, b_s, h_t, w_t, b_t, target, options=options,
                                   n_cols=n_cols, chunk=chunk, need=tuple(need_grads))


@_ld_op.register_fake
def _(h_s, w_s, b_s, h_t, w_t, b_t, target, *args):
    reduction, need = args[13], args[-1]
    n = h_s.shape[0]
    sdt = accum_dtype(h_s)
    loss = h_s.new_empty((n,) if reduction == "none" else (), dtype=sdt)
    keep = reduction == "none" and any(need)
    stats = h_s.new_empty((n, N_STATS) if keep else (0,), dtype=sdt)
    now = reduction != "none"
    return (loss, stats, *fake_linear_grads(h_s, w_s, b_s, [now and g for g in need]))


@torch.library.custom_op("probact_gpu::linear_distillation_bwd", mutates_args=())
def _ld_bwd_op(
    h_s: torch.Tensor, w_s: torch.Tensor, b_s: torch.Tensor | None, h_t: torch.Tensor,
    w_t: torch.Tensor, b_t: torch.Tensor | None, target: torch.Tensor | None,
    stats: torch.Tensor, grad_rows: torch.Tensor, divergence: str, beta: float,
    temperature: float, ignore_index: int, hard_weight: float, temperature_squared: bool,
    shared_vocab: int | None, s_logit_scale: float, s_logit_divisor: float,
    s_softcap: float | None, t_logit_scale: float, t_logit_divisor: float,
    t_softcap: float | None, chunk: int, need_grads: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh_s, dW_s, db_s) for per-token ``grad_rows`` (N,), empty where not needed."""
    options = _options((divergence, beta, temperature, ignore_index, hard_weight,
                        temperature_squared, shared_vocab, s_logit_scale, s_logit_divisor,
                        s_softcap, t_logit_scale, t_logit_divisor, t_softcap), "none", None,
                       None)
    return linear_distillation_bwd(h_s, w_s, b_s, h_t, w_t, b_t, target, stats,
                                   grad_rows.contiguous(), options=options,
                                   n_cols=shared_vocab or w_s.shape[0], chunk=chunk,
                                   need=tuple(need_grads))


@_ld_bwd_op.register_fake
def _(h_s, w_s, b_s, h_t, w_t, b_t, target, stats, grad_rows, *args):
    return fake_linear_grads(h_s, w_s, b_s, args[-1])


_NS = DistillationOptions.N_SCHEMA_ARGS


def _setup_context(ctx, inputs, output):
    h_s, w_s, b_s, h_t, w_t, b_t, target = inputs[:7]
    ctx.schema = inputs[7:7 + _NS]
    reduction, _, _, chunk, need = inputs[7 + _NS:]
    ctx.chunk, ctx.need, ctx.has_bias = chunk, need, b_s is not None
    _, stats, dh, dw, db = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(stats, dh, dw, db)
    ctx.recompute = reduction == "none"
    if ctx.recompute:
        ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, target, stats)
    else:
        ctx.save_for_backward(dh, dw, db)


def _backward(ctx, grad_loss, _gs, _gdh, _gdw, _gdb):
    no_second_derivative("linear_distillation_loss")
    need = ctx.need
    none = (None,) * (4 + _NS + 5)
    if grad_loss is None:
        return (None,) * 3 + none
    if ctx.recompute:
        h_s, w_s, b_s, h_t, w_t, b_t, target, stats = ctx.saved_tensors
        dh, dw, db = _ld_bwd_op(h_s, w_s, b_s, h_t, w_t, b_t, target, stats,
                                grad_loss.to(stats.dtype), *ctx.schema, ctx.chunk, need)
    else:
        try:
            dh, dw, db = ctx.saved_tensors
        except RuntimeError as exc:
            raise RuntimeError(
                "linear_distillation_loss with reduction='sum'/'mean' computes its gradients "
                "in the forward and scales them in place in the backward, so it can be "
                "backpropagated once; use reduction='none' and reduce outside to "
                "backpropagate several times") from exc
        _scale_grads_op(dh, dw, db, grad_loss)
    return (dh if need[0] else None, dw if need[1] else None,
            db if need[2] and ctx.has_bias else None) + none


torch.library.register_autograd("probact_gpu::linear_distillation", _backward,
                                setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def _check_head(name_in: str, name_w: str, name_b: str, h, w, b) -> None:
    from .._runtime import check_float

    check_float(name_in, h)
    check_float(name_w, w)
    if w.ndim != 2:
        raise ValueError(f"{name_w} must be 2-D (V, H), got shape {tuple(w.shape)}")
    if h.ndim < 1 or h.shape[-1] != w.shape[1]:
        raise ValueError(f"{name_in}'s last dim must be the hidden size {w.shape[1]} of "
                         f"{name_w} {tuple(w.shape)}, got {name_in} shape {tuple(h.shape)}")
    if w.dtype != h.dtype:
        raise TypeError(f"{name_w} dtype {w.dtype} must match {name_in} dtype {h.dtype}")
    if w.shape[0] == 0:
        raise ValueError(f"{name_w} must have at least one class (row), got shape "
                         f"{tuple(w.shape)}")
    if b is not None:
        check_float(name_b, b)
        if tuple(b.shape) != (w.shape[0],) or b.dtype != h.dtype:
            raise ValueError(f"{name_b} must be ({w.shape[0]},) of dtype {h.dtype}, got shape "
                             f"{tuple(b.shape)}, dtype {b.dtype}")


def linear_distillation_loss(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    hard_weight: float = 0.0,
    temperature_squared: bool = False,
    shared_vocab: int | None = None,
    student_logit_scale: float | torch.Tensor = 1.0,
    student_logit_divisor: float | torch.Tensor = 1.0,
    student_softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_logit_divisor: float = 1.0,
    teacher_softcap: float | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> torch.Tensor:
    """:func:`probact_gpu.distillation_loss` of ``student_input @ student_weight.T +
    student_bias`` and ``teacher_input @ teacher_weight.T + teacher_bias`` without holding
    either head's logits (module docstring: chunks, GEMMs, memory).

    - ``student_input`` (…, H_s) with ``student_weight`` (V_s, H_s) (``nn.Linear`` layout, the
      same dtype) and ``student_bias`` (V_s,) or None; ``teacher_input`` (…, H_t) with
      ``teacher_weight`` (V_t, H_t), ``teacher_bias``: the same leading (token) dims, hidden
      sizes free. ``target`` (…) or None: the mask (and the hard term's labels).
    - Every other option as :func:`probact_gpu.distillation_loss` (each bias is added before its
      head's transform; a tensor ``student_logit_scale`` / ``student_logit_divisor`` is folded
      into the student's input and bias, as ``linear_cross_entropy`` folds its own, and gets
      its gradient).
    - ``chunk_size`` (tokens per chunk) or ``memory_budget`` (bytes of both heads' (C, V)
      logits per chunk; default ``tiling.LINEAR_CE_LOGITS_BUDGET``).

    Gradients flow to the student's input, weight and bias; a teacher tensor that requires
    grad while gradients are enabled raises. With ``reduction="mean"``/``"sum"`` the gradients
    are computed in the forward (4 GEMMs per chunk) and the loss can be backpropagated once;
    ``"none"`` recomputes in the backward. Returns the loss in the student input's dtype
    (float32 under autocast, as kl_div).
    """
    factor, transforms = split_student_factors(
        temperature=temperature, student_logit_scale=student_logit_scale,
        student_logit_divisor=student_logit_divisor, student_softcap=student_softcap,
        teacher_logit_scale=teacher_logit_scale, teacher_logit_divisor=teacher_logit_divisor,
        teacher_softcap=teacher_softcap)
    options = DistillationOptions.from_kwargs(
        divergence=divergence, beta=beta, ignore_index=ignore_index,
        reduction=reduction, normalizer=normalizer, hard_weight=hard_weight,
        temperature_squared=temperature_squared, shared_vocab=shared_vocab, **transforms)
    chunk_size, memory_budget, _ = check_chunking(chunk_size, memory_budget)
    _check_head("student_input", "student_weight", "student_bias", student_input,
                student_weight, student_bias)
    _check_head("teacher_input", "teacher_weight", "teacher_bias", teacher_input,
                teacher_weight, teacher_bias)
    batch = tuple(student_input.shape[:-1])
    if tuple(teacher_input.shape[:-1]) != batch:
        raise ValueError(f"student_input {tuple(student_input.shape)} and teacher_input "
                         f"{tuple(teacher_input.shape)} must have the same leading (token) dims")
    names = ("student_weight", "teacher_weight")
    check_math_dtypes(student_weight, teacher_weight, names)
    n_cols = shared_classes(student_weight.shape[0], teacher_weight.shape[0], options, names)
    check_target_mask(target, batch, options)
    norm = options.normalizer if isinstance(options.normalizer, torch.Tensor) else None
    check_same_device(student_input=student_input, student_weight=student_weight,
                      student_bias=student_bias, teacher_input=teacher_input,
                      teacher_weight=teacher_weight, teacher_bias=teacher_bias, target=target,
                      normalizer=norm)
    check_teacher_no_grad(teacher_input=teacher_input, teacher_weight=teacher_weight,
                          teacher_bias=teacher_bias)
    # its gradients are formed in the forward, chunk by chunk: reverse mode only (the logits
    # form, distillation_loss, has forward-mode AD and torch.func)
    refuse_transforms("linear_distillation_loss", student_input, student_weight, student_bias,
                      teacher_input, teacher_weight, teacher_bias)
    # Under autocast the heads follow F.linear (operands cast to the autocast dtype) and the
    # loss kl_div (float32 for 16-bit operands), as the unfused composition would.
    loss_dtype = (torch.float32 if autocast_fp32("distillation_loss", student_input,
                                                 student_weight) else student_input.dtype)
    student_input, student_weight, student_bias = autocast_linear(student_input, student_weight,
                                                                  student_bias)
    teacher_input, teacher_weight, teacher_bias = autocast_linear(teacher_input, teacher_weight,
                                                                  teacher_bias)
    student_input, student_bias = fold_head_factor(student_input, student_bias, factor)
    h_s, _ = flatten_head_input(student_input, student_weight.shape[1])
    h_t, _ = flatten_head_input(teacher_input, teacher_weight.shape[1])
    if h_s.shape[0] > 0 and not h_s.is_meta:  # meta: the fake implementations infer the outputs
        check_runnable(h_s, "student_input")
    per_token = n_cols * (h_s.element_size() + h_t.element_size())
    chunk = chunk_size or tiling.choose_distillation_token_chunk(h_s.shape[0], per_token,
                                                                  memory_budget)
    grad_on = torch.is_grad_enabled()
    need = [grad_on and student_input.requires_grad, grad_on and student_weight.requires_grad,
            grad_on and student_bias is not None and student_bias.requires_grad]
    n = options.normalizer
    loss, *_ = _ld_op(h_s, student_weight, student_bias, h_t, teacher_weight, teacher_bias,
                      None if target is None else target.reshape(-1), *options.schema_args(),
                      options.reduction, n if isinstance(n, torch.Tensor) else None,
                      None if isinstance(n, torch.Tensor) else n, chunk, need)
    if options.reduction == "none":
        loss = loss.reshape(batch)
    return loss.to(loss_dtype)
