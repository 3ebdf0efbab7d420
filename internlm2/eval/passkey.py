"""`internlm2 eval passkey`: passkey retrieval as the long-context papers run it (Mohtashami & Jaggi 2023,
then Position Interpolation, YaRN, LongLoRA): a number hidden in repeated filler, then "What is the pass
key?", on the same length x depth grid as `eval needle`.

The prompt pieces live here once: `passkey_data` writes training documents from the same pieces.
"""

from __future__ import annotations

import argparse
import itertools

from internlm2.eval import EvalError
from internlm2.eval.haystack import Prompt, build_prompt
from internlm2.eval.retrieval import Task, add_grid_arguments, random_digits, run_command

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
               "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


class PasskeyFormat:
    """The format's pieces in one tokenizer's ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.head = ([tokenizer.bos_id] if tokenizer.bos_id >= 0 else []) + tokenizer.encode(INSTRUCTION)
        self.filler = tokenizer.encode(FILLER)
        self.tail = tokenizer.encode(QUESTION)

    def needle(self, key: str) -> list[int]:
        return self.tokenizer.encode(NEEDLE.format(key=key))

    def prompt(self, key: str, length: int, depth: float) -> Prompt:
        return build_prompt(itertools.repeat(self.filler), self.head, self.needle(key), self.tail, length, depth)

    def answer(self, key: str) -> list[int]:
        return self.tokenizer.encode(f" {key}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grid_arguments(parser, lengths="1k,2k,4k")
    parser.add_argument("--key-digits", type=int, default=5, help="digits of the pass keys (default 5)")


def make_task(args: argparse.Namespace, tokenizer) -> Task:
    if not 1 <= args.key_digits <= 18:
        raise EvalError(f"--key-digits must be within [1, 18], got {args.key_digits}")
    fmt = PasskeyFormat(tokenizer)
    return Task("passkey", lambda cell, key: fmt.prompt(key, cell.length, cell.depth),
                lambda rng: random_digits(rng, args.key_digits), {"key_digits": args.key_digits})


def run(args: argparse.Namespace) -> int:
    return run_command(args, "passkey", make_task)
