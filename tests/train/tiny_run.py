"""A tiny training run for the trainer's tests: data made once per session, configs written per test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from internlm2.train.config import BuiltinData
from internlm2.train.data_setup import make_builtin_data

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 1024


def make_data(directory: Path) -> Path:
    make_builtin_data(BuiltinData(vocab_size=VOCAB, max_bytes=400_000, eval_fraction=0.05), directory)
    return directory


def tiny_config(data_dir: Path, run_dir: Path, **overrides) -> dict:
    """4 layers, hidden 64, 8 heads, 4 KV heads (divisible by tp=2, pp=2); two stages with different
    sequence lengths, batch sizes and RoPE bases; float32 and deterministic, so runs repeat bit for bit."""
    cfg = {
        "run_dir": str(run_dir),
        "seed": 7,
        "dtype": "float32",
        "deterministic": True,
        "model": {"preset": "internlm2-tiny", "vocab_size": VOCAB, "num_layers": 4, "hidden_size": 64,
                  "intermediate_size": 192, "num_attention_heads": 8, "num_key_value_heads": 4},
        "data": {"tokenizer": str(data_dir / "tokenizer"), "train": [{"path": str(data_dir / "train")}],
                 "eval": {"path": str(data_dir / "eval")}, "num_workers": 0},
        "stages": [
            {"name": "short", "steps": 6, "seq_len": 64, "global_batch_size": 4, "micro_batch_size": 2,
             "rope_theta": 10000.0},
            {"name": "long", "steps": 4, "seq_len": 128, "global_batch_size": 2, "micro_batch_size": 1,
             "rope_theta": 100000.0},
        ],
        "optim": {"lr": 3.0e-3, "warmup_steps": 2},
        "checkpoint": {"every": 4, "keep": 10, "export_hf": False},
        "eval": {"every": 5, "rows": 4},
        "logging": {"tensorboard": False, "progress": False},
    }
    return with_overrides(cfg, overrides)


def with_overrides(cfg: dict, overrides: dict) -> dict:
    """`cfg` with dotted keys set (`stages.0.steps`: list items by index)."""
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[last] = value
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


# The environment of every CLI run in the tests: one thread per rank, and a dead rank fails the run soon.
CLI_ENV = dict(os.environ, OMP_NUM_THREADS="1", INTERNLM2_PG_TIMEOUT_S="120")


def cli_command(*args, nproc: int = 1) -> list[str]:
    """`python -m internlm2.cli ARGS` on one process, or under torchrun with `nproc` ranks."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [sys.executable, *launcher, "-m", "internlm2.cli", *map(str, args)]


def run_cli(*args, nproc: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args, nproc=nproc), cwd=ROOT, env=CLI_ENV, capture_output=True, text=True,
                          timeout=timeout)


def pretrain_command(config: Path, nproc: int = 1) -> list[str]:
    return cli_command("pretrain", "--config", config, nproc=nproc)


def run_pretrain(config: Path, nproc: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    result = run_cli("pretrain", "--config", config, nproc=nproc, timeout=timeout)
    assert result.returncode == 0, f"pretrain failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from the run's metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out
