"""`internlm2 ppo --config FILE [--set key=value ...]`: online PPO with a conditional reward model and
fast-path rounds (internlm2/rlhf/ppo.py), resuming if it was interrupted.

Launched like `internlm2 pretrain` (one process or torchrun) on tp and dp layouts. The run directory gets
metrics.jsonl (one line per iteration), TensorBoard logs, checkpoints/, rounds/ (each round's responses
and patch pairs), rounds.jsonl (each fast path's patterns, pairs and reward-model accuracy), and at the
end hf/ (the actor), reward_model_hf/ (when the fast path patched it) and ppo.png.
"""

from __future__ import annotations

import argparse

from internlm2.train.stage_run import add_arguments, run_stage

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    from internlm2.config import load_config
    from internlm2.rlhf.ppo import PPOTrainer, export
    from internlm2.rlhf.ppo_config import PPOConfig

    return run_stage(PPOTrainer(load_config(PPOConfig, args.config, args.set)), "ppo", export)
