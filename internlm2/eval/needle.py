"""`internlm2 eval needle`: needle in a haystack (Kamradt's test, with a random key per prompt as in
RULER), over a grid of prompt lengths and needle depths.

The haystack is real text, Python's documentation by default (`--corpus FILES` for others), cut into
sentences and counted in the model's tokens; the needle sentence carries the key; after the haystack
comes the question and the start of the answer, so a base model answers by continuing it.
"""

from __future__ import annotations

import argparse

from internlm2.eval import EvalError
from internlm2.eval.haystack import BUILTIN_CORPUS, Corpus, build_prompt, haystack_budget
from internlm2.eval.retrieval import Cell, Task, add_grid_arguments, random_digits, run_command

NEEDLE = "The special magic number is {key}."
QUESTION = "What is the special magic number mentioned in the text above?"
ANSWER = "The special magic number is"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grid_arguments(parser, lengths="1k,2k,4k")
    parser.add_argument("--corpus", nargs="+", default=[BUILTIN_CORPUS], metavar="FILE",
                        help=f"text files of the haystack (default {BUILTIN_CORPUS}: this Python's documentation)")
    parser.add_argument("--needle", default=NEEDLE, help="the needle sentence; {key} marks the key")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--answer-prefix", default=ANSWER, help="the start of the answer the model continues")
    parser.add_argument("--key", help="a fixed key (default: a random number per prompt)")
    parser.add_argument("--key-digits", type=int, default=7, help="digits of the random keys (default 7)")


def make_task(args: argparse.Namespace, tokenizer) -> Task:
    if "{key}" not in args.needle:
        raise EvalError(f"--needle {args.needle!r} has no {{key}} to hold the key")
    if args.key is None and not 1 <= args.key_digits <= 18:
        raise EvalError(f"--key-digits must be within [1, 18], got {args.key_digits}")
    corpus = Corpus(args.corpus, tokenizer)
    head = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    tail = tokenizer.encode(f"\n\n{args.question}\n{args.answer_prefix}")
    needle_text = args.needle + " "
    longest = max(args.lengths)
    budget = haystack_budget(longest, head, tokenizer.encode(needle_text.format(key=_longest_key(args))), tail)
    corpus.check_fits(budget, longest)

    def prompt(cell: Cell, key: str):
        units = corpus.units_from(corpus.start(cell.repeat, args.repeats, budget))
        return build_prompt(units, head, tokenizer.encode(needle_text.format(key=key)), tail, cell.length,
                            cell.depth, f"corpus {corpus.name}")

    def key(rng):
        return args.key if args.key is not None else random_digits(rng, args.key_digits)

    settings = {"corpus": args.corpus, "corpus_tokens": corpus.num_tokens, "needle": args.needle,
                "question": args.question, "answer_prefix": args.answer_prefix, "key": args.key,
                "key_digits": args.key_digits}
    return Task("needle", prompt, key, settings)


def _longest_key(args) -> str:
    return args.key if args.key is not None else "9" * args.key_digits


def run(args: argparse.Namespace) -> int:
    return run_command(args, "needle", make_task)
