"""COOL RLHF's fast path (InternLM2 report §4.2.2): after a round of PPO, find the reward-hacking patterns in
its responses and turn each into preference pairs that patch the reward model.

Detectors compare the responses of the round's first iterations ("early") with its last ("late"):

- `length_drift`: the mean response length rose by `length_rise` or more while the true reward (a
  checker's, where the prompts have one) rose by at most `reward_tolerance`: the policy says more
  without being more right;
- `spreading_phrases`: a word n-gram in at least `ngram_late_share` of late responses and in
  `ngram_rise` more of them than early on: a phrase the reward model pays for, spreading;
- custom detectors, `"module:function"` in the config: `function(early, late) -> list[Pattern]`, with
  `RoundResponse` lists.

A `Pattern` says whether a response shows it. Its pairs (20-100 per pattern in the report) contrast, for
the same prompt, an early response without the pattern (chosen) with the late-round actor's response that
has it (rejected): the reward model learns that the pattern is not what made a response better.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from internlm2.errors import ConfigError
from internlm2.rlhf.ppo_config import DetectorConfig

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class RoundResponse:
    """What the fast path keeps of one rollout."""

    iteration: int
    prompt_index: int
    text: str
    length: int  # response tokens
    score: float  # the reward model's raw score
    true_reward: float | None = None

    def to_json(self) -> dict:
        return {"iteration": self.iteration, "prompt_index": self.prompt_index, "text": self.text,
                "length": self.length, "score": self.score, "true_reward": self.true_reward}


@dataclass
class Pattern:
    name: str
    present: Callable[[str, int], bool]  # (response text, response length) -> shows the pattern
    detail: dict = field(default_factory=dict)  # the numbers behind the finding, for the round's log


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def length_drift(early: Sequence[RoundResponse], late: Sequence[RoundResponse], cfg: DetectorConfig) -> list[Pattern]:
    before, after = _mean([r.length for r in early]), _mean([r.length for r in late])
    rewards = [r.true_reward for r in (*early, *late)]
    if not early or not late or any(x is None for x in rewards) or after < before * (1 + cfg.length_rise):
        return []  # without a true reward there is no telling a longer answer from a hack
    gain = _mean([r.true_reward for r in late]) - _mean([r.true_reward for r in early])
    if gain > cfg.reward_tolerance:
        return []
    threshold = (before + after) / 2  # long: nearer the late mean than the early one
    return [Pattern("length", lambda text, length: length >= threshold,
                    {"early_mean_length": before, "late_mean_length": after, "true_reward_gain": gain,
                     "long_at_tokens": threshold})]


def _ngrams(text: str, sizes: Sequence[int]) -> set[str]:
    w = words(text)
    return {" ".join(w[i:i + n]) for n in sizes for i in range(len(w) - n + 1)}


def contains_phrase(text: str, phrase: str) -> bool:
    return f" {phrase} " in f" {' '.join(words(text))} "


def spreading_phrases(early: Sequence[RoundResponse], late: Sequence[RoundResponse],
                      cfg: DetectorConfig) -> list[Pattern]:
    if not early or not late:
        return []

    def shares(responses) -> dict[str, float]:
        counts: dict[str, int] = {}
        for r in responses:
            for gram in _ngrams(r.text, cfg.ngram_sizes):
                counts[gram] = counts.get(gram, 0) + 1
        return {gram: c / len(responses) for gram, c in counts.items()}

    before, after = shares(early), shares(late)
    found = [(after[g] - before.get(g, 0.0), g) for g in after
             if after[g] >= cfg.ngram_late_share and after[g] - before.get(g, 0.0) >= cfg.ngram_rise]
    # The longest phrase of a family of overlapping n-grams that spread about as much ("hope this helps"
    # over "this helps"): sort by rise in steps of 5%, then by length.
    found.sort(key=lambda x: (-round(x[0] * 20), -len(x[1].split()), x[1]))
    chosen: list[str] = []
    for _, gram in found:
        if len(chosen) == cfg.max_phrases:
            break
        if not any(gram in c or c in gram for c in chosen):
            chosen.append(gram)
    return [Pattern(f"phrase '{g}'", lambda text, length, g=g: contains_phrase(text, g),
                    {"phrase": g, "early_share": before.get(g, 0.0), "late_share": after[g]}) for g in chosen]


def load_function(spec: str, key: str) -> Callable:
    """The function named "package.module:function" (a config hook); ConfigError naming `key` otherwise."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ConfigError(f"{key}: {spec!r} is not of the form 'package.module:function'")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{key}: cannot load {spec!r} ({err})") from None
    if not callable(function):
        raise ConfigError(f"{key}: {spec!r} is not callable")
    return function


def detect(responses: Sequence[RoundResponse], iterations: Sequence[int], cfg: DetectorConfig) -> list[Pattern]:
    """The patterns in one round's responses (`iterations`: the round's iteration numbers, in order)."""
    window = max(1, round(len(iterations) * cfg.window))
    first, last = set(iterations[:window]), set(iterations[-window:])
    early = [r for r in responses if r.iteration in first]
    late = [r for r in responses if r.iteration in last]
    patterns = length_drift(early, late, cfg) + spreading_phrases(early, late, cfg)
    for k, spec in enumerate(cfg.custom):
        patterns += list(load_function(spec, f"fast_path.detectors.custom.{k}")(early, late))
    return patterns


def early_responses(responses: Sequence[RoundResponse], iterations: Sequence[int],
                    cfg: DetectorConfig) -> list[RoundResponse]:
    """The first response to each prompt of the round's early window, in order."""
    window = set(iterations[:max(1, round(len(iterations) * cfg.window))])
    seen, out = set(), []
    for r in responses:
        if r.iteration in window and r.prompt_index not in seen:
            seen.add(r.prompt_index)
            out.append(r)
    return out


def patch_pairs(pattern: Pattern, early: Sequence[RoundResponse], late: dict[int, tuple[str, int]],
                max_pairs: int) -> list[tuple[int, str, str]]:
    """(prompt index, chosen, rejected) for prompts whose early response lacks the pattern and whose late
    response (`late`: prompt index -> (text, length)) has it; at most `max_pairs`."""
    pairs = []
    for r in early:
        if r.prompt_index not in late or pattern.present(r.text, r.length):
            continue
        text, length = late[r.prompt_index]
        if pattern.present(text, length) and text != r.text:
            pairs.append((r.prompt_index, r.text, text))
            if len(pairs) == max_pairs:
                break
    return pairs
