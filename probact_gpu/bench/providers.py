"""The providers compared side by side, the inputs they share, and the step each pass times.

- ``probact``: the public function of ``probact_gpu`` (``PUBLIC_NAMES``), looked up at run time,
  so the bench works with whichever ops the installed package has (one it lacks is a skipped
  row that says so). ``probact_inplace`` (cross-entropy only): the same with
  ``inplace_backward=True``, the gradient written into the logits' storage (no logits-sized
  buffer). ``probact_low_memory`` (linear + cross-entropy only): ``low_memory=True``, gradients
  recomputed over vocabulary blocks in the backward. ``probact_invariant`` (cross-entropy, the
  LM-head log-probs and their linear forms): ``batch_invariant=True`` (docs/rl.md), the fused
  Triton head for the linear forms — the cost of invariance is its row beside ``probact``'s.
- ``torch``: torch eager (``torch.softmax``, ``F.cross_entropy``, ...); for the LM-head outputs
  (``token_log_probs``: per-token log-prob and entropy) the unfused path: ``log_softmax`` in fp32,
  ``gather``, entropy from the same (tokens × V) fp32 tensor.
- ``torch_chunked`` (LM-head outputs only): that torch path over ``CHUNK_TOKENS`` tokens at a time
  (the logits of linear + token log-probs computed per chunk), concatenated.
- ``compile``: the torch eager functions through ``torch.compile(dynamic=False)``; dynamo's
  caches are reset per case so no shape silently falls back to eager after too many recompiles.
- ``liger``: Liger-Kernel (``liger_kernel.transformers.functional`` / ``liger_kernel.ops``) where
  it has the op and is importable. Distillation: its KL / JSD / TVD losses on log-probs (or
  probabilities) formed by torch first — how they are called — with JSD's β = 1 for reverse
  KL; its fused linear JSD for the linear op.
- ``cce`` (linear + cross-entropy only): cut-cross-entropy's
  ``cut_cross_entropy.linear_cross_entropy`` with its defaults, when importable.

A provider that is missing, lacks the op or raises on a shape becomes a skipped row with the
reason (:class:`Skip`, or the exception the runner catches) — never a crash of the run.

Every provider's forward has the positional signature of its op family: ``(x)`` for softmax,
log_softmax and sigmoid, ``(logits, target)`` for cross-entropy and token log-probs, ``(x,
target)`` for BCE, ``(x, weight, target)`` for the linear ops, ``(student, teacher, target)``
for distillation (the mean over kept tokens; JSD at β = 0.5), ``(x, weight, teacher_x,
teacher_weight, target)`` for the fused linear distillation; defaults (``ignore_index=-100``,
``reduction="mean"``, ``dim=-1``) are torch's. The LM-head outputs return ``(logp, entropy)``,
both per token, zero on ignored tokens.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .shapes import CE_IGNORED_FRACTION

PROVIDERS = ("probact", "torch", "compile", "liger")
# Providers measured beside those for some ops only (when probact is): probact's variants, and
# the peers that exist for one op family. Speed-ups compare probact's rows with every other.
VARIANTS = {"cross_entropy": ("probact_inplace", "probact_invariant"),
            "linear_cross_entropy": ("probact_low_memory", "probact_invariant", "cce"),
            "token_log_probs": ("probact_invariant", "torch_chunked"),
            "linear_token_log_probs": ("probact_invariant", "torch_chunked")}
# Liger-Kernel's per-token log-prob + entropy from hidden states, looked up by these names in
# liger_kernel.transformers.functional (a version without one is a skipped row saying so).
LIGER_LM_HEAD_NAMES = ("liger_fused_linear_logprobs", "liger_fused_linear_token_logprobs")
IGNORE_INDEX = -100
# Tokens per chunk of the torch_chunked LM-head path (8 chunks of 4096 tokens, 16 of 8192).
CHUNK_TOKENS = 512
# Ops whose forward returns (logp, entropy) per token; their backward takes a gradient for each.
LM_HEAD_OPS = ("token_log_probs", "linear_token_log_probs")
# Distillation: the divergence each bench op times; TRL's default β for JSD.
DISTILLATION_OPS = {"distillation_kl": "kl", "distillation_reverse_kl": "reverse_kl",
                    "distillation_jsd": "jsd", "distillation_tvd": "tvd",
                    "linear_distillation_jsd": "jsd"}
JSD_BETA = 0.5

# probact_gpu's public name for each bench op.
PUBLIC_NAMES = {
    "softmax": "softmax",
    "log_softmax": "log_softmax",
    "sigmoid": "sigmoid",
    "cross_entropy": "cross_entropy",
    "bce": "binary_cross_entropy_with_logits",
    "linear_cross_entropy": "linear_cross_entropy",
    "token_log_probs": "token_log_probs",
    "linear_token_log_probs": "linear_token_log_probs",
    "distillation_kl": "distillation_loss",
    "distillation_reverse_kl": "distillation_loss",
    "distillation_jsd": "distillation_loss",
    "distillation_tvd": "distillation_loss",
    "linear_distillation_jsd": "linear_distillation_loss",
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


def _torch_token_log_probs(logits, target):
    """The unfused path: a (tokens × V) fp32 log_softmax, a gather, the entropy from it."""
    logp_all = torch.log_softmax(logits.float(), -1)
    ignored = target == IGNORE_INDEX
    logp = logp_all.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp.masked_fill(ignored, 0.0), entropy.masked_fill(ignored, 0.0)


def _torch_linear_token_log_probs(x, weight, target):
    return _torch_token_log_probs(x @ weight.t(), target)


def _cat_pairs(pairs):
    return tuple(torch.cat(parts) for parts in zip(*pairs, strict=True))


def _torch_chunked_token_log_probs(logits, target):
    return _cat_pairs(_torch_token_log_probs(z, t) for z, t in
                      zip(logits.split(CHUNK_TOKENS), target.split(CHUNK_TOKENS), strict=True))


def _torch_chunked_linear_token_log_probs(x, weight, target):
    return _cat_pairs(_torch_token_log_probs(h @ weight.t(), t) for h, t in
                      zip(x.split(CHUNK_TOKENS), target.split(CHUNK_TOKENS), strict=True))


def _torch_divergence_rows(student, teacher, divergence):
    """Per token, the unfused fp32 path: both heads' log_softmax in fp32 (two (tokens × V)
    tensors), then the divergence by its definition (``F.kl_div`` for the KLs, TRL's mixture
    for JSD)."""
    ls = torch.log_softmax(student.float(), -1)
    lt = torch.log_softmax(teacher.float(), -1)
    if divergence == "kl":
        return F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    if divergence == "reverse_kl":
        return F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    if divergence == "tvd":
        return 0.5 * (ls.exp() - lt.exp()).abs().sum(-1)
    lm = torch.logsumexp(torch.stack([ls + torch.log1p(torch.tensor(-JSD_BETA)),
                                      lt + torch.log(torch.tensor(JSD_BETA))]), 0)
    return (JSD_BETA * F.kl_div(lm, lt, reduction="none", log_target=True)
            + (1 - JSD_BETA) * F.kl_div(lm, ls, reduction="none", log_target=True)).sum(-1)


def _masked_mean(rows, target):
    kept = target != IGNORE_INDEX
    return (rows * kept).sum() / kept.sum().clamp(min=1)


def _torch_distillation(divergence: str) -> Callable:
    def torch_distillation(student, teacher, target):
        return _masked_mean(_torch_divergence_rows(student, teacher, divergence), target)

    return torch_distillation


def _torch_linear_distillation(x, weight, teacher_x, teacher_weight, target):
    return _masked_mean(_torch_divergence_rows(x @ weight.t(), teacher_x @ teacher_weight.t(),
                                               "jsd"), target)


TORCH_FNS: dict[str, Callable] = {
    "softmax": _torch_softmax,
    "log_softmax": _torch_log_softmax,
    "sigmoid": _torch_sigmoid,
    "cross_entropy": _torch_cross_entropy,
    "bce": _torch_bce,
    "linear_cross_entropy": _torch_linear_cross_entropy,
    "token_log_probs": _torch_token_log_probs,
    "linear_token_log_probs": _torch_linear_token_log_probs,
    **{op: _torch_distillation(d) for op, d in DISTILLATION_OPS.items()
       if not op.startswith("linear")},
    "linear_distillation_jsd": _torch_linear_distillation,
}
CHUNKED_FNS: dict[str, Callable] = {
    "token_log_probs": _torch_chunked_token_log_probs,
    "linear_token_log_probs": _torch_chunked_linear_token_log_probs,
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


def probact_fn(op: str, module: str = "probact_gpu") -> Callable:
    """``probact_gpu.<name>`` (``PUBLIC_NAMES``), or :class:`Skip` with the reason it cannot be
    had: the module or the function's own module does not import, or has no such name."""
    name = PUBLIC_NAMES[op]
    try:
        package = importlib.import_module(module)
        fn = getattr(package, name, None)
    except Exception as exc:  # a broken or absent module is a skipped row, not a crash
        raise Skip(f"{module}.{name} not importable: {type(exc).__name__}: {exc}") from exc
    if fn is None:
        raise Skip(f"{module} has no {name}")
    return fn


def _lm_head(op: str, fn: Callable, **options) -> Callable:
    """probact's LM-head function returning (logp, entropy) like the torch paths."""
    if op == "token_log_probs":
        def probact_token_log_probs(logits, target):
            out = fn(logits, target, return_entropy=True, **options)
            return out.logprobs, out.entropy

        return probact_token_log_probs

    def probact_linear_token_log_probs(x, weight, target):
        out = fn(x, weight, target, return_entropy=True, **options)
        return out.logprobs, out.entropy

    return probact_linear_token_log_probs


def _distillation(op: str, fn: Callable) -> Callable:
    """probact's distillation function at the op's divergence (JSD at ``JSD_BETA``)."""
    divergence = DISTILLATION_OPS[op]
    if op.startswith("linear"):
        def probact_linear_distillation(x, weight, teacher_x, teacher_weight, target):
            return fn(x, weight, teacher_x, teacher_weight, target, divergence=divergence,
                      beta=JSD_BETA)

        return probact_linear_distillation

    def probact_distillation(student, teacher, target):
        return fn(student, teacher, target, divergence=divergence, beta=JSD_BETA)

    return probact_distillation


def cce_fn(op: str) -> Callable:
    """cut-cross-entropy's ``linear_cross_entropy`` (its defaults), or :class:`Skip`."""
    if op != "linear_cross_entropy":
        raise Skip(f"cut-cross-entropy has no {op}")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:
        raise Skip(f"cut-cross-entropy not importable ({type(exc).__name__}: {exc})") from exc

    def cce_linear_cross_entropy(x, weight, target):
        return linear_cross_entropy(x, weight, target, ignore_index=IGNORE_INDEX)

    return cce_linear_cross_entropy


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
    if op in DISTILLATION_OPS:
        return _liger_distillation(op)


    if op == "linear_token_log_probs":
        functional = _import("liger_kernel.transformers.functional")
        for name in LIGER_LM_HEAD_NAMES:
            fn = getattr(functional, name, None)
            if fn is not None:
                def liger_linear_token_log_probs(x, weight, target, fn=fn):
                    return fn(x, weight, target, ignore_index=IGNORE_INDEX)

                return liger_linear_token_log_probs
        raise Skip(f"this liger-kernel has no log-prob + entropy head (none of "
                   f"{', '.join(LIGER_LM_HEAD_NAMES)})")
    raise Skip(f"liger-kernel has no {op}")


def _liger_distillation(op: str) -> Callable:
    """Liger's KL / JSD / TVD losses take log-probs (TVD: probabilities) formed by torch first;
    its JSD at β = 1 is reverse KL; its fused linear JSD takes both heads."""
    functional = _import("liger_kernel.transformers.functional")
    divergence = DISTILLATION_OPS[op]
    if op == "linear_distillation_jsd":
        def liger_linear_jsd(x, weight, teacher_x, teacher_weight, target):
            return functional.liger_fused_linear_jsd(x, weight, teacher_x, teacher_weight,
                                                     target, jsd_beta=JSD_BETA,
                                                     ignore_index=IGNORE_INDEX)

        return liger_linear_jsd

    def liger_distillation(student, teacher, target):
        ls = torch.log_softmax(student.float(), -1)
        lt = torch.log_softmax(teacher.float(), -1)
        if divergence == "kl":
            return functional.liger_kl_div(ls, lt, log_target=True, reduction="batchmean")
        if divergence == "tvd":
            return functional.liger_tvd(ls.exp(), lt.exp(), target, reduction="batchmean",
                                        ignore_index=IGNORE_INDEX)
        beta = 1.0 if divergence == "reverse_kl" else JSD_BETA
        return functional.liger_jsd(ls, lt, target, beta=beta, ignore_index=IGNORE_INDEX)

    return liger_distillation


def resolve(provider: str, op: str, *, device: torch.device, smoke: bool = False) -> Callable:
    """The forward function ``provider`` offers for ``op``, or :class:`Skip` with the reason."""
    if provider == "probact":
        fn = probact_fn(op)
        if op in DISTILLATION_OPS:
            return _distillation(op, fn)
        return _lm_head(op, fn) if op in LM_HEAD_OPS else fn
    if provider == "probact_inplace" and op == "cross_entropy":
        ce = probact_fn(op)

        def probact_cross_entropy_inplace(logits, target):
            if logits.requires_grad:
                logits = _Upstream.apply(logits)
            return ce(logits, target, inplace_backward=True)

        return probact_cross_entropy_inplace
    if provider == "probact_invariant" and op in VARIANTS and "probact_invariant" in VARIANTS[op]:
        fn = probact_fn(op)
        if op in LM_HEAD_OPS:
            return _lm_head(op, fn, batch_invariant=True)

        def probact_invariant(*args):
            return fn(*args, batch_invariant=True)

        return probact_invariant
    if provider == "probact_low_memory" and op == "linear_cross_entropy":
        lce = probact_fn(op)

        def probact_linear_cross_entropy_low_memory(x, weight, target):
            return lce(x, weight, target, low_memory=True)

        return probact_linear_cross_entropy_low_memory
    if provider == "torch":
        return TORCH_FNS[op]
    if provider == "torch_chunked":
        if op not in CHUNKED_FNS:
            raise Skip(f"torch_chunked is an LM-head path; not defined for {op}")
        return CHUNKED_FNS[op]
    if provider == "cce":
        if device.type != "cuda":
            raise Skip("cut-cross-entropy needs a CUDA device")
        return cce_fn(op)
    if provider == "compile":
        if smoke:
            raise Skip("torch.compile is not run in a smoke pass (compile time)")
        return compiled_fn(op)
    if provider == "liger":
        if device.type != "cuda":
            raise Skip("liger-kernel needs a CUDA device")
        return liger_fn(op)
    known = PROVIDERS + tuple(dict.fromkeys(v for vs in VARIANTS.values() for v in vs))
    raise ValueError(f"unknown provider {provider!r}; expected one of {known}")


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
    if op in ("cross_entropy", "token_log_probs"):
        rows, vocab = shape
        return {"logits": randn(rows, vocab), "target": targets(rows, vocab)}
    if op == "bce":
        target = torch.rand(*shape, dtype=dtype, device=device, generator=g)
        return {"x": randn(*shape), "target": target}
    if op in DISTILLATION_OPS and not op.startswith("linear"):
        rows, vocab = shape
        return {"student": randn(rows, vocab), "teacher": randn(rows, vocab),
                "target": targets(rows, vocab)}
    if op == "linear_distillation_jsd":
        tokens, hidden, vocab = shape  # both heads of hidden size H
        return {"x": randn(tokens, hidden), "weight": randn(vocab, hidden, scale=hidden**-0.5),
                "teacher_x": randn(tokens, hidden),
                "teacher_weight": randn(vocab, hidden, scale=hidden**-0.5),
                "target": targets(tokens, vocab)}
    if op in ("linear_cross_entropy", "linear_token_log_probs"):
        tokens, hidden, vocab = shape
        # Unit-variance logits: x ~ N(0, 1), weight ~ N(0, 1/hidden).
        return {"x": randn(tokens, hidden), "weight": randn(vocab, hidden, scale=hidden**-0.5),
                "target": targets(tokens, vocab)}
    raise ValueError(f"unknown op {op!r}")


# The inputs a backward differentiates (the "leaves").
GRAD_INPUTS = {"softmax": ("x",), "log_softmax": ("x",), "sigmoid": ("x",),
               "cross_entropy": ("logits",), "bce": ("x",),
               "linear_cross_entropy": ("x", "weight"), "token_log_probs": ("logits",),
               "linear_token_log_probs": ("x", "weight"),
               **{op: ("student",) for op in DISTILLATION_OPS if not op.startswith("linear")},
               "linear_distillation_jsd": ("x", "weight")}


@dataclass
class Step:
    """One timed call of a pass: ``run()`` is what is timed; ``reset()`` drops the gradients a
    previous call left, so a memory measurement starts from the inputs alone."""

    run: Callable[[], object]
    leaves: tuple[torch.Tensor, ...] = field(default_factory=tuple)

    def reset(self) -> None:
        for t in self.leaves:
            t.grad = None


SCALAR_LOSS_OPS = ("cross_entropy", "bce", "linear_cross_entropy", *DISTILLATION_OPS)


def upstream_grads(op: str, inputs: dict[str, torch.Tensor], seed: int = 1):
    """The gradient a backward of ``op``'s output starts from: None for the scalar losses; a
    random tensor like ``x`` for softmax, log_softmax and sigmoid; for the LM-head outputs a
    random fp32 weight per token for each of logp and entropy (an RL update's advantages and
    entropy bonus)."""
    if op in SCALAR_LOSS_OPS:
        return None
    like = inputs["target"] if op in LM_HEAD_OPS else inputs["x"]
    g = torch.Generator(device=like.device)
    g.manual_seed(seed)
    if op in LM_HEAD_OPS:
        return tuple(torch.randn(like.shape, dtype=torch.float32, device=like.device,
                                 generator=g) for _ in range(2))
    return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=g)


def backward(out, grads) -> None:
    """``out.backward(grads)``, or both LM-head outputs at once."""
    if isinstance(out, tuple):
        torch.autograd.backward(out, grads)
    else:
        out.backward(grads)


def build_step(fn: Callable, op: str, pass_: str, inputs: dict[str, torch.Tensor],
               seed: int = 1) -> Step:
    """The call timed for ``pass_``: ``fwd`` the forward alone (no autograd graph); ``fwd_bwd``
    forward then ``backward()`` (from :func:`upstream_grads`); ``bwd`` the backward alone,
    replayed on one retained forward graph (softmax, log_softmax, sigmoid)."""
    args = list(inputs.values())
    if pass_ == "fwd":
        return Step(lambda: fn(*args))
    leaves = tuple(inputs[name].requires_grad_() for name in GRAD_INPUTS[op])
    dy = upstream_grads(op, inputs, seed)
    if pass_ == "fwd_bwd":
        def fwd_bwd():
            for t in leaves:
                t.grad = None
            out = fn(*args)
            backward(out, dy)
            return out

        return Step(fwd_bwd, leaves)
    if pass_ == "bwd":
        if op in SCALAR_LOSS_OPS or op in LM_HEAD_OPS:
            raise ValueError(f"{op} has no separate bwd pass in the bench")
        out = fn(*args)

        def bwd():
            return torch.autograd.grad(out, leaves, dy, retain_graph=True)

        return Step(bwd, leaves)
    raise ValueError(f"unknown pass {pass_!r}")
