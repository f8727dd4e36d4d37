"""Softmax cross-entropy, the registered ``torch.library`` ops (with fake implementations, so
``torch.compile(fullgraph=True)`` traces them): the forward (optionally with the fused gradient),
the in-place forward, and the two backwards from lse. Autograd for the forward op is registered
in ``autograd.py``.

Every op takes the options as ``CrossEntropyOptions.schema_args()``: weight: Tensor?,
ignore_index: int, reduction: str, label_smoothing: float, z_loss: float, logit_scale: float,
logit_divisor: float, softcap: float?, temperature: float, normalizer: Tensor?,
normalizer_value: float?. The forwards end with ``loss_dtype: ScalarType?``, the loss's dtype
(None: the input's; float32 under autocast, which runs cross-entropy in float32)."""

from __future__ import annotations

import torch

from ..._runtime import accum_dtype, check_runnable, empty, row_view
from ...options import CrossEntropyOptions
from .launch import (
    _copy_back,
    _fwd_rows,
    _grad_rows,
    _normalizer,
    _total_weight,
    _written_view,
    cross_entropy_finish,
    cross_entropy_mean_divisors,
)


def _run(input: torch.Tensor, target: torch.Tensor, opts: CrossEntropyOptions,
         grad_out: torch.Tensor | None,
         loss_dtype: torch.dtype | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward for an ND input (class dim 1) and its targets: (loss, lse, the mean's
    divisors), the loss in ``loss_dtype`` (default: the input's). With ``grad_out`` the fused
    gradient of the loss is written there. Launches: the mean's divisors (mean only), the
    forward, and (sum/mean) the finish kernel, which reduces the rows."""
    sdt = accum_dtype(input)
    loss_dtype = loss_dtype or input.dtype
    if input.numel() > 0:
        check_runnable(input)
    flat = target.reshape(-1).contiguous()
    xv = row_view(input, 1)
    divisor, denom, z_scale = None, 1.0, None
    divisors = input.new_empty((0,), dtype=sdt)
    if opts.reduction == "mean":  # (Σ w_t, the z term's scale): an output, for the backward
        divisors = empty((2,), sdt, input.device)
        _total_weight(flat, xv.n_cols, opts.weight, opts.ignore_index, sdt, True, out=divisors)
        divisor, z_scale = divisors[0], divisors[1] if opts.scales_z_term else None
    elif opts.reduction == "sum":
        divisor, denom = _normalizer(opts, input, sdt)
    dxv, temp = (None, None) if grad_out is None else _written_view(grad_out, "input")
    rows, lse = _fwd_rows(xv, flat, opts, dxv=dxv, divisor=divisor, denom=denom, config=None,
                          loss_dtype=loss_dtype if opts.reduction == "none" else None,
                          z_scale=z_scale)
    if grad_out is not None:
        _copy_back(grad_out, temp)
    if opts.reduction == "none":
        loss = rows.reshape(target.shape)
    else:
        loss = cross_entropy_finish(rows, divisor=divisor, denom=denom, dtype=loss_dtype)
    return loss, lse.reshape(target.shape), divisors


def _fake_outputs(input, target, reduction, loss_dtype):
    loss_shape = target.shape if reduction == "none" else ()
    sdt = accum_dtype(input)
    return (input.new_empty(loss_shape, dtype=loss_dtype or input.dtype),
            input.new_empty(target.shape, dtype=sdt),
            input.new_empty((2,) if reduction == "mean" else (0,), dtype=sdt))


@torch.library.custom_op("probact_gpu::cross_entropy", mutates_args=())
def _ce_op(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
    reduction: str, label_smoothing: float, z_loss: float, logit_scale: float,
    logit_divisor: float, softcap: float | None, temperature: float,
    normalizer: torch.Tensor | None, normalizer_value: float | None, compute_grad: bool,
    loss_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, dlogits of the reduced loss — or an empty tensor without compute_grad, the
    mean's divisors ``(Σ w_t, Σ w_t / n)`` in the math dtype — an empty tensor for the other
    reductions). ``input`` has at least 2 dims (class dim 1)."""
    opts = CrossEntropyOptions.from_schema(weight, ignore_index, reduction, label_smoothing,
                                           z_loss, logit_scale, logit_divisor, softcap,
                                           temperature, normalizer, normalizer_value)
    grad = empty(input.shape if compute_grad else (0,), input.dtype, input.device)
    loss, lse, divisors = _run(input, target, opts, grad if compute_grad else None, loss_dtype)
    return loss, lse, grad, divisors


@_ce_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, logit_scale,
      logit_divisor, softcap, temperature, normalizer, normalizer_value, compute_grad,
      loss_dtype=None):
    loss, lse, divisors = _fake_outputs(input, target, reduction, loss_dtype)
    return loss, lse, input.new_empty(input.shape if compute_grad else (0,)), divisors


@torch.library.custom_op("probact_gpu::cross_entropy_inplace", mutates_args=("input",))
def _ce_inplace_op(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
    reduction: str, label_smoothing: float, z_loss: float, logit_scale: float,
    logit_divisor: float, softcap: float | None, temperature: float,
    normalizer: torch.Tensor | None, normalizer_value: float | None,
    loss_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) for sum/mean; the gradient of the loss overwrites ``input``."""
    opts = CrossEntropyOptions.from_schema(weight, ignore_index, reduction, label_smoothing,
                                           z_loss, logit_scale, logit_divisor, softcap,
                                           temperature, normalizer, normalizer_value)
    return _run(input, target, opts, input, loss_dtype)[:2]


@_ce_inplace_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, logit_scale,
      logit_divisor, softcap, temperature, normalizer, normalizer_value, loss_dtype=None):
    return _fake_outputs(input, target, reduction, loss_dtype)[:2]


def _bwd_impl(input, target, lse, grad_output, opts: CrossEntropyOptions, out) -> None:
    flat = target.reshape(-1).contiguous()
    xv = row_view(input, 1)
    dxv, temp = _written_view(out, "input")
    divisor, denom, z_scale = None, 1.0, None
    if opts.reduction == "mean":
        divisor, z_scale = cross_entropy_mean_divisors(flat, xv.n_cols, opts, lse.dtype)
    elif opts.reduction == "sum":
        divisor, denom = _normalizer(opts, input, lse.dtype)
    g = grad_output.reshape(-1) if grad_output.ndim else grad_output
    _grad_rows(xv, dxv, flat, lse.reshape(-1), g, opts, vocab_start=0, n_classes=xv.n_cols,
               divisor=divisor, z_scale=z_scale, denom=denom, config=None)
    _copy_back(out, temp)


@torch.library.custom_op("probact_gpu::cross_entropy_bwd", mutates_args=())
def _ce_bwd_op(
    input: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad_output: torch.Tensor,
    weight: torch.Tensor | None, ignore_index: int, reduction: str, label_smoothing: float,
    z_loss: float, logit_scale: float, logit_divisor: float, softcap: float | None,
    temperature: float, normalizer: torch.Tensor | None, normalizer_value: float | None,
) -> torch.Tensor:
    """dlogits from the saved lse and ``grad_output`` (0-d, or the per-row loss's shape)."""
    opts = CrossEntropyOptions.from_schema(weight, ignore_index, reduction, label_smoothing,
                                           z_loss, logit_scale, logit_divisor, softcap,
                                           temperature, normalizer, normalizer_value)
    out = empty(input.shape, input.dtype, input.device)
    _bwd_impl(input, target, lse, grad_output, opts, out)
    return out


@_ce_bwd_op.register_fake
def _(input, target, lse, grad_output, *schema):
    return input.new_empty(input.shape)


@torch.library.custom_op("probact_gpu::cross_entropy_bwd_inplace", mutates_args=("input",))
def _ce_bwd_inplace_op(
    input: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad_output: torch.Tensor,
    weight: torch.Tensor | None, ignore_index: int, reduction: str, label_smoothing: float,
    z_loss: float, logit_scale: float, logit_divisor: float, softcap: float | None,
    temperature: float, normalizer: torch.Tensor | None, normalizer_value: float | None,
) -> None:
    """As ``cross_entropy_bwd``, the gradient overwriting ``input``."""
    opts = CrossEntropyOptions.from_schema(weight, ignore_index, reduction, label_smoothing,
                                           z_loss, logit_scale, logit_divisor, softcap,
                                           temperature, normalizer, normalizer_value)
    _bwd_impl(input, target, lse, grad_output, opts, input)


@_ce_bwd_inplace_op.register_fake
def _(input, target, lse, grad_output, *schema):
    return None
