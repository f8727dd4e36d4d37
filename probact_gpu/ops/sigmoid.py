"""sigmoid / logsigmoid: launchers, the registered custom ops, autograd, public functions.

Read top-down: ``sigmoid_fwd`` / ``sigmoid_bwd`` launch the elementwise kernels of
``probact_gpu.kernels.sigmoid`` (``config`` overrides the tiling); ``probact_gpu::sigmoid_fwd`` /
``::sigmoid_bwd`` wrap them as torch.library ops with fake implementations so
``torch.compile(fullgraph=True)`` traces them; autograd is registered on the forward op;
``sigmoid`` / ``logsigmoid`` are the public functions.

Layout: the kernels walk a flat contiguous buffer. A non-contiguous input (a transpose, a slice)
is first copied to a contiguous one (``Tensor.contiguous``, two extra passes over it); the output
always has the input's shape and is contiguous. Backward saves ``y`` for sigmoid (``dx =
dy·y·(1 − y)``) and the input ``x`` for logsigmoid (``dx = dy·σ(−x)``).
"""

from __future__ import annotations

import torch

from .. import tiling
from .._runtime import (
    check_float,
    check_runnable,
    check_same_device,
    device_guard,
    empty,
    record,
)
from ..kernels.sigmoid import sigmoid_bwd_kernel, sigmoid_fwd_kernel
from ..tiling import ElementwiseConfig


def _config(t: torch.Tensor, config: ElementwiseConfig | None) -> ElementwiseConfig:
    if config is None:
        return tiling.choose_elementwise_config(t.numel(), t.element_size())
    return config


def sigmoid_fwd(
    x: torch.Tensor, *, log: bool = False, config: ElementwiseConfig | None = None
) -> torch.Tensor:
    """σ(x) (``log=False``) or log σ(x): a new contiguous tensor of ``x``'s shape and dtype."""
    check_float("input", x)
    y = empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    check_runnable(x)
    x = x.contiguous()
    cfg = _config(x, config)
    grid = (tiling.cdiv(x.numel(), cfg.block),)
    with device_guard(x):
        sigmoid_fwd_kernel[grid](x, y, x.numel(), BLOCK=cfg.block, IS_LOG=log,
                                 num_warps=cfg.num_warps)
    record(sigmoid_fwd_kernel, "elementwise", grid, BLOCK=cfg.block, IS_LOG=log)
    return y


def sigmoid_bwd(
    saved: torch.Tensor,
    dy: torch.Tensor,
    *,
    log: bool = False,
    config: ElementwiseConfig | None = None,
) -> torch.Tensor:
    """Gradient w.r.t. the input: from the forward's output ``saved = σ(x)`` (``log=False``) or
    from the input ``saved = x`` (logsigmoid), and the incoming gradient ``dy`` (any strides)."""
    check_float("saved", saved)
    check_float("grad_output", dy)
    if dy.shape != saved.shape:
        raise ValueError(
            f"grad_output has shape {tuple(dy.shape)}, expected {tuple(saved.shape)}"
        )
    check_same_device(saved=saved, grad_output=dy)
    dx = empty(saved.shape, dtype=saved.dtype, device=saved.device)
    if saved.numel() == 0:
        return dx
    check_runnable(saved, "saved")
    saved, dy = saved.contiguous(), dy.contiguous()
    cfg = _config(saved, config)
    grid = (tiling.cdiv(saved.numel(), cfg.block),)
    with device_guard(saved):
        sigmoid_bwd_kernel[grid](saved, dy, dx, saved.numel(), BLOCK=cfg.block, IS_LOG=log,
                                 num_warps=cfg.num_warps)
    record(sigmoid_bwd_kernel, "elementwise", grid, BLOCK=cfg.block, IS_LOG=log)
    return dx


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("probact_gpu::sigmoid_fwd", mutates_args=())
def _sigmoid_fwd_op(x: torch.Tensor, log: bool) -> torch.Tensor:
    return sigmoid_fwd(x, log=log)


@_sigmoid_fwd_op.register_fake
def _(x, log):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("probact_gpu::sigmoid_bwd", mutates_args=())
def _sigmoid_bwd_op(saved: torch.Tensor, dy: torch.Tensor, log: bool) -> torch.Tensor:
    return sigmoid_bwd(saved, dy, log=log)


@_sigmoid_bwd_op.register_fake
def _(saved, dy, log):
    return torch.empty(saved.shape, dtype=saved.dtype, device=saved.device)


def _setup_context(ctx, inputs, output):
    x, log = inputs
    ctx.save_for_backward(x if log else output)
    ctx.log = log


def _backward(ctx, dy):
    (saved,) = ctx.saved_tensors
    return _sigmoid_bwd_op(saved, dy, ctx.log), None


torch.library.register_autograd("probact_gpu::sigmoid_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public functions


def sigmoid(input: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + exp(−x))`` elementwise, as ``torch.sigmoid``; computed in fp32 (fp64 for fp64
    input) without overflow: ``sigmoid(±1000)`` is exactly 1 / 0. Integer input raises
    TypeError (torch would promote it; pass a float tensor)."""
    check_float("input", input)
    return _sigmoid_fwd_op(input, False)


def logsigmoid(input: torch.Tensor) -> torch.Tensor:
    """``log σ(x) = min(x, 0) − log1p(exp(−|x|))`` elementwise, as
    ``torch.nn.functional.logsigmoid``: finite for any finite x (``logsigmoid(−1000) = −1000``)."""
    check_float("input", input)
    return _sigmoid_fwd_op(input, True)
