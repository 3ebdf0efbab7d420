"""Scoring conversations with a reward model, batched: what `internlm2 score` and PPO's rewards use.

A conversation is rendered in ChatML (with its domain's system prompt first when a condition is named,
so one conditional reward model serves every domain) and closed by the reward token; conversations are
packed into rows of at most `batch_tokens` tokens and scored in one forward each, at their reward tokens.
A reward model's conditions travel with its export (`conditions.json`: domain name -> system prompt).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from internlm2.data.chat import Message, check_order, render
from internlm2.data.errors import DataError
from internlm2.data.tokenizer import Tokenizer
from internlm2.model import InternLM2ForScore

CONDITIONS_FILE = "conditions.json"


def read_conditions(path: str | Path, required: bool = False) -> dict[str, str]:
    """Condition prompts from a JSON file (a reward-model export's `conditions.json`); {} when the file
    does not exist and is not `required`."""
    path = Path(path)
    if not path.is_file():
        if required:
            raise DataError(f"{path}: no such file")
        return {}
    try:
        conditions = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(conditions, dict) or not all(isinstance(v, str) for v in conditions.values()):
        raise DataError(f"{path}: expected a mapping of condition names to system-prompt texts")
    return conditions


class Scorer:
    def __init__(self, model: InternLM2ForScore, tokenizer: Tokenizer, conditions: dict[str, str] | None = None,
                 batch_tokens: int = 16384):
        if model.config.reward_token_id is None:
            raise DataError("the model has no reward_token_id: it is not a reward model")
        self.model, self.tokenizer = model, tokenizer
        self.conditions = dict(conditions or {})
        self.batch_tokens = batch_tokens

    def tokens(self, messages: Sequence[Message], condition: str | None, where: str = "conversation") -> list[int]:
        """The scored token ids of one conversation (ending with an assistant turn)."""
        if condition is not None and condition not in self.conditions:
            raise DataError(f"{where}: condition {condition!r} is not one of the reward model's "
                            f"{sorted(self.conditions) or 'none'}")
        prefix = [] if condition is None else [Message("system", self.conditions[condition])]
        conversation = [*prefix, *messages]
        check_order(conversation, ("assistant",), where)
        return render(conversation, self.tokenizer)[0] + [self.model.config.reward_token_id]

    @torch.no_grad()
    def score_tokens(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Scores (float32 [N]) of token sequences that already end with the reward token."""
        device = next(self.model.parameters()).device
        scores = torch.empty(len(sequences), dtype=torch.float32)
        start = 0
        while start < len(sequences):
            end, used = start, 0
            while end < len(sequences) and (end == start or used + len(sequences[end]) <= self.batch_tokens):
                used += len(sequences[end])
                end += 1
            batch = sequences[start:end]
            lengths = torch.tensor([len(s) for s in batch])
            cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
            ids = torch.tensor([t for s in batch for t in s], device=device)
            out = self.model(ids, cu_seqlens=cu.to(device), positions=(cu[1:].long() - 1).to(device))
            scores[start:end] = out.float().cpu()
            start = end
        return scores

    def score(self, conversations: Sequence[Sequence[Message]], conditions: Sequence[str | None]) -> torch.Tensor:
        return self.score_tokens([self.tokens(m, c) for m, c in zip(conversations, conditions)])
