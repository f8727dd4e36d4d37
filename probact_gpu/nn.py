"""Modules: each stores its arguments and calls the function in ``probact_gpu.functional``."""

from __future__ import annotations

import torch

from . import functional as F


class Softmax(torch.nn.Module):
    """As ``torch.nn.Softmax``; ``dim`` defaults to -1."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.softmax(input, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LogSoftmax(Softmax):
    """As ``torch.nn.LogSoftmax``; ``dim`` defaults to -1."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(input, self.dim)


class Sigmoid(torch.nn.Module):
    """As ``torch.nn.Sigmoid``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.sigmoid(input)


class LogSigmoid(torch.nn.Module):
    """As ``torch.nn.LogSigmoid``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(input)


class BCEWithLogitsLoss(torch.nn.Module):
    """As ``torch.nn.BCEWithLogitsLoss``: ``weight`` and ``pos_weight`` are buffers (they follow
    ``.to(device)``), ``reduction`` defaults to ``"mean"``."""

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
        return F.binary_cross_entropy_with_logits(
            input, target, self.weight, reduction=self.reduction, pos_weight=self.pos_weight
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class CrossEntropyLoss(torch.nn.Module):
    """As ``torch.nn.CrossEntropyLoss`` (``weight`` is a buffer), plus probact's keyword-only
    ``z_loss``, ``softcap``, ``logit_scale``, ``return_lse`` and ``inplace_backward`` (see
    ``probact_gpu.cross_entropy``)."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        return_lse: bool = False,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        return F.cross_entropy(
            input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, logit_scale=self.logit_scale,
            return_lse=self.return_lse, inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, logit_scale={self.logit_scale}")


class LinearCrossEntropyLoss(torch.nn.Module):
    """Fused LM head + loss: ``forward(input, weight, target, bias=None)`` is
    ``F.linear_cross_entropy`` with the options stored here (``class_weight`` is the per-class
    weight of cross_entropy). The head's weight is passed in, so it stays owned by the model."""

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        class_weight: torch.Tensor | None = None,
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        low_memory: bool = False,
    ) -> None:
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction
        self.low_memory = low_memory
        self.label_smoothing, self.z_loss = label_smoothing, z_loss
        self.softcap, self.logit_scale = softcap, logit_scale
        self.chunk_size, self.memory_budget = chunk_size, memory_budget
        self.register_buffer("class_weight", class_weight)

    def forward(
        self,
        input: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return F.linear_cross_entropy(
            input, weight, target, bias, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
            softcap=self.softcap, logit_scale=self.logit_scale, class_weight=self.class_weight,
            chunk_size=self.chunk_size, memory_budget=self.memory_budget,
            low_memory=self.low_memory,
        )
