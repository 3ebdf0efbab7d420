"""RMSNorm as a module: the weight is the parameter, the math is the selected kernel's."""

from __future__ import annotations

import torch
from torch import nn

from internlm2.model.kernels import Kernels


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, *, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
