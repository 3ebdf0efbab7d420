"""InternLM2's SwiGLU feed-forward: w2(silu(w1 x) * w3 x), w1/w3 column-parallel, w2 row-parallel."""

from __future__ import annotations

import torch
from torch import nn

from internlm2.model.config import ModelConfig
from internlm2.model.kernels import Kernels
from internlm2.parallel import ColumnParallelLinear, ParallelState, RowParallelLinear


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelState, *, dtype=None, device=None):
        super().__init__()
        sp = parallel.sequence_parallel
        hidden, ffn = config.hidden_size, config.intermediate_size
        self.w1 = ColumnParallelLinear(hidden, ffn, parallel=parallel, sequence_parallel=sp, dtype=dtype, device=device)
        self.w3 = ColumnParallelLinear(hidden, ffn, parallel=parallel, sequence_parallel=sp, dtype=dtype, device=device)
        self.w2 = RowParallelLinear(ffn, hidden, parallel=parallel, input_is_parallel=True, sequence_parallel=sp,
                                    dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        return self.w2(kernels.swiglu(self.w1(x), self.w3(x)))
