"""The options of the cross-entropy family, in one validated, frozen home.

Every public entry point of the family (``cross_entropy``, ``linear_cross_entropy``, the
vocab-parallel ops, ``token_log_probs`` and their modules) builds one :class:`CrossEntropyOptions`
from its keywords, which validates each value once and names the offending argument. The options
travel as that object down to the ``torch.library`` boundary, where :meth:`CrossEntropyOptions.
schema_args` flattens them into native schema types (``reduction: str``, ``softcap: float |
None``), and :meth:`CrossEntropyOptions.from_schema` rebuilds them on the other side.

The logit transform (:class:`HeadTransform`) is applied inside the kernels, in fp32 (fp64 for fp64
logits), in one documented order, forward and backward::

    z = x (+ bias)                      the head's output (bias only in the fused linear ops)
    z = z · logit_scale                 Cohere-style logit scale
    z = z / logit_divisor               Granite-style ``logits_scaling``
    z = softcap · tanh(z / softcap)     Gemma-style final-logit softcapping (when not None)
    z = z / temperature                 sampling temperature (RL log-probs)

and the loss, log-probs, entropy and lse are those of ``softmax(z)``. The options hold numbers
only: a 0-d tensor ``logit_scale`` / ``logit_divisor`` / ``temperature`` (a learnt scale) is
taken out first by :func:`split_tensor_factors` and applied with torch ops outside the kernels
(to the logits, or to the fused heads' hidden states and bias), so autograd differentiates it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

Reduction = Literal["none", "sum", "mean"]
REDUCTIONS: tuple[str, ...] = ("none", "sum", "mean")
_INT64 = (-(2**63), 2**63 - 1)

__all__ = [
    "DIVERGENCES",
    "REDUCTIONS",
    "CrossEntropyOptions",
    "DistillationOptions",
    "HeadTransform",
    "Reduction",
    "as_index",
    "as_real",
    "fold_head_factor",
    "scale_by_factor",
    "split_student_factors",
    "split_tensor_factors",
]


# --------------------------------------------------------------------------- scalar rules


def as_index(name: str, value: Any) -> int:
    """An integer argument by torch's rule: a Python or NumPy integer, or a 0-d integer tensor
    (read on the host: only pass one that lives there). A float, bool, None or out-of-int64
    value raises, naming ``name``."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an int, got a tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if not _INT64[0] <= value <= _INT64[1]:
        raise ValueError(f"{name}={value} does not fit in int64")
    return value


def as_real(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> float:
    """A real argument by torch's rule (a Python or NumPy number, or a 0-d tensor on the host),
    checked against ``[low, high]`` (either end open on request) and finiteness; raises naming
    ``name``."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a number, got a tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    # Comparisons, not math.isnan / math.isinf: under torch.compile(dynamic=True) a number
    # that comes with a source (a default, a module attribute) is symbolic, and Dynamo traces
    # a comparison of it (a guard) where math.isnan would break the graph.
    if value != value or (finite and abs(value) == math.inf):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")
    return value


def check_normalizer(reduction: str, n: Any) -> float | torch.Tensor | None:
    """``normalizer`` by the families' rule: None, or with ``reduction="sum"`` only a positive
    number or a 0-d int/float tensor (a device tensor is never read on the host)."""
    if n is None:
        return None
    if reduction != "sum":
        raise ValueError("normalizer divides the summed loss: it needs reduction='sum', "
                         f"got reduction={reduction!r}")
    if isinstance(n, torch.Tensor):
        if n.ndim != 0 or not (n.dtype.is_floating_point or n.dtype in (torch.int32,
                                                                         torch.int64)):
            raise TypeError("normalizer must be a number or a 0-d int/float tensor, got "
                            f"shape {tuple(n.shape)}, dtype {n.dtype}")
        return n
    return as_real("normalizer", n, low=0.0, low_open=True)


# --------------------------------------------------------------------------- tensor factors


def _check_factor_tensor(name: str, value: torch.Tensor) -> None:
    if value.ndim != 0 or not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a number or a 0-d floating tensor, got a tensor of "
                        f"shape {tuple(value.shape)} and dtype {value.dtype}")


def refuse_grad(name: str, value: Any, why: str) -> None:
    """Raise when ``value`` is a tensor that requires grad (grad mode on): an option the loss
    is not differentiated with respect to (``why`` says why), whose gradient would silently be
    none."""
    if isinstance(value, torch.Tensor) and value.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{name} is a tensor that requires grad, but {why}: pass "
                           f"{name}.detach() or a float")


def split_tensor_factors(
    *,
    logit_scale: Any = 1.0,
    logit_divisor: Any = 1.0,
    softcap: Any = None,
    temperature: Any = 1.0,
    prefix: str = "",
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The head transform's tensor factors, taken out of the options and folded into one 0-d
    tensor that the public functions multiply into the logits (or, in the fused linear forms,
    into the hidden states and the bias) with torch ops, so autograd differentiates them.

    ``logit_scale``, ``logit_divisor`` and ``temperature`` are multiplicative, so a 0-d
    floating tensor given for one of them (on the input's device or the CPU; grad or not) is
    never read on the host (no sync; ``torch.compile`` traces it): ``factor = logit_scale /
    logit_divisor / temperature`` over the tensor ones, and each is replaced by 1.0 in the
    returned keywords, which go on to the options (floats). ``temperature`` divides *after*
    the softcap (``softcap(u) / T`` is not a rescale of ``u``): a tensor temperature with a
    softcap raises, naming both. A tensor ``softcap`` that requires grad raises (it is read
    on the host, as a number); one that does not is left to the options, which read it. No
    value check (a zero divisor or a non-positive temperature tensor gives what the
    arithmetic gives: inf / NaN). ``prefix`` names the arguments (``student_``).

    Returns ``(factor or None, keywords)``; the keywords are ``logit_scale``,
    ``logit_divisor``, ``softcap`` and ``temperature`` with the tensor factors at 1.0.
    """
    refuse_grad(prefix + "softcap", softcap,
                "the softcap is applied inside the kernels as a number (a softcap that "
                "requires grad is not supported)")
    values = dict(logit_scale=logit_scale, logit_divisor=logit_divisor, temperature=temperature)
    factor = None
    for name, value in values.items():
        if not isinstance(value, torch.Tensor):
            continue
        _check_factor_tensor(prefix + name, value)
        if name == "temperature" and softcap is not None:
            raise ValueError(
                f"{prefix}temperature is a tensor and {prefix}softcap is set: the temperature "
                f"divides after the softcap (softcap(u) / T is not a rescale of the logits), "
                f"so only a number can be applied there; pass {prefix}temperature as a float, "
                f"or drop {prefix}softcap")
        if name == "logit_scale":
            factor = value if factor is None else factor * value
        else:
            factor = 1.0 / value if factor is None else factor / value
        values[name] = 1.0
    return factor, dict(values, softcap=softcap)


def split_student_factors(
    *,
    temperature: Any = 1.0,
    student_logit_scale: Any = 1.0,
    student_logit_divisor: Any = 1.0,
    student_softcap: Any = None,
    teacher_logit_scale: Any = 1.0,
    teacher_logit_divisor: Any = 1.0,
    teacher_softcap: Any = None,
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """:func:`split_tensor_factors` for the distillation family: the student's tensor
    ``student_logit_scale`` / ``student_logit_divisor`` folded into one factor (applied to the
    student's logits, or its hidden states and bias), so they get their gradient. The teacher is
    not differentiated, so a teacher option or the shared ``temperature`` (it divides the
    teacher's logits too) that requires grad raises; one that does not is read as a number, as
    before (on the host: a device sync for a device tensor — pass a float). Returns
    ``(factor or None, keywords)``, the keywords with the folded ones at 1.0."""
    teacher = "distillation gives the teacher no gradient"
    refuse_grad("temperature", temperature,
                "the temperature divides the teacher's logits too, and " + teacher)
    for name, value in (("teacher_logit_scale", teacher_logit_scale),
                        ("teacher_logit_divisor", teacher_logit_divisor),
                        ("teacher_softcap", teacher_softcap)):
        refuse_grad(name, value, teacher)
    factor, student = split_tensor_factors(logit_scale=student_logit_scale,
                                           logit_divisor=student_logit_divisor,
                                           softcap=student_softcap, prefix="student_")
    return factor, dict(temperature=temperature, student_logit_scale=student["logit_scale"],
                        student_logit_divisor=student["logit_divisor"],
                        student_softcap=student_softcap,
                        teacher_logit_scale=teacher_logit_scale,
                        teacher_logit_divisor=teacher_logit_divisor,
                        teacher_softcap=teacher_softcap)


def scale_by_factor(x: torch.Tensor | None, factor: torch.Tensor | None,
                    name: str = "input") -> torch.Tensor | None:
    """``x * factor`` in ``x``'s dtype (a 0-d factor does not promote it), differentiable in
    both, or ``x`` itself when either is None. ``factor`` must live on ``x``'s device or the
    CPU."""
    if x is None or factor is None:
        return x
    check_factor_device(factor, x, name)
    return x * factor


def check_factor_device(factor: torch.Tensor, x: torch.Tensor, name: str = "input") -> None:
    """Raise unless the tensor factor lives on ``x``'s device or the CPU."""
    if factor.device != x.device and factor.device.type != "cpu":
        raise ValueError(f"the tensor logit_scale / logit_divisor / temperature is on "
                         f"{factor.device} but {name} is on {x.device}: pass it on "
                         f"{x.device} or the CPU")


def fold_head_factor(h: torch.Tensor, bias: torch.Tensor | None, factor: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused heads' fold of a tensor factor: ``(h · f) Wᵀ + b · f = f · (h Wᵀ + b)``, so the
    hidden states and the bias are scaled ((N, H) and (V,) products) and the logits, never
    formed, come out scaled."""
    return scale_by_factor(h, factor), scale_by_factor(bias, factor, "linear_bias")


# --------------------------------------------------------------------------- the transform


@dataclass(frozen=True)
class HeadTransform:
    """The logit transform of the LM head, applied in fp32 inside the kernels (module docstring
    gives the order): ``logit_scale`` (finite, any sign), ``logit_divisor`` (finite, nonzero),
    ``softcap`` (None or > 0), ``temperature`` (> 0)."""

    logit_scale: float = 1.0
    logit_divisor: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "logit_scale", as_real("logit_scale", self.logit_scale))
        divisor = as_real("logit_divisor", self.logit_divisor)
        if divisor == 0.0:
            raise ValueError("logit_divisor must be a nonzero finite number, got 0.0")
        set_(self, "logit_divisor", divisor)
        if self.softcap is not None:
            set_(self, "softcap", as_real("softcap", self.softcap, low=0.0, low_open=True))
        set_(self, "temperature",
             as_real("temperature", self.temperature, low=0.0, low_open=True))

    @property
    def pre_scale(self) -> float:
        """``logit_scale / logit_divisor`` (float64), the factor before the softcap; the kernels
        take it folded into ``kernel_factors``."""
        return self.logit_scale / self.logit_divisor

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature

    @property
    def kernel_mode(self) -> int:
        """The kernels' ``HEAD`` constexpr (``kernels/_head.py``): 0 the identity (no arithmetic),
        1 a scale (``logit_scale``, ``logit_divisor``, ``temperature``), 2 a softcap."""
        if self.softcap is not None:
            return 2
        return 0 if self.kernel_factors[0] == 1.0 else 1

    @property
    def kernel_factors(self) -> tuple[float, float, float]:
        """``(scale, u_scale, cap_scale)``, the kernels' arguments (``kernels/_head.py``), in
        float64: ``pre_scale / temperature`` (z = x · scale without a softcap; the chain rule's
        factor), ``pre_scale / softcap`` (u = x · u_scale) and ``softcap / temperature``
        (z = cap_scale · tanh u); the last two are 1.0 (unused) without a softcap."""
        scale = self.pre_scale / self.temperature
        if self.softcap is None:
            return scale, 1.0, 1.0
        return scale, self.pre_scale / self.softcap, self.softcap / self.temperature

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The transform in torch ops on a float tensor (references, the soft-target path)."""
        z = x * self.pre_scale if self.pre_scale != 1.0 else x
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        if self.temperature != 1.0:
            z = z / self.temperature
        return z


# --------------------------------------------------------------------------- the options


@dataclass(frozen=True, eq=False)
class CrossEntropyOptions:
    """The cross-entropy family's options, validated at construction.

    ``weight``: per-class weights (C,) or None (torch's ``weight``); ``ignore_index``: an int64
    target value whose rows add nothing; ``reduction``: ``"none" | "sum" | "mean"``;
    ``label_smoothing`` in [0, 1]; ``z_loss`` ≥ 0 (adds ``z_loss · lse²`` per non-ignored row;
    ``"mean"`` averages it over those rows, whatever the class weights);
    ``transform``: the :class:`HeadTransform`; ``normalizer``: with ``reduction="sum"`` only, a
    number or a 0-d device tensor the summed loss is divided by (e.g. Hugging Face's
    ``num_items_in_batch``), so any trainer's counting rule is reproduced without a host sync.
    """

    weight: torch.Tensor | None = None
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    transform: HeadTransform = field(default_factory=HeadTransform)
    normalizer: float | torch.Tensor | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "ignore_index", as_index("ignore_index", self.ignore_index))
        if not isinstance(self.reduction, str) or self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        set_(self, "label_smoothing",
             as_real("label_smoothing", self.label_smoothing, low=0.0, high=1.0))
        set_(self, "z_loss", as_real("z_loss", self.z_loss, low=0.0))
        if not isinstance(self.transform, HeadTransform):
            raise TypeError(f"transform must be a HeadTransform, got {self.transform!r}")
        if self.weight is not None:
            w = self.weight
            if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point:
                raise TypeError("weight (per-class weights) must be a floating tensor, got "
                                f"{getattr(w, 'dtype', type(w).__name__)}")
            if w.ndim != 1:
                raise ValueError(f"weight (per-class weights) must be 1-D (C,), got shape "
                                 f"{tuple(w.shape)}")
        set_(self, "normalizer", check_normalizer(self.reduction, self.normalizer))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_kwargs(
        cls,
        *,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        logit_scale: float = 1.0,
        logit_divisor: float = 1.0,
        softcap: float | None = None,
        temperature: float = 1.0,
        normalizer: float | torch.Tensor | None = None,
    ) -> CrossEntropyOptions:
        """The options from the public functions' keywords (each validated, named on error)."""
        transform = HeadTransform(logit_scale=logit_scale, logit_divisor=logit_divisor,
                                  softcap=softcap, temperature=temperature)
        return cls(weight=weight, ignore_index=ignore_index, reduction=reduction,
                   label_smoothing=label_smoothing, z_loss=z_loss, transform=transform,
                   normalizer=normalizer)

    def as_kwargs(self) -> dict[str, Any]:
        """The public functions' keywords for these options (the inverse of
        :meth:`from_kwargs`): what a module passes on to its function."""
        t = self.transform
        return dict(weight=self.weight, ignore_index=self.ignore_index,
                    reduction=self.reduction, label_smoothing=self.label_smoothing,
                    z_loss=self.z_loss, logit_scale=t.logit_scale,
                    logit_divisor=t.logit_divisor, softcap=t.softcap,
                    temperature=t.temperature, normalizer=self.normalizer)

    def replace(self, **changes: Any) -> CrossEntropyOptions:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @property
    def scales_z_term(self) -> bool:
        """True when the kernels scale ``z_loss`` by the device scalar ``Σ w_t / (non-ignored
        rows)``: a mean over class-index targets with class weights and a z-loss, whose z term
        is averaged over the tokens, not divided by Σ w_t (``docs/cross_entropy.md``)."""
        return self.reduction == "mean" and self.weight is not None and self.z_loss > 0.0

    # ------------------------------------------------------------------ checks against input

    def check_weight(self, n_classes: int, device: torch.device) -> None:
        """Raise unless ``weight`` is None or (n_classes,) on ``device``."""
        w = self.weight
        if w is None:
            return
        if w.shape[0] != n_classes:
            raise ValueError(f"weight (per-class weights) must have shape ({n_classes},), got "
                             f"{tuple(w.shape)}")
        if w.device != device:
            raise ValueError(f"weight is on {w.device} but the logits are on {device}: all "
                             "tensors must be on one device")

    def refuse_weight_grad(self) -> None:
        """Raise, as torch's ``cross_entropy`` does, when the per-class ``weight`` requires grad
        (grad mode on) for a loss of class-index targets, which is not differentiable w.r.t. it
        (with class probabilities it is: those paths give the weights their gradient)."""
        w = self.weight
        if w is not None and w.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "weight (per-class weights) requires grad, but with class-index targets the loss "
                "is not differentiable with respect to argument 'weight' (torch's cross_entropy "
                "refuses it too): pass weight.detach(), or class-probability targets")

    # ------------------------------------------------------------------ the op boundary

    def schema_args(self) -> tuple:
        """Flattened for a ``torch.library`` op, in this order and with these schema types:
        ``weight: Tensor?, ignore_index: int, reduction: str, label_smoothing: float,
        z_loss: float, logit_scale: float, logit_divisor: float, softcap: float?,
        temperature: float, normalizer: Tensor?, normalizer_value: float?``."""
        t = self.transform
        n = self.normalizer
        return (self.weight, self.ignore_index, self.reduction, self.label_smoothing,
                self.z_loss, t.logit_scale, t.logit_divisor, t.softcap, t.temperature,
                n if isinstance(n, torch.Tensor) else None,
                None if isinstance(n, torch.Tensor) else n)

    @classmethod
    def from_schema(cls, weight, ignore_index, reduction, label_smoothing, z_loss, logit_scale,
                    logit_divisor, softcap, temperature, normalizer,
                    normalizer_value) -> CrossEntropyOptions:
        """Inverse of :meth:`schema_args`."""
        return cls(weight=weight, ignore_index=ignore_index, reduction=reduction,
                   label_smoothing=label_smoothing, z_loss=z_loss,
                   transform=HeadTransform(logit_scale, logit_divisor, softcap, temperature),
                   normalizer=normalizer if normalizer is not None else normalizer_value)

    N_SCHEMA_ARGS = 11


# --------------------------------------------------------------------------- distillation

DIVERGENCES: tuple[str, ...] = ("kl", "reverse_kl", "jsd", "jsd_continuous", "tvd")
# The kernels' ``DIVERGENCE`` constexpr (kernels/distillation.py).
DIVERGENCE_KIND = {"kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3}


@dataclass(frozen=True, eq=False)
class DistillationOptions:
    """The distillation family's options (``probact_gpu.distillation_loss`` documents each),
    validated at construction, each error naming its argument.

    ``divergence`` in :data:`DIVERGENCES`; ``beta`` in [0, 1] (JSD only); ``temperature`` > 0,
    applied to both heads after their own transforms; ``ignore_index`` (int64);
    ``reduction`` ``"none" | "sum" | "mean"``; ``normalizer`` (``"sum"`` only: a number or a 0-d
    device tensor); ``hard_weight`` ≥ 0 (the student's cross-entropy against ``target``, at its
    own transform without the temperature); ``temperature_squared`` (multiply the divergence
    by T²); ``shared_vocab`` (None: both heads' class counts must agree; else the number of
    leading classes both distributions are taken over, each renormalised over them); the
    ``student`` and ``teacher`` transforms (:class:`HeadTransform` without the temperature,
    which is ``temperature``).
    """

    divergence: str = "kl"
    beta: float = 0.5
    temperature: float = 1.0
    ignore_index: int = -100
    reduction: str = "mean"
    normalizer: float | torch.Tensor | None = None
    hard_weight: float = 0.0
    temperature_squared: bool = False
    shared_vocab: int | None = None
    student: HeadTransform = field(default_factory=HeadTransform)
    teacher: HeadTransform = field(default_factory=HeadTransform)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.divergence, str) or self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        set_(self, "beta", as_real("beta", self.beta, low=0.0, high=1.0))
        set_(self, "temperature",
             as_real("temperature", self.temperature, low=0.0, low_open=True))
        set_(self, "ignore_index", as_index("ignore_index", self.ignore_index))
        if not isinstance(self.reduction, str) or self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        set_(self, "hard_weight", as_real("hard_weight", self.hard_weight, low=0.0))
        if not isinstance(self.temperature_squared, bool):
            raise TypeError(f"temperature_squared must be a bool, got "
                            f"{self.temperature_squared!r}")
        if self.shared_vocab is not None:
            n = as_index("shared_vocab", self.shared_vocab)
            if n < 1:
                raise ValueError(f"shared_vocab must be a positive number of classes, got {n}")
            set_(self, "shared_vocab", n)
        for name in ("student", "teacher"):
            t = getattr(self, name)
            if not isinstance(t, HeadTransform) or t.temperature != 1.0:
                raise TypeError(f"{name} must be a HeadTransform without a temperature (the "
                                f"shared temperature is its own option), got {t!r}")
        set_(self, "normalizer", check_normalizer(self.reduction, self.normalizer))

    @classmethod
    def from_kwargs(cls, *, divergence="kl", beta=0.5, temperature=1.0, ignore_index=-100,
                    reduction="mean", normalizer=None, hard_weight=0.0,
                    temperature_squared=False, shared_vocab=None, student_logit_scale=1.0,
                    student_logit_divisor=1.0, student_softcap=None, teacher_logit_scale=1.0,
                    teacher_logit_divisor=1.0, teacher_softcap=None) -> DistillationOptions:
        """The options from the public functions' keywords (each validated, named on error)."""
        student = HeadTransform(logit_scale=_named("student_logit_scale", student_logit_scale),
                                logit_divisor=_named("student_logit_divisor",
                                                     student_logit_divisor),
                                softcap=_named("student_softcap", student_softcap))
        teacher = HeadTransform(logit_scale=_named("teacher_logit_scale", teacher_logit_scale),
                                logit_divisor=_named("teacher_logit_divisor",
                                                     teacher_logit_divisor),
                                softcap=_named("teacher_softcap", teacher_softcap))
        return cls(divergence=divergence, beta=beta, temperature=temperature,
                   ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
                   hard_weight=hard_weight, temperature_squared=temperature_squared,
                   shared_vocab=shared_vocab, student=student, teacher=teacher)

    def as_kwargs(self) -> dict[str, Any]:
        """The public functions' keywords (the inverse of :meth:`from_kwargs`)."""
        s, t = self.student, self.teacher
        return dict(divergence=self.divergence, beta=self.beta, temperature=self.temperature,
                    ignore_index=self.ignore_index, reduction=self.reduction,
                    normalizer=self.normalizer, hard_weight=self.hard_weight,
                    temperature_squared=self.temperature_squared,
                    shared_vocab=self.shared_vocab, student_logit_scale=s.logit_scale,
                    student_logit_divisor=s.logit_divisor, student_softcap=s.softcap,
                    teacher_logit_scale=t.logit_scale, teacher_logit_divisor=t.logit_divisor,
                    teacher_softcap=t.softcap)

    def replace(self, **changes: Any) -> DistillationOptions:
        return replace(self, **changes)

    # ------------------------------------------------------------------ what the kernels take

    @property
    def kernel_divergence(self) -> tuple[int, float]:
        """``(DIVERGENCE, coef)``: TRL's JSD at β = 0 / 1 is KL(P‖Q) / KL(Q‖P) (its special
        cases), as is the continuous JSD, elsewhere divided by β(1 − β); the soft coefficient
        ``coef`` carries that division and T² when ``temperature_squared``."""
        name, beta = self.divergence, self.beta
        coef = self.temperature ** 2 if self.temperature_squared else 1.0
        if name in ("jsd", "jsd_continuous"):
            if beta == 0.0:
                return DIVERGENCE_KIND["kl"], coef
            if beta == 1.0:
                return DIVERGENCE_KIND["reverse_kl"], coef
            if name == "jsd_continuous":
                coef /= beta * (1.0 - beta)
            return DIVERGENCE_KIND["jsd"], coef
        return DIVERGENCE_KIND[name], coef

    @property
    def soft_transforms(self) -> tuple[HeadTransform, HeadTransform, HeadTransform]:
        """(student, teacher, hard): the heads' transforms with the temperature, and the
        student's without it (the hard term's)."""
        s, t, temp = self.student, self.teacher, self.temperature
        return (replace(s, temperature=temp), replace(t, temperature=temp), s)

    def kernel_args(self) -> tuple[tuple[float, ...], dict[str, int | bool]]:
        """The kernels' runtime floats — the three transforms' factors (student, teacher, hard:
        ``HeadTransform.kernel_factors``), β, 1 − β, coef, hard_weight — and their constexprs
        ``HEAD_S``, ``HEAD_T``, ``DIVERGENCE``, ``HAS_HARD``. The hard head runs with the
        student's kind (a scale kind reaches the identity exactly: fma(x, 1, 0))."""
        student, teacher, hard = self.soft_transforms
        kind, coef = self.kernel_divergence
        floats = (*student.kernel_factors, *teacher.kernel_factors, *hard.kernel_factors,
                  self.beta, 1.0 - self.beta, coef, self.hard_weight)
        head_s = max(student.kernel_mode, hard.kernel_mode) if self.hard_weight else \
            student.kernel_mode
        flags = dict(HEAD_S=head_s, HEAD_T=teacher.kernel_mode, DIVERGENCE=kind,
                     HAS_HARD=self.hard_weight > 0.0)
        return floats, flags

    # ------------------------------------------------------------------ the op boundary

    def schema_args(self) -> tuple:
        """Flattened for a ``torch.library`` op, in this order: ``divergence: str, beta: float,
        temperature: float, ignore_index: int, hard_weight: float, temperature_squared: bool,
        shared_vocab: int?, student_logit_scale, student_logit_divisor: float,
        student_softcap: float?, teacher_logit_scale, teacher_logit_divisor: float,
        teacher_softcap: float?`` (reduction and normalizer stay outside the logits op)."""
        s, t = self.student, self.teacher
        return (self.divergence, self.beta, self.temperature, self.ignore_index,
                self.hard_weight, self.temperature_squared, self.shared_vocab, s.logit_scale,
                s.logit_divisor, s.softcap, t.logit_scale, t.logit_divisor, t.softcap)

    N_SCHEMA_ARGS = 13

    @classmethod
    def from_schema(cls, divergence, beta, temperature, ignore_index, hard_weight,
                    temperature_squared, shared_vocab, s_scale, s_divisor, s_softcap, t_scale,
                    t_divisor, t_softcap, reduction="mean",
                    normalizer=None) -> DistillationOptions:
        """Inverse of :meth:`schema_args` (plus the reduction and normalizer)."""
        return cls(divergence=divergence, beta=beta, temperature=temperature,
                   ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
                   hard_weight=hard_weight, temperature_squared=temperature_squared,
                   shared_vocab=shared_vocab, student=HeadTransform(s_scale, s_divisor, s_softcap),
                   teacher=HeadTransform(t_scale, t_divisor, t_softcap))


def _named(name: str, value: Any) -> Any:
    """Validate one transform keyword under its public name (the HeadTransform would name its
    own field, ``softcap``, not ``teacher_softcap``)."""
    if value is None:
        return None
    if name.endswith("softcap"):
        return as_real(name, value, low=0.0, low_open=True)
    value = as_real(name, value)
    if name.endswith("divisor") and value == 0.0:
        raise ValueError(f"{name} must be a nonzero finite number, got 0.0")
    return value
