"""`internlm2 train-tokenizer`: train a SentencePiece BPE tokenizer (see `tokenizer_training.py`)."""

import argparse
import time

from internlm2.data.errors import Skips
from internlm2.data.prepare_data_cli import add_input_arguments
from internlm2.data.sources import read_texts, resolve_inputs, spans_within
from internlm2.data.tokenizer_training import train_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser)
    parser.add_argument("--vocab-size", type=int, required=True, help="pieces in the vocabulary (e.g. 4096)")
    parser.add_argument("--out", required=True, help="directory to write tokenizer.model into")
    parser.add_argument("--max-sentences", type=int, default=1_000_000,
                        help="paragraphs sampled for training (bounds time and memory; default 1000000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the paragraph sample")
    parser.add_argument("--threads", type=int, help="training threads (default: all cores)")


def run(args: argparse.Namespace) -> int:
    skips = Skips(args.on_error == "fail")
    spans = spans_within(resolve_inputs(args.input), args.max_bytes)
    counted = {"docs": 0, "chars": 0}

    def documents():
        for span in spans:
            for _, text in read_texts(span, args.text_key, skips):
                counted["docs"] += 1
                counted["chars"] += len(text)
                yield text

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(documents(), args.out, args.vocab_size, seed=args.seed,
                                max_sentences=args.max_sentences, threads=args.threads)
    print(f"{tokenizer.source}: {tokenizer.vocab_size} pieces from {counted['docs']} documents "
          f"({counted['chars']} characters) in {time.perf_counter() - t0:.1f} s, fingerprint {tokenizer.fingerprint}")
    if skips.counts:
        print(skips.summary())
    return 0
