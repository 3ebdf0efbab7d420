"""InternLM2's SwiGLU feed-forward: w2(silu(w1 x) * w3 x), w1/w3 column-parallel, w2 row-parallel."""

from __future__ import annotations

import torch
from torch import nn

from internlm2.model.config import ModelConfig
from internlm2.model.kernels import Kernels
from internlm2.parallel import ColumnParallelLinear, ParallelState, RowParallelLinear
from internlm2.parallel.tensor_parallel import column_parallel_input


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelState, *, dtype=None, device=None):
        super().__init__()
        self.parallel = parallel
        sp = parallel.sequence_parallel
        hidden, ffn = config.hidden_size, config.intermediate_size
        self.w1 = ColumnParallelLinear(hidden, ffn, parallel=parallel, sequence_parallel=sp, dtype=dtype, device=device)
        self.w3 = ColumnParallelLinear(hidden, ffn, parallel=parallel, sequence_parallel=sp, dtype=dtype, device=device)
        self.w2 = RowParallelLinear(ffn, hidden, parallel=parallel, input_is_parallel=True, sequence_parallel=sp,
                                    dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        # w1 and w3 read the same input: enter the TP region once (one all-gather under sequence parallel,
        # one gradient all-reduce otherwise) instead of once per projection.
        x = column_parallel_input(x, self.parallel)
        return self.w2(kernels.swiglu(self.w1(x, input_prepared=True), self.w3(x, input_prepared=True)))
