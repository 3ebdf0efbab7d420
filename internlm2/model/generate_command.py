"""`internlm2 generate --model DIR --prompt TEXT`: continue prompts with an HF checkpoint.

With a tokenizer in the model directory (`tokenizer.model`) prompts are text and the answers are printed
as text; `--chat` wraps each prompt as a ChatML user turn and stops at `<|im_end|>`. Without one, pass
token ids with `--prompt-ids 1,2,3` and the answers are printed as ids.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF checkpoint directory (InternLM2 or Llama)")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    parser.add_argument("--prompt-ids", action="append", default=[],
                        help="prompt as comma-separated token ids (repeat for a batch)")
    parser.add_argument("--chat", action="store_true", help="render each prompt as a ChatML user turn")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: off")
    parser.add_argument("--stop-id", type=int, action="append", help="stop token id (default: the config's eos)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--dtype", choices=DTYPES, help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--kernels", choices=("fused", "reference"), default="fused")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def _load_tokenizer(directory: Path):
    if not (directory / "tokenizer.model").is_file():
        return None
    from internlm2.data.tokenizer import Tokenizer

    return Tokenizer.load(directory)


def _prompts(args, tokenizer) -> list[list[int]]:
    prompts = []
    for text in args.prompt:
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer.model: pass token ids with --prompt-ids")
        if args.chat:
            from internlm2.data.chat import Message, render

            ids, _ = render([Message("user", text)], tokenizer, generation_prompt=True)
        else:
            ids = tokenizer.encode(text, bos=True)
        prompts.append(ids)
    for spec in args.prompt_ids:
        try:
            prompts.append([int(t) for t in spec.split(",") if t.strip()])
        except ValueError:
            raise ValueError(f"--prompt-ids {spec!r}: expected comma-separated integers") from None
    if not prompts:
        raise ValueError("give at least one --prompt or --prompt-ids")
    return prompts


def run(args: argparse.Namespace) -> int:
    import torch

    from internlm2.model.checkpoint_files import CheckpointError
    from internlm2.model.config import ConfigError
    from internlm2.model.generation import SamplingParams, generate
    from internlm2.model.pretrained import load_pretrained

    directory = Path(args.model)
    try:
        tokenizer = _load_tokenizer(directory)
        prompts = _prompts(args, tokenizer)
        model = load_pretrained(
            directory, kernels=args.kernels, dtype=getattr(torch, args.dtype) if args.dtype else None).eval()
        stops = args.stop_id
        if stops is None and args.chat and tokenizer is not None:
            stops = [tokenizer.special_id("<|im_end|>"), tokenizer.eos_id]
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, stop_token_ids=None if stops is None else tuple(stops))
    except (ValueError, FileNotFoundError, CheckpointError, ConfigError) as err:
        print(f"internlm2 generate: {err}", file=sys.stderr)
        return 1
    result = generate(model, prompts, params, generator=torch.Generator().manual_seed(args.seed))
    for i, (tokens, reason) in enumerate(zip(result.tokens, result.finish_reasons)):
        text = tokenizer.decode(tokens) if tokenizer is not None else None
        if args.json:
            print(json.dumps({"prompt": i, "tokens": tokens, "text": text, "finish_reason": reason}))
        else:
            if len(prompts) > 1:
                print(f"### {i} ({reason})")
            print(text if text is not None else " ".join(map(str, tokens)))
    return 0
