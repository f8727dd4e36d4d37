"""The providers compared side by side, the inputs they share, and the step each pass times.

- ``probact``: ``probact_gpu.functional.<name>``, looked up at run time, so the bench works with
  whichever ops exist (a missing one is a skipped row that says so). ``probact_inplace``
  (cross-entropy only): the same with ``inplace_backward=True``, the gradient written into the
  logits' storage (no logits-sized buffer). ``probact_low_memory`` (linear + cross-entropy
  only): ``low_memory=True``, gradients recomputed over vocabulary blocks in the backward.
- ``torch``: torch eager (``torch.softmax``, ``F.cross_entropy``, ...).
- ``compile``: the same eager functions through ``torch.compile(dynamic=False)``; dynamo's caches
  are reset per case so no shape silently falls back to eager after too many recompiles.
- ``liger``: Liger-Kernel (``liger_kernel.transformers.functional`` / ``liger_kernel.ops``) where
  it has the op and is importable.

A provider that is missing, lacks the op or raises on a shape becomes a skipped row with the
reason (:class:`Skip`, or the exception the runner catches) — never a crash of the run.

Every provider's forward has the positional signature of its op family: ``(x)`` for softmax,
log_softmax and sigmoid, ``(logits, target)`` for cross-entropy, ``(x, target)`` for BCE,
``(x, weight, target)`` for linear + cross-entropy; defaults (``ignore_index=-100``,
``reduction="mean"``, ``dim=-1``) are torch's.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .shapes import CE_IGNORED_FRACTION

PROVIDERS = ("probact", "torch", "compile", "liger")
# Variants of probact measured beside it for some ops; speed-ups compare probact with the others.
VARIANTS = {"cross_entropy": ("probact_inplace",),
            "linear_cross_entropy": ("probact_low_memory",)}
IGNORE_INDEX = -100

# probact_gpu.functional's public name for each bench op.
PUBLIC_NAMES = {
    "softmax": "softmax",
    "log_softmax": "log_softmax",
    "sigmoid": "sigmoid",
    "cross_entropy": "cross_entropy",
    "bce": "binary_cross_entropy_with_logits",
    "linear_cross_entropy": "linear_cross_entropy",
}


class Skip(Exception):
    """A provider cannot run this case; the message is the skipped row's reason."""


# --------------------------------------------------------------------------- torch eager


def _torch_softmax(x):
    return torch.softmax(x, -1)


def _torch_log_softmax(x):
    return torch.log_softmax(x, -1)


def _torch_sigmoid(x):
    return torch.sigmoid(x)


def _torch_cross_entropy(logits, target):
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


def _torch_bce(x, target):
    return F.binary_cross_entropy_with_logits(x, target)


def _torch_linear_cross_entropy(x, weight, target):
    return F.cross_entropy(x @ weight.t(), target, ignore_index=IGNORE_INDEX)


TORCH_FNS: dict[str, Callable] = {
    "softmax": _torch_softmax,
    "log_softmax": _torch_log_softmax,
    "sigmoid": _torch_sigmoid,
    "cross_entropy": _torch_cross_entropy,
    "bce": _torch_bce,
    "linear_cross_entropy": _torch_linear_cross_entropy,
}


# --------------------------------------------------------------------------- resolution


class _Upstream(torch.autograd.Function):
    """A zero-copy stand-in for the op that produced the logits (the LM head's matmul): the
    in-place mode may overwrite a non-leaf tensor, never a leaf the user asked gradients of.
    Costs no memory traffic; its backward passes the gradient through."""

    @staticmethod
    def forward(ctx, x):
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


def probact_fn(op: str, module: str = "probact_gpu.functional") -> Callable:
    """``probact_gpu.functional.<name>`` now, or :class:`Skip` saying it does not exist yet."""
    name = PUBLIC_NAMES[op]
    try:
        functional = importlib.import_module(module)
    except Exception as exc:  # a broken or absent module is a skipped row, not a crash
        raise Skip(f"{module} not importable: {type(exc).__name__}: {exc}") from exc
    fn = getattr(functional, name, None)
    if fn is None:
        raise Skip(f"{module} has no {name} (not implemented yet)")
    return fn


def compiled_fn(op: str, backend: str = "inductor") -> Callable:
    """torch eager's function through ``torch.compile(dynamic=False)``, with fresh caches."""
    torch._dynamo.reset()
    return torch.compile(TORCH_FNS[op], dynamic=False, backend=backend)


def _import(name: str):
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise Skip(f"liger-kernel not importable ({type(exc).__name__}: {exc})") from exc


def liger_fn(op: str) -> Callable:
    """Liger-Kernel's version of ``op`` (0.8.x names), or :class:`Skip`."""
    if op == "softmax":
        functional = _import("liger_kernel.transformers.functional")
        fn = getattr(functional, "liger_softmax", None)
        if fn is not None:
            return fn
        ops = _import("liger_kernel.ops.softmax")
        return ops.LigerSoftmaxFunction.apply
    if op == "cross_entropy":
        functional = _import("liger_kernel.transformers.functional")

        def liger_cross_entropy(logits, target):
            return functional.liger_cross_entropy(logits, target, ignore_index=IGNORE_INDEX)

        return liger_cross_entropy
    if op == "linear_cross_entropy":
        functional = _import("liger_kernel.transformers.functional")

        def liger_linear_cross_entropy(x, weight, target):
            return functional.liger_fused_linear_cross_entropy(
                x, weight, target, ignore_index=IGNORE_INDEX)

        return liger_linear_cross_entropy
    raise Skip(f"liger-kernel has no {op}")


def resolve(provider: str, op: str, *, device: torch.device, smoke: bool = False) -> Callable:
    """The forward function ``provider`` offers for ``op``, or :class:`Skip` with the reason."""
    if provider == "probact":
        return probact_fn(op)
    if provider == "probact_inplace" and op == "cross_entropy":
        ce = probact_fn(op)

        def probact_cross_entropy_inplace(logits, target):
            if logits.requires_grad:
                logits = _Upstream.apply(logits)
            return ce(logits, target, inplace_backward=True)

        return probact_cross_entropy_inplace
    if provider == "probact_low_memory" and op == "linear_cross_entropy":
        lce = probact_fn(op)

        def probact_linear_cross_entropy_low_memory(x, weight, target):
            return lce(x, weight, target, low_memory=True)

        return probact_linear_cross_entropy_low_memory
    if provider == "torch":
        return TORCH_FNS[op]
    if provider == "compile":
        if smoke:
            raise Skip("torch.compile is not run in a smoke pass (compile time)")
        return compiled_fn(op)
    if provider == "liger":
        if device.type != "cuda":
            raise Skip("liger-kernel needs a CUDA device")
        return liger_fn(op)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


# --------------------------------------------------------------------------- inputs and steps


def make_inputs(op: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs (never zeros) for ``op``, keyed by argument name, in call order."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)

    def randn(*size, scale=1.0):
        t = torch.randn(*size, dtype=dtype, device=device, generator=g)
        return t.mul_(scale) if scale != 1.0 else t

    def targets(rows: int, vocab: int) -> torch.Tensor:
        t = torch.randint(0, vocab, (rows,), device=device, generator=g)
        ignored = torch.randperm(rows, device=device, generator=g)[: rows // CE_IGNORED_FRACTION]
        t[ignored] = IGNORE_INDEX
        return t

    if op in ("softmax", "log_softmax", "sigmoid"):
        return {"x": randn(*shape)}
    if op == "cross_entropy":
        rows, vocab = shape
        return {"logits": randn(rows, vocab), "target": targets(rows, vocab)}
    if op == "bce":
        target = torch.rand(*shape, dtype=dtype, device=device, generator=g)
        return {"x": randn(*shape), "target": target}
    if op == "linear_cross_entropy":
        tokens, hidden, vocab = shape
        # Unit-variance logits: x ~ N(0, 1), weight ~ N(0, 1/hidden).
        return {"x": randn(tokens, hidden), "weight": randn(vocab, hidden, scale=hidden**-0.5),
                "target": targets(tokens, vocab)}
    raise ValueError(f"unknown op {op!r}")


# The inputs a backward differentiates (the "leaves").
GRAD_INPUTS = {"softmax": ("x",), "log_softmax": ("x",), "sigmoid": ("x",),
               "cross_entropy": ("logits",), "bce": ("x",),
               "linear_cross_entropy": ("x", "weight")}


@dataclass
class Step:
    """One timed call of a pass: ``run()`` is what is timed; ``reset()`` drops the gradients a
    previous call left, so a memory measurement starts from the inputs alone."""

    run: Callable[[], object]
    leaves: tuple[torch.Tensor, ...] = field(default_factory=tuple)

    def reset(self) -> None:
        for t in self.leaves:
            t.grad = None


def build_step(fn: Callable, op: str, pass_: str, inputs: dict[str, torch.Tensor],
               seed: int = 1) -> Step:
    """The call timed for ``pass_``: ``fwd`` the forward alone (no autograd graph); ``fwd_bwd``
    forward then ``backward()`` (a random upstream gradient for non-scalar outputs); ``bwd`` the
    backward alone, replayed on one retained forward graph."""
    args = list(inputs.values())
    if pass_ == "fwd":
        return Step(lambda: fn(*args))
    leaves = tuple(inputs[name].requires_grad_() for name in GRAD_INPUTS[op])
    scalar_loss = op in ("cross_entropy", "bce", "linear_cross_entropy")
    dy = None
    if not scalar_loss:
        x = inputs["x"]
        g = torch.Generator(device=x.device)
        g.manual_seed(seed)
        dy = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=g)
    if pass_ == "fwd_bwd":
        def fwd_bwd():
            for t in leaves:
                t.grad = None
            out = fn(*args)
            out.backward(dy)
            return out

        return Step(fwd_bwd, leaves)
    if pass_ == "bwd":
        if scalar_loss:
            raise ValueError(f"{op} has no separate bwd pass in the bench")
        out = fn(*args)

        def bwd():
            return torch.autograd.grad(out, leaves, dy, retain_graph=True)

        return Step(bwd, leaves)
    raise ValueError(f"unknown pass {pass_!r}")
