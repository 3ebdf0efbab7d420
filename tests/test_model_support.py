"""Shared builders for the model tests (no tests here): tiny configs, random models, HF oracles."""

from __future__ import annotations

import pytest
import torch

from internlm2.model import InternLM2ForCausalLM, ModelConfig
from tests.numerics import fresh_seed

# 8 query heads over 2 KV heads (GQA 4), head_dim 8: small enough for CPU, every layout path exercised.
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_layers=2, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=10_000.0, rope_scaling_factor=2.0)


def fused_kernels_available() -> bool:
    """The `fused` path needs CPU kernels for every op the model calls."""
    ops = ("rms_norm_forward", "swiglu_forward", "rope_cos_sin", "apply_rope", "flash_attention_forward",
           "cross_entropy_chunk_")
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"internlm2::{op}", "CPU") for op in ops)


KERNEL_CHOICES = [
    "reference",
    pytest.param("fused", marks=pytest.mark.skipif(not fused_kernels_available(),
                                                   reason="the CPU kernels of internlm2.ops are not all built yet")),
]


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, "kernels": "reference", **overrides})


def random_model(config: ModelConfig, dtype=torch.float32, std: float = 0.2) -> InternLM2ForCausalLM:
    """A model with every weight random (norm weights too, so a swapped or skipped norm shows), seeded
    fresh per test. std 0.2 spreads the logits so greedy decoding has no near-ties."""
    g = torch.Generator().manual_seed(fresh_seed())
    model = InternLM2ForCausalLM(config, dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def random_ids(shape, vocab_size: int, seed: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(fresh_seed() if seed is None else seed)
    return torch.randint(0, vocab_size, shape, generator=g)
