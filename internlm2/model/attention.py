"""InternLM2 attention: fused `wqkv` in the per-KV-group interleaved layout, RoPE, GQA, `wo`.

Built from the tensor-parallel layers (plain linears at TP=1). `wqkv` is column-parallel: InternLM2 stores
its rows grouped per KV head (`[q_0 .. q_{g-1}, k, v]` for each of the KV heads), so rank r's contiguous
chunk holds whole groups, i.e. its own query heads together with the K/V heads they read. `wo` is
row-parallel. Attention runs on packed tokens `[T, heads, D]` with `cu_seqlens` (see packing.py); with a
KV cache it runs the prefill on the packed prompts and each decode step against the cache; under context
parallelism it is the ring over the CP ranks' shares of each sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from internlm2.model.config import ModelConfig
from internlm2.model.kernels import Kernels
from internlm2.model.kv_cache import KVCache
from internlm2.model.packing import Packing
from internlm2.parallel import ColumnParallelLinear, ParallelState, RowParallelLinear
from internlm2.parallel.context_parallel import ring_attention


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelState, layer_id: int, *, dtype=None, device=None):
        super().__init__()
        tp = parallel.tp_size
        self.parallel = parallel
        self.layer_id = layer_id
        self.head_dim = config.head_size
        self.queries_per_kv = config.queries_per_kv
        self.local_kv_heads = config.num_key_value_heads // tp
        self.local_heads = config.num_attention_heads // tp
        sp = parallel.sequence_parallel
        self.wqkv = ColumnParallelLinear(
            config.hidden_size, config.qkv_size, parallel=parallel, sequence_parallel=sp, dtype=dtype, device=device,
        )
        self.wo = RowParallelLinear(
            config.num_attention_heads * config.head_size, config.hidden_size, parallel=parallel,
            input_is_parallel=True, sequence_parallel=sp, dtype=dtype, device=device,
        )

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], packing: Packing, kernels: Kernels,
                cache: KVCache | None = None) -> torch.Tensor:
        cos, sin = rope
        qkv = self.wqkv(x)
        tokens = qkv.shape[0]
        g, d = self.queries_per_kv, self.head_dim
        qkv = qkv.view(tokens, self.local_kv_heads, g + 2, d)
        # apply_rope takes the strided views straight out of the fused projection and returns
        # contiguous [T, kv, g, D] / [T, kv, D] tensors, so q needs no copy of its own.
        q = kernels.apply_rope(qkv[:, :, :g], cos, sin).view(tokens, self.local_heads, d)
        k = kernels.apply_rope(qkv[:, :, g], cos, sin)
        v = qkv[:, :, g + 1].contiguous()
        if packing.context is not None:
            out = ring_attention(q, k, v, packing.context, self.parallel, attention=kernels.flash_attention,
                                 overlap=self.parallel.config.cp_overlap)
        elif cache is None or cache.is_empty:
            out = kernels.flash_attention(q, k, v, packing.cu_seqlens, packing.max_seqlen, causal=True)
            if cache is not None:
                cache.write_prefill(self.layer_id, k, v, packing)
        else:
            out = cache.decode_attention(self.layer_id, q, k, v, kernels.kv_cache_attention)
        return self.wo(out.reshape(tokens, self.local_heads * d))
