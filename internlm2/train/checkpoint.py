"""What a training checkpoint holds, how it is written and read under any parallel layout, and how it is
verified before anything trusts it.

A checkpoint holds named units, one per trained model (pretraining and SFT: `model`; a reward model run:
`model`; PPO: `actor` and `critic`), plus the loop's own state. Inside a checkpoint directory (made
complete-or-absent by checkpoint_dir.py):

    dcp/                 every unit's weights and optimizer states through torch.distributed.checkpoint,
                         as `<unit>/<param>` and `<unit>/optim/<param>/<master|exp_avg|exp_avg_sq>`
    state.json           format, world size, the loop's state (step, stage, data position, ...), and per
                         unit its model class, its live model config and its optimizer step count
    rng/rank_XXXXX.pt    every rank's RNG states (torch, CUDA, Python, NumPy)
    config.yaml          the run's resolved configuration
    manifest.json        size and SHA-256 of every other file, written last

Tensors are saved by global name and global shape: a tensor-parallel shard is saved as a DTensor over the
TP mesh (DCP records each rank's piece with its offset), replicated tensors (norms, and every tensor's DP
replicas) are saved once, and pipeline stages contribute their own layers' names. The optimizer's state
is saved per parameter (float32 master weight and AdamW moments, in the parameter's TP shard shape,
gathered from the ZeRO shards), not as flat buffers. So a checkpoint loads into any (tp, pp, dp, ZeRO)
layout: DCP reads the overlapping pieces for each rank's new shards, and the optimizer re-cuts its shards.
RNG states are restored when the layout (world size) is the same; a resharded run draws fresh ones.

Verification: the files are hashed when written (the ranks share the work) and `verify` re-hashes them
on load; a checkpoint whose manifest is missing or does not match names the first file that differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, Shard

from internlm2.config import save_yaml
from internlm2.errors import CheckpointError
from internlm2.model import ModelConfig
from internlm2.model.pretrained import model_kind, shape_differences
from internlm2.parallel import ParallelState
from internlm2.train.engine import Engine

FORMAT_VERSION = 2
STATE_FILE, MANIFEST = "state.json", "manifest.json"
_OPTIM_KEYS = ("master", "exp_avg", "exp_avg_sq")
MODEL_UNIT = "model"  # the unit of the one model a staged run (pretraining, SFT) trains


def _global(tensor: torch.Tensor, param: torch.Tensor, parallel: ParallelState) -> torch.Tensor:
    """`tensor` (this rank's piece of `param`'s kind) as the global tensor DCP should see."""
    dim = getattr(param, "tensor_parallel_dim", None)
    if dim is None or parallel.tp_size == 1:
        return tensor
    return DTensor.from_local(tensor, device_mesh=parallel.mesh["tp"], placements=[Shard(dim)], run_check=False)


def unit_state_dict(name: str, engine: Engine, optimizer_state: dict | None) -> dict[str, torch.Tensor]:
    """The DCP entries of one unit: its parameters and, when given, their optimizer states."""
    out = {}
    for pname, param in engine.named_parameters().items():
        out[f"{name}/{pname}"] = _global(param.data, param, engine.parallel)
        if optimizer_state is not None:
            for key in _OPTIM_KEYS:
                out[f"{name}/optim/{pname}/{key}"] = _global(optimizer_state[pname][key], param, engine.parallel)
    return out


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns on every call without a process group that it assumes one process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save(directory: Path, units: dict[str, Engine], loop_state: dict, run_config, parallel: ParallelState) -> None:
    """Collective: every rank writes its part of `directory` (a fresh temporary directory), then the
    ranks hash the files between them and rank 0 writes the manifest."""
    sd = {}
    for name, engine in units.items():
        optim = engine.optimizer.per_param_state() if engine.optimizer is not None else None
        sd.update(unit_state_dict(name, engine, optim))
    with single_process_quiet():
        dcp.save(sd, checkpoint_id=directory / "dcp")
    if parallel.rank == 0:
        (directory / "rng").mkdir()
        state = {
            "format": FORMAT_VERSION,
            "world_size": parallel.world_size,
            "loop": loop_state,
            "units": {name: {"kind": model_kind(e.chunks[0]), "model_config": e.model_config.to_dict(),
                             "optimizer_step": e.optimizer.step_count if e.optimizer is not None else None}
                      for name, e in units.items()},
        }
        (directory / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        save_yaml(run_config, directory / "config.yaml")
    _barrier(parallel)
    torch.save(_rng_state(parallel.device), directory / "rng" / f"rank_{parallel.rank:05d}.pt")
    _barrier(parallel)
    digests = _hash_share(directory, parallel)
    if parallel.rank == 0:
        manifest = {rel: entry for share in digests for rel, entry in share.items()}
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=0, sort_keys=True) + "\n")
    _barrier(parallel)


def read_state(directory: Path) -> dict:
    """state.json of a checkpoint, checked for its format."""
    path = Path(directory) / STATE_FILE
    if not path.is_file() or not (Path(directory) / "dcp").is_dir():
        raise CheckpointError(f"{directory} is not a complete training checkpoint (no {STATE_FILE} or dcp/)")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{directory}: checkpoint format {state.get('format')!r}, this version reads "
                              f"{FORMAT_VERSION}")
    return state


def unit_config(directory: Path, unit: str) -> tuple[str, ModelConfig]:
    """(model kind, model config as it was training) of one unit of a checkpoint."""
    units = read_state(directory)["units"]
    if unit not in units:
        raise CheckpointError(f"{directory}: no unit {unit!r} (it holds {', '.join(units)})")
    return units[unit]["kind"], ModelConfig.from_dict(units[unit]["model_config"])


def load(directory: Path, units: dict[str, Engine], parallel: ParallelState) -> dict:
    """Collective: restores every unit's weights and optimizer state and (same world size) the RNG
    states from `directory`; returns the loop's state. Verify the checkpoint first (`verify`)."""
    state = read_state(directory)
    missing = sorted(set(units) - set(state["units"]))
    if missing:
        raise CheckpointError(f"{directory}: has no unit(s) {', '.join(missing)} (it holds "
                              f"{', '.join(state['units'])})")
    sd, optimizer_states = {}, {}
    for name, engine in units.items():
        optim = None
        if engine.optimizer is not None:
            optim = {p: {k: torch.empty(t.shape, dtype=torch.float32, device=t.device) for k in _OPTIM_KEYS}
                     for p, t in engine.named_parameters().items()}
            optimizer_states[name] = optim
        sd.update(unit_state_dict(name, engine, optim))
    # DCP reads in place: straight into the parameters (and DTensor views of their shards) and into the
    # per-parameter optimizer tensors, which each optimizer then cuts into its own shards.
    with single_process_quiet():
        dcp.load(sd, checkpoint_id=directory / "dcp")
    for name, optim in optimizer_states.items():
        units[name].optimizer.load_per_param_state(optim, state["units"][name]["optimizer_step"])
    rng_file = directory / "rng" / f"rank_{parallel.rank:05d}.pt"
    if state["world_size"] == parallel.world_size and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True), parallel.device)
    return state["loop"]


def load_weights(directory: Path, unit: str, chunks, parallel: ParallelState) -> None:
    """Collective: unit `unit`'s weights from a verified checkpoint into `chunks` (this rank's part of the
    model, in any layout: DCP reads the pieces each shard needs), and nothing else: no optimizer state, no
    RNG, no loop position (a new run starting from another run's model)."""
    directory = Path(directory)
    problem = verify(directory, parallel)
    if problem is not None:
        raise CheckpointError(f"init_from {directory}: {problem}")
    _, saved = unit_config(directory, unit)
    differ = shape_differences(saved, chunks[0].config)
    if differ:
        raise CheckpointError(f"init_from {directory}: unit {unit!r} has another model shape: {', '.join(differ)}")
    with single_process_quiet():
        dcp.load(unit_state_dict(unit, Engine(chunks, parallel), None), checkpoint_id=directory / "dcp")


def read_unit_tensor(directory: Path, unit: str, name: str, shape) -> torch.Tensor:
    """One full parameter of a unit, read in this process alone (no process group involved, whatever
    launched it: export at the end of a multi-process run must not wait for the other ranks)."""
    target = {f"{unit}/{name}": torch.empty(shape, dtype=torch.float32)}
    with single_process_quiet():
        dcp.load(target, checkpoint_id=Path(directory) / "dcp", no_dist=True)
    return target[f"{unit}/{name}"]


# ---- verification -------------------------------------------------------------------------------
def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _hash_share(directory: Path, parallel: ParallelState) -> list[dict]:
    """Every rank hashes every world_size-th file; all ranks get all the digests."""
    files = _files(directory)
    mine = {rel: {"bytes": (directory / rel).stat().st_size, "sha256": _sha256(directory / rel)}
            for rel in files[parallel.rank::parallel.world_size]}
    return _all_gather_objects(mine, parallel)


def verify(directory: Path, parallel: ParallelState) -> str | None:
    """Collective: None when every file of the checkpoint matches its manifest, else what is wrong (the
    first file that is missing, of the wrong size, or whose hash differs)."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    problem = None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        problem = f"{manifest_path} cannot be read ({err.__class__.__name__}): the checkpoint is unverifiable"
    if problem is None:
        extra = sorted(set(_files(directory)) - set(manifest))
        if extra:
            problem = f"{directory / extra[0]} is not in the checkpoint's manifest"
    if problem is None:
        for rel in sorted(manifest)[parallel.rank::parallel.world_size]:
            path, want = directory / rel, manifest[rel]
            if not path.is_file():
                problem = f"{path} is missing"
            elif path.stat().st_size != want["bytes"]:
                problem = f"{path} has {path.stat().st_size} bytes, its manifest says {want['bytes']}"
            elif _sha256(path) != want["sha256"]:
                problem = f"{path} does not match its SHA-256 in the manifest (corrupted)"
            if problem:
                break
    found = [p for p in _all_gather_objects(problem, parallel) if p]
    return found[0] if found else None


def choose_resume(checkpoints, explicit: str | None, parallel: ParallelState) -> Path | None:
    """Collective: the checkpoint a run continues from. The run's own newest one that verifies; one that
    does not is reported (naming the file) and passed over for the one before it; if the run has
    checkpoints but none verifies, it stops. A run without checkpoints starts from `explicit`
    (`checkpoint.load`), which must verify, or from scratch (None)."""
    own = [path for _, path in checkpoints.complete()]
    failures = []
    for path in reversed(own):
        problem = verify(path, parallel)
        if problem is None:
            return path
        failures.append(problem)
        if parallel.rank == 0:
            print(f"checkpoint {path} is skipped: {problem}", flush=True)
    if own:
        raise CheckpointError(f"no checkpoint of the run verifies ({failures[0]}); move {checkpoints.root} away to "
                              "start over")
    if explicit is None:
        return None
    problem = verify(Path(explicit), parallel)
    if problem is not None:
        raise CheckpointError(f"checkpoint.load {explicit}: {problem}")
    return Path(explicit)


def _all_gather_objects(obj, parallel: ParallelState) -> list:
    if parallel.world_size == 1:
        return [obj]
    out = [None] * parallel.world_size
    dist.all_gather_object(out, obj)
    return out


def _barrier(parallel: ParallelState) -> None:
    if parallel.world_size > 1:
        dist.barrier()


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
