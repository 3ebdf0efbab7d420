"""PPO's rollouts: responses sampled from the actor's live weights, and the packed micro-batches that the
actor, reference and critic read them in.

A rollout is one prompt (ChatML with the generation prompt, no condition: the actor, the reference and the
critic never see the domain's system prompt; only the reward model does, report Fig. 10) and the response
drawn for it with the KV cache, stopped at `<|im_end|>` or EOS or at `max_new_tokens`.

A micro-batch packs whole sequences (prompt + response) into one row, `cu_seqlens` between them. The
*actions* are the positions whose next token is a response token: position t's next-token distribution
drew token t+1, so `targets[t]` is that token and `action_mask[t]` is set, for t from the prompt's last
token to the response's second-to-last. Log-probabilities, values, rewards and advantages all live at
action positions, in the row's own (packed) layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from internlm2.constants import IGNORE_INDEX
from internlm2.data.chat import Message
from internlm2.data.tokenizer import Tokenizer
from internlm2.model.generation import SamplingParams, generate


@dataclass
class Rollout:
    index: int  # of the prompt in the prompt dataset
    messages: list[Message]  # the prompt's turns
    condition: str | None  # the reward model's domain for this prompt
    record: dict  # the prompt's JSON record (a checker reads its reference answer there)
    prompt_ids: list[int]
    response_ids: list[int]
    finish_reason: str  # "stop" or "length"
    text: str = ""  # the response's text, without its stop token

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def stop_tokens(tokenizer: Tokenizer, eos_token_id: int | None) -> tuple[int, ...]:
    """A response ends at `<|im_end|>` (the end of the assistant's turn) or at EOS."""
    ends = {tokenizer.special_id("<|im_end|>")}
    if eos_token_id is not None:
        ends.add(eos_token_id)
    return tuple(sorted(ends))


def response_text(tokenizer: Tokenizer, response_ids: Sequence[int], stops: Sequence[int]) -> str:
    ids = list(response_ids)
    if ids and ids[-1] in stops:
        ids = ids[:-1]
    return tokenizer.decode(ids)


@torch.no_grad()
def sample_responses(model, tokenizer: Tokenizer, prompts: Sequence[dict], params: SamplingParams,
                     generator: torch.Generator) -> list[Rollout]:
    """Responses of `model` (the actor's own module: its live weights, no copy) to `prompts`, items of a
    `PromptDataset` plus their `index` and `record`, in one batched generation. The model is put in eval
    mode for it and back."""
    was_training = model.training
    model.eval()
    try:
        result = generate(model, [p["prompt_ids"].tolist() for p in prompts], params, generator)
    finally:
        model.train(was_training)
    stops = params.stop_token_ids
    rollouts = []
    for p, tokens, reason in zip(prompts, result.tokens, result.finish_reasons):
        rollouts.append(Rollout(p["index"], p["messages"], p["condition"], p["record"], p["prompt_ids"].tolist(),
                                tokens, reason, response_text(tokenizer, tokens, stops)))
    return rollouts


def collate_rollouts(rollouts: Sequence[Rollout]) -> dict:
    """One packed micro-batch: input_ids, cu_seqlens, max_seqlen, targets (next token at actions,
    IGNORE_INDEX elsewhere), action_mask, and `last_action` (each sequence's last action, flat index)."""
    lengths = [len(r.tokens) for r in rollouts]
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    total = starts[-1]
    input_ids = torch.tensor([t for r in rollouts for t in r.tokens], dtype=torch.int64)
    targets = torch.full((total,), IGNORE_INDEX, dtype=torch.int64)
    mask = torch.zeros(total, dtype=torch.bool)
    for r, start in zip(rollouts, starts):
        first = start + len(r.prompt_ids) - 1  # the prompt's last token predicts the first response token
        actions = slice(first, first + len(r.response_ids))
        targets[actions] = torch.tensor(r.response_ids, dtype=torch.int64)
        mask[actions] = True
    last = torch.tensor([s + len(r.tokens) - 2 for r, s in zip(rollouts, starts)], dtype=torch.int64)
    return {"input_ids": input_ids, "cu_seqlens": torch.tensor(starts, dtype=torch.int32), "max_seqlen": max(lengths),
            "targets": targets, "action_mask": mask, "last_action": last}


def sequence_rows(flat: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """A packed per-token tensor [T] -> [sequences, longest] (zeros after each sequence's end)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return torch.nn.utils.rnn.pad_sequence(list(torch.split(flat, lengths)), batch_first=True)


def packed(rows: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The inverse of `sequence_rows`."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return torch.cat([rows[i, :n] for i, n in enumerate(lengths)])
