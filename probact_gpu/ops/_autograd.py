"""The autograd glue every op shares: forward-mode AD and ``torch.func`` for ``torch.library``
ops.

A ``torch.library`` op with ``register_autograd`` gets reverse-mode autograd only: under
forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``, ``jacfwd``) it returns its
output with no tangent — a silent zero — and ``torch.func``'s transforms (``grad``, ``vjp``,
``jacrev``, ``vmap`` of those) fail inside torch with "must override the setup_context
staticmethod". So each differentiable op here is also an ``autograd.Function`` built from the
same ``setup_context`` and ``backward`` plus the op's forward-mode rule (``jvp``), with vmap
support (``generate_vmap_rule``: the Function's forward and backward run the ops, whose own
batching rules are :func:`register_vmap_by_rows` or :func:`register_vmap_loop`). Eager calls go
through the Function; under ``torch.compile`` the op is called directly (Dynamo does not trace
an ``autograd.Function`` with a custom ``jvp``), and its ``register_autograd`` — the same
``setup_context`` and ``backward`` — is what the compiled graph differentiates.

Stable surface (the op modules use these names):

``differentiable_op(op, setup_context, backward, jvp, jvp_saved) -> call``
    Registers ``backward`` for ``op`` and returns ``call(*op_args)``: the Function's ``apply``
    in eager mode, the op itself while compiling. ``jvp(ctx, *tangents)`` gets one tangent per
    op input (None where there is none) and returns one per output; ``jvp_saved(inputs,
    output)`` names the tensors it reads as ``ctx.saved_tensors`` (saved only while forward-mode
    AD may run).
``kernel_backward(name)``
    Decorator for a backward whose gradients come from kernels (not differentiable further):
    with ``create_graph=True`` it raises, naming what is unsupported.
``terminal_op(op, name) -> call``
    A kernel op called inside a backward or a forward-mode rule, as a Function whose own
    backward and forward-mode rule raise: nested transforms (``hessian``, ``jacfwd(jacrev(f))``,
    ``grad(grad(f))``) get an error where they would differentiate a kernel's gradient, never a
    silent zero.
``forward_ad_possible()``: a dual level is open or a ``torch.func`` transform is active.
``plain_eager()``: not compiling and no ``torch.func`` transform active — the only place a
backward may run a launcher on saved tensors directly (in place, on raw storage).
``refuse_functorch(name, why)``: raise when a ``torch.func`` transform is active.
``register_vmap_loop(op)`` / ``register_vmap_by_rows(op, rule)``: batching rules for ``vmap``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

__all__ = [
    "differentiable_op",
    "forward_ad_possible",
    "functorch_active",
    "kernel_backward",
    "move_batch_dim",
    "plain_eager",
    "refuse_functorch",
    "refuse_transforms",
    "register_vmap_by_rows",
    "register_vmap_loop",
    "terminal_op",
]


# --------------------------------------------------------------------------- where we run


def functorch_active() -> bool:
    """True inside a ``torch.func`` transform (``grad``, ``vjp``, ``jacrev``, ``jvp``,
    ``jacfwd``, ``vmap``, ``hessian``): tensors there may be wrappers with no storage."""
    return torch._C._are_functorch_transforms_active()


def plain_eager() -> bool:
    """Neither tracing for ``torch.compile`` nor inside a ``torch.func`` transform."""
    return not torch.compiler.is_compiling() and not functorch_active()


def forward_ad_possible() -> bool:
    """Whether a forward-mode rule may be asked for: a dual level is open, or a torch.func
    transform is active (saving for ``jvp`` costs nothing, but keeps tensors alive)."""
    from torch.autograd import forward_ad

    return forward_ad._current_level >= 0 or functorch_active()


def refuse_functorch(name: str, why: str) -> None:
    """Raise when a ``torch.func`` transform is active: ``name`` does not support them."""
    if functorch_active():
        raise RuntimeError(
            f"{name} does not support torch.func transforms (grad, vjp, jacrev, jvp, jacfwd, "
            f"vmap, hessian): {why}")


def refuse_transforms(name: str, *tensors: torch.Tensor | None) -> None:
    """Raise when a ``torch.func`` transform is active or one of ``tensors`` carries a
    forward-mode tangent: for paths whose ops have reverse-mode autograd only (the
    batch-invariant ones), which would otherwise drop the tangent silently."""
    from torch.autograd import forward_ad

    dual = forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    if dual or functorch_active():
        raise RuntimeError(
            f"{name} supports reverse-mode autograd only: forward-mode AD (torch.func.jvp, "
            "jacfwd, torch.autograd.forward_ad) and torch.func transforms (grad, vjp, jacrev, "
            "vmap) are not available there")


def _higher_order(name: str) -> RuntimeError:
    return RuntimeError(
        f"{name} does not support second derivatives (double backward: a backward with "
        "create_graph=True; nested torch.func transforms such as hessian, jacfwd(jacrev(f)), "
        "grad(grad(f))): its gradients are computed by kernels, not by differentiable ops; "
        "forward-mode AD and first-order torch.func transforms (grad, vjp, jacrev, jvp, "
        "jacfwd, vmap of them) work")


def kernel_backward(name: str):
    """Decorate a backward whose gradients come from kernels: with ``create_graph=True`` (grad
    mode on in the backward, outside ``torch.func``) it raises at once. ``torch.func``'s
    reverse transforms always build a graph, so there it runs, and the kernels' ops it calls
    are terminal ops (:func:`terminal_op`): differentiating their results further raises,
    lazily."""
    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if (torch.is_grad_enabled() and not torch.compiler.is_compiling()
                    and not functorch_active()):
                raise _higher_order(name)
            return backward(ctx, *grads)

        return wrapper

    return decorate


def terminal_op(op, name: str) -> Callable:
    """``call(*op_args)``: ``op`` (a kernel computing a gradient or a forward-mode tangent) as
    an ``autograd.Function`` whose backward and forward-mode rule raise: a result that a nested
    transform (``hessian``, ``jacrev(jacfwd(f))``) or ``create_graph=True`` would differentiate
    again is refused when it is, never silently treated as a constant. The op itself while
    compiling."""
    def setup(ctx, inputs, output):
        pass

    def refuse(ctx, *grads):
        raise _higher_order(name)

    return _function_call(op, "Terminal", setup, refuse, refuse,
                          f"``{op._qualname}``, not differentiable further "
                          "(probact_gpu.ops._autograd.terminal_op).")


# --------------------------------------------------------------------------- the Function


class _Whole(list):
    """A list argument (``need_grads: list[bool]``) that torch's pytree keeps whole: under
    ``torch.func`` an ``autograd.Function``'s arguments are flattened and rebuilt, and a plain
    list's items would be counted apart from it."""


def _whole(args) -> list:
    return [_Whole(a) if type(a) is list else a for a in args]


def _function_call(op, suffix: str, setup: Callable, backward: Callable, jvp: Callable,
                   doc: str) -> Callable:
    """``call(*op_args)``: an ``autograd.Function`` running ``op`` with these rules (vmap by
    ``generate_vmap_rule``) in eager mode, ``op`` itself while compiling (Dynamo does not trace
    a Function with a custom ``jvp``); ``call.function`` is the Function."""
    def forward(*args):
        return op(*args)

    qual = op._qualname.split("::")[1]
    function = type(
        "".join(part.title() for part in qual.split("_")) + suffix,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "setup_context": staticmethod(setup),
         "backward": staticmethod(backward), "jvp": staticmethod(jvp),
         "generate_vmap_rule": True, "__module__": __name__, "__doc__": doc})

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        return function.apply(*_whole(args))

    call.function = function
    return call


def differentiable_op(op, setup_context: Callable, backward: Callable, jvp: Callable,
                      jvp_saved: Callable) -> Callable:
    """Register ``backward`` as ``op``'s autograd and return ``call(*op_args)`` (module
    docstring)."""
    torch.library.register_autograd(op, backward, setup_context=setup_context)

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.jvp_ready = forward_ad_possible()
        if ctx.jvp_ready:
            ctx.save_for_forward(*jvp_saved(inputs, output))

    def forward_rule(ctx, *tangents):
        if not ctx.jvp_ready:  # (a dual level opened between forward and jvp: never seen)
            raise RuntimeError(f"{op._qualname}: forward-mode AD started after the forward")
        return jvp(ctx, *tangents)

    return _function_call(op, "Function", setup, backward, forward_rule,
                          f"``{op._qualname}`` with its autograd and forward-mode rule "
                          "(probact_gpu.ops._autograd).")


# --------------------------------------------------------------------------- vmap


def _select(args, in_dims, b):
    """Entry ``b`` of each batched tensor argument (a list argument's in_dims is a list)."""
    return [a.select(d, b) if isinstance(d, int) else a
            for a, d in zip(args, in_dims, strict=True)]


def register_vmap_loop(op) -> None:
    """A batching rule for ``op`` that runs it once per batch entry and stacks the results (the
    ops' kernels take one problem a launch; a batched problem is a loop of them). Tensors
    without a batch dim are passed as they are. For ops that mutate nothing."""
    def rule(info, in_dims, *args):
        outs = [op(*_select(args, in_dims, b)) for b in range(info.batch_size)]
        if isinstance(outs[0], torch.Tensor):
            return torch.stack(outs), 0
        stacked = tuple(torch.stack(list(parts)) for parts in zip(*outs, strict=True))
        return stacked, (0,) * len(stacked)

    op.register_vmap(rule)


def register_vmap_by_rows(op, rule: Callable) -> None:
    """``op``'s batching rule ``rule(info, in_dims, *args) -> (output, out_dims)``: ops whose
    kernels take any number of independent rows fold the batch dim into them."""
    op.register_vmap(rule)


def move_batch_dim(t: torch.Tensor | None, d: int | None, size: int) -> torch.Tensor | None:
    """``t`` with its batch dim ``d`` first (expanded to ``size`` when it has none)."""
    if t is None:
        return None
    if d is None:
        return t.unsqueeze(0).expand(size, *t.shape)
    return t.movedim(d, 0)
