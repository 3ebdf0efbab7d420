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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run's YAML config (e.g. configs/tiny.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by its dotted key, e.g. --set optim.lr=1e-4 (repeatable)")


def finish(trainer) -> None:
    """Rank 0, after the process group is gone: HF export of the final (verified) checkpoint, a sample
    from the exported model, plots, the learning summary."""
    from internlm2.data import Tokenizer
    from internlm2.model.generation import SamplingParams, generate
    from internlm2.model.pretrained import load_pretrained
    from internlm2.train.data_setup import unigram_entropy
    from internlm2.train.export import export_hf
    from internlm2.train.metrics_log import read_metrics
    from internlm2.train.plot import draw

    cfg, run_dir = trainer.cfg, trainer.run_dir
    final = trainer.checkpoints.latest()
    hf_dir = run_dir / "hf"
    if cfg.checkpoint.export_hf and final is not None:
        export_hf(final, hf_dir, tokenizer_directory=trainer.data.tokenizer, dtype=torch.float32, overwrite=True)
        print(f"exported {final.name} to {hf_dir}")
    if cfg.sample is not None and (hf_dir / "config.json").is_file():
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
    draw(records, run_dir / "metrics.png", title=run_dir.resolve().name)
    print(f"plots: {run_dir / 'metrics.png'}")
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    if evals and trainer.data.train:
        baseline = unigram_entropy(trainer.data.train[0].path)
        print(f"held-out loss {evals[0]:.3f} -> {evals[-1]:.3f} nats/token; unigram entropy of the training "
              f"data {baseline:.3f} (a model that ignores context)")


def train_then_finish(trainer, command: str, finish) -> int:
    """Runs `trainer`; when it ends, rank 0 calls `finish(trainer)` (export, plots) after the process group
    is gone. A run stopped early (a scheduler or a user asked) has saved its checkpoint: no export yet."""
    from internlm2.train.preemption import StoppedEarly

    try:
        trainer.run()
    except StoppedEarly as stop:
        trainer.runtime.close()
        if trainer.rank == 0:
            print(f"internlm2 {command}: {stop}", flush=True)
        return 0
    trainer.runtime.close()
    if trainer.rank == 0:
        finish(trainer)
    return 0


def run(args: argparse.Namespace) -> int:
    from internlm2.train.trainer import Trainer

    return train_then_finish(Trainer(load_config(TrainConfig, args.config, args.set)), "pretrain", finish)
