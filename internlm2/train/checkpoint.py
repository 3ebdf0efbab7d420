"""What a training checkpoint holds, and how it is written and read under any parallel layout.

Inside a checkpoint directory (made complete-or-absent by checkpoint_dir.py):

    dcp/                 model weights and optimizer states through torch.distributed.checkpoint
    trainer_state.json   position in the run (step, stage, consumed samples, ...), optimizer step count
    rng/rank_XXXXX.pt    every rank's RNG states (torch, CUDA, Python, NumPy)
    config.yaml          the run's resolved configuration

Tensors are saved by global name and global shape: a tensor-parallel shard is saved as a DTensor over the
TP mesh (DCP records each rank's piece with its offset), replicated tensors (norms, and every tensor's DP
replicas) are saved once, and pipeline stages contribute their own layers' names. The optimizer's state
is saved per parameter (float32 master weight and AdamW moments, in the parameter's TP shard shape,
gathered from the ZeRO shards), not as flat buffers. So a checkpoint loads into any (tp, pp, dp, ZeRO)
layout: DCP reads the overlapping pieces for each rank's new shards, and the optimizer re-cuts its shards.
RNG states are restored when the layout (world size) is the same; a resharded run draws fresh ones.
"""

from __future__ import annotations

import contextlib
import json
import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, Shard

from internlm2.config import save_yaml

if TYPE_CHECKING:
    from internlm2.train.trainer import Trainer

FORMAT_VERSION = 1
_OPTIM_KEYS = ("master", "exp_avg", "exp_avg_sq")


def _global(tensor: torch.Tensor, param: torch.Tensor, trainer: "Trainer") -> torch.Tensor:
    """`tensor` (this rank's piece of `param`'s kind) as the global tensor DCP should see."""
    dim = getattr(param, "tensor_parallel_dim", None)
    if dim is None or trainer.parallel.tp_size == 1:
        return tensor
    mesh = trainer.parallel.mesh["tp"]
    return DTensor.from_local(tensor, device_mesh=mesh, placements=[Shard(dim)], run_check=False)


def _named_params(trainer: "Trainer") -> dict[str, torch.nn.Parameter]:
    return {n: p for c in trainer.chunks for n, p in c.named_parameters()}


def state_dict(trainer: "Trainer", optimizer_state: dict[str, dict[str, torch.Tensor]]) -> dict:
    """The DCP state dict: `model.<name>` and `optim.<name>.<master|exp_avg|exp_avg_sq>`."""
    out = {}
    for name, param in _named_params(trainer).items():
        out[f"model.{name}"] = _global(param.data, param, trainer)
        for key in _OPTIM_KEYS:
            out[f"optim.{name}.{key}"] = _global(optimizer_state[name][key], param, trainer)
    return out


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns on every call without a process group that it assumes one process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save(directory: Path, trainer: "Trainer") -> None:
    """Collective: every rank writes its part of `directory` (a fresh temporary directory)."""
    sd = state_dict(trainer, trainer.optimizer.per_param_state())
    with single_process_quiet():
        dcp.save(sd, checkpoint_id=directory / "dcp")
    rank = trainer.rank
    rng_dir = directory / "rng"
    if rank == 0:
        rng_dir.mkdir()
        payload = {
            "format": FORMAT_VERSION,
            "trainer": trainer.state.to_dict(),
            "optimizer_step": trainer.optimizer.step_count,
            "world_size": trainer.parallel.world_size,
            "stages": [s.name for s in trainer.cfg.stages],
            # The model as it trains now (vocabulary as resolved, the current stage's RoPE base), which an
            # export must describe: the config file's `model` section alone is not that model.
            "model_config": trainer.chunks[0].config.to_dict(),
        }
        (directory / "trainer_state.json").write_text(json.dumps(payload, indent=1) + "\n")
        save_yaml(trainer.cfg, directory / "config.yaml")
    trainer.barrier()
    torch.save(_rng_state(trainer.device), rng_dir / f"rank_{rank:05d}.pt")


def load(directory: Path, trainer: "Trainer") -> None:
    """Collective: restores model, optimizer, position and (same world size) RNG states from `directory`."""
    meta_path = directory / "trainer_state.json"
    if not meta_path.is_file() or not (directory / "dcp").is_dir():
        raise FileNotFoundError(f"{directory} is not a complete training checkpoint (no trainer_state.json or dcp/)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{directory}: checkpoint format {meta.get('format')!r}, this version reads {FORMAT_VERSION}")
    if meta["stages"] != [s.name for s in trainer.cfg.stages][: len(meta["stages"])]:
        raise ValueError(f"{directory}: saved with stages {meta['stages']}, but the config has "
                         f"{[s.name for s in trainer.cfg.stages]}; a run can only be extended with later stages")
    params = _named_params(trainer)
    optimizer_state = {name: {k: torch.empty(p.shape, dtype=torch.float32, device=p.device) for k in _OPTIM_KEYS}
                       for name, p in params.items()}
    # DCP reads in place: straight into the parameters (and DTensor views of their shards) and into the
    # per-parameter optimizer tensors, which the optimizer then cuts into its own shards.
    with single_process_quiet():
        dcp.load(state_dict(trainer, optimizer_state), checkpoint_id=directory / "dcp")
    trainer.optimizer.load_per_param_state(optimizer_state, meta["optimizer_step"])
    state = trainer.state
    for key, value in meta["trainer"].items():
        setattr(state, key, value)
    rng_file = directory / "rng" / f"rank_{trainer.rank:05d}.pt"
    if meta["world_size"] == trainer.parallel.world_size and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True), trainer.device)


def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))

