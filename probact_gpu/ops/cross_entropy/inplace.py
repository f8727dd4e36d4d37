"""Softmax cross-entropy with ``inplace_backward=True``: the checks that decide, before anything
is written, whether autograd lets the logits be overwritten with their gradient, the
``autograd.Function`` that carries the gradient in the logits' storage, and its form for
``torch.compile``."""

from __future__ import annotations

import warnings

import torch

from ...options import CrossEntropyOptions
from .autograd import _refuse_double_backward, _saved_grad, _scale_saved_grad
from .custom_ops import _ce_bwd_inplace_op, _ce_inplace_op, _ce_op
from .launch import _overlaps


def _inplace_carrier(input: torch.Tensor, reduction: str):
    """Before anything is written: may autograd let ``input`` be overwritten in place? Returns
    (the tensor to hand autograd as written, the logits' geometry in it or None). A view (sum /
    mean) is written through its base — autograd cannot mark a view dirty in a function with
    several outputs — so it must cover its base whole (``logits.view(-1, V)``, the usual LM
    head call)."""
    if input.is_leaf:
        raise RuntimeError(
            "cross_entropy(..., inplace_backward=True) overwrites input with its gradient, but "
            "input is a leaf tensor that requires grad, which autograd never lets be written in "
            "place: pass the logits as computed (a non-leaf tensor), or inplace_backward=False")
    if _overlaps(input):
        raise ValueError(
            f"cross_entropy(..., inplace_backward=True): input (shape {tuple(input.shape)}, "
            f"strides {input.stride()}) has elements sharing memory (an expanded tensor), so "
            "its gradient cannot be written in place: use inplace_backward=False")
    if not input._is_view():
        return input, None
    base = input._base
    if base.is_leaf:
        raise RuntimeError(
            "cross_entropy(..., inplace_backward=True) overwrites input with its gradient, but "
            "input is a view of a leaf tensor that requires grad, which autograd never lets be "
            "written in place: use inplace_backward=False")
    meta = torch._C._autograd._get_creation_meta(input)
    if meta != torch._C._autograd.CreationMeta.DEFAULT:
        raise RuntimeError(
            f"cross_entropy(..., inplace_backward=True) overwrites input with its gradient, but "
            f"input is a view autograd does not let be written in place ({meta}: a view made "
            "under no_grad, or one of several views from one op such as split): pass a tensor "
            "that is not such a view, or inplace_backward=False")
    if reduction == "none":
        return input, None
    if base.numel() != input.numel() or torch._debug_has_internal_overlap(base) != 0:
        raise ValueError(
            f"cross_entropy(..., inplace_backward=True): input is a view of part of a larger "
            f"tensor (shape {tuple(base.shape)}); its gradient can be written in place only "
            "when the view covers its base whole (e.g. logits.view(-1, V)): pass "
            "input.contiguous(), or inplace_backward=False")
    return base, (tuple(input.shape), input.stride(), input.storage_offset())


class CrossEntropyInplaceFunction(torch.autograd.Function):
    """``inplace_backward=True``: the gradient lives in the logits' storage.

    sum/mean: the forward writes the gradient into the logits, marks them dirty and returns them
    as a hidden output, so autograd knows: an op that saved the logits before raises at backward
    ("modified by an inplace operation"), and any differentiable use of the logits afterwards
    flows a gradient into this node, whose backward raises. none: the backward writes the
    gradient into the saved logits (a version bump, so a later unpack of the same logits
    raises). ``cross_entropy`` validates the logits before calling it (nothing is written
    when autograd would refuse)."""

    @staticmethod
    def forward(ctx, carrier, target, geometry, loss_dtype, *schema):
        """``carrier``: the logits, or (sum/mean, logits that are a view) the base tensor they
        cover whole, which autograd is told was written; ``geometry``: None, or the logits'
        (size, stride, storage_offset) in the base; ``loss_dtype``: the loss's dtype (None: the
        logits')."""
        opts = CrossEntropyOptions.from_schema(*schema)
        ctx.set_materialize_grads(False)
        ctx.used = False
        ctx.handed_out = None
        ctx.schema_scalars = (*schema[1:9], schema[10])
        if opts.reduction == "none":
            loss, lse, _, _ = _ce_op(carrier, target, *schema, False, loss_dtype)
            ctx.save_for_backward(carrier, target, lse, schema[0])
            ctx.mark_non_differentiable(lse)
            return loss, lse, None
        x = carrier if geometry is None else carrier.as_strided(*geometry)
        loss, lse = _ce_inplace_op(x, target, *schema, loss_dtype)
        ctx.mark_dirty(carrier)
        ctx.save_for_backward(carrier)
        ctx.mark_non_differentiable(lse)
        return loss, lse, carrier

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(
            "cross_entropy(..., inplace_backward=True) does not support forward-mode AD "
            "(torch.autograd.forward_ad, torch.func.jvp, jacfwd) on logits that also require "
            "grad: they are overwritten with their gradient; use inplace_backward=False")

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_input_out):
        none = (None,) * (3 + CrossEntropyOptions.N_SCHEMA_ARGS)
        if grad_input_out is not None:
            raise RuntimeError(
                "the logits passed to cross_entropy(..., inplace_backward=True) were used after "
                "the call, but they now hold the gradient: compute with them before the loss, or "
                "use inplace_backward=False")
        if grad_loss is None:
            return (None, *none)
        _refuse_double_backward()
        if ctx.schema_scalars[1] == "none":
            if ctx.used:
                raise RuntimeError(
                    "cross_entropy(..., reduction='none', inplace_backward=True) supports one "
                    "backward pass: it overwrites the logits with their gradient")
            ctx.used = True
            input, target, lse, weight = ctx.saved_tensors
            s = ctx.schema_scalars
            _ce_bwd_inplace_op(input, target, lse, grad_loss, weight, *s[:8], None, s[8])
            return (input, *none)
        return (_scale_saved_grad(ctx, _saved_grad(ctx), grad_loss), *none)


class CompiledCrossEntropyInplaceFunction(torch.autograd.Function):
    """``inplace_backward=True`` (sum/mean) while torch.compile traces. The forward calls the
    mutating op ``probact_gpu::cross_entropy_inplace`` (registered with ``mutates_args``) on the
    logits and keeps them for the backward, which returns them times ``grad_output``. The
    compiler sees a real mutation: AOTAutograd functionalizes it, and inductor's reinplace pass
    writes into the logits' own buffer whenever nothing reads their old values afterwards (the
    LM head's logits, used by the loss alone) — no logits-sized buffer, as eager. The backward's
    multiply is one pointwise op on a saved tensor that dies there (a donated buffer, which
    inductor writes in place). Where the old logits are still needed (an op that saved them
    earlier), the compiler keeps a copy instead: correct, not free (eager raises there).

    Not used eagerly: the eager Function marks the logits dirty, which Dynamo does not trace."""

    @staticmethod
    def forward(ctx, logits, target, loss_dtype, *schema):
        loss, lse = _ce_inplace_op(logits, target, *schema, loss_dtype)
        ctx.save_for_backward(logits)
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss, *(None,) * (2 + CrossEntropyOptions.N_SCHEMA_ARGS))


_NONE_UNDER_COMPILE = (
    "cross_entropy(..., reduction='none', inplace_backward=True) under torch.compile computes "
    "the gradient out of place (one logits-sized buffer): its backward writes into logits "
    "saved by the forward, which the compiler copies rather than mutates. Use reduction='sum' "
    "or 'mean' (weight the rows with a normalizer) to keep the gradient in the logits.")


@torch.compiler.assume_constant_result
def warn_none_not_in_place_under_compile() -> bool:
    """Warn (at trace time, through Dynamo: this runs once per compilation, outside the
    graph) that ``reduction="none"`` cannot keep its in-place gradient under torch.compile."""
    warnings.warn(_NONE_UNDER_COMPILE, RuntimeWarning, stacklevel=3)
    return True
