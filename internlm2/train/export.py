"""A training checkpoint to an HF checkpoint directory, in one process, whatever layout trained it.

The checkpoint stores every parameter under its global name and shape (checkpoint.py), so one process can
read each full tensor from it in turn (a tensor's DCP pieces from all ranks are stitched by DCP), without a
process group and without holding the whole model in memory at once. The checkpoint is verified first: an
export never writes a model from a checkpoint whose files do not match their manifest. The HF config is
the one the unit was training with when saved (its vocabulary, its stage's RoPE base), and the layout
its head's (a causal LM, or InternLM2's reward-model layout for a scalar head).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from internlm2.constants import DTYPES
from internlm2.data import Tokenizer, hf_tokenizer_files
from internlm2.errors import CheckpointError
from internlm2.model.pretrained import full_parameter_shapes, write_pretrained
from internlm2.parallel import ParallelState
from internlm2.train import checkpoint as ckpt


def export_hf(checkpoint: str | Path, out: str | Path, *, unit: str = "model", fmt: str = "internlm2",
              dtype: torch.dtype | None = torch.bfloat16, tokenizer_directory: str | Path | None = None,
              overwrite: bool = False) -> Path:
    """Writes unit `unit` of training checkpoint `checkpoint` as an HF checkpoint at `out` (atomically), with
    the HF tokenizer files of `tokenizer_directory` (a directory holding tokenizer.model, or the file)."""
    checkpoint = Path(checkpoint)
    kind, config = ckpt.unit_config(checkpoint, unit)
    problem = ckpt.verify(checkpoint, ParallelState.single())
    if problem is not None:
        raise CheckpointError(f"not exporting {checkpoint}: {problem}")

    def tensors():
        for name, shape in full_parameter_shapes(config, kind).items():
            yield name, ckpt.read_unit_tensor(checkpoint, unit, name, shape)

    tokenizer_files = hf_tokenizer_files(Tokenizer.load(tokenizer_directory)) if tokenizer_directory else None
    return write_pretrained(out, config, tensors(), fmt=fmt, kind=kind, dtype=dtype, source_directory=tokenizer_directory,
                            tokenizer_files=tokenizer_files, overwrite=overwrite)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint directory (run_dir/checkpoints/step_N)")
    parser.add_argument("--out", required=True, help="HF checkpoint directory to write")
    parser.add_argument("--unit", default="model", help="which model of the checkpoint (PPO runs: actor, critic)")
    parser.add_argument("--format", choices=("internlm2", "llama"), default="internlm2")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--tokenizer", help="the run's tokenizer (directory or tokenizer.model): its HF files go alongside")
    parser.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    out = export_hf(args.checkpoint, args.out, unit=args.unit, fmt=args.format, dtype=DTYPES[args.dtype],
                    tokenizer_directory=args.tokenizer, overwrite=args.overwrite)
    print(f"exported {Path(args.checkpoint).name} ({args.unit}) to {out}")
    return 0
