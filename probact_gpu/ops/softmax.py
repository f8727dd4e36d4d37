"""softmax / log_softmax: launchers, the registered custom ops, autograd, public functions.

Read top-down: ``softmax_fwd`` / ``softmax_bwd`` launch the kernels of
``probact_gpu.kernels.softmax`` on any strided tensor (taking a ``config`` override so tests
reach every path); ``probact_gpu::softmax_fwd`` / ``::softmax_bwd`` wrap them as torch.library
ops with fake implementations, so ``torch.compile(fullgraph=True)`` traces them; autograd is
registered on the forward op and on the backward op (second derivatives, in torch ops), each
with its forward-mode rule and batching rule (``ops/_autograd.py``: forward-mode AD and
``torch.func`` to any order); ``softmax`` / ``log_softmax`` are the public functions.
"""

from __future__ import annotations

import warnings

import torch

from .. import tiling
from .._runtime import (
    accum_dtype,
    autocast_fp32,
    check_float,
    check_runnable,
    check_same_device,
    empty,
    launch,
    normalize_dim,
    row_view,
    sm_count,
)
from ..kernels.softmax import (
    softmax_bwd_kernel,
    softmax_fwd_kernel,
    softmax_split_bwd_kernel,
    softmax_split_dot_kernel,
    softmax_split_fwd_kernel,
    softmax_split_stats_kernel,
)
from ..tiling import RowConfig
from ._autograd import differentiable_op, move_batch_dim, register_vmap_by_rows


def _config(
    n_rows: int, n_cols: int, t: torch.Tensor, config: RowConfig | None, reread_tensors: int
) -> RowConfig:
    """``config``, checked, or the tiling's choice; ``reread_tensors``: row-sized tensors the
    multi path reads twice (forward: x; backward: y and dy), for the persistent-grid model."""
    if config is None:
        return tiling.choose_row_config(n_rows, n_cols, t.element_size(), sm_count(t.device),
                                        reread_tensors=reread_tensors)
    config.validate_for(n_cols)
    return config


def softmax_fwd(
    x: torch.Tensor,
    dim: int = -1,
    *,
    log: bool = False,
    dtype: torch.dtype | None = None,
    config: RowConfig | None = None,
) -> torch.Tensor:
    """softmax (``log=False``) or log_softmax of ``x`` along ``dim``; a new contiguous tensor of
    ``dtype`` (default ``x.dtype``). ``x`` may have any strides: no copy is made unless the dims
    around ``dim`` cannot each be merged into one stride."""
    check_float("input", x)
    dim = normalize_dim(dim, x.ndim)
    out_dtype = x.dtype if dtype is None else dtype
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"dtype must be a floating dtype, got {out_dtype}")
    y = empty(x.shape, out_dtype, x.device)
    if x.numel() == 0:
        return y
    check_runnable(x)
    xv, yv = row_view(x, dim), row_view(y, dim)
    cfg = _config(xv.n_rows, xv.n_cols, x, config, reread_tensors=1)
    if cfg.path == "split":
        chunk = tiling.split_chunk(xv.n_cols, cfg)
        stats = torch.empty((xv.n_rows, cfg.n_splits, 2), dtype=accum_dtype(x), device=x.device)
        grid = (xv.n_rows, cfg.n_splits)
        launch(softmax_split_stats_kernel, grid,
               (xv.tensor, stats, xv.n_cols, xv.n_inner, chunk, *xv.strides),
               path=cfg.path, num_warps=cfg.num_warps, BLOCK_N=cfg.block_n)
        launch(softmax_split_fwd_kernel, grid,
               (xv.tensor, y, stats, xv.n_cols, xv.n_inner, chunk, cfg.n_splits, *xv.strides,
                *yv.strides),
               path=cfg.path, num_warps=cfg.num_warps, BLOCK_N=cfg.block_n,
               BLOCK_S=tiling.next_power_of_2(cfg.n_splits), IS_LOG=log)
    else:
        launch(softmax_fwd_kernel, (tiling.row_programs(xv.n_rows, cfg),),
               (xv.tensor, y, xv.n_rows, xv.n_cols, xv.n_inner, *xv.strides, *yv.strides),
               path=cfg.path, num_warps=cfg.num_warps, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
               SINGLE_TILE=cfg.path == "single", IS_LOG=log, PERSISTENT=cfg.n_programs > 0,
               NUM_STAGES=cfg.num_stages)
    return y


def softmax_bwd(
    y: torch.Tensor,
    dy: torch.Tensor,
    dim: int = -1,
    *,
    log: bool = False,
    dtype: torch.dtype | None = None,
    config: RowConfig | None = None,
) -> torch.Tensor:
    """Gradient of softmax (``log=False``) or log_softmax w.r.t. its input, from the forward's
    output ``y`` and the incoming gradient ``dy``; ``dtype`` is the input's dtype (default
    ``y.dtype``). Returns a new contiguous tensor of ``y``'s shape. ``dy`` is read through its
    strides as it is; ``y`` is read contiguous (a non-contiguous ``y`` is copied first: the
    kernels address ``y`` and ``dx`` with one set of strides), which the forward's output
    always is."""
    check_float("y", y)
    check_float("grad_output", dy)
    if dy.shape != y.shape:
        raise ValueError(f"grad_output has shape {tuple(dy.shape)}, expected {tuple(y.shape)}")
    check_same_device(y=y, grad_output=dy)
    dim = normalize_dim(dim, y.ndim)
    y = y.contiguous()
    dx = empty(y.shape, y.dtype if dtype is None else dtype, y.device)
    if y.numel() == 0:
        return dx
    check_runnable(y, "y")
    yv, dyv = row_view(y, dim), row_view(dy, dim)
    cfg = _config(yv.n_rows, yv.n_cols, y, config, reread_tensors=2)
    if cfg.path == "split":
        chunk = tiling.split_chunk(yv.n_cols, cfg)
        partial = torch.empty((yv.n_rows, cfg.n_splits), dtype=accum_dtype(y), device=y.device)
        grid = (yv.n_rows, cfg.n_splits)
        launch(softmax_split_dot_kernel, grid,
               (y, dyv.tensor, partial, yv.n_cols, yv.n_inner, chunk, *yv.strides, *dyv.strides),
               path=cfg.path, num_warps=cfg.num_warps, BLOCK_N=cfg.block_n, IS_LOG=log)
        launch(softmax_split_bwd_kernel, grid,
               (y, dyv.tensor, dx, partial, yv.n_cols, yv.n_inner, chunk, cfg.n_splits,
                *yv.strides, *dyv.strides),
               path=cfg.path, num_warps=cfg.num_warps, BLOCK_N=cfg.block_n,
               BLOCK_S=tiling.next_power_of_2(cfg.n_splits), IS_LOG=log)
    else:
        launch(softmax_bwd_kernel, (tiling.row_programs(yv.n_rows, cfg),),
               (y, dyv.tensor, dx, yv.n_rows, yv.n_cols, yv.n_inner, *yv.strides, *dyv.strides),
               path=cfg.path, num_warps=cfg.num_warps, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
               SINGLE_TILE=cfg.path == "single", IS_LOG=log, PERSISTENT=cfg.n_programs > 0,
               RELOAD=tiling.softmax_bwd_reloads(cfg), NUM_STAGES=cfg.num_stages)
    return dx


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("probact_gpu::softmax_fwd", mutates_args=())
def _softmax_fwd_op(
    x: torch.Tensor, dim: int, log: bool, dtype: torch.dtype | None
) -> torch.Tensor:
    return softmax_fwd(x, dim, log=log, dtype=dtype)


@_softmax_fwd_op.register_fake
def _(x, dim, log, dtype):
    return torch.empty(x.shape, dtype=x.dtype if dtype is None else dtype, device=x.device)


@torch.library.custom_op("probact_gpu::softmax_bwd", mutates_args=())
def _softmax_bwd_op(
    y: torch.Tensor, dy: torch.Tensor, dim: int, log: bool, dtype: torch.dtype
) -> torch.Tensor:
    return softmax_bwd(y, dy, dim, log=log, dtype=dtype)


@_softmax_bwd_op.register_fake
def _(y, dy, dim, log, dtype):
    return torch.empty(y.shape, dtype=dtype, device=y.device)


def _setup_context(ctx, inputs, output):
    x, dim, log, _ = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output)
    ctx.dim, ctx.log, ctx.in_dtype = dim, log, x.dtype


def _backward(ctx, dy):
    if dy is None:
        return None, None, None, None
    (y,) = ctx.saved_tensors
    return _softmax_bwd(y, dy, ctx.dim, ctx.log, ctx.in_dtype), None, None, None


def _jvp(ctx, x_dot, *_):
    """softmax: ẏ = y ⊙ (ẋ − Σ y ⊙ ẋ); log_softmax: ẏ = ẋ − Σ softmax ⊙ ẋ (in the math dtype,
    rounded to the output's)."""
    (y,) = ctx.saved_tensors
    if x_dot is None:
        return None
    math = accum_dtype(y)
    ym, xd = y.to(math), x_dot.to(math)
    if ctx.log:
        p = ym.exp()
        out = xd - (p * xd).sum(ctx.dim, keepdim=True)
    else:
        out = ym * (xd - (ym * xd).sum(ctx.dim, keepdim=True))
    return out.to(y.dtype)


def _fwd_vmap(info, in_dims, x, dim, log, dtype):
    """A batched input's batch dim becomes one more dim of rows."""
    x = x.movedim(in_dims[0], 0)
    return _softmax_fwd_op(x, normalize_dim(dim, x.ndim - 1) + 1, log, dtype), 0


_softmax = differentiable_op(_softmax_fwd_op, _setup_context, _backward, _jvp,
                             lambda inputs, output: (output,))
register_vmap_by_rows(_softmax_fwd_op, _fwd_vmap)


def _bwd_setup_context(ctx, inputs, output):
    y, dy, dim, log, dtype = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(y, dy)
    ctx.dim, ctx.log, ctx.out_dtype = dim, log, dtype


def _bwd_backward(ctx, g):
    """Second derivatives (create_graph=True), in torch ops so they differentiate further. With
    G the gradient of dx:
    softmax      dx = y⊙(dy − s), s = Σ dy⊙y
                 d/dy = G⊙(dy − s) − (Σ G⊙y)⊙dy,   d/ddy = y⊙(G − Σ G⊙y)
    log_softmax  dx = dy − exp(y)·Σ dy
                 d/dy = −G⊙exp(y)·Σ dy,            d/ddy = G − Σ G⊙exp(y)"""
    if g is None:
        return None, None, None, None, None
    y, dy = ctx.saved_tensors
    math = accum_dtype(y, dy)
    ym, dym, gm = y.to(math), dy.to(math), g.to(math)

    def row_sum(t):
        return t.sum(ctx.dim, keepdim=True)

    if ctx.log:
        e = ym.exp()
        grad_y = -gm * e * row_sum(dym)
        grad_dy = gm - row_sum(gm * e)
    else:
        gy = row_sum(gm * ym)
        grad_y = gm * (dym - row_sum(dym * ym)) - gy * dym
        grad_dy = ym * (gm - gy)
    return grad_y.to(y.dtype), grad_dy.to(dy.dtype), None, None, None


def _bwd_jvp(ctx, y_dot, dy_dot, *_):
    """Tangent of dx (forward-over-reverse, e.g. ``torch.func.hessian``), in torch ops:
    softmax      dx = y⊙(dy − s), s = Σ dy⊙y:   ẋ = ẏ⊙(dy − s) + y⊙(ḋy − ṡ),
                 ṡ = Σ (ḋy⊙y + dy⊙ẏ)
    log_softmax  dx = dy − exp(y)·Σ dy:          ẋ = ḋy − exp(y)⊙(ẏ·Σ dy + Σ ḋy)"""
    y, dy = ctx.saved_tensors
    math = accum_dtype(y, dy)
    ym, dym = y.to(math), dy.to(math)
    yd = torch.zeros_like(ym) if y_dot is None else y_dot.to(math)
    dyd = torch.zeros_like(dym) if dy_dot is None else dy_dot.to(math)

    def row_sum(t):
        return t.sum(ctx.dim, keepdim=True)

    if ctx.log:
        out = dyd - ym.exp() * (yd * row_sum(dym) + row_sum(dyd))
    else:
        s = row_sum(dym * ym)
        out = yd * (dym - s) + ym * (dyd - row_sum(dyd * ym + dym * yd))
    return out.to(ctx.out_dtype)


def _bwd_vmap(info, in_dims, y, dy, dim, log, dtype):
    y = move_batch_dim(y, in_dims[0], info.batch_size)
    dy = move_batch_dim(dy, in_dims[1], info.batch_size)
    return _softmax_bwd_op(y, dy, normalize_dim(dim, y.ndim - 1) + 1, log, dtype), 0


_softmax_bwd = differentiable_op(_softmax_bwd_op, _bwd_setup_context, _bwd_backward, _bwd_jvp,
                                 lambda inputs, output: inputs[:2])
register_vmap_by_rows(_softmax_bwd_op, _bwd_vmap)


# --------------------------------------------------------------------------- public functions


def _prepare(
    input: torch.Tensor, dim: int | None, dtype: torch.dtype | None, name: str
) -> tuple[torch.Tensor, int, torch.dtype | None]:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if dim is None:  # torch's deprecated implicit dim, with its warning
        warnings.warn(f"Implicit dimension choice for {name} has been deprecated. Change the "
                      "call to include dim=X as an argument.", stacklevel=3)
        dim = 0 if input.ndim in (0, 1, 3) else 1
    if dtype is not None and not input.dtype.is_floating_point:
        input = input.to(dtype)  # torch casts integer input to `dtype` first
    check_float("input", input)
    normalize_dim(dim, input.ndim)
    if dtype is None and autocast_fp32(name, input):
        dtype = torch.float32  # autocast runs it in float32 there (CUDA): no copy, the kernels
    return input, dim, dtype   # read 16-bit input and compute in float32 anyway


def softmax(
    input: torch.Tensor, dim: int | None = -1, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``exp(x − max) / Σ exp(x − max)`` along ``dim``, as ``torch.softmax``; computed in fp32
    (fp64 for fp64 input) and returned in ``dtype`` (default: the input's dtype). ``dim=None``
    picks torch's deprecated implicit dim (0 for 0-, 1- and 3-d input, else 1) and warns.
    Under ``torch.autocast`` on CUDA (where autocast runs softmax in float32) 16-bit input gives
    a float32 result, as torch."""
    input, dim, dtype = _prepare(input, dim, dtype, "softmax")
    return _softmax(input, dim, False, dtype)


def log_softmax(
    input: torch.Tensor, dim: int | None = -1, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``(x − max) − log Σ exp(x − max)`` along ``dim``, as ``torch.log_softmax`` (``dim=None``
    as in ``softmax``; autocast as ``softmax``)."""
    input, dim, dtype = _prepare(input, dim, dtype, "log_softmax")
    return _softmax(input, dim, True, dtype)
