"""Softmax cross-entropy, autograd of the ``probact_gpu::cross_entropy`` op: sum/mean hand out
the gradient the forward fused (scaled by grad_output), ``none`` runs the backward op from the
saved lse. Shared with the in-place Function (``inplace.py``)."""

from __future__ import annotations

import torch

from ...options import CrossEntropyOptions
from .custom_ops import _ce_bwd_op
from .launch import cross_entropy_scale_grad


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
    _, lse, grad = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse, grad)
    ctx.fused = compute_grad
    ctx.handed_out = None
    weight, normalizer = schema[0], schema[9]
    ctx.scalars = (*schema[1:9], schema[10])
    if compute_grad:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(input, target, lse, weight, normalizer)


def _backward(ctx, grad_loss, grad_lse, grad_grad):
    none = (None,) * (_N_OP_INPUTS - 1)
    if grad_loss is None:
        return (None, *none)
    _refuse_double_backward()
    if ctx.fused:
        return (_scale_saved_grad(ctx, _saved_grad(ctx), grad_loss), *none)
    input, target, lse, weight, normalizer = ctx.saved_tensors
    scalars = ctx.scalars
    dx = _ce_bwd_op(input, target, lse, grad_loss, weight, *scalars[:8], normalizer, scalars[8])
    return (dx, *none)


torch.library.register_autograd("probact_gpu::cross_entropy", _backward,
                                setup_context=_setup_context)
