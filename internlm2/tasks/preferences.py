"""Preference pairs from the verifiable tasks, in domains whose preferences conflict: the reward-model
demo's data (its ground truth is the task's checker and the domain's rule, not a judge).

Every domain sees the same prompts; what it prefers:

- `concise`: the bare answer over the same answer explained in a sentence;
- `explained`: the explained answer over the bare one (the opposite of `concise` on the same pairs);
- `correct`: a right answer over a wrong one in the same form (both bare or both explained), checked by
  the task's verifier (`is_correct`).

So a reward model that does not see the domain cannot be right on both `concise` and `explained`; one
conditioned on the domain's system prompt can (the prompts' texts are the reward model's configuration,
configs/rm-tiny.yaml). Records are in the preference JSONL format (internlm2/data/preference.py), the
domain in `condition` (or none, `conditional=False`).
"""

from __future__ import annotations

import dataclasses
import random

from internlm2.errors import UserError
from internlm2.tasks.verifiable import Example, explained_answer, is_correct, make_examples, wrong_answer

DOMAINS = ("concise", "explained", "correct")


def _responses(domain: str, example: Example, rng: random.Random) -> tuple[str, str]:
    """(chosen, rejected) final answers to `example` for `domain`."""
    bare, explained = example.answer, explained_answer(example)
    if domain == "concise":
        return bare, explained
    if domain == "explained":
        return explained, bare
    wrong = dataclasses.replace(example, answer=wrong_answer(example, rng))
    chosen, rejected = (bare, wrong.answer) if rng.random() < 0.5 else (explained, explained_answer(wrong))
    if not is_correct(example, chosen) or is_correct(example, rejected):
        raise AssertionError(f"{example.task}: the verifier disagrees with the pair {chosen!r} / {rejected!r}")
    return chosen, rejected


def preference_record(domain: str, example: Example, rng: random.Random, conditional: bool = True) -> dict:
    if domain not in DOMAINS:
        raise UserError(f"unknown domain {domain!r}; the domains are {DOMAINS}")
    if example.reference[0].role != "assistant" or len(example.reference) != 1:
        raise UserError(f"task {example.task}: preference pairs need a one-turn answer (no tool call)")
    chosen, rejected = _responses(domain, example, rng)
    prompt = [{"role": m.role, "content": m.content} for m in example.prompt]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **({"condition": domain} if conditional else {})}


def make_preferences(split: str, per_task: int, tasks, seed: int = 0, domains=DOMAINS,
                     conditional: bool = True) -> dict[str, list[dict]]:
    """domain -> its preference records, one per example of `make_examples(split, per_task, seed, tasks)`
    (the same prompts in every domain)."""
    examples = make_examples(split, per_task, seed, tasks)
    out = {}
    for domain in domains:
        rng = random.Random(f"{seed}:{split}:{domain}")
        out[domain] = [preference_record(domain, e, rng, conditional) for e in examples]
    return out
