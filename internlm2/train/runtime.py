"""The processes of a run: the launcher's world, the device, the process grid, and the few collectives the
training loops use around the engine (barrier, rank 0's decision, the end of the run).

Every stage command starts one `Runtime` after its configuration and layout were validated (so a bad
layout never reaches a process group), and closes it when training is done: the process group is torn
down on every rank together, so what rank 0 does after it (HF export, a sample, plots) needs no other
rank and no launcher can leave it waiting on a peer that already exited.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from internlm2.parallel import ParallelConfig, ParallelState, init_distributed
from internlm2.train.launch_env import pg_timeout_s


def launched_world_size() -> int:
    """The number of processes the launcher started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Runtime:
    parallel: ParallelState
    device: torch.device

    @classmethod
    def start(cls, layout: ParallelConfig, *, deterministic: bool = False, seed: int = 0,
              **model_shape) -> "Runtime":
        """Joins the launcher's process group (when there is more than one process), picks this rank's
        device and builds the process grid for `layout` (already validated against the world size)."""
        timeout = pg_timeout_s(600.0)
        device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
                  else torch.device("cpu"))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if launched_world_size() > 1:
            init_distributed(timeout_s=timeout)
            parallel = ParallelState(layout, timeout_s=timeout, **model_shape)
        else:
            layout.validate(1, **model_shape)
            parallel = ParallelState.single(layout)
        if deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(seed)
        return cls(parallel, device)

    @property
    def rank(self) -> int:
        return self.parallel.rank

    @property
    def distributed(self) -> bool:
        return self.parallel.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def from_rank0(self, value):
        """Rank 0's `value` on every rank (e.g. a problem only rank 0 can see, so all stop together)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Ends the process group on every rank together (a collective: all ranks call it)."""
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
