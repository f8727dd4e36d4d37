"""Softmax cross-entropy, autograd of the ``probact_gpu::cross_entropy`` op: sum/mean hand out
the gradient the forward fused — as it is for grad_output 1, else recomputed for grad_output
from the saved logits and rounded once (decided on the device) — and ``none`` runs the backward
op from the saved lse. The in-place Function (``inplace.py``) shares the double-backward refusal
and the in-place rescale of its gradient (``_scale_saved_grad``: it has no logits left)."""

from __future__ import annotations

import torch

from ...options import CrossEntropyOptions
from .._autograd import (
    differentiable_op,
    kernel_backward,
    plain_eager,
    register_vmap_loop,
    terminal_op,
)
from .custom_ops import _ce_bwd_op, _ce_op
from .launch import cross_entropy_regrad_, cross_entropy_scale_grad


def _refuse_double_backward() -> None:
    """Raise when a backward runs with grad mode on (``create_graph=True``): the gradient comes
    from a kernel (in the forward, for sum/mean), so it has no graph of its own to
    differentiate — returning it would silently make every second derivative 0."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            "probact_gpu.cross_entropy does not support double backward (create_graph=True): "
            "its gradient is computed by a kernel, not by differentiable ops; use "
            "torch.nn.functional.cross_entropy for higher-order derivatives")


_MODIFIED = ("cross_entropy: a repeated backward through this graph (retain_graph) rescales the "
             "gradient the first backward returned, but that tensor (or the first grad_output) "
             "was modified in place since — e.g. accumulated into .grad, or changed by the "
             "caller. Clone the first gradient before modifying it, or run the forward again")


def _saved_grad(ctx) -> torch.Tensor:
    """The fused gradient saved by the forward; our error when autograd finds it was modified
    in place (it is the tensor a first backward handed out)."""
    try:
        (grad,) = ctx.saved_tensors
    except RuntimeError as exc:
        if "modified by an inplace operation" not in str(exc):
            raise
        raise RuntimeError(_MODIFIED) from exc
    return grad


def _scale_saved_grad(ctx, grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """The fused gradient times grad_output. First backward, eager: in place, by the launcher
    directly (one small launch that returns at once when grad_output is 1; not a registered
    mutating op, so the saved tensor's version stays valid) and the buffer itself is returned,
    so autograd keeps it as .grad with no copy. A repeated backward through the same graph
    (retain_graph) returns a new tensor, rescaled by grad_output over the grad_output applied
    first (a first grad_output of exactly 0 leaves NaN); it needs both as the first backward
    left them, so it raises if either was modified in place since (version counters) — e.g.
    by an in-place accumulation into ``.grad``. Under torch.compile (which cannot partition a
    backward mutating a saved forward output) always out of place; on meta tensors (shape
    inference: nothing is launched) too."""
    if torch.compiler.is_compiling() or grad.is_meta:
        return grad * grad_output
    if ctx.handed_out is None:
        cross_entropy_scale_grad(grad, grad_output)
        ctx.handed_out = (grad._version, grad_output, grad_output._version)
        return grad
    version, first, first_version = ctx.handed_out
    if grad._version != version or first._version != first_version:
        raise RuntimeError(_MODIFIED)
    return grad * (grad_output / first).to(grad.dtype)


_N_OP_INPUTS = 2 + CrossEntropyOptions.N_SCHEMA_ARGS + 2  # + compute_grad, loss_dtype


def _setup_context(ctx, inputs, output):
    input, target, *schema, compute_grad, _loss_dtype = inputs
    _, lse, grad, divisors = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse, grad, divisors)
    ctx.fused = compute_grad
    weight, normalizer = schema[0], schema[9]
    ctx.scalars = (*schema[1:9], schema[10])
    # The fused gradient is held outside save_for_backward: the first backward hands the buffer
    # itself to autograd (dropping this reference), so what the caller does to it afterwards
    # never reaches a later backward, which recomputes from the saved logits.
    ctx.grad = grad if compute_grad else None
    ctx.save_for_backward(input, target, lse, weight, normalizer, divisors)


@kernel_backward("probact_gpu.cross_entropy")
def _backward(ctx, grad_loss, grad_lse, grad_grad, grad_divisors):
    none = (None,) * (_N_OP_INPUTS - 1)
    if grad_loss is None:
        return (None, *none)
    input, target, lse, weight, normalizer, divisors = ctx.saved_tensors
    scalars = ctx.scalars
    if ctx.grad is not None and plain_eager() and not input.is_meta:
        # First eager backward of a reduced loss: the forward's gradient (for grad_output 1) is
        # kept as it is when grad_output is exactly 1, else recomputed from the logits for it
        # and rounded once — decided on the device by the launch itself.
        grad, ctx.grad = ctx.grad, None
        opts = CrossEntropyOptions.from_schema(weight, *scalars[:8], normalizer, scalars[8])
        mean = opts.reduction == "mean"
        cross_entropy_regrad_(grad, input, target, lse, grad_loss, options=opts,
                              divisor=divisors[0] if mean else None,
                              z_scale=divisors[1] if mean else None)
        return (grad, *none)
    # reduction "none", a repeated backward (retain_graph), torch.compile (which cannot
    # partition a backward that mutates a saved forward output), a torch.func transform (whose
    # tensors may have no storage of their own) or meta tensors (the backward op's fake
    # implementation infers the shape; nothing is launched): out of place, from lse.
    dx = _ce_bwd(input, target, lse, grad_loss, weight, *scalars[:8], normalizer, scalars[8])
    return (dx, *none)


def _jvp(ctx, input_dot, target_dot, weight_dot, *rest):
    """Forward-mode rule: the loss's tangent is ``Σ_c (∂loss/∂x_c) · ẋ_c`` per row (``none``) or
    over the whole input (sum / mean), with ∂loss/∂x from the backward op for grad_output 1
    (per row for ``none``), in the math dtype on an upcast copy of the logits; lse is not
    differentiable. Class weights and a normalizer are not differentiated (refused)."""
    if weight_dot is not None:
        raise RuntimeError("weight (per-class weights) has a forward-mode tangent, but with "
                           "class-index targets the loss is not differentiable with respect "
                           "to it (as torch's cross_entropy)")
    if rest[8] is not None:
        raise RuntimeError("normalizer has a forward-mode tangent: the loss is not "
                           "differentiated with respect to its normalizer (a count)")
    if input_dot is None:
        return None, None, None, None
    input, target, lse, weight, normalizer, loss = ctx.saved_tensors
    scalars = ctx.scalars
    math = lse.dtype
    none = scalars[1] == "none"
    ones = (torch.ones(target.shape, dtype=math, device=lse.device) if none
            else torch.ones((), dtype=math, device=lse.device))
    slope = _ce_bwd(input.to(math), target, lse, ones, weight, *scalars[:8], normalizer,
                    scalars[8])
    terms = slope * input_dot.to(math)
    tangent = terms.sum(1) if none else terms.sum()
    return tangent.to(loss.dtype), None, None, None


def _jvp_saved(inputs, output):
    input, target, weight, normalizer = inputs[0], inputs[1], inputs[2], inputs[11]
    return input, target, output[1], weight, normalizer, output[0]


_ce_bwd = terminal_op(_ce_bwd_op, "probact_gpu.cross_entropy")
_cross_entropy = differentiable_op(_ce_op, _setup_context, _backward, _jvp, _jvp_saved)
register_vmap_loop(_ce_op)
register_vmap_loop(_ce_bwd_op)
