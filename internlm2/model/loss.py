"""The causal-LM loss from the final hidden states and the output weight, without full logits.

The trainer calls this (through `InternLM2ForCausalLM(..., labels=...)` or directly): `hidden [T, H]` after
the final norm, `weight [V, H]` (this rank's vocabulary shard under tensor parallelism), `labels [T]`
already shifted (label t is the token after position t, `ignore_index` where there is none, e.g. at the
end of every packed document).
"""

from __future__ import annotations

import torch

from internlm2.constants import IGNORE_INDEX
from internlm2.model.kernels import Kernels
from internlm2.parallel import ParallelState
from internlm2.parallel.cross_entropy import vocab_parallel_linear_cross_entropy


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, kernels: Kernels,
                   parallel: ParallelState, reduction: str = "mean", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `labels` (float32; "mean" over non-ignored tokens,
    "sum", or "none" per token). Under tensor parallelism `weight` is this rank's vocabulary shard and
    `hidden` its token shard when sequence parallel; at TP=1 it is the selected kernels' op."""
    return vocab_parallel_linear_cross_entropy(hidden, weight, labels, parallel, ignore_index=ignore_index,
                                               reduction=reduction, single_device=kernels.linear_cross_entropy)
