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
