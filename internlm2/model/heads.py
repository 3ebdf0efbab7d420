"""What sits on the backbone's last hidden states: the language-model head and the scalar head.

Both read a `BackboneOutput` (hidden states of the tokens this rank computed, and how they map to the
caller's tokens), so a stage's loss is written once for every parallel layout:

- `LMHead` (HF name `output`, vocabulary-parallel over TP): the token loss without full logits, per-token
  log-probabilities with a backward (PPO's ratio and KL), logits (gathered, for sampling), entropy.
- `ScalarHead` (HF name `v_head`, InternLM2's reward-model layout; also a PPO critic's value head): one
  score per token, read at the positions the caller names (a reward token per sequence, every response
  token for a critic).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from internlm2.constants import IGNORE_INDEX
from internlm2.model.kernels import Kernels
from internlm2.model.loss import causal_lm_loss
from internlm2.model.packing import Packing
from internlm2.parallel import ColumnParallelLinear, ParallelState
from internlm2.parallel.context_parallel import sum_over_context
from internlm2.parallel.cross_entropy import vocab_parallel_entropy
from internlm2.parallel.mappings import gather_from_sequence


@dataclass
class BackboneOutput:
    """The last hidden states of one call and where their tokens come from.

    hidden: `[T_local, H]`, the tokens this rank computed in packed order: all of the call's (non-padding)
    tokens, this rank's zigzag share of them under context parallelism, and under sequence parallelism
    this TP rank's 1/tp slice of those. `shape` is the caller's token shape (`[B, S]` padded or `[T]`
    packed). `head` is the stage's head on the last pipeline stage (None before it)."""

    hidden: torch.Tensor
    packing: Packing
    shape: tuple[int, ...]
    parallel: ParallelState
    head: nn.Module | None = None

    def tokens(self, x: torch.Tensor, what: str = "per-token tensor") -> torch.Tensor:
        """A per-token tensor in the caller's layout (labels, masks: `shape + ...`) -> the computed tokens'
        order, `[T_computed, ...]` (before the sequence-parallel slice: heads gather over TP first)."""
        if tuple(x.shape[:len(self.shape)]) != self.shape:
            raise ValueError(f"{what} has shape {tuple(x.shape)}, expected the inputs' {self.shape}")
        return self.packing.pack(x)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """Values of the computed tokens `[T_computed, ...]` -> the caller's layout (padded: zeros at padding)."""
        return self.packing.unpack(x)

    def stage_output(self) -> torch.Tensor:
        """The hidden states as the next pipeline stage (or a caller) takes them: this rank's tokens
        `[T_local, H]` under sequence/context parallelism, else in the caller's layout."""
        if self.parallel.sequence_parallel or self.parallel.cp_size > 1:
            return self.hidden
        return self.unpack(self.hidden)

    def gathered_hidden(self) -> torch.Tensor:
        """`hidden` of all computed tokens (all-gathered over TP under sequence parallelism, with a backward
        that keeps this rank's slice: every TP rank computes the same thing from it)."""
        if not self.parallel.sequence_parallel:
            return self.hidden
        return gather_from_sequence(self.hidden, self.parallel.tp_group, grad_is_partial=False)


class LMHead(ColumnParallelLinear):
    """The output projection to the vocabulary, split over TP ranks by vocabulary rows."""

    def __init__(self, hidden_size: int, vocab_size: int, parallel: ParallelState, kernels: Kernels, *, dtype=None,
                 device=None):
        super().__init__(hidden_size, vocab_size, parallel=parallel, gather_output=True, dtype=dtype, device=device)
        self.kernels = kernels

    def loss(self, out: BackboneOutput, labels: torch.Tensor, *, reduction: str = "sum",
             ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """Cross-entropy of the computed tokens against `labels` (caller's layout, already shifted), float32:
        "sum" (this rank's share under CP), "mean" or "none" (per computed token)."""
        return causal_lm_loss(out.hidden, self.weight, out.tokens(labels, "labels"), kernels=self.kernels,
                              parallel=self.parallel, reduction=reduction, ignore_index=ignore_index)

    def token_logprobs(self, out: BackboneOutput, targets: torch.Tensor,
                       ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """log p(target_t | tokens <= t) for every computed token, float32 `[T_computed]`, differentiable
        (0 where the target is `ignore_index`). The log-softmax of the raw logits (temperature 1)."""
        return -self.loss(out, targets, reduction="none", ignore_index=ignore_index)

    def logits(self, out: BackboneOutput) -> torch.Tensor:
        """Full-vocabulary logits in the caller's layout (gathered over TP)."""
        return out.unpack(self(out.hidden))

    @torch.no_grad()
    def entropy(self, out: BackboneOutput) -> torch.Tensor:
        """Entropy (nats) of the next-token distribution at every computed token, float32 `[T_computed]`,
        without full-vocabulary logits on any rank. A metric: no backward."""
        return vocab_parallel_entropy(out.gathered_hidden(), self.weight, self.parallel)


class ScalarHead(nn.Module):
    """One score per token, `v_head(h) = h @ w` (InternLM2ForRewardModel's `v_head`, no bias). Replicated
    over TP: under sequence parallelism each TP rank scores its own token slice, so the weight's gradient
    is partial per rank and summed over TP like the norms'."""

    def __init__(self, hidden_size: int, parallel: ParallelState, *, dtype=None, device=None):
        super().__init__()
        self.parallel = parallel
        self.weight = nn.Parameter(torch.empty(1, hidden_size, dtype=dtype, device=device))

    def token_scores(self, out: BackboneOutput) -> torch.Tensor:
        """The score of every computed token, float32 `[T_computed]`."""
        scores = F.linear(out.hidden, self.weight).squeeze(-1).float()
        if self.parallel.sequence_parallel:
            scores = gather_from_sequence(scores, self.parallel.tp_group, grad_is_partial=False)
        return scores

    def scores_at(self, out: BackboneOutput, positions: torch.Tensor) -> torch.Tensor:
        """Scores at `positions` (flat indices into the caller's tokens, e.g. each sequence's reward token),
        float32 `[len(positions)]`, the same on every rank of the call.

        Under context parallelism each CP rank holds some of the positions; the scores are summed over CP
        (`sum_over_context`), so every CP rank computes its loss from all of them. Such a loss is then
        a copy on each CP rank, not a share: divide it by `parallel.cp_size` before returning it to the
        engine, which sums losses over DP x CP ranks."""
        scores = self.token_scores(out)
        if out.packing.token_index is None:
            return scores.index_select(0, positions)
        total = int(torch.tensor(out.shape).prod())
        full = scores.new_zeros(total).index_add(0, out.packing.token_index, scores)
        if out.packing.context is not None:
            full = sum_over_context(full, self.parallel)
        return full.index_select(0, positions)
