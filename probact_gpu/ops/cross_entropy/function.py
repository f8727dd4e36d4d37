"""Softmax cross-entropy, the public function: validates, then runs the class-index op, the
in-place Function or the class-probability path."""

from __future__ import annotations

from typing import Literal, overload

import torch

from ..._runtime import autocast_fp32, check_float, check_same_device
from ...options import CrossEntropyOptions, scale_by_factor, split_tensor_factors
from .._autograd import functorch_active, refuse_transforms
from .autograd import _cross_entropy
from .inplace import (
    CompiledCrossEntropyInplaceFunction,
    CrossEntropyInplaceFunction,
    _inplace_carrier,
    warn_none_not_in_place_under_compile,
)
from .launch import _INT_DTYPES
from .soft_targets import _soft_target_ce


def _check_target(input: torch.Tensor, target) -> bool:
    """Validate ``target`` against ``input``; True for class probabilities (float targets)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if input.ndim == 0:
        raise ValueError("input must have at least 1 dimension (the classes), got a 0-d tensor")
    if target.dtype.is_floating_point:
        if target.shape != input.shape:
            raise ValueError(
                f"target holds class probabilities (dtype={target.dtype}) so it must have the "
                f"input's shape {tuple(input.shape)}, got {tuple(target.shape)}")
        return True
    if target.dtype not in _INT_DTYPES:
        raise TypeError(f"target must hold class indices (int64 or int32) or class "
                        f"probabilities (float), got dtype={target.dtype}")
    expected = tuple(input.shape[:1] + input.shape[2:]) if input.ndim >= 2 else ()
    if tuple(target.shape) != expected:
        raise ValueError(f"target of class indices must have shape {expected} for input of "
                         f"shape {tuple(input.shape)}, got {tuple(target.shape)}")
    return False


@overload
def cross_entropy(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, *,
    ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
    z_loss: float = 0.0, softcap: float | None = None, logit_scale: float | torch.Tensor = 1.0,
    logit_divisor: float | torch.Tensor = 1.0, temperature: float = 1.0,
    normalizer: float | torch.Tensor | None = None, return_lse: Literal[False] = False,
    inplace_backward: bool = False,
) -> torch.Tensor: ...


@overload
def cross_entropy(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, *,
    ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
    z_loss: float = 0.0, softcap: float | None = None, logit_scale: float | torch.Tensor = 1.0,
    logit_divisor: float | torch.Tensor = 1.0, temperature: float = 1.0,
    normalizer: float | torch.Tensor | None = None, return_lse: Literal[True],
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float | torch.Tensor = 1.0,
    logit_divisor: float | torch.Tensor = 1.0,
    temperature: float | torch.Tensor = 1.0,
    normalizer: float | torch.Tensor | None = None,
    return_lse: bool = False,
    inplace_backward: bool = False,
    batch_invariant: bool = False,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
):
    """Softmax cross-entropy as ``torch.nn.functional.cross_entropy`` (input (C), (N, C) or
    (N, C, d1, ...), class dim 1; targets as class indices or class probabilities; ``weight``,
    ``ignore_index``, ``reduction``, ``label_smoothing`` with torch's semantics and scalar rules),
    computed in fp32 (fp64 for fp64 input) and returned in the input's dtype (float32 under
    ``torch.autocast`` for 16-bit input, as torch: the logits are still read as they are), plus:

    - ``z_loss``: adds ``z_loss · lse²`` per non-ignored row (PaLM); ``"mean"`` averages it
      over the non-ignored rows, whatever the class weights (docs/cross_entropy.md).
    - the logit transform, in this order, inside the kernels: ``logit_scale`` (multiplies),
      ``logit_divisor`` (divides), ``softcap`` (``softcap · tanh(z / softcap)``, Gemma 2),
      ``temperature`` (divides); loss and lse are those of the transformed logits.
    - ``normalizer`` (``reduction="sum"`` only): a number or a 0-d device tensor the summed loss
      and its gradient are divided by on the device (Hugging Face's ``num_items_in_batch``).
    - ``logit_scale``, ``logit_divisor``, ``temperature`` may be 0-d floating tensors (on the
      input's device or the CPU), e.g. a learnt ``nn.Parameter``: never read on the host, they
      are folded into one factor and applied as ``input * factor`` in torch (the kernels then
      take 1.0 for them), so autograd gives them their gradient — the computation of
      ``F.cross_entropy(logits * scale, target)``, at its price: one elementwise pass and one
      logits-sized buffer (pass a float to keep the transform fused). Raises: a tensor
      temperature with a ``softcap`` (it divides after the softcap, not a rescale of the
      logits), any tensor factor with ``inplace_backward=True`` (the product would hold the
      gradient, not ``input``), a ``softcap`` tensor that requires grad (it is read as a
      number). No value check on a tensor: a zero divisor or a non-positive temperature gives
      inf / NaN.
    - ``return_lse``: returns ``(loss, lse)``, lse of the transformed logits per row, fp32 (fp64
      for fp64 input), not differentiable.
    - ``inplace_backward``: the gradient is written into ``input``'s storage (no logits-sized
      buffer), when ``input`` requires grad (otherwise it is left alone). Class indices and a
      batch dim only. Checked before anything is written: a leaf that requires grad, a view of
      one, a view autograd forbids writing (no_grad, multi-output), an expanded tensor and
      (sum/mean) a view of part of a larger tensor raise; a view covering its base whole
      (``logits.view(-1, V)``) works. Logits whose dims after the class dim do not merge into
      one stride are computed through a temporary copied back into them (correct, not free).
      After the call ``input`` holds the gradient (sum/mean; none: after backward). Autograd
      then raises if an op that saved the logits earlier runs its backward, or if a
      differentiable use of the logits after the call needs a gradient; a non-differentiable
      read (``logits.argmax(1)``, printing, a copy under no_grad) raises nothing and silently
      reads the gradient — read the logits before the call. Under ``torch.compile`` (sum /
      mean) the mutating op is traced, which the compiler keeps in place when nothing reads
      the old logits afterwards (``docs/cross_entropy.md``); ``reduction="none"`` is computed
      out of place there (one logits-sized buffer), with a warning. Under ``torch.func``
      transforms the out-of-place op runs instead (same values, one logits-sized buffer).
    - ``batch_invariant``: each row's loss (``reduction="none"``), lse and argmax are the same
      bits whatever the other rows, their number and the launch (docs/rl.md: fixed 128-class
      tiles added exactly), the gradient is elementwise from them; class indices only, no
      label smoothing, no ``inplace_backward``. The gradient is then computed in the backward.
    - ``return_z_loss`` / ``return_token_accuracy`` / ``return_predicted_tokens`` (class
      indices): return a ``CrossEntropyOutput(loss, lse, z_loss, token_accuracy,
      predicted_tokens)`` (``ops._common``; lse only with ``return_lse``) — the z-loss term
      reduced as the loss (for logging), the accuracy of the argmax, the argmax of each row.
      Without ``batch_invariant`` the argmax costs one more read of the logits.

    A class index outside ``[0, C)`` that is not ``ignore_index`` gives NaN for its row (never an
    out-of-bounds read); all targets ignored with ``"mean"`` gives NaN, as torch. With
    ``reduction`` sum or mean and ``input.requires_grad``, the gradient is computed in the forward
    (one read of the logits when a row fits on-chip); backward keeps it when grad_output is 1 (no
    work) and otherwise recomputes it for grad_output from the logits, rounded once (decided on
    the device; the logits are therefore kept until backward). Under ``torch.compile`` the
    backward computes the gradient from lse instead. Forward-mode AD (``torch.func.jvp``,
    ``jacfwd``, ``torch.autograd.forward_ad``) and first-order ``torch.func`` transforms
    (``grad``, ``vjp``, ``jacrev``, ``vmap``) work; double backward (``create_graph=True``) and
    nested transforms (``hessian``) raise.
    """
    factor, transform = split_tensor_factors(logit_scale=logit_scale,
                                             logit_divisor=logit_divisor, softcap=softcap,
                                             temperature=temperature)
    opts = CrossEntropyOptions.from_kwargs(
        weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, normalizer=normalizer, **transform)
    check_float("input", input)
    if factor is not None:
        if inplace_backward:
            raise ValueError(
                "inplace_backward=True writes the gradient into input, but a tensor "
                "logit_scale / logit_divisor / temperature is applied as input * factor, a new "
                "tensor, which would hold it instead: pass the option as a float, or "
                "inplace_backward=False")
        input = scale_by_factor(input, factor)
    soft = _check_target(input, target)
    opts.check_weight(input.shape[1] if input.ndim >= 2 else input.shape[0], input.device)
    check_same_device(input=input, target=target)
    if isinstance(opts.normalizer, torch.Tensor):
        check_same_device(input=input, normalizer=opts.normalizer)
        if opts.normalizer.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("normalizer requires grad, but the loss is not differentiated "
                               "with respect to its normalizer (a count such as "
                               "num_items_in_batch): pass normalizer.detach()")
    # autocast runs cross-entropy in float32: the loss is float32 (the kernels' math is anyway,
    # so the logits are read as they are, never copied)
    loss_dtype = torch.float32 if autocast_fp32("cross_entropy", input, target) else None
    extras = bool(return_z_loss or return_token_accuracy or return_predicted_tokens)
    if soft:
        if inplace_backward:
            raise ValueError("inplace_backward=True supports class-index targets only, got "
                             f"class probabilities (dtype={target.dtype})")
        if batch_invariant or extras:
            raise ValueError("batch_invariant, return_z_loss, return_token_accuracy and "
                             "return_predicted_tokens need class-index targets, got class "
                             f"probabilities (dtype={target.dtype})")
        loss, lse = _soft_target_ce(input, target, opts, loss_dtype)
        return (loss, lse) if return_lse else loss
    opts.refuse_weight_grad()
    if batch_invariant or extras:
        return _invariant_or_extras(input, target, opts, batch_invariant, inplace_backward,
                                    return_lse, return_z_loss, return_token_accuracy,
                                    return_predicted_tokens, loss_dtype)
    squeeze = input.ndim == 1
    if inplace_backward and squeeze:
        raise ValueError("inplace_backward=True needs input with a batch dim (N, C, ...)")
    x = input.unsqueeze(0) if squeeze else input
    t = target.reshape(1) if squeeze else target
    needs_grad = input.requires_grad and torch.is_grad_enabled()
    in_place = inplace_backward and needs_grad and not functorch_active()
    if in_place and torch.compiler.is_compiling():
        if input.is_leaf:
            _inplace_carrier(input, opts.reduction)  # raises: a leaf is never written
        if opts.reduction == "none":
            warn_none_not_in_place_under_compile()
            in_place = False
        else:
            loss, lse = CompiledCrossEntropyInplaceFunction.apply(x, t, loss_dtype,
                                                                  *opts.schema_args())
    elif in_place:
        carrier, geometry = _inplace_carrier(input, opts.reduction)
        loss, lse, _ = CrossEntropyInplaceFunction.apply(carrier, t, geometry, loss_dtype,
                                                         *opts.schema_args())
    if not in_place:  # (in place without a backward to feed would only destroy the logits)
        # The gradient is fused into the forward in eager mode only: a compiled backward cannot
        # keep it in place, and recomputing it there from lse (one read, one write) moves less
        # than rescaling a stored one would.
        fuse = needs_grad and opts.reduction != "none" and not torch.compiler.is_compiling()
        loss, lse, _, _ = _cross_entropy(x, t, *opts.schema_args(), fuse, loss_dtype)
    if squeeze:
        lse = lse.reshape(())
        if opts.reduction == "none":
            loss = loss.reshape(())
    return (loss, lse) if return_lse else loss


def _invariant_or_extras(input, target, opts, batch_invariant, inplace_backward, return_lse,
                         return_z_loss, return_token_accuracy, return_predicted_tokens,
                         loss_dtype=None):
    """``batch_invariant`` (ops.batch_invariant) and the extra outputs (ops._common's
    ``cross_entropy_output``) for class-index targets."""
    from .._common import cross_entropy_output
    from ..batch_invariant import invariant_cross_entropy
    from ..token_log_probs import _tlp_op

    squeeze = input.ndim == 1
    x = input.unsqueeze(0) if squeeze else input
    t = target.reshape(1) if squeeze else target
    want_arg = bool(return_token_accuracy or return_predicted_tokens)
    zl = arg = None
    if batch_invariant:
        refuse_transforms("cross_entropy(batch_invariant=True)", input)
        if inplace_backward:
            raise ValueError("inplace_backward=True is not available with batch_invariant=True "
                             "(its gradient is formed in the backward, from the exact rows)")
        loss, lse, zl, arg, _ = invariant_cross_entropy(x, t, opts, compute_argmax=want_arg)
        loss, arg = loss.to(loss_dtype or input.dtype), arg if want_arg else None
    elif inplace_backward:
        raise ValueError("return_z_loss, return_token_accuracy and return_predicted_tokens are "
                         "not available with inplace_backward=True")
    else:
        needs_grad = input.requires_grad and torch.is_grad_enabled()
        fuse = needs_grad and opts.reduction != "none" and not torch.compiler.is_compiling()
        loss, lse, _, _ = _cross_entropy(x, t, *opts.schema_args(), fuse, loss_dtype)
    if want_arg and arg is None:  # the token log-probs forward's argmax: one more read
        tr = opts.transform
        arg = _tlp_op(x.detach().movedim(1, -1), t, opts.ignore_index, tr.logit_scale,
                      tr.logit_divisor, tr.softcap, tr.temperature, False, True, False)[3]
    if squeeze:
        lse = lse.reshape(())
        if opts.reduction == "none":
            loss = loss.reshape(())
    if not (return_z_loss or want_arg):
        return (loss, lse) if return_lse else loss
    out = cross_entropy_output(
        loss, lse, t, opts, x.shape[1], z_loss_term=zl,
        predicted=None if arg is None else arg.reshape(t.shape), return_lse=return_lse,
        return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
        return_predicted_tokens=return_predicted_tokens)
    if squeeze:
        out = out._replace(**{k: v.reshape(()) for k, v in out._asdict().items()
                              if k != "loss" and v is not None and v.ndim})
    return out
