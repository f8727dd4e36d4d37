"""Modules: each stores its arguments as torch's modules do — public attributes of torch's names
(``reduction``, ``ignore_index``, ``label_smoothing``, ``dim``, …) that ``forward`` reads, so
assigning one changes what the next call computes — and calls the function in
``probact_gpu.functional``. Unlike torch's, every assignment is validated at once (the error
names the attribute) and ``repr`` shows every option that changes the result. Tensor options
(class weights, ``pos_weight``, a ``normalizer`` tensor, a tensor transform factor) are buffers,
so they follow ``.to(device)``; the class weights are in the ``state_dict`` (as torch's
``weight``), the others are not (an ``nn.Parameter`` stays a parameter)."""

from __future__ import annotations

from typing import Any

import torch

from . import functional
from .options import (
    REDUCTIONS,
    CrossEntropyOptions,
    DistillationOptions,
    split_student_factors,
    split_tensor_factors,
)


def _check_reduction(value: Any) -> str:
    if not isinstance(value, str) or value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def _check_dim(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"dim must be an int (or None, torch's implicit dim), got {value!r}")
    return value


def _check_float_tensor(name: str, value: Any) -> torch.Tensor | None:
    if value is not None and (not isinstance(value, torch.Tensor)
                              or not value.dtype.is_floating_point):
        raise TypeError(f"{name} must be None or a floating tensor, got "
                        f"{getattr(value, 'dtype', type(value).__name__)}")
    return value


def _store(module: torch.nn.Module, name: str, value: Any, *, persistent: bool = False) -> None:
    """Set option ``name``: a tensor as a buffer (an ``nn.Parameter`` as a parameter; None as an
    empty buffer when ``persistent``, as torch's ``weight``), anything else as a plain
    attribute, replacing whichever it was before."""
    for table in (module._buffers, module._parameters):
        table.pop(name, None)
    module.__dict__.pop(name, None)
    module._non_persistent_buffers_set.discard(name)
    if (isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)) or (
            value is None and persistent):
        module.register_buffer(name, value, persistent=persistent)
    else:
        torch.nn.Module.__setattr__(module, name, value)


class _DimModule(torch.nn.Module):
    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, _check_dim(value) if name == "dim" else value)


class Softmax(_DimModule):
    """As ``torch.nn.Softmax``; ``dim`` (an attribute, checked on assignment) defaults to -1."""

    def __init__(self, dim: int | None = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.softmax(input, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LogSoftmax(_DimModule):
    """As ``torch.nn.LogSoftmax``; ``dim`` (an attribute, checked on assignment) defaults to
    -1."""

    def __init__(self, dim: int | None = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.log_softmax(input, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Sigmoid(torch.nn.Module):
    """As ``torch.nn.Sigmoid``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.sigmoid(input)


class LogSigmoid(torch.nn.Module):
    """As ``torch.nn.LogSigmoid``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.logsigmoid(input)


class BCEWithLogitsLoss(torch.nn.Module):
    """As ``torch.nn.BCEWithLogitsLoss``: ``weight`` and ``pos_weight`` are buffers (in the
    ``state_dict``, as torch's), ``reduction`` (default ``"mean"``) an attribute; each is checked
    on assignment."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        reduction: str = "mean",
        pos_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", _check_float_tensor("weight", weight))
        self.register_buffer("pos_weight", _check_float_tensor("pos_weight", pos_weight))
        self.reduction = reduction

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "reduction":
            value = _check_reduction(value)
        elif name in ("weight", "pos_weight"):
            value = _check_float_tensor(name, value)
        super().__setattr__(name, value)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.binary_cross_entropy_with_logits(
            input, target, self.weight, reduction=self.reduction, pos_weight=self.pos_weight
        )

    def extra_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}"]
        for name in ("weight", "pos_weight"):
            t = getattr(self, name)
            if t is not None:
                parts.append(f"{name}=Tensor{tuple(t.shape)}")
        return ", ".join(parts)


# The cross-entropy family's options as module attributes, with their defaults (the defaults
# are left out of repr).
_CE_OPTIONS: dict[str, Any] = dict(
    ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
    logit_scale=1.0, logit_divisor=1.0, temperature=1.0, normalizer=None)


_TRANSFORM = ("logit_scale", "logit_divisor", "softcap", "temperature")


def _value_repr(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}"
    return repr(value)


class _CrossEntropyOptionsModule(torch.nn.Module):
    """The cross-entropy family's options as attributes of torch's names (``weight``: the
    per-class weights, a buffer in the ``state_dict``; ``ignore_index``, ``reduction``,
    ``label_smoothing``; then ``z_loss``, ``softcap``, ``logit_scale``, ``logit_divisor``,
    ``temperature``, ``normalizer``). An assignment is validated at once with every other
    option, by :class:`CrossEntropyOptions` (so ``normalizer`` needs ``reduction="sum"`` set
    first); a number is stored validated, a tensor as given, as a buffer (an ``nn.Parameter``
    as a parameter: a learnt ``logit_scale`` or ``temperature`` gets its gradient, the function
    folding it as ``probact_gpu.cross_entropy`` documents). ``options`` is the validated
    :class:`CrossEntropyOptions` of the current values (a tensor ``logit_scale``,
    ``logit_divisor`` or ``temperature`` stands there as 1.0: it is applied outside the
    kernels, never read on the host)."""

    _EXTRA: dict[str, Any] = {}  # the subclass's own options and their defaults

    def _init_options(self, weight: torch.Tensor | None, **values: Any) -> None:
        """Validate every option together, then store each (``__setattr__`` checks each later
        assignment against the others)."""
        self._build(weight=weight, **values)
        for name, value in values.items():
            self._put(name, value)
        _store(self, "weight", weight, persistent=True)
        object.__setattr__(self, "_options_ready", True)

    def _current(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _CE_OPTIONS}

    def _build(self, **values: Any) -> CrossEntropyOptions:
        kwargs = dict(values)
        if kwargs.get("ignore_index", -100) is None:  # LinearCrossEntropyLoss: None is -100
            kwargs["ignore_index"] = -100
        _, transform = split_tensor_factors(**{name: kwargs.pop(name) for name in _TRANSFORM
                                               if name in kwargs})
        return CrossEntropyOptions.from_kwargs(**kwargs, **transform)

    def _put(self, name: str, value: Any) -> None:
        if name == "ignore_index" and value is not None:
            value = self._build(ignore_index=value).ignore_index  # an int, as torch stores it
        elif name in _CE_OPTIONS and not isinstance(value, torch.Tensor | type(None)):
            value = getattr(self._number_options(name, value), name)
        _store(self, name, value)

    def _number_options(self, name: str, value: Any):
        """The validated number for option ``name`` (its home: the options or the transform)."""
        opts = self._build(**{name: value, **({"reduction": "sum"} if name == "normalizer"
                                              else {})})
        return opts.transform if name in ("softcap", "logit_scale", "logit_divisor",
                                          "temperature") else opts

    def __setattr__(self, name: str, value: Any) -> None:
        if not self.__dict__.get("_options_ready"):
            return super().__setattr__(name, value)
        if name in _CE_OPTIONS or name == "weight":
            values = dict(self._current(), weight=self.weight)
            values[name] = value
            self._build(**values)
            if name == "weight":
                _store(self, "weight", value, persistent=True)
            else:
                self._put(name, value)
        elif name in self._EXTRA:
            self._check_extra(**{name: value})
            super().__setattr__(name, value)
        else:
            super().__setattr__(name, value)

    def _check_extra(self, **values: Any) -> None:
        raise NotImplementedError

    @property
    def options(self) -> CrossEntropyOptions:
        """The validated options of the current attributes (class weights included)."""
        return self._build(weight=self.weight, **self._current())

    def _kwargs(self) -> dict:
        """The function's keywords: every option left at its default omitted."""
        kwargs = {name: value for name, value in self._current().items()
                  if isinstance(value, torch.Tensor) or value != _CE_OPTIONS[name]}
        if self.weight is not None:
            kwargs["weight"] = self.weight
        return kwargs

    def extra_repr(self) -> str:
        parts = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        if self.weight is not None:
            parts.append(f"weight=Tensor{tuple(self.weight.shape)}")
        values = dict(self._current())
        values.update({name: getattr(self, name) for name in self._EXTRA})
        defaults = dict(_CE_OPTIONS, **self._EXTRA)
        for name, value in values.items():
            if name in ("ignore_index", "reduction"):
                continue
            if isinstance(value, torch.Tensor) or value != defaults[name]:
                parts.append(f"{name}={_value_repr(value)}")
        return ", ".join(parts)


class CrossEntropyLoss(_CrossEntropyOptionsModule):
    """As ``torch.nn.CrossEntropyLoss`` (``weight``: per-class weights, a buffer;
    ``ignore_index``, ``reduction``, ``label_smoothing``: attributes), plus probact's
    keyword-only options (``z_loss``, the logit transform ``logit_scale`` → ``logit_divisor`` →
    ``softcap`` → ``temperature``, ``normalizer``, ``return_lse``, ``inplace_backward``,
    ``batch_invariant``, ``return_z_loss``, ``return_token_accuracy``,
    ``return_predicted_tokens``; see ``probact_gpu.cross_entropy``), attributes too. Every
    option is validated here, and again on each assignment."""

    _EXTRA = dict(return_lse=False, inplace_backward=False, batch_invariant=False,
                  return_z_loss=False, return_token_accuracy=False,
                  return_predicted_tokens=False)

    def __init__(
        self,
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
    ) -> None:
        super().__init__()
        flags = dict(return_lse=return_lse, inplace_backward=inplace_backward,
                     batch_invariant=batch_invariant, return_z_loss=return_z_loss,
                     return_token_accuracy=return_token_accuracy,
                     return_predicted_tokens=return_predicted_tokens)
        self._check_extra(**flags)
        for name, value in flags.items():
            setattr(self, name, value)
        self._init_options(weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                           logit_scale=logit_scale, logit_divisor=logit_divisor,
                           temperature=temperature, normalizer=normalizer)

    def _check_extra(self, **values: Any) -> None:
        for name, value in values.items():
            _check_flag(name, value)

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        return functional.cross_entropy(input, target, **self._kwargs(),
                                        **{name: getattr(self, name) for name in self._EXTRA})


class LinearCrossEntropyLoss(_CrossEntropyOptionsModule):
    """Fused LM head + loss: ``forward(input, linear_weight, target, linear_bias=None)`` is
    ``probact_gpu.linear_cross_entropy`` with the options stored here (torch's names:
    ``weight`` are per-class weights, a buffer; the head's ``linear_weight`` is passed in, so it
    stays owned by the model). ``ignore_index`` defaults to None, as torch's (-100 for class
    indices; class probabilities refuse an explicit one). Every option, ``chunk_size``,
    ``memory_budget``, ``low_memory``, ``batch_invariant``, ``fp32_precision`` and the
    ``return_*`` flags included, is validated here and again on each assignment."""

    _EXTRA = dict(chunk_size=None, memory_budget=None, low_memory=False, batch_invariant=False,
                  fp32_precision="ieee", return_z_loss=False, return_token_accuracy=False,
                  return_predicted_tokens=False)
    _FLAGS = ("low_memory", "batch_invariant", "return_z_loss", "return_token_accuracy",
              "return_predicted_tokens")

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        *,
        ignore_index: int | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        logit_scale: float | torch.Tensor = 1.0,
        logit_divisor: float | torch.Tensor = 1.0,
        temperature: float | torch.Tensor = 1.0,
        normalizer: float | torch.Tensor | None = None,
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        low_memory: bool = False,
        batch_invariant: bool = False,
        fp32_precision: str = "ieee",
        return_z_loss: bool = False,
        return_token_accuracy: bool = False,
        return_predicted_tokens: bool = False,
    ) -> None:
        super().__init__()
        extra = dict(chunk_size=chunk_size, memory_budget=memory_budget, low_memory=low_memory,
                     batch_invariant=batch_invariant, fp32_precision=fp32_precision,
                     return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
                     return_predicted_tokens=return_predicted_tokens)
        self._check_extra(**extra)
        for name, value in extra.items():
            setattr(self, name, value)
        self._init_options(weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                           logit_scale=logit_scale, logit_divisor=logit_divisor,
                           temperature=temperature, normalizer=normalizer)

    def _check_extra(self, **values: Any) -> None:
        from .ops._common import check_chunking
        from .ops.fused_head import check_fp32_precision

        current = {name: self.__dict__.get(name, default)
                   for name, default in self._EXTRA.items()}
        current.update(values)
        for name in self._FLAGS:
            _check_flag(name, current[name])
        check_chunking(current["chunk_size"], current["memory_budget"], current["low_memory"])
        check_fp32_precision(current["fp32_precision"], current["batch_invariant"])

    def _kwargs(self) -> dict:
        kwargs = super()._kwargs()
        if self.ignore_index is None:
            kwargs.pop("ignore_index", None)
        elif self.ignore_index == -100:
            kwargs["ignore_index"] = -100  # explicit: probabilities then raise, as torch
        return kwargs

    def forward(
        self,
        input: torch.Tensor,
        linear_weight: torch.Tensor,
        target: torch.Tensor,
        linear_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return functional.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, **self._kwargs(),
            **{name: getattr(self, name) for name in self._EXTRA},
        )


class DistillationLoss(torch.nn.Module):
    """``probact_gpu.distillation_loss`` with its options stored (validated here, once):
    ``forward(student_logits, teacher_logits, target=None)``; the teacher may be logits,
    log-probs or a ``TopKTeacher``."""

    def __init__(
        self,
        divergence: str = "kl",
        *,
        beta: float = 0.5,
        temperature: float | torch.Tensor = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        normalizer: float | torch.Tensor | None = None,
        hard_weight: float = 0.0,
        temperature_squared: bool = False,
        shared_vocab: int | None = None,
        student_logit_scale: float | torch.Tensor = 1.0,
        student_logit_divisor: float | torch.Tensor = 1.0,
        student_softcap: float | None = None,
        teacher_logit_scale: float = 1.0,
        teacher_logit_divisor: float = 1.0,
        teacher_softcap: float | None = None,
    ) -> None:
        super().__init__()
        _, transforms = split_student_factors(
            temperature=temperature, student_logit_scale=student_logit_scale,
            student_logit_divisor=student_logit_divisor, student_softcap=student_softcap,
            teacher_logit_scale=teacher_logit_scale, teacher_logit_divisor=teacher_logit_divisor,
            teacher_softcap=teacher_softcap)
        self.options = DistillationOptions.from_kwargs(
            divergence=divergence, beta=beta, ignore_index=ignore_index, reduction=reduction,
            normalizer=normalizer, hard_weight=hard_weight,
            temperature_squared=temperature_squared, shared_vocab=shared_vocab, **transforms)
        # a tensor student_logit_scale / student_logit_divisor (an nn.Parameter: a parameter of
        # this module) is kept and passed on, so it gets its gradient; ``options`` holds 1.0
        tensors = {name: value for name, value in (("student_logit_scale", student_logit_scale),
                                                   ("student_logit_divisor",
                                                    student_logit_divisor))
                   if isinstance(value, torch.Tensor)}
        self._student_tensors = tuple(tensors)
        for name, value in tensors.items():
            _store(self, name, value)

    def _call_kwargs(self) -> dict:
        kwargs = self.options.as_kwargs()
        kwargs.update({name: getattr(self, name) for name in self._student_tensors})
        return kwargs

    def forward(self, student_logits: torch.Tensor, teacher_logits,
                target: torch.Tensor | None = None) -> torch.Tensor:
        from .ops.distillation import distillation_loss

        return distillation_loss(student_logits, teacher_logits, target,
                                 **self._call_kwargs())

    def extra_repr(self) -> str:
        return _distillation_repr(self.options)


class LinearDistillationLoss(DistillationLoss):
    """``probact_gpu.linear_distillation_loss`` with its options stored: ``forward(
    student_input, student_weight, teacher_input, teacher_weight, target=None,
    student_bias=None, teacher_bias=None)`` (the heads stay owned by their models)."""

    def __init__(self, divergence: str = "kl", *, chunk_size: int | None = None,
                 memory_budget: int | None = None, **kwargs) -> None:
        super().__init__(divergence, **kwargs)
        from .ops._common import check_chunking

        self.chunk_size, self.memory_budget, _ = check_chunking(chunk_size, memory_budget)

    def forward(self, student_input: torch.Tensor, student_weight: torch.Tensor,
                teacher_input: torch.Tensor, teacher_weight: torch.Tensor,
                target: torch.Tensor | None = None, student_bias: torch.Tensor | None = None,
                teacher_bias: torch.Tensor | None = None) -> torch.Tensor:
        from .ops.linear_distillation import linear_distillation_loss

        return linear_distillation_loss(
            student_input, student_weight, teacher_input, teacher_weight, target,
            student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=self.chunk_size,
            memory_budget=self.memory_budget, **self._call_kwargs())


def _distillation_repr(options: DistillationOptions) -> str:
    defaults = DistillationOptions().as_kwargs()
    parts = [f"divergence={options.divergence!r}"]
    for name, value in options.as_kwargs().items():
        if name != "divergence" and value is not None and value != defaults.get(name):
            parts.append(f"{name}={value!r}")
    return ", ".join(parts)
