"""`internlm2 sft --config FILE [--set key=value ...]`: supervised fine-tuning, resuming if interrupted.

Launched like `internlm2 pretrain` (one process, torchrun, slurm), on any layout it takes. The run directory
gets what a pretraining run's does (metrics, checkpoints, config.yaml, plots, `hf/`, whose
tokenizer_config.json carries the chat template) and, with `task_eval`, `task_eval.json`: the demo tasks'
scores of the model before (init_from) and after fine-tuning, per task.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from internlm2.train.stage_run import add_arguments, export_and_plot, rank0_printer, run_stage

__all__ = ["add_arguments", "run"]


def _init_model_directory(trainer) -> Path:
    """An HF directory of the model the run started from (a training checkpoint is exported once)."""
    from internlm2.train.export import export_hf
    from internlm2.train.init_from import init_source

    source = init_source(trainer.cfg.init_from)
    if not source.is_checkpoint:
        return source.path
    out = trainer.run_dir / "init_hf"
    if not (out / "config.json").is_file():
        export_hf(source.path, out, dtype=None, overwrite=True)
    return out


def evaluate_tasks(trainer) -> dict:
    """The held-out task prompts answered by the initial and the fine-tuned model; `task_eval.json`."""
    import torch

    from internlm2.data import Tokenizer
    from internlm2.model.pretrained import load_pretrained
    from internlm2.tasks.evaluation import evaluate
    from internlm2.tasks.verifiable import Example
    from internlm2.train.sft import task_data_dir

    cfg = trainer.cfg
    path = trainer.run_dir / "task_eval.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    tokenizer = Tokenizer.load(trainer.data.tokenizer)
    lines = (task_data_dir(cfg.run_dir) / "tasks_eval.jsonl").read_text().splitlines()
    examples = [Example.from_json(json.loads(line)) for line in lines]
    for name, directory in (("before", _init_model_directory(trainer)), ("after", trainer.run_dir / "hf")):
        if name not in results:
            model = load_pretrained(directory, dtype=torch.float32).eval()
            results[name] = evaluate(model, tokenizer, examples, max_new_tokens=cfg.task_eval.max_new_tokens,
                                     batch_size=cfg.task_eval.batch_size)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"held-out tasks ({len(examples)} prompts), before -> after fine-tuning:")
    for task, after in results["after"].items():
        before = results["before"][task]
        print(f"  {task:<14} exact match {before['exact_match']:6.1%} -> {after['exact_match']:6.1%}   "
              f"correct {before['correct']:6.1%} -> {after['correct']:6.1%}   "
              f"format {before['format']:6.1%} -> {after['format']:6.1%}")
    return results


def finish(trainer) -> None:
    """Rank 0, after the process group is gone: HF export of the final checkpoint, plots, task scores."""
    if export_and_plot(trainer) is not None and trainer.cfg.task_eval is not None:
        evaluate_tasks(trainer)


def run(args: argparse.Namespace) -> int:
    from internlm2.config import load_config
    from internlm2.train.sft import SFTConfig, SFTTask
    from internlm2.train.trainer import Trainer

    cfg = load_config(SFTConfig, args.config, args.set)
    trainer = Trainer(cfg, SFTTask(cfg.sft, report=rank0_printer()))
    return run_stage(trainer, "sft", finish)
