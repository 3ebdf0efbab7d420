"""Tensor names and layouts of HF checkpoints, InternLM2 and Llama flavours, against ours.

Our parameter names are InternLM2's HF names (`model.layers.{i}.attention.wqkv.weight`, ...), so the
InternLM2 layout is the identity. The Llama layout renames every tensor and splits the fused `wqkv` into
`q_proj`, `k_proj`, `v_proj`. InternLM2's `wqkv` rows are grouped per KV head as `[q_0 .. q_{g-1}, k, v]`
(g query heads per KV head), which keeps a tensor-parallel shard a contiguous row slice; Llama's q/k/v
keep every query head in order, and query head `h * g + j` uses KV head `h` in both, so the conversion is
a pure reshape and concatenation: bitwise in both directions.

Every checkpoint tensor that one of ours is made from splits along the same dimension as ours, into the
same tensor-parallel chunks: chunk r of q, k and v fused is chunk r of `wqkv` (KV groups r*kv/tp onwards).
So a rank can read just its chunk of each source tensor and convert the chunks.
"""

from __future__ import annotations

import re

import torch

from internlm2.model.config import ModelConfig

# Tensors some checkpoints carry that are recomputed rather than loaded (RoPE frequency buffers).
IGNORED_SOURCE_TENSOR = re.compile(r".*rotary_emb\.inv_freq$")

_LLAMA_RENAMES = [  # (ours, llama) as regular-expression templates over the layer index
    (r"model\.tok_embeddings\.weight", "model.embed_tokens.weight"),
    (r"model\.layers\.(\d+)\.attention\.wo\.weight", "model.layers.{0}.self_attn.o_proj.weight"),
    (r"model\.layers\.(\d+)\.feed_forward\.w1\.weight", "model.layers.{0}.mlp.gate_proj.weight"),
    (r"model\.layers\.(\d+)\.feed_forward\.w3\.weight", "model.layers.{0}.mlp.up_proj.weight"),
    (r"model\.layers\.(\d+)\.feed_forward\.w2\.weight", "model.layers.{0}.mlp.down_proj.weight"),
    (r"model\.layers\.(\d+)\.attention_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (r"model\.layers\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    (r"model\.norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
]
_LLAMA_RENAMES = [(re.compile(ours + "$"), theirs) for ours, theirs in _LLAMA_RENAMES]
_WQKV = re.compile(r"model\.layers\.(\d+)\.attention\.wqkv\.weight$")
_LLAMA_QKV = ("model.layers.{0}.self_attn.q_proj.weight", "model.layers.{0}.self_attn.k_proj.weight",
              "model.layers.{0}.self_attn.v_proj.weight")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """InternLM2's interleaved `wqkv [(nh + 2 nkv) d, in]` from Llama's q `[nh d, in]`, k/v `[nkv d, in]`
    (or from the same tensor-parallel chunk of each: the number of KV heads is read off `k`)."""
    g, d = config.queries_per_kv, config.head_size
    kv = k.shape[0] // d
    groups = [q.reshape(kv, g, d, -1), k.reshape(kv, 1, d, -1), v.reshape(kv, 1, d, -1)]
    return torch.cat(groups, dim=1).reshape(kv * (g + 2) * d, -1)


def split_wqkv(wqkv: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Llama's (q, k, v) from InternLM2's interleaved `wqkv` (the inverse of `fuse_qkv`)."""
    kv, g, d = config.num_key_value_heads, config.queries_per_kv, config.head_size
    q, k, v = wqkv.reshape(kv, g + 2, d, -1).split([g, 1, 1], dim=1)
    return tuple(t.reshape(-1, wqkv.shape[-1]) for t in (q, k, v))


def source_names(name: str, fmt: str) -> list[str]:
    """The checkpoint tensors (in format `fmt`) that our tensor `name` is made from."""
    if fmt == "internlm2":
        return [name]
    if match := _WQKV.match(name):
        return [template.format(match[1]) for template in _LLAMA_QKV]
    for pattern, template in _LLAMA_RENAMES:
        if match := pattern.match(name):
            return [template.format(*match.groups())]
    raise KeyError(f"no Llama name for tensor {name!r}")


def to_ours(name: str, tensors: list[torch.Tensor], fmt: str, config: ModelConfig) -> torch.Tensor:
    """Our tensor `name` from its `source_names` tensors."""
    if fmt == "llama" and _WQKV.match(name):
        return fuse_qkv(*tensors, config)
    (tensor,) = tensors
    return tensor


def from_ours(name: str, tensor: torch.Tensor, fmt: str, config: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint tensors (names in format `fmt`) that our tensor `name` becomes."""
    parts = split_wqkv(tensor, config) if fmt == "llama" and _WQKV.match(name) else (tensor,)
    return list(zip(source_names(name, fmt), parts))
