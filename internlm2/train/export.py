"""A training checkpoint to an HF checkpoint directory, in one process, whatever layout trained it.

The checkpoint stores every parameter under its global name and shape (checkpoint.py), so one process can
read each full tensor from it in turn (a tensor's DCP pieces from all ranks are stitched by DCP), without a
process group and without holding the whole model in memory at once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from internlm2.data import Tokenizer, hf_tokenizer_files
from internlm2.model import ModelConfig
from internlm2.model.pretrained import full_parameter_shapes, write_pretrained
from internlm2.train.checkpoint import single_process_quiet

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_model_config(checkpoint: Path) -> ModelConfig:
    """The configuration of the model a training checkpoint holds, as it was training when saved (the
    resolved vocabulary, the current stage's RoPE base)."""
    meta = json.loads((checkpoint / "trainer_state.json").read_text())
    return ModelConfig.from_dict(meta["model_config"])


def export_hf(checkpoint: str | Path, out: str | Path, *, model_config: ModelConfig | None = None, fmt: str = "internlm2",
              dtype: torch.dtype | None = torch.bfloat16, tokenizer_directory: str | Path | None = None,
              overwrite: bool = False) -> Path:
    """Writes the model of training checkpoint `checkpoint` as an HF checkpoint at `out` (atomically), with
    the HF tokenizer files of `tokenizer_directory` (a directory holding tokenizer.model, or the file)."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "dcp").is_dir() or not (checkpoint / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete training checkpoint (no dcp/ or trainer_state.json)")
    config = model_config or checkpoint_model_config(checkpoint)

    def tensors():
        for name, shape in full_parameter_shapes(config).items():
            target = {f"model.{name}": torch.empty(shape, dtype=torch.float32)}
            with single_process_quiet():
                dcp.load(target, checkpoint_id=checkpoint / "dcp")
            yield name, target[f"model.{name}"]

    tokenizer_files = hf_tokenizer_files(Tokenizer.load(tokenizer_directory)) if tokenizer_directory else None
    return write_pretrained(out, config, tensors(), fmt=fmt, dtype=dtype, source_directory=tokenizer_directory,
                            tokenizer_files=tokenizer_files, overwrite=overwrite)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint directory (run_dir/checkpoints/step_N)")
    parser.add_argument("--out", required=True, help="HF checkpoint directory to write")
    parser.add_argument("--format", choices=("internlm2", "llama"), default="internlm2")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--tokenizer", help="the run's tokenizer (directory or tokenizer.model): its HF files go alongside")
    parser.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    out = export_hf(args.checkpoint, args.out, fmt=args.format, dtype=_DTYPES[args.dtype],
                    tokenizer_directory=args.tokenizer, overwrite=args.overwrite)
    step = json.loads((Path(args.checkpoint) / "trainer_state.json").read_text())["trainer"]["step"]
    print(f"exported step {step} to {out}")
    return 0
