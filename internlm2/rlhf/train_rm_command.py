"""`internlm2 train-rm --config FILE [--set key=value ...]`: train a (conditional) reward model, resuming if
interrupted.

Launched like `internlm2 sft` (one process, torchrun, slurm), on any layout it takes. The run directory gets
what an SFT run's does (metrics.jsonl with the training and held-out `eval_*` metrics, checkpoints,
config.yaml, metrics.png) and `hf/`: the reward model in InternLM2's released layout
(`InternLM2ForRewardModel`, `reward_token_id` in config.json) with `conditions.json`, the domain prompts,
so that `internlm2 score --model RUN/hf --condition NAME` scores as training did.
"""

from __future__ import annotations

import argparse

from internlm2.train.stage_run import add_arguments, export_and_plot, rank0_printer, run_stage

__all__ = ["add_arguments", "run"]


def finish(trainer) -> None:
    """Rank 0, after the process group is gone: HF export of the final checkpoint with its conditions, plots,
    the held-out summary."""
    from internlm2.rlhf.rm_training import write_conditions
    from internlm2.train.metrics_log import read_metrics

    cfg = trainer.cfg
    hf_dir = export_and_plot(trainer)
    if hf_dir is not None:
        write_conditions(cfg.rm.conditions, hf_dir)
        print(f"reward token {cfg.model['reward_token_id']}, conditions: {', '.join(cfg.rm.conditions) or 'none'}")
    held_out = [r for r in read_metrics(trainer.run_dir / "metrics.jsonl") if "eval_accuracy" in r]
    if held_out:
        last = held_out[-1]
        by_condition = ", ".join(f"{k.removeprefix('eval_accuracy/')} {v:.1%}" for k, v in sorted(last.items())
                                 if k.startswith("eval_accuracy/"))
        print(f"held-out pairs at step {last['step']}: accuracy {last['eval_accuracy']:.1%} ({by_condition}), "
              f"margin {last['eval_margin']:.3f}, loss {last['eval_loss']:.4f}")


def run(args: argparse.Namespace) -> int:
    from internlm2.config import load_config
    from internlm2.rlhf.rm_training import RMConfig, RMTask
    from internlm2.train.trainer import Trainer

    cfg = load_config(RMConfig, args.config, args.set)
    trainer = Trainer(cfg, RMTask(cfg, report=rank0_printer()))
    return run_stage(trainer, "train-rm", finish)
