"""`internlm2 prepare-data`: tokenize a corpus into shards for training (see `prepare.py`)."""

import argparse
import json
import os
import re
import time

from internlm2.data import builtin_corpus
from internlm2.data.errors import Skips
from internlm2.data.prepare import FORMATS, PrepareOptions, prepare
from internlm2.data.tokenizer import Tokenizer


def parse_size(text: str) -> int:
    """Bytes from `123`, `64K`, `16M` or `2G` (binary multiples)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4096, 64K, 16M or 2G")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The input options shared with `train-tokenizer`."""
    parser.add_argument("--input", nargs="+", default=[builtin_corpus.NAME], metavar="PATH",
                        help="text files (one document each), JSONL files, directories of them, or "
                             f"{builtin_corpus.NAME} (the default: this Python's standard-library sources)")
    parser.add_argument("--text-key", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--max-bytes", type=parse_size, metavar="SIZE",
                        help="use only the first SIZE bytes of input, in input order (e.g. 2M for a quick demo)")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                        help="a bad record (invalid JSON, missing field, bad conversation, not UTF-8): stop "
                             "with its file and line (default), or count it and go on")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser)
    parser.add_argument("--tokenizer", required=True, help="tokenizer.model, or a directory holding it")
    parser.add_argument("--out", required=True, help="output directory (resumes if it holds the same plan)")
    parser.add_argument("--format", choices=FORMATS, default="text",
                        help="text: documents; chat: JSONL {\"messages\": [...]} rendered in ChatML with an "
                             "assistant-only loss mask")
    parser.add_argument("--no-bos", action="store_true", help="text format: no <s> before each document")
    parser.add_argument("--no-eos", action="store_true", help="text format: no </s> after each document")
    parser.add_argument("--shard-bytes", type=parse_size, default=PrepareOptions.shard_bytes, metavar="SIZE",
                        help="input bytes per shard (default 16M); shards are the unit of parallelism and resume")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: all cores)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    tokenizer = Tokenizer.load(args.tokenizer)
    options = PrepareOptions(format=args.format, text_key=args.text_key, bos=not args.no_bos, eos=not args.no_eos,
                             shard_bytes=args.shard_bytes, max_bytes=args.max_bytes)
    t0 = time.perf_counter()
    summary = prepare(args.input, tokenizer, args.out, options, workers=args.workers, on_error=args.on_error,
                      progress=True)
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({**summary, "seconds": seconds}, indent=1))
        return 0
    print(f"{args.out}: {summary['shards']} shards ({summary['made_now']} made now), {summary['num_docs']} documents, "
          f"{summary['num_tokens']} tokens, tokenizer {tokenizer.fingerprint}, {seconds:.1f} s")
    skips = Skips(fail=False)
    skips.merge(summary["skipped"], summary["skip_examples"])
    if skips.counts:
        print(skips.summary())
    return 0
