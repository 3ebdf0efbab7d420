"""Batched generation with a KV cache: greedy or sampled (temperature, top-k, top-p), stop tokens.

A batch of prompts of different lengths is prefilled as packed sequences (no padding computed), then
decoded one token per unfinished sequence per step against the cache. Only the last position of each
sequence goes through the vocabulary projection. When half of the rows still in the cache have finished,
the cache is compacted to the unfinished ones, so long-tailed batches (PPO rollouts) do not keep paying
for answers that ended early.

With dynamic NTK scaling, a step whose sequences run past `max_position_embeddings` rotates its new
query and key with the base of that length while cached keys keep the base they were written with, as
HF's generate does (its tests pin this down token for token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from internlm2.model.kv_cache import KVCache
from internlm2.model.model import InternLM2ForCausalLM


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy (argmax); top_k 0 and top_p 1 switch those filters off. stop_token_ids:
    tokens that end a sequence (kept as its last token); None means the config's eos_token_id."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0: off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # the new tokens of each prompt, in prompt order
    finish_reasons: list[str]  # "stop" (a stop token was generated) or "length" (max_new_tokens reached)
    # log-probability of each new token under the distribution it was drawn from (`sampling_logits`:
    # after temperature, top-k and top-p; greedy: the model's own distribution), float32 values
    logprobs: list[list[float]]


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [N] from logits [N, V] (HF's order: temperature, then top-k, then top-p)."""
    return _draw(sampling_logits(logits, params), params, generator)


def _draw(filtered: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    if params.temperature == 0:
        return filtered.argmax(dim=-1)
    return torch.multinomial(filtered.softmax(dim=-1), 1, generator=generator).squeeze(1)


def sampling_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """float32 logits [N, V] of the distribution `sample_next` draws from: divided by the temperature,
    -inf outside top-k and top-p. Greedy (temperature 0): the logits as they are."""
    logits = logits.float()
    if params.temperature == 0:
        return logits
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first one always stays).
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return logits


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    if not prompts:
        raise ValueError("generate: no prompts given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"generate: prompt {i} is empty")
        bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"generate: prompt {i} has token ids outside [0, vocab_size={vocab_size}): {bad[:8]}")


@torch.no_grad()
def generate(model: InternLM2ForCausalLM, prompts: Sequence[Sequence[int]], params: SamplingParams = SamplingParams(),
             generator: torch.Generator | None = None,
             on_token: Callable[[int, int], None] | None = None) -> GenerationResult:
    """Continues every prompt (a list of token ids) by up to `params.max_new_tokens` tokens.
    `on_token(prompt index, token)` is called for each new token as it is drawn (streaming).

    Under tensor parallelism every TP rank calls this with the same prompts and an identically seeded
    `generator`: the logits are gathered, so all ranks draw the same tokens."""
    if not (model.with_embedding and model.with_head):
        raise ValueError("generate needs the whole model (a pipeline stage cannot generate on its own)")
    config = model.config
    _check_prompts(prompts, config.vocab_size)
    stops = params.stop_token_ids if params.stop_token_ids is not None else (
        () if config.eos_token_id is None else (config.eos_token_id,))
    device = model.output.weight.device
    stop_ids = torch.tensor(sorted(set(stops)), dtype=torch.long, device=device)

    lengths = [len(p) for p in prompts]
    cache = KVCache(
        model.layer_ids, len(prompts), max(lengths) + params.max_new_tokens,
        config.num_key_value_heads // model.parallel.tp_size, config.head_size,
        dtype=model.output.weight.dtype, device=device,
    )
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
    cu_seqlens = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    hidden = model(ids, cu_seqlens=cu_seqlens, kv_cache=cache, return_logits=False).hidden_states
    hidden = hidden.index_select(0, cu_seqlens[1:].long() - 1)  # each prompt's last position

    tokens: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    rows = torch.arange(len(prompts), device=device)  # cache row -> prompt index
    live = torch.ones(len(prompts), dtype=torch.bool, device=device)  # per cache row
    for step in range(params.max_new_tokens):
        filtered = sampling_logits(model.output(hidden), params)
        next_ids = _draw(filtered, params, generator)
        drawn = filtered.log_softmax(dim=-1).gather(1, next_ids[:, None]).squeeze(1)
        finished = torch.isin(next_ids, stop_ids) & live
        for prompt, token, logprob in zip(rows[live].tolist(), next_ids[live].tolist(), drawn[live].tolist()):
            tokens[prompt].append(token)
            logprobs[prompt].append(logprob)
            if on_token is not None:
                on_token(prompt, token)
        for prompt in rows[finished].tolist():
            reasons[prompt] = "stop"
        live &= ~finished
        if step + 1 == params.max_new_tokens or not live.any():
            break
        if 2 * int(live.sum()) <= live.numel():
            keep = live.nonzero().squeeze(1)
            cache.keep(keep)
            rows, next_ids, live = rows[keep], next_ids[keep], live[keep]
        hidden = model(next_ids, kv_cache=cache, return_logits=False).hidden_states
    return GenerationResult(tokens, reasons, logprobs)
