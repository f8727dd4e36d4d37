"""Fused linear + cross-entropy for LM heads: ``cross_entropy(input @ linear_weight.T +
linear_bias, target)`` without ever holding the (tokens × vocab) logits; torch 2.13's
``F.linear_cross_entropy`` names (``weight`` are per-class weights).

Tokens are processed in chunks of ``C`` rows (``tiling.choose_token_chunk``: ``chunk_size``
tokens, or as many as fit ``memory_budget`` bytes of logits). Per chunk, with ``h`` (C, H),
``W`` (V, H) (``ops._common`` holds these steps, shared with the vocab-parallel op):

    logits = h @ W.T + b               cuBLAS, into one reused (C, V) buffer
    loss, lse, dlogits                 our CE kernel (it applies the logit transform in fp32),
                                       dlogits written over the logits (in place)
    dh[chunk]  = dlogits @ W           cuBLAS (fp32 accumulation inside, one rounding)
    dW        += dlogits.T @ h         in the GEMM's fp32 accumulator, one rounding per chunk
    db        += Σ_rows dlogits        fp32

For ``reduction`` "sum"/"mean" the gradients are computed in the forward (3 matmuls in all, as
eager) and the backward only multiplies them by ``grad_output`` on the device, in place (a no-op
kernel when it is 1), so such a loss can be backpropagated once; a second backward through the
same graph raises. For "none" the per-token ``grad_output`` is only known in the backward, which
recomputes the logits and scales each *row* of dlogits before the two gradient matmuls (4
matmuls in all) — never scaling after dW was summed over tokens. It walks the vocabulary as
``low_memory`` does (below), in blocks as large as a token chunk's buffer, so dW is rounded
once. The divisor of
"mean" (Σ w_t) and the ``normalizer`` of "sum" divide dlogits inside the CE kernel.

**Memory model** (beyond the inputs and the returned gradients dh (N, H), dW (V, H), db (V,)),
default mode, at 8192 × 4096 × 128256 bf16 (C = 2048 tokens a chunk):

- the (C, V) logits buffer: 501 MiB (``tiling.LINEAR_CE_LOGITS_BUDGET``), which the CE kernel
  overwrites with dlogits;
- (N,) fp32 loss rows and lse, a (V,) fp32 db accumulator, the mean's 0-d divisor: < 1 MiB.

So ≈ 0.5 GiB, where an fp32 (V, H) dW accumulator (2 GiB, zero-filled, read and written by
every chunk, then cast) plus autograd's (V, H) zero gradient for the non-differentiable outputs
cost ~3.5 GiB. Here dW is allocated once in the weight's dtype and each chunk after the first
adds into it by ``addmm_``, whose GEMM accumulates in fp32 and rounds once
(``ops._common.LinearGrads``); ``set_materialize_grads(False)`` means no zero gradients are
made; the saved gradients are handed to autograd, which keeps them as ``.grad`` without a copy.
tests/test_linear_cross_entropy.py counts every allocation at a scaled-down shape
(test_linear_ce_default_mode_memory_model). Precision: dW of a 16-bit head is rounded once per
token chunk (4 times here); its largest error against float64 stays within eager bf16's, whose
logits and dlogits are rounded too (test_linear_ce_bf16_dw_accuracy_vs_eager), its RMS error is
~1.15× eager's at 4 chunks and grows as √k with k chunks; the recomputing backward ("none",
``low_memory``) rounds dW once.

``low_memory=True`` trades one matmul for the in-forward gradients: the forward only computes
the loss and lse (token chunks, 1 matmul); the backward walks the vocabulary in blocks of
``V_c`` classes (``tiling.choose_vocab_chunk``): the (N, V_c) logits block is recomputed (1
matmul), our CE gradient kernel overwrites it in place (with ``vocab_start``, as one shard of a
vocab-parallel head), and it gives ``dW[v0:v1]`` directly — cuBLAS reduces over all N tokens
in fp32 and rounds once — while ``dh`` accumulates in an (N, H) fp32 buffer. Extra memory: the
(N, V_c) block plus (N, H) fp32; 4 matmuls in all. The gradients then come from the backward,
so any ``grad_output`` and any number of backward passes work.

**Class-probability targets** (float, (…, V), as torch): a chunked path of torch ops in fp32
(z = transform(logits), ``loss_row = Σ_c w_c t'_c (lse − z_c) + z_loss · lse²`` with
``t' = (1 − ε) t + ε / V``; "mean" divides by the number of rows, as torch). Its backward
recomputes each chunk (``dz = (Σ_c w_c t'_c + 2 z_loss lse) p − w ⊙ t'``, through the
transform's chain rule), so it supports any ``grad_output`` and repeated backward passes;
``ignore_index`` does not apply and ``low_memory`` changes nothing. Targets and per-class weights
that require grad get their gradients there too, as torch's (``d row / d t_c = (1 − ε) w_c
(lse − z_c)``, ``d row / d w_c = ((1 − ε) t_c + ε / V) (lse − z_c)``). With class-index
targets per-class weights that require grad are refused, as torch refuses them.

Second derivatives are not supported (every path raises in a backward run with
``create_graph=True``, and under nested ``torch.func`` transforms). Forward-mode AD gets the
loss's tangent from ``linear_cross_entropy_jvp`` (token chunks: the logits' gradient for
grad_output 1 against ``ḣ Wᵀ + h Ẇᵀ + ḃ``, never the (N, V) logits); under ``torch.func`` the
backward recomputes (as ``low_memory``). Class-probability targets under forward-mode AD or
``torch.func`` run through the materialised logits (``cross_entropy``'s differentiable ops).
No host sync in forward or backward.
"""

from __future__ import annotations

import torch

from .. import tiling
from .._runtime import accum_dtype, autocast_fp32, autocast_linear, check_runnable, empty
from ..options import CrossEntropyOptions, fold_head_factor, split_tensor_factors
from ._autograd import (
    differentiable_op,
    forward_ad_possible,
    functorch_active,
    kernel_backward,
    refuse_transforms,
    register_vmap_loop,
    terminal_op,
)
from ._common import (
    LinearGrads,
    accumulate_fp32,
    ce_launch_options,
    check_chunking,
    check_head_inputs,
    chunk_logits,
    fake_linear_grads,
    flatten_head_input,
    logits_chunks,
    loss_divisors,
    no_second_derivative,
    reduce_rows,
    token_chunk,
    token_chunks,
)
from .cross_entropy import cross_entropy_fwd, cross_entropy_grad, cross_entropy_scale_grad

_NO_GRADS = (False, False, False)


# --------------------------------------------------------------------------- launchers


def linear_cross_entropy_fwd(
    h: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None = None,
    *,
    options: CrossEntropyOptions | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    low_memory: bool = False,
    need_grads: tuple[bool, bool, bool] = _NO_GRADS,
) -> tuple[torch.Tensor, ...]:
    """Loss of ``cross_entropy(h @ linear_weight.T + linear_bias, target)`` for 2-D ``h`` (N, H)
    and class-index ``target`` (N,); returns ``(loss, lse, dh, dW, db)``. ``loss`` is reduced as
    ``options.reduction`` says and ``lse`` is (N,), both fp32 (fp64 for fp64 input). With
    ``need_grads`` (dh, dW, db), reduction "sum"/"mean" and not ``low_memory``, those gradients
    of the reduced loss for grad_output 1; else empty tensors (the backward recomputes them)."""
    options = options or CrossEntropyOptions()
    n_tokens, n_classes = h.shape[0], linear_weight.shape[0]
    chunk = token_chunk(n_tokens, n_classes, h.element_size(), chunk_size, memory_budget)
    grads_now = not low_memory and options.reduction != "none" and any(need_grads)
    grads = LinearGrads(h, linear_weight, linear_bias, need_grads if grads_now else _NO_GRADS)
    stats_dtype = accum_dtype(h)
    loss_rows = torch.empty(n_tokens, dtype=stats_dtype, device=h.device)
    lse = torch.empty(n_tokens, dtype=stats_dtype, device=h.device)
    divisor, z_scale = loss_divisors(options, target, n_classes, stats_dtype)
    mean = options.reduction == "mean"
    for start, end, logits in logits_chunks(h, linear_weight, linear_bias, chunk):
        rows, row_lse, dlogits = cross_entropy_fwd(
            logits, target[start:end], options=options, compute_grad=grads_now,
            grad_out=logits if grads_now else None, total_weight=divisor if mean else None,
            z_scale=z_scale)
        loss_rows[start:end] = rows
        lse[start:end] = row_lse
        if grads_now:
            grads.add_chunk(start, end, dlogits, h[start:end], linear_weight)
    loss = reduce_rows(loss_rows, options, divisor)
    return (loss, lse, *grads.results(h, linear_weight, linear_bias))


def linear_cross_entropy_bwd(
    h: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None,
    lse: torch.Tensor,
    grad_output: torch.Tensor,
    *,
    options: CrossEntropyOptions | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    low_memory: bool = False,
    need_grads: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients recomputed from the forward's ``lse``, for ``grad_output`` (one per token for
    ``reduction="none"``, else 0-d), walking the vocabulary: each (N, V_c) block of logits is
    recomputed, each row of its dlogits scaled by its grad_output (and the mean's divisor or the
    normalizer) *before* the gradient matmuls, and it gives its rows of dW directly (cuBLAS
    reduces over all N tokens in fp32 and rounds once) while dh accumulates in an (N, H) fp32
    buffer; nothing (V, H)-sized but dW itself is allocated. ``V_c``: ``chunk_size`` classes
    with ``low_memory`` (else the block as large as a token chunk's (C, V) buffer would be), or
    as many as fit ``memory_budget`` (``tiling.choose_vocab_chunk``). Returns (dh, dW, db),
    empty where not needed."""
    options = options or CrossEntropyOptions()
    n_tokens, n_classes = h.shape[0], linear_weight.shape[0]
    divisor, z_scale = loss_divisors(options, target, n_classes, lse.dtype)
    ce = dict(ce_launch_options(options), divisor=divisor, z_scale=z_scale)
    elem = h.element_size()
    if low_memory:
        vocab_chunk = chunk_size or tiling.choose_vocab_chunk(n_tokens, n_classes, elem,
                                                              memory_budget)
    else:
        tokens = token_chunk(n_tokens, n_classes, elem, chunk_size, memory_budget)
        vocab_chunk = tiling.choose_vocab_chunk(n_tokens, n_classes, elem,
                                                max(1, tokens * n_classes * elem))
    return vocab_walk_bwd(h, linear_weight, target, linear_bias, lse, grad_output, ce,
                          vocab_chunk, need_grads)


def vocab_walk_bwd(h, weight, target, bias, lse, grad_output, ce, chunk, need_grads, *,
                   vocab_start=0, n_classes=None):
    """The recomputing backward of a linear head over blocks of ``chunk`` of its classes
    (linear_cross_entropy_bwd); also one rank's shard of a vocab-parallel head, whose classes
    start at global ``vocab_start`` of ``n_classes`` (default: the head's own). ``ce``: the CE
    gradient launcher's keywords (``ce_launch_options`` and the divisor). Returns (dh, dW, db),
    dh from an fp32 (N, H) accumulator, empty where not needed."""
    n_tokens, v_local = h.shape[0], weight.shape[0]
    n_classes = v_local if n_classes is None else n_classes
    need_dh, need_dw, need_db = need_grads
    dh_acc = torch.zeros(h.shape, dtype=accum_dtype(h), device=h.device) if need_dh else None
    dw = empty(weight.shape, weight.dtype, weight.device) if need_dw else weight.new_empty(0)
    db = empty(bias.shape, bias.dtype, bias.device) if need_db else weight.new_empty(0)
    buffer = torch.empty(n_tokens * min(chunk, v_local), dtype=h.dtype, device=h.device)
    for v0, v1 in token_chunks(v_local, chunk):
        logits = chunk_logits(h, weight[v0:v1], None if bias is None else bias[v0:v1],
                              buffer[: n_tokens * (v1 - v0)].view(n_tokens, v1 - v0))
        dlogits = cross_entropy_grad(logits, target, lse, grad_output,
                                     vocab_start=vocab_start + v0, n_classes=n_classes,
                                     out=logits, **ce)
        if need_dw:
            torch.mm(dlogits.t(), h, out=dw[v0:v1])
        if need_db:
            db[v0:v1] = dlogits.sum(0, dtype=accum_dtype(bias))
        if need_dh:
            accumulate_fp32(dh_acc, dlogits, weight[v0:v1])
    dh = h.new_empty(0) if dh_acc is None else dh_acc.to(h.dtype)
    return dh, dw, db


def linear_cross_entropy_jvp(h, weight, target, bias, lse, h_dot, w_dot, b_dot, *, options,
                             chunk, vocab_start=0, n_classes=None):
    """The loss's forward-mode tangent for tangents ``ḣ``, ``Ẇ``, ``ḃ`` (each may be None):
    per token chunk, the logits ``x = h Wᵀ + b`` as the forward forms them, their gradient
    ``G`` for grad_output 1 in the math dtype (the CE gradient kernel, with the loss's own
    divisors), ``ẋ = ḣ Wᵀ + h Ẇᵀ + ḃ`` accumulated in the math dtype, and ``Σ_c G ⊙ ẋ`` per
    token (``none``) or in all (sum / mean). One (C, V) buffer of each; (N,) or 0-d result.
    ``vocab_start`` / ``n_classes``: the head's rows are global classes ``[vocab_start,
    vocab_start + V)`` of ``n_classes`` (one rank's share of a vocab-parallel tangent)."""
    n_tokens = h.shape[0]
    n_classes = weight.shape[0] if n_classes is None else n_classes
    math = accum_dtype(h)
    divisor, z_scale = loss_divisors(options, target, n_classes, math)
    none = options.reduction == "none"
    ce = dict(ce_launch_options(options), divisor=divisor, z_scale=z_scale,
              vocab_start=vocab_start, n_classes=n_classes)
    rows = torch.zeros(n_tokens, dtype=math, device=h.device)
    one = torch.ones((), dtype=math, device=h.device)
    for start, end, logits in logits_chunks(h, weight, bias, chunk):
        g = one.expand(end - start) if none else one
        slope = cross_entropy_grad(logits, target[start:end], lse[start:end], g,
                                   out=torch.empty(logits.shape, dtype=math, device=h.device),
                                   **ce)
        x_dot = torch.zeros(logits.shape, dtype=math, device=h.device)
        if h_dot is not None:
            accumulate_fp32(x_dot, h_dot[start:end], weight.t())
        if w_dot is not None:
            accumulate_fp32(x_dot, h[start:end], w_dot.t())
        if b_dot is not None:
            x_dot += b_dot.to(math)
        rows[start:end] = (slope * x_dot).sum(1)
    return rows if none else rows.sum()


# --------------------------------------------------------------------------- custom ops
# Options cross the torch.library boundary as CrossEntropyOptions.schema_args() (11 values, native
# schema types), then the chunking arguments.


@torch.library.custom_op("probact_gpu::linear_cross_entropy", mutates_args=())
def _lce_op(
    h: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
    linear_bias: torch.Tensor | None, weight: torch.Tensor | None, ignore_index: int,
    reduction: str, label_smoothing: float, z_loss: float, logit_scale: float,
    logit_divisor: float, softcap: float | None, temperature: float,
    normalizer: torch.Tensor | None, normalizer_value: float | None, chunk_size: int | None,
    memory_budget: int | None, low_memory: bool, need_grads: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    options = CrossEntropyOptions.from_schema(
        weight, ignore_index, reduction, label_smoothing, z_loss, logit_scale, logit_divisor,
        softcap, temperature, normalizer, normalizer_value)
    return linear_cross_entropy_fwd(
        h, linear_weight, target, linear_bias, options=options, chunk_size=chunk_size,
        memory_budget=memory_budget, low_memory=low_memory, need_grads=tuple(need_grads))


@_lce_op.register_fake
def _(h, linear_weight, target, linear_bias, *args):
    reduction, low_memory, need_grads = args[2], args[-2], args[-1]
    n = h.shape[0]
    now = not low_memory and reduction != "none"
    stats_dtype = accum_dtype(h)
    loss = h.new_empty((n,) if reduction == "none" else (), dtype=stats_dtype)
    lse = h.new_empty((n,), dtype=stats_dtype)
    return (loss, lse, *fake_linear_grads(h, linear_weight, linear_bias,
                                    [now and g for g in need_grads]))


@torch.library.custom_op("probact_gpu::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd_op(
    h: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
    linear_bias: torch.Tensor | None, lse: torch.Tensor, grad_output: torch.Tensor,
    weight: torch.Tensor | None, ignore_index: int, reduction: str, label_smoothing: float,
    z_loss: float, logit_scale: float, logit_divisor: float, softcap: float | None,
    temperature: float, normalizer: torch.Tensor | None, normalizer_value: float | None,
    chunk_size: int | None, memory_budget: int | None, low_memory: bool, need_grads: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    options = CrossEntropyOptions.from_schema(
        weight, ignore_index, reduction, label_smoothing, z_loss, logit_scale, logit_divisor,
        softcap, temperature, normalizer, normalizer_value)
    return linear_cross_entropy_bwd(
        h, linear_weight, target, linear_bias, lse, grad_output, options=options,
        chunk_size=chunk_size, memory_budget=memory_budget, low_memory=low_memory,
        need_grads=tuple(need_grads))


@_lce_bwd_op.register_fake
def _(h, linear_weight, target, linear_bias, lse, grad_output, *args):
    return fake_linear_grads(h, linear_weight, linear_bias, args[-1])


@torch.library.custom_op("probact_gpu::scale_grads", mutates_args=("dh", "dw", "db"))
def _scale_grads_op(
    dh: torch.Tensor, dw: torch.Tensor, db: torch.Tensor, grad_output: torch.Tensor
) -> None:
    for g in (dh, dw, db):
        cross_entropy_scale_grad(g, grad_output)


@_scale_grads_op.register_fake
def _(dh, dw, db, grad_output):
    return None


@torch.library.custom_op("probact_gpu::linear_cross_entropy_jvp", mutates_args=())
def _lce_jvp_op(
    h: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
    linear_bias: torch.Tensor | None, lse: torch.Tensor, h_dot: torch.Tensor | None,
    w_dot: torch.Tensor | None, b_dot: torch.Tensor | None, weight: torch.Tensor | None,
    ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
    logit_scale: float, logit_divisor: float, softcap: float | None, temperature: float,
    normalizer: torch.Tensor | None, normalizer_value: float | None, chunk: int,
) -> torch.Tensor:
    """The loss's tangent (``linear_cross_entropy_jvp``), in the math dtype."""
    options = CrossEntropyOptions.from_schema(
        weight, ignore_index, reduction, label_smoothing, z_loss, logit_scale, logit_divisor,
        softcap, temperature, normalizer, normalizer_value)
    return linear_cross_entropy_jvp(h, linear_weight, target, linear_bias, lse, h_dot, w_dot,
                                    b_dot, options=options, chunk=chunk)


@_lce_jvp_op.register_fake
def _(h, linear_weight, target, linear_bias, lse, h_dot, w_dot, b_dot, weight, ignore_index,
      reduction, *args):
    return h.new_empty((h.shape[0],) if reduction == "none" else (), dtype=accum_dtype(h))


_N_OPTIONS = CrossEntropyOptions.N_SCHEMA_ARGS
_N_CHUNKING = 4  # chunk_size, memory_budget, low_memory, need_grads


def _setup_context(ctx, inputs, output):
    h, weight, target, bias = inputs[:4]
    ctx.schema = inputs[4:4 + _N_OPTIONS]
    ctx.chunking = inputs[4 + _N_OPTIONS:]
    ctx.has_bias = bias is not None
    _, lse, dh, dw, db = output
    # lse and the gradients are outputs no one differentiates: no zero gradients for them.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse, dh, dw, db)
    reduction, low_memory = ctx.schema[2], ctx.chunking[2]
    ctx.recompute = reduction == "none" or low_memory
    if ctx.recompute:
        ctx.save_for_backward(h, weight, target, bias, lse)
    else:
        ctx.save_for_backward(dh, dw, db)


@kernel_backward("probact_gpu.linear_cross_entropy")
def _backward(ctx, grad_loss, _grad_lse, _gdh, _gdw, _gdb):
    need = ctx.chunking[-1]
    none = (None,) * (_N_OPTIONS + _N_CHUNKING)
    if grad_loss is None:
        return (None,) * 4 + none
    if ctx.recompute:
        h, weight, target, bias, lse = ctx.saved_tensors
        dh, dw, db = _lce_bwd(h, weight, target, bias, lse, grad_loss.to(lse.dtype),
                              *ctx.schema, *ctx.chunking)
    else:
        # The saved gradients are for grad_output 1; they are scaled in place (no new dW-sized
        # buffer) and handed to autograd, which can then keep them as .grad without a copy. The
        # in-place scale bumps their version, so a second backward (retain_graph) — or one after
        # the caller mutated a gradient it was handed — cannot unpack them and raises here.
        try:
            dh, dw, db = ctx.saved_tensors
        except RuntimeError as exc:
            raise RuntimeError(
                "linear_cross_entropy with reduction='sum'/'mean' computes its gradients in the "
                "forward and scales them in place in the backward, so it can be backpropagated "
                "once (no retain_graph re-use); use reduction='none' and reduce outside, or "
                "low_memory=True, to backpropagate several times") from exc
        _scale_grads_op(dh, dw, db, grad_loss)
    return (dh if need[0] else None, dw if need[1] else None, None,
            db if need[2] and ctx.has_bias else None) + none


def _jvp(ctx, h_dot, w_dot, target_dot, b_dot, weight_dot, *rest):
    """Forward-mode rule: the loss's tangent from ``linear_cross_entropy_jvp``; lse and the
    gradients handed out are not differentiable. Class weights and a normalizer with tangents
    are refused, as in the backward."""
    if weight_dot is not None:
        raise RuntimeError("weight (per-class weights) has a forward-mode tangent, but with "
                           "class-index targets the loss is not differentiable with respect "
                           "to it (as torch's cross_entropy)")
    if rest[8] is not None:
        raise RuntimeError("normalizer has a forward-mode tangent: the loss is not "
                           "differentiated with respect to its normalizer (a count)")
    if h_dot is None and w_dot is None and b_dot is None:
        return (None,) * 5
    h, weight, target, bias, lse = ctx.saved_tensors
    chunk_size, memory_budget = ctx.chunking[:2]
    chunk = token_chunk(h.shape[0], weight.shape[0], h.element_size(), chunk_size,
                        memory_budget)
    tangent = _lce_jvp(h, weight, target, bias, lse, h_dot, w_dot, b_dot, *ctx.schema, chunk)
    return tangent, None, None, None, None


_lce = differentiable_op(_lce_op, _setup_context, _backward, _jvp,
                         lambda inputs, output: (*inputs[:4], output[1]))
_lce_bwd = terminal_op(_lce_bwd_op, "probact_gpu.linear_cross_entropy")
_lce_jvp = terminal_op(_lce_jvp_op, "probact_gpu.linear_cross_entropy")
for _op in (_lce_op, _lce_bwd_op, _lce_jvp_op):
    register_vmap_loop(_op)


# --------------------------------------------------------------------------- soft targets


def _transform_grad(transform, z: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """dL/dx from dL/dz for ``z = transform.apply(x)`` (the kernels' ``head_chain``)."""
    factor = transform.pre_scale * transform.inv_temperature
    if transform.softcap is None:
        return dz * factor if factor != 1.0 else dz
    r = z / (transform.softcap * transform.inv_temperature)
    return dz * (factor * (1.0 - r * r))


class _SoftTargetLinearCE(torch.autograd.Function):
    """Class-probability targets (module docstring): forward per token chunk in fp32 torch
    ops, backward recomputing each chunk. ``target`` (N, V) float and the per-class
    ``class_weight`` (V,) or None are inputs of their own, so they get their gradients (as
    torch's): with ``s = (1 − ε) t + ε / V`` and ``t' = w ⊙ s``, ``d row / d t_c = (1 − ε) w_c
    (lse − z_c)`` and ``d row / d w_c = s_c (lse − z_c)``."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, class_weight, options, chunk, loss_dtype):
        n_tokens, n_classes = h.shape[0], weight.shape[0]
        sdt = accum_dtype(h)
        rows = torch.empty(n_tokens, dtype=sdt, device=h.device)
        lse = torch.empty(n_tokens, dtype=sdt, device=h.device)
        buffer = torch.empty((min(chunk, n_tokens), n_classes), dtype=h.dtype, device=h.device)
        for start, end in token_chunks(n_tokens, chunk):
            z = options.transform.apply(
                chunk_logits(h[start:end], weight, bias, buffer[: end - start]).to(sdt))
            row_lse = torch.logsumexp(z, 1)
            t = _smoothed(target[start:end], options, class_weight, sdt)
            row = (t * (row_lse[:, None] - z)).sum(1)
            if options.z_loss:
                row = row + options.z_loss * row_lse * row_lse
            rows[start:end] = row
            lse[start:end] = row_lse
        divisor, _ = loss_divisors(options, target, n_classes, sdt)
        ctx.save_for_backward(h, weight, bias, target, class_weight, lse, divisor)
        ctx.options, ctx.chunk = options, chunk
        ctx.set_materialize_grads(False)
        return reduce_rows(rows, options, divisor).to(loss_dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        no_second_derivative("linear_cross_entropy")
        if grad_loss is None:
            return (None,) * 7
        h, weight, bias, target, class_weight, lse, divisor = ctx.saved_tensors
        options = ctx.options
        need = ctx.needs_input_grad
        need_target, need_class_weight = need[3], need[4]
        g = grad_loss.to(lse.dtype)
        if divisor is not None:
            g = g / divisor
        grads = LinearGrads(h, weight, bias, (need[0], need[1], need[2] and bias is not None))
        d_target = torch.empty_like(target) if need_target else None
        d_class_weight = (torch.zeros(weight.shape[0], dtype=lse.dtype, device=h.device)
                          if need_class_weight else None)
        eps = options.label_smoothing
        for start, end in token_chunks(h.shape[0], ctx.chunk):
            x = chunk_logits(h[start:end], weight, bias,
                             torch.empty((end - start, weight.shape[0]), dtype=h.dtype,
                                         device=h.device))
            z = options.transform.apply(x.to(lse.dtype))
            row_lse = lse[start:end, None]
            g_rows = g[start:end, None] if g.ndim == 1 else g
            if any(need[:3]):
                p = torch.exp(z - row_lse)
                t = _smoothed(target[start:end], options, class_weight, lse.dtype)
                coef = t.sum(1, keepdim=True)
                if options.z_loss:
                    coef = coef + 2.0 * options.z_loss * row_lse
                dz = (coef * p - t) * g_rows
                dlogits = _transform_grad(options.transform, z, dz).to(h.dtype)
                grads.add_chunk(start, end, dlogits, h[start:end], weight)
            if need_target or need_class_weight:
                nll = (row_lse - z) * g_rows  # g · (lse − z_c): d row / d t'_c
                if need_target:
                    dt = nll * (1.0 - eps)
                    if class_weight is not None:
                        dt = dt * class_weight.to(lse.dtype)
                    d_target[start:end] = dt
                if need_class_weight:
                    s = _smoothed(target[start:end], options, None, lse.dtype)
                    d_class_weight += (s * nll).sum(0)
        dh, dw, db = grads.results(h, weight, bias)
        return (dh if need[0] else None, dw if need[1] else None,
                db if need[2] and bias is not None else None, d_target,
                None if d_class_weight is None else d_class_weight.to(class_weight.dtype),
                None, None, None)


def _smoothed(target: torch.Tensor, options: CrossEntropyOptions, class_weight, dtype
              ) -> torch.Tensor:
    """``w ⊙ ((1 − ε) t + ε / V)`` in ``dtype`` (without ``w`` when ``class_weight`` is None)."""
    t = target.to(dtype)
    eps = options.label_smoothing
    if eps > 0.0:
        t = t * (1.0 - eps) + eps / t.shape[1]
    if class_weight is not None:
        t = t * class_weight.to(dtype)
    return t


# --------------------------------------------------------------------------- public function


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float | torch.Tensor = 1.0,
    logit_divisor: float | torch.Tensor = 1.0,
    temperature: float | torch.Tensor = 1.0,
    normalizer: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    low_memory: bool = False,
    batch_invariant: bool = False,
    fp32_precision: str = "ieee",
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
):
    """``probact_gpu.cross_entropy(input @ linear_weight.T + linear_bias, target, ...)`` without
    holding the logits; torch 2.13's ``F.linear_cross_entropy`` names and order.

    - ``input`` (…, H); ``linear_weight`` (V, H) (``nn.Linear`` layout), same dtype;
      ``linear_bias`` (V,) or None, added before the logit transform.
    - ``target``: (…) int64/int32 class indices, or (…, V) float class probabilities (torch's
      rule; ``ignore_index`` must then be left None, as torch: an explicit one raises).
    - ``weight``: per-class weights (V,); ``reduction``, ``ignore_index`` (None means -100 for
      class indices, as torch), ``label_smoothing``: torch's semantics. ``z_loss``,
      ``softcap``, ``logit_scale``, ``logit_divisor``, ``temperature``, ``normalizer``: as
      ``probact_gpu.cross_entropy`` (the transform runs inside the kernels, in fp32, after the
      bias). A 0-d tensor ``logit_scale`` / ``logit_divisor`` / ``temperature`` (say a learnt
      ``nn.Parameter``) is folded into the hidden states and the bias (``input · f``,
      ``linear_bias · f``: (N, H) and (V,) products, nothing logits-sized) in torch, so it
      gets its gradient, with no host read; refused as in ``cross_entropy``: a tensor
      temperature with a ``softcap``, a ``softcap`` that requires grad.
    - ``chunk_size`` (tokens) or ``memory_budget`` (bytes of logits per chunk) trade speed for
      memory; ``low_memory=True`` computes the gradients in the backward over vocabulary chunks
      (4 matmuls instead of 3, any number of backward passes).
    - ``batch_invariant``: the fused head (``ops.fused_head``, docs/rl.md): a Triton GEMM that
      never rounds or stores the logits; each token's loss (``reduction="none"``) and lse the
      same bits whatever the batch, the chunking and the tensor-parallel split; dh, dW, db the
      same bits for any chunking; ignored tokens cost no GEMM work. 4 GEMMs (the gradients
      come from the backward). Class indices only, no label smoothing; ``low_memory`` changes
      nothing. ``fp32_precision``: as ``linear_token_log_probs``.
    - ``return_z_loss`` / ``return_token_accuracy`` / ``return_predicted_tokens`` (class
      indices): a ``CrossEntropyOutput`` as ``probact_gpu.cross_entropy`` returns. Without
      ``batch_invariant`` the argmax costs one more forward GEMM pass.

    Returns the loss in ``input``'s dtype (per token, shaped like ``target``'s leading dims, for
    ``reduction="none"``). Under ``torch.autocast`` it follows ``F.linear`` + ``F.cross_entropy``
    there: the head runs in the autocast dtype (input, head and bias cast to it, as autocast
    casts F.linear's operands) and the loss is float32. The module docstring has the memory
    model.
    """
    factor, transform = split_tensor_factors(logit_scale=logit_scale,
                                             logit_divisor=logit_divisor, softcap=softcap,
                                             temperature=temperature)
    options = CrossEntropyOptions.from_kwargs(
        weight=weight, ignore_index=-100 if ignore_index is None else ignore_index,
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
        normalizer=normalizer, **transform)
    chunk_size, memory_budget, low_memory = check_chunking(chunk_size, memory_budget, low_memory)
    # Under autocast, as F.linear + F.cross_entropy: the head in the autocast dtype (the casts
    # are differentiable, so the gradients come back in the parameters' dtypes), the loss fp32.
    input, linear_weight, linear_bias = autocast_linear(input, linear_weight, linear_bias)
    loss_dtype = torch.float32 if autocast_fp32("cross_entropy", input) else input.dtype
    soft = check_head_inputs(input, linear_weight, target, linear_bias, options)
    input, linear_bias = fold_head_factor(input, linear_bias, factor)
    if soft and ignore_index is not None:
        raise ValueError(f"ignore_index cannot be specified when target contains probabilities "
                         f"(got ignore_index={ignore_index!r} with a {target.dtype} target of "
                         f"shape {tuple(target.shape)}): leave it None, as torch requires")
    h, batch_shape = flatten_head_input(input, linear_weight.shape[1])
    if h.shape[0] > 0 and not h.is_meta:  # meta: the fake implementations infer the outputs
        check_runnable(h)
    if not soft:
        options.refuse_weight_grad()
    if soft and forward_ad_possible():
        # Forward-mode AD and torch.func: through the logits (materialised), whose class-
        # probability cross-entropy is made of differentiable ops (the same values).
        from .cross_entropy import cross_entropy

        logits = torch.nn.functional.linear(h, linear_weight, linear_bias)
        loss = cross_entropy(logits, target.reshape(logits.shape), **options.as_kwargs())
        return loss.reshape(batch_shape) if reduction == "none" else loss
    if soft:
        n_classes = linear_weight.shape[0]
        chunk = chunk_size or token_chunk(h.shape[0], n_classes, 4 * accum_dtype(h).itemsize,
                                          None, memory_budget)
        loss = _SoftTargetLinearCE.apply(h, linear_weight, linear_bias,
                                         target.reshape(h.shape[0], n_classes), options.weight,
                                         options, chunk, loss_dtype)
        return loss.reshape(batch_shape) if reduction == "none" else loss
    extras = dict(return_z_loss=bool(return_z_loss),
                  return_token_accuracy=bool(return_token_accuracy),
                  return_predicted_tokens=bool(return_predicted_tokens))
    if batch_invariant or any(extras.values()):
        from .fused_head import check_fp32_precision

        check_fp32_precision(fp32_precision, batch_invariant)
        return _invariant_or_extras(input, h, linear_weight, target, linear_bias, options,
                                    batch_shape, batch_invariant, fp32_precision, chunk_size,
                                    memory_budget, low_memory, extras, loss_dtype)
    if fp32_precision != "ieee":
        from .fused_head import check_fp32_precision

        check_fp32_precision(fp32_precision, batch_invariant)
    grad_on = torch.is_grad_enabled()
    need = [grad_on and input.requires_grad, grad_on and linear_weight.requires_grad,
            grad_on and linear_bias is not None and linear_bias.requires_grad]
    # torch.func's tensors cannot be scaled in place: there the backward recomputes.
    low_memory = low_memory or functorch_active()
    loss, *_ = _lce(h, linear_weight, target.reshape(-1), linear_bias,
                    *options.schema_args(), chunk_size, memory_budget, low_memory, need)
    if options.reduction == "none":
        loss = loss.reshape(batch_shape)
    return loss.to(loss_dtype)


def _invariant_or_extras(input, h, linear_weight, target, linear_bias, options, batch_shape,
                         batch_invariant, fp32_precision, chunk_size, memory_budget,
                         low_memory, extras, loss_dtype):
    """``batch_invariant`` (the fused head) and the extra outputs (``CrossEntropyOutput``)."""
    from ._common import cross_entropy_output
    from .fused_head import fused_linear_cross_entropy
    from .linear_token_log_probs import linear_token_log_probs

    flat = target.reshape(-1)
    want_arg = extras["return_token_accuracy"] or extras["return_predicted_tokens"]
    zl = arg = None
    if batch_invariant:
        refuse_transforms("linear_cross_entropy(batch_invariant=True)", input, linear_weight,
                          linear_bias)
        loss, lse, zl, arg, _ = fused_linear_cross_entropy(
            h, linear_weight, flat.contiguous(), linear_bias, options, compute_argmax=want_arg,
            fp32_precision=fp32_precision, chunk_size=chunk_size, budget=memory_budget)
        arg = arg if want_arg else None
    else:
        grad_on = torch.is_grad_enabled()
        need = [grad_on and input.requires_grad, grad_on and linear_weight.requires_grad,
                grad_on and linear_bias is not None and linear_bias.requires_grad]
        loss, lse, *_ = _lce(h, linear_weight, flat, linear_bias, *options.schema_args(),
                            chunk_size, memory_budget, low_memory, need)
        if want_arg:  # one more forward pass of the head for the argmax
            with torch.no_grad():
                arg = linear_token_log_probs(
                    h, linear_weight, flat, linear_bias=linear_bias,
                    ignore_index=options.ignore_index, return_argmax=True,
                    chunk_size=chunk_size, memory_budget=memory_budget,
                    **_transform_kwargs(options)).argmax
    if options.reduction == "none":
        loss = loss.reshape(batch_shape)
        if zl is not None:
            zl = zl.reshape(batch_shape)
    if not any(extras.values()):
        return loss.to(input.dtype)
    return cross_entropy_output(
        loss.to(loss_dtype), lse.reshape(batch_shape), target, options,
        linear_weight.shape[0], z_loss_term=zl,
        predicted=None if arg is None else arg.reshape(batch_shape), **extras)


def _transform_kwargs(options: CrossEntropyOptions) -> dict:
    t = options.transform
    return dict(logit_scale=t.logit_scale, logit_divisor=t.logit_divisor, softcap=t.softcap,
                temperature=t.temperature)
