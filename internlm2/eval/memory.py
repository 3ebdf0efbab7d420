"""What a long-context evaluation will need in memory, estimated from the model's config before anything
is loaded, and checked against what the device has free.

Generation holds the weights, the KV cache (every layer's keys and values for prompt + answer, per
sequence) and, during the prefill of a batch of prompts, one layer's activations for all their tokens
at a time (no gradients are kept). The fused attention kernel works in tiles; the reference attention
materialises each sequence's heads x length x length fp32 scores and probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from internlm2.eval import EvalError
from internlm2.model.config import ModelConfig
from internlm2.model.pretrained import full_parameter_shapes

GiB = 2 ** 30


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def describe(self) -> str:
        return (f"about {_size(self.total)} (weights {_size(self.weights)}, KV cache {_size(self.kv_cache)}, "
                f"activations {_size(self.activations)})")


def _size(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB // 10 else f"{nbytes / 2 ** 20:.1f} MiB"


def estimate(config: ModelConfig, *, length: int, batch: int, new_tokens: int, dtype: torch.dtype,
             kv_cache: bool = True, all_logits: bool = False) -> Estimate:
    """Peak memory of running `batch` sequences of `length` tokens through the model (plus `new_tokens`
    decoded with a KV cache when `kv_cache`); `all_logits`: every position's fp32 logits are formed at
    once (the reference loss), not only the last ones."""
    size = torch.empty(0, dtype=dtype).element_size()
    tokens = batch * length
    h, d = config.hidden_size, config.head_size
    cache = (2 * config.num_layers * batch * (length + new_tokens) * config.num_key_value_heads * d * size
             if kv_cache else 0)
    # One layer at a time: the residual stream and its norm, then either attention's projections or the
    # feed-forward's three intermediate products, whichever is larger.
    attention = config.qkv_size + 2 * config.num_attention_heads * d
    per_token = 3 * h + max(attention, 3 * config.intermediate_size)
    activations = tokens * per_token * size + tokens * 2 * d * 4  # + the fp32 RoPE tables
    if config.kernels == "reference":
        activations += 2 * config.num_attention_heads * length * length * 4  # one sequence's scores, probs
    activations += (tokens if all_logits else batch) * config.vocab_size * 4
    weights = sum(math.prod(shape) for shape in full_parameter_shapes(config).values()) * size
    return Estimate(weights, cache, activations)


def available_bytes(device: torch.device) -> int:
    """Free memory on `device`: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise EvalError("cannot tell how much memory is free (no MemAvailable in /proc/meminfo)")


def check_fits(need: Estimate, device: torch.device, what: str, available: int | None = None) -> None:
    """Raises when `need` exceeds the free memory of `device`; `what` names the length and batch."""
    free = available_bytes(device) if available is None else available
    if need.total > free:
        raise EvalError(f"{what} needs {need.describe()}, more than the {_size(free)} free on {device}; "
                        "use shorter --lengths or a smaller --batch-size")
