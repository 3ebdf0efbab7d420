"""What every training command (`pretrain`, `sft`, `train-rm`) does around `Trainer.run()`: the same
options, the same stop on a scheduler's signal, and the same end of a run on rank 0 once the process group
is gone (the final checkpoint exported to HF, the curves drawn), before the command's own last steps."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run's YAML config (e.g. configs/tiny.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by its dotted key, e.g. --set optim.lr=1e-4 (repeatable)")


def rank0_printer() -> Callable[[str], None] | None:
    """What a task reports about its data (packing, skipped records), printed by the first rank only; set
    before the process group exists, so it reads the launcher's RANK."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    return lambda line: print(line, flush=True)


def run_stage(trainer, command: str, finish: Callable) -> int:
    """Trains to the end, then `finish(trainer)` on rank 0 after the process group is closed (an export
    reads the checkpoint without collectives). A stop on a signal (SIGTERM, slurm's --signal) leaves the
    saved checkpoint for the next run: nothing is exported yet."""
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


def export_and_plot(trainer) -> Path | None:
    """The final (verified) checkpoint as an HF directory `run_dir/hf` (when `checkpoint.export_hf`) and the
    run's curves in `run_dir/metrics.png`; returns the HF directory when there is one."""
    from internlm2.train.export import export_hf
    from internlm2.train.metrics_log import read_metrics
    from internlm2.train.plot import draw

    cfg, run_dir = trainer.cfg, trainer.run_dir
    final = trainer.checkpoints.latest()
    hf_dir = run_dir / "hf"
    if cfg.checkpoint.export_hf and final is not None:
        export_hf(final, hf_dir, tokenizer_directory=trainer.data.tokenizer, dtype=torch.float32, overwrite=True)
        print(f"exported {final.name} to {hf_dir}")
    draw(read_metrics(run_dir / "metrics.jsonl"), run_dir / "metrics.png", title=run_dir.resolve().name)
    print(f"plots: {run_dir / 'metrics.png'}")
    return hf_dir if (hf_dir / "config.json").is_file() else None
