"""binary_cross_entropy_with_logits: launchers, the registered custom ops, autograd, the public
function.

Read top-down: ``bce_fwd`` / ``bce_bwd`` / ``bce_regrad_`` / ``bce_scale_grad_`` launch the
kernels of ``probact_gpu.kernels.bce``; ``probact_gpu::bce_fwd`` / ``::bce_bwd`` /
``::bce_regrad_`` wrap them as torch.library ops with fake implementations; autograd is
registered on the forward op and on ``::bce_bwd``; ``binary_cross_entropy_with_logits`` is the
public function (torch's names; arguments after ``weight`` keyword-only).

Two gradient paths:

- **in-forward** (``reduction`` ``sum`` / ``mean`` and the input needs a gradient): the forward
  kernel writes ``dx`` (already divided by ``numel`` for mean) beside the loss partials; backward
  keeps it when ``grad_output``, read on the device, is exactly 1 (a plain ``loss.backward()``:
  the launch returns at once) and otherwise recomputes it for ``grad_output`` from x and target,
  rounded once (``bce_regrad_``; rescaling the stored gradient would round a 16-bit one twice).
  Forward+backward moves 3 bytes-per-element passes (read x, read target, write dx) in three
  launches: ``bce_fwd_kernel``, ``bce_finish_kernel`` (one program), ``bce_bwd_kernel`` with
  ``UNLESS_ONE`` (about one program per SM), and no torch kernel: the fused-gradient output is
  non-differentiable and ``set_materialize_grads(False)`` keeps autograd from filling zeros for
  it. Should backward run
  a second time on the same graph (``retain_graph=True``), the buffer has been handed out, so it
  recomputes: mutating a gradient autograd returned never reaches a later backward.
- **recompute** (``reduction="none"``, the input did not need a gradient at forward time, or a
  backward with ``create_graph=True``): ``bce_bwd_kernel`` recomputes ``dx`` from the saved input
  and target with the per-element (or scalar) ``grad_output``. That op has its own autograd
  formula (torch ops), so second derivatives are exact.

Layout: input and target are flattened; non-contiguous ones are first made contiguous (a copy).
``weight`` and ``pos_weight`` are read through broadcast index terms (see ``broadcast_terms``)
and never expanded to the input's size, except when the broadcast needs more than two terms
(e.g. a weight of shape (A, 1, C, 1, E) against (A, B, C, D, E)): then that operand alone is
materialised. The reductions are deterministic: one partial sum per program, summed in a fixed
order by a single wide program (no atomics).

Dtypes (torch's): the loss has the *target*'s dtype, the gradient the input's; the maths runs in
fp32, or fp64 when any operand is fp64.
"""

from __future__ import annotations

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
    sm_count,
)
from ..kernels.bce import (
    bce_bwd_kernel,
    bce_finish_kernel,
    bce_fwd_kernel,
    bce_scale_grad_kernel,
)
from ..tiling import ElementwiseConfig
from ._autograd import differentiable_op, functorch_active, register_vmap_loop

REDUCTIONS = ("none", "mean", "sum")
MAX_TERMS = 2  # index terms the kernels take per broadcast operand

Terms = tuple[int, tuple[int, ...]]  # (TERMS constexpr, 6 ints: inner0, size0, stride0, ...)
_ABSENT: Terms = (-1, (1, 1, 0, 1, 1, 0))


def broadcast_terms(operand: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, Terms]:
    """Describe ``operand`` broadcast to ``shape`` (flattened, row-major) as index terms: element
    ``i`` of the flat input reads ``Σ ((i // inner) % size) · stride`` of the operand's storage.

    Dims of size 1 and broadcast (stride-0) dims contribute nothing; neighbouring dims whose
    strides chain merge into one term. Returns the tensor the kernel reads and its terms (the
    six ints are the kernels' ``*_terms`` tuple argument); more than ``MAX_TERMS`` terms and the
    operand is materialised to ``shape`` (one term)."""
    view = operand.expand(shape)
    terms: list[list[int]] = []  # innermost first: [inner, size, stride]
    inner = 1
    for size, stride in zip(reversed(shape), reversed(view.stride()), strict=True):
        if size != 1 and stride != 0:
            last = terms[-1] if terms else None
            if last is not None and last[0] * last[1] == inner and last[2] * last[1] == stride:
                last[1] *= size
            else:
                terms.append([inner, size, stride])
        inner *= size
    if len(terms) > MAX_TERMS:
        view = view.contiguous()
        terms = [[1, view.numel(), 1]]
    if not terms:
        return operand, (0, _ABSENT[1])
    flat = [v for term in terms for v in term] + [1, 1, 0] * (MAX_TERMS - len(terms))
    return view, (len(terms), tuple(flat))


def _operand(t: torch.Tensor | None, shape: torch.Size) -> tuple[torch.Tensor | None, Terms]:
    if t is None:
        return None, _ABSENT
    return broadcast_terms(t, shape)


def _config(
    x: torch.Tensor, config: ElementwiseConfig | None, w_terms: Terms, pw_terms: Terms
) -> ElementwiseConfig:
    if config is None:
        broadcast = w_terms[0] > 0 or pw_terms[0] > 0  # index-term math costs registers
        return tiling.choose_bce_config(x.numel(), x.element_size(), broadcast=broadcast)
    return config


def _check(
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    reduction: str,
) -> None:
    check_float("input", x)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if not target.dtype.is_floating_point:
        raise TypeError(f"target must be a floating tensor (labels in [0, 1]), got "
                        f"dtype={target.dtype}")
    check_float("target", target)
    if target.shape != x.shape:
        raise ValueError(f"target size ({tuple(target.shape)}) must be the same as input size "
                         f"({tuple(x.shape)})")
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is None:
            continue
        check_float(name, t)
        try:
            shape = torch.broadcast_shapes(t.shape, x.shape)
        except RuntimeError:
            shape = None
        if shape != x.shape:
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to the "
                             f"input's shape {tuple(x.shape)}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not a valid value: expected one of "
                         f"{REDUCTIONS}")
    check_same_device(input=x, target=target, weight=weight, pos_weight=pos_weight)


def _divisor(reduction: str, numel: int) -> int:
    return numel if reduction == "mean" else 1


def bce_fwd(
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    compute_grad: bool = False,
    config: ElementwiseConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss (shape of ``x`` for ``none``, else 0-d; ``target``'s dtype) and, when
    ``compute_grad`` (``sum`` / ``mean`` only), ``d loss / dx`` for a grad_output of 1 (``x``'s
    dtype); otherwise an empty tensor in its place. Launches: ``bce_fwd_kernel``, then for a
    reduced loss ``bce_finish_kernel`` (one program)."""
    _check(x, target, weight, pos_weight, reduction)
    if compute_grad and reduction == "none":
        raise ValueError("compute_grad=True needs reduction 'sum' or 'mean' (none recomputes)")
    reduce = reduction != "none"
    loss = empty(() if reduce else x.shape, dtype=target.dtype, device=x.device)
    dx = empty(x.shape if compute_grad else (0,), dtype=x.dtype, device=x.device)
    numel = x.numel()
    if numel == 0:
        if reduce:
            loss.fill_(float("nan") if reduction == "mean" else 0.0)  # torch's mean of nothing
        return loss, dx
    check_runnable(x)
    x, target = x.contiguous(), target.contiguous()
    w, w_terms = _operand(weight, x.shape)
    pw, pw_terms = _operand(pos_weight, x.shape)
    cfg = _config(x, config, w_terms, pw_terms)
    n_programs = tiling.cdiv(numel, cfg.block)
    partial = empty(
        (n_programs if reduce else 0,), dtype=accum_dtype(x, target, weight, pos_weight),
        device=x.device,
    )
    path = "fused_grad" if compute_grad else ("reduce" if reduce else "none")
    divisor = _divisor(reduction, numel)
    launch(
        bce_fwd_kernel, (n_programs,),
        (x, target, x if w is None else w, x if pw is None else pw, loss, partial, dx,
         numel, divisor, w_terms[1], pw_terms[1]),
        path=path, num_warps=cfg.num_warps, BLOCK=cfg.block, W_TERMS=w_terms[0],
        PW_TERMS=pw_terms[0], REDUCE=reduce, COMPUTE_GRAD=compute_grad,
    )
    if reduce:
        fin = tiling.choose_bce_finish_config(n_programs, partial.element_size())
        launch(bce_finish_kernel, (1,), (partial, loss, n_programs, divisor),
               path=path, num_warps=fin.num_warps, BLOCK=fin.block)
    return loss, dx


def bce_bwd(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    config: ElementwiseConfig | None = None,
) -> torch.Tensor:
    """``d loss / dx`` recomputed from ``x`` and ``target``: ``grad_output`` has the input's shape
    (``none``) or is 0-d (``sum`` / ``mean``; read on the device, never on the host)."""
    _check(x, target, weight, pos_weight, reduction)
    check_float("grad_output", grad_output)
    want = x.shape if reduction == "none" else torch.Size([])
    if grad_output.shape != want:
        raise ValueError(f"grad_output has shape {tuple(grad_output.shape)}, expected "
                         f"{tuple(want)}")
    check_same_device(input=x, grad_output=grad_output)
    dx = empty(x.shape, dtype=x.dtype, device=x.device)
    numel = x.numel()
    if numel == 0:
        return dx
    check_runnable(x)
    x, target, g = x.contiguous(), target.contiguous(), grad_output.contiguous()
    w, w_terms = _operand(weight, x.shape)
    pw, pw_terms = _operand(pos_weight, x.shape)
    cfg = _config(x, config, w_terms, pw_terms)
    launch(
        bce_bwd_kernel, (tiling.cdiv(numel, cfg.block),),
        (x, target, x if w is None else w, x if pw is None else pw, g, dx,
         numel, _divisor(reduction, numel), w_terms[1], pw_terms[1]),
        path="recompute", num_warps=cfg.num_warps, BLOCK=cfg.block, W_TERMS=w_terms[0],
        PW_TERMS=pw_terms[0], G_SCALAR=reduction != "none",
    )
    return dx


def bce_regrad_(
    dx: torch.Tensor,
    grad_output: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    config: ElementwiseConfig | None = None,
) -> None:
    """The backward of a reduced loss whose gradient the forward fused: ``dx`` (contiguous,
    holding ``d loss / dx`` for grad_output 1) becomes the gradient for the 0-d
    ``grad_output``, read on the device — untouched when it is exactly 1 (one launch of about
    one program per SM, each returning at once: no bytes move), else recomputed from ``x`` and
    ``target`` (``bce_bwd_kernel``) and rounded once. ``dx *= grad_output`` would round a
    16-bit gradient twice."""
    _check(x, target, weight, pos_weight, reduction)
    check_float("grad_output", grad_output)
    if reduction == "none" or grad_output.numel() != 1:
        raise ValueError(f"bce_regrad_ rescales a reduced loss's gradient: got reduction="
                         f"{reduction!r}, grad_output shape {tuple(grad_output.shape)}")
    check_same_device(input=x, dx=dx, grad_output=grad_output)
    if not dx.is_contiguous() or dx.shape != x.shape:
        raise ValueError("dx must be the contiguous gradient buffer the forward wrote")
    numel = x.numel()
    if numel == 0:
        return
    check_runnable(x)
    x, target = x.contiguous(), target.contiguous()
    w, w_terms = _operand(weight, x.shape)
    pw, pw_terms = _operand(pos_weight, x.shape)
    cfg = _config(x, config, w_terms, pw_terms)
    grid = (tiling.grid_stride_programs(numel, cfg.block, sm_count(x.device)),)
    launch(
        bce_bwd_kernel, grid,
        (x, target, x if w is None else w, x if pw is None else pw, grad_output.reshape(()),
         dx, numel, _divisor(reduction, numel), w_terms[1], pw_terms[1]),
        path="fused_grad", num_warps=cfg.num_warps, BLOCK=cfg.block, W_TERMS=w_terms[0],
        PW_TERMS=pw_terms[0], G_SCALAR=True, UNLESS_ONE=True,
    )


def bce_scale_grad_(
    dx: torch.Tensor, grad_output: torch.Tensor, *, config: ElementwiseConfig | None = None
) -> None:
    """``dx *= grad_output`` in place (``dx`` contiguous, ``grad_output`` 0-d), reading
    grad_output on the device: one launch of about one program per SM (``config.block``
    elements a step), each returning at once when grad_output is exactly 1."""
    check_float("dx", dx)
    check_float("grad_output", grad_output)
    if grad_output.numel() != 1:
        raise ValueError(f"grad_output must hold one value, got shape {tuple(grad_output.shape)}")
    check_same_device(dx=dx, grad_output=grad_output)
    if not dx.is_contiguous():
        raise ValueError("dx must be contiguous (it is the buffer the forward wrote)")
    if dx.numel() == 0:
        return
    check_runnable(dx, "dx")
    cfg = config or tiling.choose_elementwise_config(dx.numel(), dx.element_size())
    grid = (tiling.grid_stride_programs(dx.numel(), cfg.block, sm_count(dx.device)),)
    launch(bce_scale_grad_kernel, grid, (dx, grad_output, dx.numel()), path="fused_grad",
           num_warps=cfg.num_warps, BLOCK=cfg.block)


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("probact_gpu::bce_fwd", mutates_args=())
def _bce_fwd_op(
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    reduction: str,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return bce_fwd(x, target, weight, pos_weight, reduction=reduction, compute_grad=compute_grad)


@_bce_fwd_op.register_fake
def _(x, target, weight, pos_weight, reduction, compute_grad):
    loss_shape = x.shape if reduction == "none" else ()
    loss = torch.empty(loss_shape, dtype=target.dtype, device=x.device)
    dx = torch.empty(x.shape if compute_grad else (0,), dtype=x.dtype, device=x.device)
    return loss, dx


@torch.library.custom_op("probact_gpu::bce_bwd", mutates_args=())
def _bce_bwd_op(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    reduction: str,
) -> torch.Tensor:
    return bce_bwd(grad_output, x, target, weight, pos_weight, reduction=reduction)


@_bce_bwd_op.register_fake
def _(grad_output, x, target, weight, pos_weight, reduction):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("probact_gpu::bce_regrad_", mutates_args=("dx",))
def _bce_regrad_op(
    dx: torch.Tensor,
    grad_output: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    reduction: str,
) -> None:
    bce_regrad_(dx, grad_output, x, target, weight, pos_weight, reduction=reduction)


@_bce_regrad_op.register_fake
def _(dx, grad_output, x, target, weight, pos_weight, reduction):
    return None


def _setup_context(ctx, inputs, output):
    x, target, weight, pos_weight, reduction, compute_grad = inputs
    _, dx = output
    ctx.mark_non_differentiable(dx)
    # The fused-gradient output never receives a gradient: without this autograd would fill an
    # input-sized tensor of zeros for it on every backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, target, weight, pos_weight)
    ctx.reduction = reduction
    # Held outside save_for_backward so backward can hand the buffer itself to autograd (and
    # drop this reference first, letting AccumulateGrad keep it without a copy).
    ctx.dx = dx if compute_grad else None


def _backward(ctx, grad_loss, _grad_dx):
    if grad_loss is None:  # the loss itself got no gradient
        return None, None, None, None, None, None
    x, target, weight, pos_weight = ctx.saved_tensors
    if ctx.dx is not None and not torch.is_grad_enabled() and not functorch_active():
        # The buffer is handed out once: a second backward through a retained graph recomputes,
        # so whatever the caller does to the gradient it was given cannot reach a later one.
        dx, ctx.dx = ctx.dx, None
        _bce_regrad_op(dx, grad_loss, x, target, weight, pos_weight, ctx.reduction)
    else:
        # Recompute; under create_graph=True (grad mode on in backward) this op is
        # differentiable (_bwd_backward), so second derivatives are exact, never a constant.
        dx = _bce_bwd(grad_loss, x, target, weight, pos_weight, ctx.reduction)
    return dx, None, None, None, None, None


def _refuse_operand_tangents(*tangents) -> None:
    for name, t in zip(("target", "weight", "pos_weight"), tangents, strict=True):
        if t is not None:
            raise NotImplementedError(
                f"{name} has a forward-mode tangent: probact_gpu differentiates this loss "
                "w.r.t. input only")


def _slope(x, target, weight, pos_weight, math):
    """d loss_i / d x_i = w·(σ(x)·(1 + (pw − 1)·t) − pw·t), in ``math`` (torch ops)."""
    xm, tm = x.to(math), target.to(math)
    w = 1.0 if weight is None else weight.to(math)
    pw = 1.0 if pos_weight is None else pos_weight.to(math)
    return w * (torch.sigmoid(xm) * (1.0 + (pw - 1.0) * tm) - pw * tm)


def _jvp(ctx, x_dot, target_dot, weight_dot, pos_weight_dot, *_):
    """The loss's tangent ``Σ (d loss_i / d x_i)·ẋ_i`` (per element for ``none``; divided by
    numel for ``mean``), in the math dtype, rounded to the loss's (the target's) dtype."""
    _refuse_operand_tangents(target_dot, weight_dot, pos_weight_dot)
    x, target, weight, pos_weight = ctx.saved_tensors
    if x_dot is None:
        return None, None
    math = accum_dtype(x, target, weight, pos_weight)
    terms = _slope(x, target, weight, pos_weight, math) * x_dot.to(math)
    if ctx.reduction == "none":
        return terms.to(target.dtype), None
    return (terms.sum() / _divisor(ctx.reduction, x.numel())).to(target.dtype), None


_bce = differentiable_op(_bce_fwd_op, _setup_context, _backward, _jvp,
                         lambda inputs, output: inputs[:4])
register_vmap_loop(_bce_fwd_op)


def _bwd_setup_context(ctx, inputs, output):
    grad_output, x, target, weight, pos_weight, reduction = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_output, x, target, weight, pos_weight)
    ctx.reduction = reduction


def _bwd_backward(ctx, grad_dx):
    """Derivatives of ``dx = w·(σ(x)·lw − pw·t)·g / divisor`` (torch ops, themselves
    differentiable): d/dx = w·lw·σ(x)·σ(−x)·g / divisor, d/dg = w·(σ(x)·lw − pw·t) / divisor
    summed to g's shape. Reached only by double backward; target and weights get none."""
    if grad_dx is None:
        return None, None, None, None, None, None
    g, x, target, weight, pos_weight = ctx.saved_tensors
    math = accum_dtype(x, target, weight, pos_weight)
    xm, tm = x.to(math), target.to(math)
    w = 1.0 if weight is None else weight.to(math)
    pw = 1.0 if pos_weight is None else pos_weight.to(math)
    lw = 1.0 + (pw - 1.0) * tm
    sig = torch.sigmoid(xm)
    scale = grad_dx.to(math) * w / _divisor(ctx.reduction, x.numel())
    grad_x = grad_g = None
    if ctx.needs_input_grad[1]:
        grad_x = (scale * lw * sig * torch.sigmoid(-xm) * g.to(math)).to(x.dtype)
    if ctx.needs_input_grad[0]:
        grad_g = (scale * (sig * lw - pw * tm)).sum_to_size(g.shape).to(g.dtype)
    return grad_g, grad_x, None, None, None, None


def _bwd_jvp(ctx, g_dot, x_dot, target_dot, weight_dot, pos_weight_dot, _):
    """Tangent of ``dx = slope(x)·g / divisor`` (forward-over-reverse): ``(w·lw·σ(x)·σ(−x)·g·ẋ
    + slope(x)·ġ) / divisor``."""
    _refuse_operand_tangents(target_dot, weight_dot, pos_weight_dot)
    g, x, target, weight, pos_weight = ctx.saved_tensors
    math = accum_dtype(x, target, weight, pos_weight)
    out = torch.zeros(x.shape, dtype=math, device=x.device)
    if x_dot is not None:
        xm, tm = x.to(math), target.to(math)
        w = 1.0 if weight is None else weight.to(math)
        pw = 1.0 if pos_weight is None else pos_weight.to(math)
        curve = w * (1.0 + (pw - 1.0) * tm) * torch.sigmoid(xm) * torch.sigmoid(-xm)
        out = out + curve * g.to(math) * x_dot.to(math)
    if g_dot is not None:
        out = out + _slope(x, target, weight, pos_weight, math) * g_dot.to(math)
    return (out / _divisor(ctx.reduction, x.numel())).to(x.dtype)


_bce_bwd = differentiable_op(_bce_bwd_op, _bwd_setup_context, _bwd_backward, _bwd_jvp,
                             lambda inputs, output: inputs[:5])
register_vmap_loop(_bce_bwd_op)


# --------------------------------------------------------------------------- public function


def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary cross-entropy between logits ``input`` and (soft) labels ``target``, as
    ``torch.nn.functional.binary_cross_entropy_with_logits``:
    ``w · ((1 − t)·x + (1 + (pw − 1)·t) · (log1p(exp(−|x|)) + max(−x, 0)))``, reduced by
    ``reduction`` (``"none"``, ``"mean"`` — NaN for an empty input, as torch — or ``"sum"``).
    ``weight`` broadcasts to the input, ``pos_weight`` along the last (class) dim (any shape that
    broadcasts to the input is accepted). Arguments after ``weight`` are keyword-only.
    Differentiable w.r.t. ``input`` only, to any order (``create_graph=True`` gives exact second
    derivatives). Under ``torch.autocast`` the loss is float32 when the input or target is
    16-bit, as torch's (a 16-bit target is then read as float32, as autocast does)."""
    _check(input, target, weight, pos_weight, reduction)
    grad_on = torch.is_grad_enabled()
    for name, t in (("target", target), ("weight", weight), ("pos_weight", pos_weight)):
        if grad_on and t is not None and t.requires_grad:
            raise NotImplementedError(
                f"{name} requires grad: probact_gpu differentiates this loss w.r.t. input only"
            )
    compute_grad = grad_on and input.requires_grad and reduction != "none"
    if autocast_fp32("binary_cross_entropy_with_logits", input, target):
        target = target.float()  # as autocast: the loss is float32 (the math is anyway)
    loss, _ = _bce(input, target, weight, pos_weight, reduction, compute_grad)
    return loss
