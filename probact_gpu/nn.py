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
