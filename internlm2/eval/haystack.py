"""Prompts of an exact length in the model's tokens, with a needle at a depth of the haystack.

A prompt is head + haystack (needle inside) + tail. Each part is tokenized on its own and the ids are
joined, so every length is exact and the needle's place is known to the token. The haystack is a run of
units (a corpus's sentences, or the passkey filler) taken in order, the last one cut to make the length
exact. The needle goes at the unit boundary nearest to `depth` percent of the haystack (0: before the
first unit, 100: after the last), so it never splits a sentence.

The default corpus is Python's own documentation (`pydoc_data.topics`, the text `help()` shows), which
every Python install carries: English prose counted in whatever tokenizer the model has.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from internlm2.eval import EvalError

BUILTIN_CORPUS = "builtin:python-docs"

# A sentence ends after . ! or ? and the spaces or line breaks that follow, a paragraph after its blank
# lines; the next line's indentation starts the next unit. Units joined give back the text.
_UNIT_END = re.compile(r"[.!?](?:[ \t]+|\n(?:[ \t]*\n)*)|\n(?:[ \t]*\n)+")


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]
    needle_start: int  # offset of the needle's first token in `tokens`
    needle_length: int
    haystack_start: int  # offset of the haystack (= the head's length)
    haystack_length: int  # haystack tokens, the needle not counted

    @property
    def depth(self) -> float:
        """Where the needle landed, in percent of the haystack before it."""
        return 100.0 * (self.needle_start - self.haystack_start) / max(self.haystack_length, 1)


def haystack_budget(length: int, head: Sequence[int], needle: Sequence[int], tail: Sequence[int]) -> int:
    """Haystack tokens in a prompt of `length` tokens; an error when the other parts do not fit."""
    fixed = len(head) + len(needle) + len(tail)
    if length < fixed:
        raise EvalError(f"length {length} is shorter than the needle and question alone ({fixed} tokens: "
                        f"needle {len(needle)}, question and instructions {len(head) + len(tail)})")
    return length - fixed


def build_prompt(units: Iterable[Sequence[int]], head: Sequence[int], needle: Sequence[int], tail: Sequence[int],
                 length: int, depth: float, corpus_name: str = "the haystack") -> Prompt:
    """The prompt of exactly `length` tokens with `needle` at the unit boundary nearest to `depth` %."""
    if not 0 <= depth <= 100:
        raise EvalError(f"depth {depth:g} is outside [0, 100] (percent of the haystack)")
    budget = haystack_budget(length, head, needle, tail)
    hay: list[int] = []
    bounds = [0]  # offsets in the haystack where a whole unit ends
    for unit in units:
        if len(hay) >= budget:
            break
        hay.extend(unit[: budget - len(hay)])
        bounds.append(len(hay))
    if len(hay) < budget:
        raise EvalError(f"{corpus_name} is too short: {len(hay)} tokens, a haystack of length {length} needs {budget}")
    target = depth / 100 * budget
    at = min(bounds, key=lambda b: (abs(b - target), b))
    tokens = [*head, *hay[:at], *needle, *hay[at:], *tail]
    return Prompt(tokens, len(head) + at, len(needle), len(head), budget)


def split_units(text: str) -> list[str]:
    """The sentences and paragraphs of `text`, each with the whitespace after it."""
    units, start = [], 0
    for match in _UNIT_END.finditer(text):
        units.append(text[start:match.end()])
        start = match.end()
    units.append(text[start:])
    return [u for u in units if u.strip()]


def builtin_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def read_corpus(paths: Sequence[str]) -> str:
    """The text of the corpus files (joined by blank lines), or the built-in corpus."""
    if list(paths) == [BUILTIN_CORPUS]:
        return builtin_text()
    texts = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise EvalError(f"--corpus {name}: no such file")
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(texts)


class Corpus:
    """A corpus as token units, read from where each repeat of the grid starts."""

    def __init__(self, paths: Sequence[str], tokenizer):
        self.name = ", ".join(paths)
        self.units = [u for u in tokenizer.encode_batch(split_units(read_corpus(paths))) if u]
        # tokens from unit i to the end, to find where a haystack of a given size can start
        self._left = [0] * (len(self.units) + 1)
        for i in range(len(self.units) - 1, -1, -1):
            self._left[i] = self._left[i + 1] + len(self.units[i])

    @property
    def num_tokens(self) -> int:
        return self._left[0]

    def check_fits(self, budget: int, length: int) -> None:
        if budget > self.num_tokens:
            raise EvalError(f"corpus {self.name} is too short: {self.num_tokens} tokens, the haystack of length "
                            f"{length} needs {budget} (pass longer --corpus files)")

    def start(self, repeat: int, repeats: int, budget: int) -> int:
        """The first unit of repeat `repeat`: repeats spread evenly over the starts that leave `budget`
        tokens, so each repeat reads other text where the corpus allows."""
        last = max(i for i in range(len(self.units) + 1) if self._left[i] >= budget)
        return last * repeat // repeats

    def units_from(self, start: int) -> Iterable[list[int]]:
        return iter(self.units[start:])
