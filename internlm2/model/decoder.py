"""One pre-norm InternLM2 decoder layer: x + attention(norm(x)), then h + feed_forward(norm(h))."""

from __future__ import annotations

import torch
from torch import nn

from internlm2.model.attention import Attention
from internlm2.model.config import ModelConfig
from internlm2.model.feed_forward import FeedForward
from internlm2.model.kernels import Kernels
from internlm2.model.kv_cache import KVCache
from internlm2.model.norm import RMSNorm
from internlm2.model.packing import Packing
from internlm2.parallel import ParallelState


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelState, layer_id: int, *, dtype=None, device=None):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.attention = Attention(config, parallel, layer_id, dtype=dtype, device=device)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.feed_forward = FeedForward(config, parallel, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], packing: Packing, kernels: Kernels,
                cache: KVCache | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x, kernels), rope, packing, kernels, cache)
        return h + self.feed_forward(self.ffn_norm(h, kernels), kernels)
