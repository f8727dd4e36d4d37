"""Token log-probs (and entropy, lse, argmax) from hidden states: ``token_log_probs(input @
linear_weight.T + linear_bias, target)`` without ever holding the (tokens × V) logits.

Tokens are processed in chunks of ``C`` rows (``chunk_size``, or as many as fit
``memory_budget`` bytes of logits: ``tiling.choose_token_chunk``). With ``h`` (N, H), ``W``
(V, H), per chunk ``c``:

Forward (1 GEMM)::

    logits = h_c @ W.T (+ b)          torch matmul in the input's dtype, into one reused (C, V)
                                      buffer (fp32 accumulation inside cuBLAS, one rounding)
    logp, H, lse, argmax, stats       our token log-probs kernel: one read of the buffer

Backward (3 GEMMs), with the upstream ``g_logp`` / ``g_H`` per token (either may be absent)::

    logits = h_c @ W.T (+ b)          recomputed into the same buffer
    dz                                our backward kernel, written over the buffer (in place):
                                      g_logp·(onehot − p) − g_H·p·(z − Σp·z), then the
                                      transform's chain rule
    dh[c]  = dz @ W                   written straight into dh
    dW    += dz.T @ h_c               ``ops._common.LinearGrads``: fp32 addition, the weight's
                                      dtype between chunks (its docstring has the rounding)
    db    += Σ_rows dz                fp32 accumulator

4 GEMMs in all (forward logits, recomputed logits, dh, dW): the upstream gradients are only
known in the backward, so the forward cannot form dz (linear + cross-entropy's reduced loss can).

Memory beyond inputs and outputs: the (C, V) chunk buffer in the input's dtype (forward, then
again in the backward), the saved per-token statistics (N, 3) fp32 when a gradient will be
needed (nothing under ``torch.no_grad``), and in the backward dh (N, H), dW (V, H) in the
weight's dtype plus one (V_b, H) fp32 block, db (V,) fp32. Saved for the backward: ``input``,
``linear_weight``, ``linear_bias``, the targets and the statistics — never logits.

Read top-down: the launchers (``linear_token_log_probs_fwd`` / ``_bwd``, reused by the
vocab-parallel form with its shard's ``vocab_start``), the ``probact_gpu::linear_token_log_probs``
and ``probact_gpu::linear_token_log_probs_bwd`` torch.library ops with fake implementations (so
``torch.compile(fullgraph=True)`` traces them), autograd registered on the forward op (lse and
argmax not differentiable, no zero gradient made for an unused output; a backward with
``create_graph=True`` raises), and the public function.
"""

from __future__ import annotations

import torch

from .._runtime import accum_dtype, autocast_linear, check_runnable, empty
from ..options import (
    CrossEntropyOptions,
    HeadTransform,
    fold_head_factor,
    split_tensor_factors,
)
from ._autograd import differentiable_op, kernel_backward, register_vmap_loop, terminal_op
from ._common import (
    LinearGrads,
    accumulate_fp32,
    check_chunking,
    check_head_inputs,
    fake_linear_grads,
    flatten_head_input,
    logits_chunks,
    token_chunk,
)
from .token_log_probs import (
    absent_as_empty,
    fake_outputs,
    pack_outputs,
    token_log_probs_bwd,
    token_log_probs_fwd,
)

__all__ = ["linear_token_log_probs", "linear_token_log_probs_bwd", "linear_token_log_probs_fwd"]


def linear_token_log_probs_fwd(h, weight, bias, target, *, ignore_index, transform,
                               compute_entropy, compute_argmax, save_stats, chunk):
    """(logp, entropy | None, lse, argmax | None, stats | None) of 2-D ``h`` (N, H) and flat
    ``target``, one token chunk of logits at a time (module docstring)."""
    n_tokens = h.shape[0]
    sdt, device = accum_dtype(h), h.device
    logp = empty((n_tokens,), sdt, device)
    lse = empty((n_tokens,), sdt, device)
    entropy = empty((n_tokens,), sdt, device) if compute_entropy else None
    arg = torch.empty(n_tokens, dtype=torch.int64, device=device) if compute_argmax else None
    stats = empty((n_tokens, 3), sdt, device) if save_stats else None
    for start, end, logits in logits_chunks(h, weight, bias, chunk):
        outs = token_log_probs_fwd(logits, target[start:end], ignore_index=ignore_index,
                                   transform=transform, compute_entropy=compute_entropy,
                                   compute_argmax=compute_argmax, save_stats=save_stats)
        for full, part in zip((logp, entropy, lse, arg, stats), outs, strict=True):
            if full is not None:
                full[start:end] = part
    return logp, entropy, lse, arg, stats


def linear_token_log_probs_bwd(h, weight, bias, target, stats, grad_logp, grad_entropy, *,
                               ignore_index, transform, chunk, need, vocab_start=0,
                               n_classes=None, config=None):
    """(dh, dW, db) — empty tensors where not in ``need`` — from the saved ``stats``, each
    chunk's logits recomputed and overwritten with their gradient (module docstring).
    ``vocab_start`` / ``n_classes``: the head's rows are global classes ``[vocab_start,
    vocab_start + V)`` of ``n_classes`` (one rank's shard of a vocab-parallel head; dh is then
    this shard's part, for the caller to reduce)."""
    grads = LinearGrads(h, weight, bias, need)
    if any(need):
        for start, end, logits in logits_chunks(h, weight, bias, chunk):
            dz = token_log_probs_bwd(
                logits, target[start:end], stats[start:end],
                None if grad_logp is None else grad_logp[start:end],
                None if grad_entropy is None else grad_entropy[start:end],
                vocab_start=vocab_start, n_classes=n_classes, ignore_index=ignore_index,
                transform=transform, out=logits, config=config)
            grads.add_chunk(start, end, dz, h[start:end], weight)
    return grads.results(h, weight, bias)


def linear_token_log_probs_jvp(h, weight, bias, target, stats, h_dot, w_dot, b_dot, *,
                               ignore_index, transform, chunk, compute_entropy, vocab_start=0,
                               n_classes=None, config=None):
    """The forward-mode tangents of logp and (``compute_entropy``) the entropy for tangents
    ``ḣ``, ``Ẇ``, ``ḃ`` (each may be None): per token chunk, the logits as the forward forms
    them, each output's gradient for an upstream 1 in the math dtype (the backward kernel),
    ``ẋ = ḣ Wᵀ + h Ẇᵀ + ḃ`` accumulated in the math dtype, and ``Σ_c G ⊙ ẋ`` per token.
    Returns ((N,), (N,) or None). ``vocab_start`` / ``n_classes``: as
    ``linear_token_log_probs_bwd`` (one rank's share of a vocab-parallel tangent)."""
    n_tokens = h.shape[0]
    math = accum_dtype(h)
    outs = [torch.zeros(n_tokens, dtype=math, device=h.device)]
    if compute_entropy:
        outs.append(torch.zeros(n_tokens, dtype=math, device=h.device))
    for start, end, logits in logits_chunks(h, weight, bias, chunk):
        x_dot = torch.zeros(logits.shape, dtype=math, device=h.device)
        if h_dot is not None:
            accumulate_fp32(x_dot, h_dot[start:end], weight.t())
        if w_dot is not None:
            accumulate_fp32(x_dot, h[start:end], w_dot.t())
        if b_dot is not None:
            x_dot += b_dot.to(math)
        ones = torch.ones(end - start, dtype=math, device=h.device)
        for i, grads in enumerate(((ones, None), (None, ones))[:len(outs)]):
            slope = token_log_probs_bwd(
                logits, target[start:end], stats[start:end], *grads,
                vocab_start=vocab_start, n_classes=n_classes, ignore_index=ignore_index,
                transform=transform, out=torch.empty(logits.shape, dtype=math, device=h.device),
                config=config)
            outs[i][start:end] = (slope * x_dot).sum(1)
    return outs[0], outs[1] if compute_entropy else None


# --------------------------------------------------------------------------- custom ops
# The logit transform crosses the torch.library boundary as its four numbers (native schema
# types); outputs not asked for are empty (0,) tensors.


@torch.library.custom_op("probact_gpu::linear_token_log_probs", mutates_args=())
def _ltlp_op(
    h: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
    linear_bias: torch.Tensor | None, ignore_index: int, logit_scale: float,
    logit_divisor: float, softcap: float | None, temperature: float, compute_entropy: bool,
    compute_argmax: bool, save_stats: bool, chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse, argmax, stats) of 2-D ``h`` (N, H) and flat ``target`` (N,):
    per-token (N,) outputs, stats (N, 3)."""
    if h.shape[0] > 0:
        check_runnable(h, "input")
    logp, entropy, lse, arg, stats = linear_token_log_probs_fwd(
        h, linear_weight, linear_bias, target, ignore_index=ignore_index,
        transform=HeadTransform(logit_scale, logit_divisor, softcap, temperature),
        compute_entropy=compute_entropy, compute_argmax=compute_argmax, save_stats=save_stats,
        chunk=chunk)
    return absent_as_empty(h, logp, entropy, lse, arg, stats)


@_ltlp_op.register_fake
def _(h, linear_weight, target, linear_bias, ignore_index, logit_scale, logit_divisor, softcap,
      temperature, compute_entropy, compute_argmax, save_stats, chunk):
    return fake_outputs(h, h.shape[:1], compute_entropy, compute_argmax, save_stats)


@torch.library.custom_op("probact_gpu::linear_token_log_probs_bwd", mutates_args=())
def _ltlp_bwd_op(
    h: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
    linear_bias: torch.Tensor | None, stats: torch.Tensor, grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None, ignore_index: int, logit_scale: float,
    logit_divisor: float, softcap: float | None, temperature: float, chunk: int,
    need_grads: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dW, db), an empty tensor for each not in ``need_grads``; ``grad_logp`` /
    ``grad_entropy`` (N,) (at least one given)."""
    def flat(t):
        return None if t is None else t.contiguous()

    return linear_token_log_probs_bwd(
        h, linear_weight, linear_bias, target, stats, flat(grad_logp), flat(grad_entropy),
        ignore_index=ignore_index,
        transform=HeadTransform(logit_scale, logit_divisor, softcap, temperature), chunk=chunk,
        need=tuple(need_grads))


@_ltlp_bwd_op.register_fake
def _(h, linear_weight, target, linear_bias, stats, grad_logp, grad_entropy, *args):
    return fake_linear_grads(h, linear_weight, linear_bias, args[-1])


@torch.library.custom_op("probact_gpu::linear_token_log_probs_jvp", mutates_args=())
def _ltlp_jvp_op(
    h: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
    linear_bias: torch.Tensor | None, stats: torch.Tensor, h_dot: torch.Tensor | None,
    w_dot: torch.Tensor | None, b_dot: torch.Tensor | None, ignore_index: int,
    logit_scale: float, logit_divisor: float, softcap: float | None, temperature: float,
    chunk: int, compute_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp's tangent, the entropy's — an empty tensor without compute_entropy), (N,) each
    in the math dtype (``linear_token_log_probs_jvp``)."""
    logp, entropy = linear_token_log_probs_jvp(
        h, linear_weight, linear_bias, target, stats, h_dot, w_dot, b_dot,
        ignore_index=ignore_index,
        transform=HeadTransform(logit_scale, logit_divisor, softcap, temperature), chunk=chunk,
        compute_entropy=compute_entropy)
    return logp, logp.new_empty(0) if entropy is None else entropy


@_ltlp_jvp_op.register_fake
def _(h, linear_weight, target, linear_bias, stats, h_dot, w_dot, b_dot, ignore_index,
      logit_scale, logit_divisor, softcap, temperature, chunk, compute_entropy):
    sdt = accum_dtype(h)
    return (h.new_empty(h.shape[:1], dtype=sdt),
            h.new_empty(h.shape[:1] if compute_entropy else (0,), dtype=sdt))


def _setup_context(ctx, inputs, output):
    h, weight, target, bias = inputs[:4]
    _, entropy, lse, arg, stats = output
    compute_entropy = inputs[9]
    # (the entropy too when not asked for: an empty placeholder; forward-mode AD trips on a
    # differentiable output left without a tangent)
    ctx.mark_non_differentiable(lse, arg, stats, *(() if compute_entropy else (entropy,)))
    ctx.entropy = compute_entropy
    ctx.set_materialize_grads(False)  # lse and argmax never get a zero-filled gradient
    ctx.save_for_backward(h, weight, bias, target, stats)
    ctx.opts = inputs[4:9] + inputs[12:13]  # the transform's options, then the chunk


@kernel_backward("probact_gpu.linear_token_log_probs")
def _backward(ctx, grad_logp, grad_entropy, grad_lse, grad_arg, grad_stats):
    none = (None,) * 9
    if grad_logp is None and grad_entropy is None:
        return (None,) * 4 + none
    h, weight, bias, target, stats = ctx.saved_tensors
    if stats.ndim == 1:  # the op was called with save_stats=False: recompute the statistics
        stats = _ltlp_stats(h, weight, target, bias, *ctx.opts[:5], grad_entropy is not None,
                            False, True, ctx.opts[5])[-1]
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[3]]
    dh, dw, db = _ltlp_bwd(h, weight, target, bias, stats, grad_logp, grad_entropy,
                           *ctx.opts, need)
    return (dh if need[0] else None, dw if need[1] else None, None,
            db if need[2] else None) + none


def _jvp(ctx, h_dot, w_dot, target_dot, b_dot, *_):
    """Forward-mode rule: logp's and the entropy's tangents from
    ``linear_token_log_probs_jvp``; lse, argmax and the statistics are not differentiable."""
    if h_dot is None and w_dot is None and b_dot is None:
        return (None,) * 5
    h, weight, bias, target, stats = ctx.saved_tensors
    if stats.ndim == 1:
        stats = _ltlp_stats(h, weight, target, bias, *ctx.opts[:5], ctx.entropy, False, True,
                            ctx.opts[5])[-1]
    logp, entropy = _ltlp_jvp(h, weight, target, bias, stats, h_dot, w_dot, b_dot,
                              *ctx.opts, ctx.entropy)
    return logp, entropy if ctx.entropy else None, None, None, None


_ltlp = differentiable_op(_ltlp_op, _setup_context, _backward, _jvp,
                          lambda inputs, output: (inputs[0], inputs[1], inputs[3], inputs[2],
                                                  output[4]))
_ltlp_stats = terminal_op(_ltlp_op, "probact_gpu.linear_token_log_probs")
_ltlp_bwd = terminal_op(_ltlp_bwd_op, "probact_gpu.linear_token_log_probs")
_ltlp_jvp = terminal_op(_ltlp_jvp_op, "probact_gpu.linear_token_log_probs")
for _op in (_ltlp_op, _ltlp_bwd_op, _ltlp_jvp_op):
    register_vmap_loop(_op)


# --------------------------------------------------------------------------- public function


def linear_token_log_probs(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    logit_scale: float | torch.Tensor = 1.0,
    logit_divisor: float | torch.Tensor = 1.0,
    softcap: float | None = None,
    temperature: float | torch.Tensor = 1.0,
    return_entropy: bool = False,
    return_lse: bool = False,
    return_argmax: bool = False,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    batch_invariant: bool = False,
    fp32_precision: str = "ieee",
):
    """``token_log_probs(input @ linear_weight.T + linear_bias, target, ...)`` without holding
    the (tokens × V) logits (module docstring: chunks, 4 GEMMs with a gradient, memory).

    - ``input``: (…, H) hidden states; ``linear_weight``: (V, H) (``nn.Linear`` layout), the
      same dtype; ``linear_bias``: (V,) or None; ``target``: (…) int32/int64 class indices.
    - ``ignore_index``, ``logit_scale``, ``logit_divisor``, ``softcap``, ``temperature``,
      ``return_*``: as :func:`probact_gpu.token_log_probs` (the bias is added before the
      transform; tensor options are folded into ``input`` and the bias, as
      ``linear_cross_entropy`` folds them: differentiated, never read on the host, nothing
      logits-sized). Returns logp (fp32; fp64 for fp64 input) shaped like ``target``, or a
      :class:`TokenLogProbs` when a ``return_*`` flag is set.
    - ``chunk_size`` (tokens per chunk) or ``memory_budget`` (bytes of (C, V) logits per
      chunk; default ``tiling.LINEAR_CE_LOGITS_BUDGET``).
    - ``batch_invariant``: the fused head (``ops.fused_head``, docs/rl.md): a Triton GEMM that
      never rounds or stores the logits; every per-token output the same bits whatever the
      batch, the chunking and the tensor-parallel split, dh/dW/db the same bits for any
      chunking; ignored tokens cost no GEMM work (their lse and argmax are computed only when
      ``return_lse`` / ``return_argmax`` ask). ``chunk_size`` then counts the forward's tokens
      per chunk and ``memory_budget`` the bytes of its buffers (``tiling.FUSED_HEAD_BUDGET``);
      neither changes a bit of the result.
    - ``fp32_precision`` (fp32 input with ``batch_invariant``): ``"ieee"`` fp32 products,
      ``"bf16x3"`` / ``"bf16x6"`` the bf16 splits on the tensor cores (fp32 master weights at
      bf16 speed; their error against float64 in docs/rl.md).

    Gradients flow to ``input``, ``linear_weight`` and ``linear_bias`` through logp and entropy;
    under ``torch.no_grad`` nothing is saved. Forward-mode AD (tangents from
    ``linear_token_log_probs_jvp``, chunk by chunk) and first-order ``torch.func`` transforms
    work; double backward and nested transforms raise. Under ``torch.autocast`` the head runs in
    the autocast dtype, as ``F.linear`` would (the outputs stay fp32).
    """
    factor, kwargs = split_tensor_factors(logit_scale=logit_scale,
                                          logit_divisor=logit_divisor, softcap=softcap,
                                          temperature=temperature)
    options = CrossEntropyOptions.from_kwargs(ignore_index=ignore_index, **kwargs)
    input, linear_weight, linear_bias = autocast_linear(input, linear_weight, linear_bias)
    check_head_inputs(input, linear_weight, target, linear_bias, options,
                      allow_probabilities=False)
    input, linear_bias = fold_head_factor(input, linear_bias, factor)
    chunk_size, memory_budget, _ = check_chunking(chunk_size, memory_budget)
    if linear_weight.shape[0] == 0:
        raise ValueError(f"linear_weight must have at least one class (row), got shape "
                         f"{tuple(linear_weight.shape)}")
    h, batch_shape = flatten_head_input(input, linear_weight.shape[1])
    flat_target = target.reshape(-1)
    transform: HeadTransform = options.transform
    from .fused_head import check_fp32_precision

    check_fp32_precision(fp32_precision, batch_invariant)
    if batch_invariant:
        from ._autograd import refuse_transforms
        from .fused_head import fused_token_log_probs

        refuse_transforms("linear_token_log_probs(batch_invariant=True)", input, linear_weight,
                          linear_bias)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, linear_weight, linear_bias))
        logp, entropy, lse, arg, _ = fused_token_log_probs(
            h, linear_weight, flat_target.contiguous(), linear_bias,
            ignore_index=options.ignore_index, transform=transform,
            compute_entropy=bool(return_entropy), compute_argmax=bool(return_argmax),
            all_rows=bool(return_lse or return_argmax), needs_grad=needs_grad,
            fp32_precision=fp32_precision, chunk_size=chunk_size,
            budget=memory_budget)
        return pack_outputs(logp, entropy, lse, arg, return_entropy=return_entropy,
                            return_lse=return_lse, return_argmax=return_argmax,
                            shape=batch_shape)
    chunk = token_chunk(h.shape[0], linear_weight.shape[0], h.element_size(), chunk_size,
                        memory_budget)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, linear_weight, linear_bias))
    logp, entropy, lse, arg, _ = _ltlp(
        h, linear_weight, flat_target.contiguous(), linear_bias, options.ignore_index,
        transform.logit_scale, transform.logit_divisor, transform.softcap,
        transform.temperature, bool(return_entropy), bool(return_argmax), needs_grad, chunk)
    return pack_outputs(logp, entropy, lse, arg, return_entropy=return_entropy,
                        return_lse=return_lse, return_argmax=return_argmax, shape=batch_shape)
