"""The checkpoint under evaluation: its directory checked, its tokenizer and config read before the
weights, the model loaded (the one place the evaluations load one), and greedy answers to prompts.

`--ntk` chooses the RoPE scaling at inference, whatever the checkpoint's config says: `config` keeps it,
`off` is plain RoPE, a number is dynamic NTK with that factor (the base grows once a sequence runs past
`max_position_embeddings`, HF's rule).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from internlm2.eval import EvalError

DTYPES = ("float32", "bfloat16", "float16")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF checkpoint directory with tokenizer.model")
    parser.add_argument("--dtype", choices=DTYPES, help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--kernels", choices=("fused", "reference"), default="fused")
    parser.add_argument("--ntk", type=ntk_setting, default="config", metavar="config|off|FACTOR",
                        help="RoPE scaling at inference: the checkpoint's (default), off, or dynamic NTK with FACTOR")


def ntk_setting(text: str):
    if text in ("config", "off"):
        return text
    try:
        factor = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected config, off or a factor >= 1") from None
    if not factor >= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a dynamic NTK factor must be >= 1")
    return factor


class Checkpoint:
    """What can be known about a checkpoint without loading its weights."""

    def __init__(self, args: argparse.Namespace):
        from internlm2.model.checkpoint_files import CheckpointError
        from internlm2.model.config import ConfigError
        from internlm2.model.hf_config import read_hf_config

        self.directory = Path(args.model)
        if not self.directory.is_dir():
            raise EvalError(f"--model {self.directory}: no such directory")
        try:
            config, _, stored = read_hf_config(self.directory, kernels=args.kernels)
        except (FileNotFoundError, ConfigError, CheckpointError) as err:
            raise EvalError(str(err)) from None
        if args.ntk != "config":
            config = config.replace(rope_scaling_factor=None if args.ntk == "off" else args.ntk)
        self.config = config
        self.dtype = getattr(torch, args.dtype or stored or "float32")
        try:
            self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as err:
            raise EvalError(f"--device {args.device}: {err}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EvalError(f"--device {args.device}: no CUDA device is available")
        self.tokenizer = self._tokenizer()

    def _tokenizer(self):
        from internlm2.data.tokenizer import MODEL_FILE, Tokenizer

        if not (self.directory / MODEL_FILE).is_file():
            raise EvalError(f"--model {self.directory}: no {MODEL_FILE} (the evaluations need the model's tokenizer)")
        return Tokenizer.load(self.directory)

    def load(self):
        """The model, in eval mode, computing with the (possibly overridden) config."""
        from internlm2.model.pretrained import load_pretrained

        model = load_pretrained(self.directory, kernels=self.config.kernels, dtype=self.dtype, device=self.device).eval()
        model.config = self.config  # the RoPE scaling chosen with --ntk (read at every forward)
        return model

    def describe(self) -> dict:
        c = self.config
        return {"model": str(self.directory), "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
                "kernels": c.kernels, "rope_theta": c.rope_theta, "ntk_factor": c.rope_scaling_factor,
                "max_position_embeddings": c.max_position_embeddings}


class GreedyAnswerer:
    """prompts (token ids) -> greedy continuations, through the KV-cache `generate`."""

    def __init__(self, model, stop_ids: tuple[int, ...]):
        self.model, self.stop_ids = model, stop_ids

    def __call__(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        from internlm2.model.generation import SamplingParams, generate

        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=self.stop_ids)
        return generate(self.model, prompts, params).tokens
