"""Modules: each validates its arguments once, stores them, and calls the function in
``probact_gpu.functional``. Tensors among the arguments (class weights, ``pos_weight``) are
buffers, so they follow ``.to(device)``."""

from __future__ import annotations

import torch

from . import functional
from .options import CrossEntropyOptions, DistillationOptions


class Softmax(torch.nn.Module):
    """As ``torch.nn.Softmax``; ``dim`` defaults to -1."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.softmax(input, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LogSoftmax(torch.nn.Module):
    """As ``torch.nn.LogSoftmax``; ``dim`` defaults to -1."""

    def __init__(self, dim: int = -1) -> None:
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
    """As ``torch.nn.BCEWithLogitsLoss``: ``weight`` and ``pos_weight`` are buffers,
    ``reduction`` defaults to ``"mean"``."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        reduction: str = "mean",
        pos_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = reduction

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.binary_cross_entropy_with_logits(
            input, target, self.weight, reduction=self.reduction, pos_weight=self.pos_weight
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


def _options_repr(options: CrossEntropyOptions) -> str:
    t = options.transform
    parts = [f"ignore_index={options.ignore_index}", f"reduction={options.reduction!r}"]
    if options.label_smoothing:
        parts.append(f"label_smoothing={options.label_smoothing}")
    if options.z_loss:
        parts.append(f"z_loss={options.z_loss}")
    for name, value, default in (("logit_scale", t.logit_scale, 1.0),
                                 ("logit_divisor", t.logit_divisor, 1.0),
                                 ("softcap", t.softcap, None),
                                 ("temperature", t.temperature, 1.0)):
        if value != default:
            parts.append(f"{name}={value}")
    return ", ".join(parts)


_DEFAULTS = CrossEntropyOptions().as_kwargs()


class _CrossEntropyOptionsModule(torch.nn.Module):
    """Holds a validated :class:`CrossEntropyOptions` (without the class weights, which live in
    the ``weight`` buffer so they follow the module across devices)."""

    def _set_options(self, weight: torch.Tensor | None, **kwargs) -> None:
        self.options = CrossEntropyOptions.from_kwargs(weight=weight, **kwargs).replace(
            weight=None)
        self.register_buffer("weight", weight)

    def _kwargs(self) -> dict:
        """The function's keywords, those left at their defaults omitted."""
        kwargs = {k: v for k, v in self.options.as_kwargs().items()
                  if v is not None and v != _DEFAULTS.get(k)}
        if self.weight is not None:
            kwargs["weight"] = self.weight
        return kwargs

    def extra_repr(self) -> str:
        return _options_repr(self.options)


class CrossEntropyLoss(_CrossEntropyOptionsModule):
    """As ``torch.nn.CrossEntropyLoss`` (``weight``: per-class weights, a buffer), plus
    probact's keyword-only options (``z_loss``, the logit transform ``logit_scale`` →
    ``logit_divisor`` → ``softcap`` → ``temperature``, ``normalizer``, ``return_lse``,
    ``inplace_backward``; see ``probact_gpu.cross_entropy``). Options are validated here,
    once."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        logit_divisor: float = 1.0,
        temperature: float = 1.0,
        normalizer: float | torch.Tensor | None = None,
        return_lse: bool = False,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        self._set_options(weight, ignore_index=ignore_index, reduction=reduction,
                          label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                          logit_scale=logit_scale, logit_divisor=logit_divisor,
                          temperature=temperature, normalizer=normalizer)
        self.return_lse = bool(return_lse)
        self.inplace_backward = bool(inplace_backward)

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        return functional.cross_entropy(input, target, **self._kwargs(),
                                        return_lse=self.return_lse,
                                        inplace_backward=self.inplace_backward)


class LinearCrossEntropyLoss(_CrossEntropyOptionsModule):
    """Fused LM head + loss: ``forward(input, linear_weight, target, linear_bias=None)`` is
    ``probact_gpu.linear_cross_entropy`` with the options stored here (torch's names:
    ``weight`` are per-class weights, a buffer; the head's ``linear_weight`` is passed in, so it
    stays owned by the model). Options are validated here, once."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        logit_divisor: float = 1.0,
        temperature: float = 1.0,
        normalizer: float | torch.Tensor | None = None,
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        low_memory: bool = False,
    ) -> None:
        super().__init__()
        self._set_options(weight, ignore_index=ignore_index, reduction=reduction,
                          label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                          logit_scale=logit_scale, logit_divisor=logit_divisor,
                          temperature=temperature, normalizer=normalizer)
        self.chunk_size, self.memory_budget = chunk_size, memory_budget
        self.low_memory = bool(low_memory)

    def forward(
        self,
        input: torch.Tensor,
        linear_weight: torch.Tensor,
        target: torch.Tensor,
        linear_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return functional.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, **self._kwargs(),
            chunk_size=self.chunk_size, memory_budget=self.memory_budget,
            low_memory=self.low_memory,
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
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        normalizer: float | torch.Tensor | None = None,
        hard_weight: float = 0.0,
        temperature_squared: bool = False,
        shared_vocab: int | None = None,
        student_logit_scale: float = 1.0,
        student_logit_divisor: float = 1.0,
        student_softcap: float | None = None,
        teacher_logit_scale: float = 1.0,
        teacher_logit_divisor: float = 1.0,
        teacher_softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.options = DistillationOptions.from_kwargs(
            divergence=divergence, beta=beta, temperature=temperature,
            ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
            hard_weight=hard_weight, temperature_squared=temperature_squared,
            shared_vocab=shared_vocab, student_logit_scale=student_logit_scale,
            student_logit_divisor=student_logit_divisor, student_softcap=student_softcap,
            teacher_logit_scale=teacher_logit_scale,
            teacher_logit_divisor=teacher_logit_divisor, teacher_softcap=teacher_softcap)

    def forward(self, student_logits: torch.Tensor, teacher_logits,
                target: torch.Tensor | None = None) -> torch.Tensor:
        from .ops.distillation import distillation_loss

        return distillation_loss(student_logits, teacher_logits, target,
                                 **self.options.as_kwargs())

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
            memory_budget=self.memory_budget, **self.options.as_kwargs())


def _distillation_repr(options: DistillationOptions) -> str:
    defaults = DistillationOptions().as_kwargs()
    parts = [f"divergence={options.divergence!r}"]
    for name, value in options.as_kwargs().items():
        if name != "divergence" and value is not None and value != defaults.get(name):
            parts.append(f"{name}={value!r}")
    return ", ".join(parts)
