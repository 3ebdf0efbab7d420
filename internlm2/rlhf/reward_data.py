"""Preference pairs as the reward model trains on them (InternLM2 report §4.2.1).

Every response (the prompt, with its domain's system prompt when the pair names a condition, then the
chosen or rejected answer) is rendered in ChatML and closed by the reward token, whose hidden state is
scored. Pairs are checked when the file is opened: a pair whose chosen and rejected sequences are
identical, or that is longer than `max_length` once the reward token is added, fails or is counted as
skipped (`on_error`), naming the file and record, like any other malformed record.

Batches hold a token budget rather than a fixed number of pairs (the report: 16,384 tokens per batch),
so nothing is padded: pairs are shuffled by (seed, epoch) and packed in that order into micro-batches of
at most `micro_batch_tokens` tokens, a pair's chosen and rejected always in the same micro-batch. A
micro-batch is one packed row: `input_ids`, `cu_seqlens` (chosen_0, rejected_0, chosen_1, ...),
`reward_slots` (per token: 2p for pair p's chosen reward token, 2p + 1 for its rejected one, -1
elsewhere, so the slots survive context-parallel padding) and `conditions` (per pair: index into the
condition names, -1 for none).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from internlm2.data.chat import render
from internlm2.data.errors import DataError
from internlm2.data.preference import PreferenceDataset
from internlm2.data.tokenizer import Tokenizer


def resolve_reward_token(tokenizer: Tokenizer, token: str | int) -> int:
    """The id of the reward token given by piece name or id; a DataError when the tokenizer lacks it."""
    if isinstance(token, int):
        if not 0 <= token < tokenizer.vocab_size:
            raise DataError(f"{tokenizer.source}: reward token id {token} is outside the vocabulary "
                            f"({tokenizer.vocab_size} pieces)")
        return token
    found = tokenizer.piece_id(token)
    if found is None:
        raise DataError(f"{tokenizer.source}: the tokenizer has no piece {token!r} for the reward token")
    return found


@dataclass(frozen=True)
class ScoredPair:
    chosen: tuple[int, ...]  # token ids, ending with the reward token
    rejected: tuple[int, ...]
    condition: str | None

    @property
    def tokens(self) -> int:
        return len(self.chosen) + len(self.rejected)


class RewardPairs(Dataset):
    """The usable pairs of one preference JSONL file, rendered and tokenized once at open."""

    def __init__(self, path: str | os.PathLike, tokenizer: Tokenizer, reward_token_id: int, *,
                 condition_prompts: Mapping[str, str] | None = None, max_length: int = 8192, on_error: str = "fail"):
        source = PreferenceDataset(path, tokenizer, condition_prompts, on_error)
        self.path, self.skips = source.path, source.skips
        self.pairs: list[ScoredPair] = []
        for i in range(len(source)):
            (chosen, rejected), condition = source.record(i)
            where = source.where(i)
            ids = [tuple(render(c, tokenizer)[0]) + (reward_token_id,) for c in (chosen, rejected)]
            if ids[0] == ids[1]:
                self.skips.record("identical", where, "chosen and rejected are the same conversation")
            elif max(map(len, ids)) > max_length:
                self.skips.record("too_long", where, f"{max(map(len, ids))} tokens with the reward token, more "
                                  f"than max_length={max_length}")
            else:
                self.pairs.append(ScoredPair(ids[0], ids[1], condition))
        if not self.pairs:
            raise DataError(f"{source.path}: no usable preference pairs\n{self.skips.summary()}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> ScoredPair:
        return self.pairs[i]


def budget_micro_batches(lengths: Sequence[int], budget: int, seed: int, epoch: int = 0) -> list[list[int]]:
    """Pair indices in a (seed, epoch) shuffle, cut into consecutive groups of at most `budget` tokens."""
    too_long = [i for i, n in enumerate(lengths) if n > budget]
    if too_long:
        raise DataError(f"pair {too_long[0]} has {lengths[too_long[0]]} tokens, more than the micro-batch budget "
                        f"of {budget}")
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    groups, current, used = [], [], 0
    for i in order.tolist():
        if used + lengths[i] > budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        groups.append(current)
    return groups


def collate_pairs(pairs: Sequence[ScoredPair], conditions: Sequence[str]) -> dict:
    """One packed micro-batch of pairs (see the module docstring)."""
    sequences = [seq for pair in pairs for seq in (pair.chosen, pair.rejected)]
    lengths = torch.tensor([len(s) for s in sequences])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    slots = torch.full((int(lengths.sum()),), -1, dtype=torch.int64)
    slots[cu_seqlens[1:].long() - 1] = torch.arange(len(sequences))
    index = {name: k for k, name in enumerate(conditions)}
    return {
        "input_ids": torch.tensor([t for s in sequences for t in s], dtype=torch.int64),
        "position_ids": torch.cat([torch.arange(n) for n in lengths.tolist()]),
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int(lengths.max()),
        "reward_slots": slots,
        "conditions": torch.tensor([index[p.condition] if p.condition is not None else -1 for p in pairs]),
    }


def reward_positions(reward_slots: torch.Tensor) -> torch.Tensor:
    """Token positions of the scored tokens ordered by slot: chosen_0, rejected_0, chosen_1, ..."""
    positions = (reward_slots >= 0).nonzero().flatten()
    return positions[torch.argsort(reward_slots[positions])]
