"""`internlm2 convert --from DIR --to DIR --format internlm2|llama`: rewrite an HF checkpoint in either layout.

Reads an InternLM2 or Llama checkpoint (safetensors, sharded or not, or legacy .bin), checks every tensor
against its config.json, and writes the other (or the same) layout one tensor at a time; the tokenizer
comes along, its HF files written afresh from the source's tokenizer.model (so a Llama-layout target
tokenizes in plain transformers). The target appears only when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from internlm2.model.checkpoint_files import CheckpointError
from internlm2.model.config import ConfigError
from internlm2.model.hf_config import FORMATS
from internlm2.model.pretrained import DEFAULT_MAX_SHARD_SIZE, convert_checkpoint

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True, help="HF checkpoint directory (InternLM2 or Llama)")
    parser.add_argument("--to", dest="target", required=True, help="directory to write")
    parser.add_argument("--format", choices=FORMATS, required=True, help="layout to write")
    parser.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep the stored dtype)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help=f"split the weights into safetensors shards of at most this size (default {DEFAULT_MAX_SHARD_SIZE})")
    parser.add_argument("--overwrite", action="store_true", help="replace --to if it exists")


def run(args: argparse.Namespace) -> int:
    import torch

    from internlm2.data import DataError, Tokenizer, hf_tokenizer_files
    from internlm2.data.tokenizer import MODEL_FILE

    try:
        tokenizer = Path(args.source) / MODEL_FILE
        tokenizer_files = hf_tokenizer_files(Tokenizer.load(tokenizer)) if tokenizer.is_file() else None
        target = convert_checkpoint(args.source, args.target, args.format,
                                    dtype=getattr(torch, args.dtype) if args.dtype else None,
                                    max_shard_size=args.max_shard_size, tokenizer_files=tokenizer_files,
                                    overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, CheckpointError, ConfigError, DataError) as err:
        print(f"internlm2 convert: {err}", file=sys.stderr)
        return 1
    print(f"wrote {target} ({args.format} layout)")
    return 0
