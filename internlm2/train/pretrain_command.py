"""`internlm2 pretrain --config FILE [--set key=value ...]`: train a run, resuming it if it was interrupted.

Launch on one process, with torchrun (scripts/launch_torchrun.sh) or under slurm (scripts/slurm/). The run
directory gets metrics.jsonl, TensorBoard logs, checkpoints/ (resumed from automatically), the resolved
config.yaml and, at the end, an HF export (hf/), a generated sample (sample.txt) and the plots (metrics.png).
"""

from __future__ import annotations

import argparse

import torch

from internlm2.config import load_config
from internlm2.train.config import TrainConfig
from internlm2.train.stage_run import add_arguments, export_and_plot, run_stage

__all__ = ["add_arguments", "run"]


def finish(trainer) -> None:
    """Rank 0, after the process group is gone: HF export of the final (verified) checkpoint, a sample
    from the exported model, plots, the learning summary."""
    from internlm2.data import Tokenizer
    from internlm2.model.generation import SamplingParams, generate
    from internlm2.model.pretrained import load_pretrained
    from internlm2.train.data_setup import unigram_entropy
    from internlm2.train.metrics_log import read_metrics

    cfg, run_dir = trainer.cfg, trainer.run_dir
    hf_dir = export_and_plot(trainer)
    if cfg.sample is not None and hf_dir is not None:
        model = load_pretrained(hf_dir)
        tokenizer = Tokenizer.load(trainer.data.tokenizer)
        prompt = tokenizer.encode(cfg.sample.prompt, bos=True)
        s = cfg.sample
        params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p)
        out = generate(model, [prompt], params, generator=torch.Generator().manual_seed(s.seed))
        text = s.prompt + tokenizer.decode(out.tokens[0])
        (run_dir / "sample.txt").write_text(text + "\n")
        print(f"sample (temperature {s.temperature}, top-p {s.top_p}):\n{text}")
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    if evals and trainer.data.train:
        baseline = unigram_entropy(trainer.data.train[0].path)
        print(f"held-out loss {evals[0]:.3f} -> {evals[-1]:.3f} nats/token; unigram entropy of the training "
              f"data {baseline:.3f} (a model that ignores context)")


def run(args: argparse.Namespace) -> int:
    from internlm2.train.trainer import Trainer

    return run_stage(Trainer(load_config(TrainConfig, args.config, args.set)), "pretrain", finish)
