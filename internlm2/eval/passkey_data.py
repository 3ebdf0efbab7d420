"""`internlm2 eval passkey-data --tokenizer DIR --out DIR --seq-len L --rows N`: passkey documents (the
`eval passkey` format with its answer and EOS) written as a prepared dataset, to mix into pretraining
by weight like any other (a stage's `data: [{path: ..., weight: ...}]`).

The documents tile rows of exactly `--seq-len` tokens: each row holds one or more whole documents of
random lengths (at least the shortest passkey prompt), each with a random key at a random depth. So at
that sequence length (or any multiple of it) packing never cuts a document, and every document teaches
retrieval at its own length. Generate one dataset per stage length.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Iterator

from internlm2.eval import EvalError
from internlm2.eval.passkey import PasskeyFormat
from internlm2.eval.retrieval import random_digits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="tokenizer.model, or a directory holding it")
    parser.add_argument("--out", required=True, help="the prepared dataset's directory (must not exist)")
    parser.add_argument("--seq-len", type=int, required=True, help="the training stage's sequence length")
    parser.add_argument("--rows", type=int, required=True, help="rows of --seq-len tokens to fill")
    parser.add_argument("--key-digits", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)


def shortest_document(fmt: PasskeyFormat, key_digits: int) -> int:
    """Tokens of the shortest document: the prompt with one filler unit, the answer and EOS."""
    key = "9" * key_digits
    return len(fmt.head) + len(fmt.filler) + len(fmt.needle(key)) + len(fmt.tail) + len(fmt.answer(key)) + 1


def documents(fmt: PasskeyFormat, seq_len: int, rows: int, key_digits: int, seed: int) -> Iterator[list[int]]:
    """Token ids of passkey documents filling `rows` rows of exactly `seq_len` tokens."""
    shortest = shortest_document(fmt, key_digits)
    if seq_len < shortest:
        raise EvalError(f"--seq-len {seq_len} is shorter than the shortest passkey document ({shortest} tokens)")
    rng = random.Random(seed)
    eos = fmt.tokenizer.eos_id
    for _ in range(rows):
        left = seq_len
        while left:
            n = rng.randint(shortest, left) if left >= 2 * shortest else left
            if left - n < shortest:
                n = left  # no room for another document: this one takes the rest of the row
            key = random_digits(rng, key_digits)
            answer = fmt.answer(key)
            prompt = fmt.prompt(key, n - len(answer) - 1, rng.uniform(0, 100))
            yield [*prompt.tokens, *answer, eos]
            left -= n


def run(args: argparse.Namespace) -> int:
    from internlm2.data.errors import DataError
    from internlm2.data.prepare import write_token_documents
    from internlm2.data.tokenizer import Tokenizer

    try:
        if args.rows < 1 or not 1 <= args.key_digits <= 18:
            raise EvalError(f"--rows must be >= 1 and --key-digits within [1, 18], got {args.rows}, {args.key_digits}")
        tokenizer = Tokenizer.load(args.tokenizer)
        if tokenizer.eos_id < 0:
            raise EvalError(f"{args.tokenizer}: the tokenizer has no EOS token to end the documents")
        fmt = PasskeyFormat(tokenizer)
        source = (f"passkey documents: seq_len {args.seq_len}, rows {args.rows}, key_digits {args.key_digits}, "
                  f"seed {args.seed}")
        summary = write_token_documents(args.out, documents(fmt, args.seq_len, args.rows, args.key_digits, args.seed),
                                        tokenizer, source)
    except (EvalError, DataError) as err:
        print(f"internlm2 eval passkey-data: {err}", file=sys.stderr)
        return 1
    print(f"{args.out}: {summary['num_docs']} passkey documents, {summary['num_tokens']} tokens "
          f"({args.rows} rows of {args.seq_len})")
    return 0
