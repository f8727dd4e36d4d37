"""sigmoid / logsigmoid: launchers, the registered custom ops, autograd, public functions.

Read top-down: ``sigmoid_fwd`` / ``sigmoid_bwd`` launch the elementwise kernels of
``probact_gpu.kernels.sigmoid`` (``config`` overrides the tiling); ``probact_gpu::sigmoid_fwd`` /
``::sigmoid_bwd`` wrap them as torch.library ops with fake implementations so
``torch.compile(fullgraph=True)`` traces them; autograd is registered on the forward op and on
the backward op; ``sigmoid`` / ``logsigmoid`` are the public functions.

Layout: the kernels walk a flat contiguous buffer. A non-contiguous input (a transpose, a slice)
is first copied to a contiguous one (``Tensor.contiguous``, two extra passes over it); the output
always has the input's shape and is contiguous. Backward saves ``y`` for sigmoid (``dx =
dy·y·(1 − y)``) and the input ``x`` for logsigmoid (``dx = dy·σ(−x)``). The backward op has its
own autograd formula (torch ops), so ``create_graph=True`` gives exact second derivatives; both
ops have forward-mode rules and batching rules (``ops/_autograd.py``), so forward-mode AD and
``torch.func`` work to any order.
"""

from __future__ import annotations

import torch

from .. import tiling
from .._runtime import (
    accum_dtype,
    check_float,
    check_runnable,
    check_same_device,
    empty,
    launch,
)
from ..kernels.sigmoid import sigmoid_bwd_kernel, sigmoid_fwd_kernel
from ..tiling import ElementwiseConfig
from ._autograd import differentiable_op, move_batch_dim, register_vmap_by_rows


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
    launch(sigmoid_fwd_kernel, (tiling.cdiv(x.numel(), cfg.block),), (x, y, x.numel()),
           path="elementwise", num_warps=cfg.num_warps, BLOCK=cfg.block, IS_LOG=log)
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
    launch(sigmoid_bwd_kernel, (tiling.cdiv(saved.numel(), cfg.block),),
           (saved, dy, dx, saved.numel()),
           path="elementwise", num_warps=cfg.num_warps, BLOCK=cfg.block, IS_LOG=log)
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
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x if log else output)
    ctx.log = log


def _backward(ctx, dy):
    if dy is None:
        return None, None
    (saved,) = ctx.saved_tensors
    return _sigmoid_bwd(saved, dy, ctx.log), None


def _jvp(ctx, x_dot, _):
    """sigmoid: ẏ = y·(1 − y)·ẋ; logsigmoid: ẏ = σ(−x)·ẋ (math dtype, rounded to y's)."""
    (saved,) = ctx.saved_tensors
    if x_dot is None:
        return None
    math = accum_dtype(saved)
    sm, xd = saved.to(math), x_dot.to(math)
    out = torch.sigmoid(-sm) * xd if ctx.log else sm * (1.0 - sm) * xd
    return out.to(saved.dtype)


def _elementwise_vmap(op):
    """Elementwise ops: the batched tensors, batch dim first (a tensor without one expanded),
    as one bigger problem."""
    def rule(info, in_dims, *args):
        n = sum(isinstance(a, torch.Tensor) for a in args)
        tensors = [move_batch_dim(a, d, info.batch_size) for a, d in zip(args[:n], in_dims[:n],
                                                                          strict=True)]
        return op(*tensors, *args[n:]), 0

    return rule


_sigmoid = differentiable_op(_sigmoid_fwd_op, _setup_context, _backward, _jvp,
                             lambda inputs, output: (inputs[0] if inputs[1] else output,))
register_vmap_by_rows(_sigmoid_fwd_op, _elementwise_vmap(_sigmoid_fwd_op))


def _bwd_setup_context(ctx, inputs, output):
    saved, dy, log = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(saved, dy)
    ctx.log = log


def _bwd_backward(ctx, g):
    """Second derivatives (create_graph=True), in torch ops so they differentiate further. With
    G the gradient of dx:
    sigmoid     dx = dy·y·(1 − y):  d/dy = G·dy·(1 − 2y),  d/ddy = G·y·(1 − y)
    logsigmoid  dx = dy·σ(−x):      d/dx = −G·dy·σ(x)·σ(−x),  d/ddy = G·σ(−x)"""
    if g is None:
        return None, None, None
    saved, dy = ctx.saved_tensors
    math = accum_dtype(saved, dy)
    sm, dym, gm = saved.to(math), dy.to(math), g.to(math)
    if ctx.log:
        neg = torch.sigmoid(-sm)
        grad_saved = -gm * dym * torch.sigmoid(sm) * neg
        grad_dy = gm * neg
    else:
        grad_saved = gm * dym * (1.0 - 2.0 * sm)
        grad_dy = gm * sm * (1.0 - sm)
    return grad_saved.to(saved.dtype), grad_dy.to(dy.dtype), None


def _bwd_jvp(ctx, saved_dot, dy_dot, _):
    """Tangent of dx (forward-over-reverse):
    sigmoid     dx = dy·y·(1 − y):  ẋ = ḋy·y·(1 − y) + dy·(1 − 2y)·ẏ
    logsigmoid  dx = dy·σ(−x):      ẋ = ḋy·σ(−x) − dy·σ(x)·σ(−x)·ẋ_x"""
    saved, dy = ctx.saved_tensors
    math = accum_dtype(saved, dy)
    sm, dym = saved.to(math), dy.to(math)
    out = torch.zeros(torch.broadcast_shapes(sm.shape, dym.shape), dtype=math, device=sm.device)
    if ctx.log:
        neg = torch.sigmoid(-sm)
        if dy_dot is not None:
            out = out + dy_dot.to(math) * neg
        if saved_dot is not None:
            out = out - dym * torch.sigmoid(sm) * neg * saved_dot.to(math)
    else:
        if dy_dot is not None:
            out = out + dy_dot.to(math) * sm * (1.0 - sm)
        if saved_dot is not None:
            out = out + dym * (1.0 - 2.0 * sm) * saved_dot.to(math)
    return out.to(saved.dtype)


_sigmoid_bwd = differentiable_op(_sigmoid_bwd_op, _bwd_setup_context, _bwd_backward, _bwd_jvp,
                                 lambda inputs, output: inputs[:2])
register_vmap_by_rows(_sigmoid_bwd_op, _elementwise_vmap(_sigmoid_bwd_op))


# --------------------------------------------------------------------------- public functions


def sigmoid(input: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + exp(−x))`` elementwise, as ``torch.sigmoid``; computed in fp32 (fp64 for fp64
    input) without overflow: ``sigmoid(±1000)`` is exactly 1 / 0. Integer input raises
    TypeError (torch would promote it; pass a float tensor)."""
    check_float("input", input)
    return _sigmoid(input, False)


def logsigmoid(input: torch.Tensor) -> torch.Tensor:
    """``log σ(x) = min(x, 0) − log1p(exp(−|x|))`` elementwise, as
    ``torch.nn.functional.logsigmoid``: finite for any finite x (``logsigmoid(−1000) = −1000``)."""
    check_float("input", input)
    return _sigmoid(input, True)
