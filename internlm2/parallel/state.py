"""The process grid: which rank does what, built once, validated before any collective, passed explicitly.

`ParallelConfig` holds the sizes (tp, pp, dp, cp), the pipeline's virtual stages or explicit stage layout,
the ZeRO-1 shard-group size and the sequence-parallel switch. `ParallelConfig.validate` checks them
against the world size and, when given, the model's shape (layers, heads, KV heads, padded vocab) and
raises a `ValueError` naming the sizes; it needs no process group, so a bad layout fails before any
collective. `ParallelState` is built from a validated config: one `DeviceMesh` over dims (pp, dp, cp, tp)
with TP innermost (ranks `arange(world).view(pp, dp, cp, tp)`, so TP peers are neighbouring ranks, on the
same node), plus the groups the mesh does not give directly: DP x CP (where gradients are reduced), the
ZeRO-1 shard groups (consecutive DP x CP ranks) and their replica groups, and a second pipeline group so
that activations and gradients travel on separate communicators.

`ParallelState.single()` is the one-process state with no process group: every size 1, every collective
in this package a no-op, so models built from `internlm2.parallel` layers run without torch.distributed.
Nothing here is module-level global state: code that needs the grid receives a `ParallelState`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from internlm2.errors import ConfigError

DIMS = ("pp", "dp", "cp", "tp")


@dataclass(frozen=True)
class ParallelConfig:
    """Sizes of the grid and the choices that depend on it.

    tp, pp, dp, cp: tensor, pipeline, data and context parallel sizes (their product is the world size).
    virtual_stages: model chunks per pipeline rank (interleaved 1F1B when > 1).
    stage_layout: optional explicit partition, one tuple of layer ids per global stage, in stage order
        (stage s = chunk * pp + pp_rank); when given, layers need not divide evenly.
    zero1_size: how many DP x CP ranks share one copy of the optimizer state (InternEvo's `zero1`);
        None means all of them. Must divide dp * cp.
    sequence_parallel: shard activations along the token dimension between TP regions (needs tp > 1 to
        matter; tokens per micro-batch must then divide by tp).
    cp_overlap: ring attention overlaps each K/V hop with the attention of the block already held (off:
        every hop completes first; the baseline the overlap is measured against).
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    virtual_stages: int = 1
    stage_layout: tuple[tuple[int, ...], ...] | None = None
    zero1_size: int | None = None
    sequence_parallel: bool = False
    cp_overlap: bool = True

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def validate(self, world_size: int | None = None, *, num_layers: int | None = None,
                 num_attention_heads: int | None = None, num_kv_heads: int | None = None,
                 vocab_size: int | None = None) -> None:
        """Raises ConfigError naming every offending size at once. Pure: touches no process group.

        vocab_size is the padded vocabulary the embedding and output layers are built with.
        """
        bad = [f"{name}={getattr(self, name)!r} must be a positive integer"
               for name in ("tp", "pp", "dp", "cp", "virtual_stages")
               if not isinstance(getattr(self, name), int) or getattr(self, name) < 1]
        if bad:
            raise ConfigError("parallel layout: " + "; ".join(bad))
        problems = []
        if world_size is not None and world_size != self.world_size:
            problems.append(f"world size {world_size} != tp*pp*dp*cp = {self.tp}*{self.pp}*{self.dp}*{self.cp} = "
                            f"{self.world_size}")
        dp_cp = self.dp * self.cp
        if self.zero1_size is not None and (self.zero1_size < 1 or dp_cp % self.zero1_size):
            problems.append(f"zero1_size={self.zero1_size} must divide dp*cp = {self.dp}*{self.cp} = {dp_cp}")
        if self.virtual_stages > 1 and self.pp == 1:
            problems.append(f"virtual_stages={self.virtual_stages} needs pp > 1 (pp=1)")
        for what, value in (("num_attention_heads", num_attention_heads), ("num_kv_heads", num_kv_heads),
                            ("the padded vocab_size", vocab_size)):
            if value is not None and value % self.tp:
                problems.append(f"tp={self.tp} does not divide {what}={value}")
        problems += self._stage_problems(num_layers)
        if problems:
            raise ConfigError("parallel layout: " + "; ".join(problems))

    def _stage_problems(self, num_layers: int | None) -> list[str]:
        stages = self.pp * self.virtual_stages
        if self.stage_layout is None:
            if num_layers is not None and num_layers % stages:
                return [f"pp*virtual_stages = {self.pp}*{self.virtual_stages} = {stages} does not divide "
                        f"num_layers={num_layers}; give an explicit stage_layout"]
            return []
        if len(self.stage_layout) != stages:
            return [f"stage_layout has {len(self.stage_layout)} stages, expected pp*virtual_stages = "
                    f"{self.pp}*{self.virtual_stages} = {stages}"]
        flat = [i for stage in self.stage_layout for i in stage]
        if num_layers is not None and flat != list(range(num_layers)):
            return [f"stage_layout {self.stage_layout} must list layers 0..{num_layers - 1} once each, in order"]
        if flat != list(range(len(flat))):
            return [f"stage_layout {self.stage_layout} is not 0..n-1 in order"]
        return []

    @classmethod
    def for_world(cls, world_size: int, *, tp: int = 1, pp: int = 1, cp: int = 1, dp: int | None = None,
                  **choices) -> "ParallelConfig":
        """The layout with `dp` defaulting to what tp*pp*cp leaves of `world_size`; ConfigError when they do
        not divide it (the cause, not a dp of 0)."""
        model_parallel = tp * pp * cp
        if dp is None:
            if model_parallel < 1 or world_size % model_parallel:
                raise ConfigError(f"parallel layout: tp*pp*cp = {tp}*{pp}*{cp} = {model_parallel} does not divide "
                                  f"the world size {world_size}")
            dp = world_size // model_parallel
        return cls(tp=tp, pp=pp, dp=dp, cp=cp, **choices)


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> None:
    """Initialises the default process group from torchrun/srun environment variables (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT; LOCAL_RANK picks the GPU) with a finite timeout, so a rank that dies makes
    the others fail instead of hanging. Backend: NCCL when CUDA is available, else gloo."""
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":  # one device per process, chosen by the launcher's local rank
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def _default_group_timeout() -> datetime.timedelta:
    try:  # the timeout the default group was created with (no public accessor)
        return dist.group.WORLD._get_backend(torch.device("cpu" if dist.get_backend() == "gloo" else "cuda")) \
            .options._timeout
    except (AttributeError, RuntimeError):
        return dist.default_pg_timeout


class ParallelState:
    """This rank's place in the (pp, dp, cp, tp) grid and the process groups of each dimension.

    Sizes and ranks: `tp_size`, `tp_rank`, `pp_size`, `pp_rank`, `dp_size`, `dp_rank`, `cp_size`, `cp_rank`.
    Groups: `world_group` (every rank), `tp_group`, `pp_group`, `dp_group`, `cp_group`, `dp_cp_group` (gradient reduction),
    `zero_group` / `zero_replica_group` (ZeRO-1 sharding), `pp_fwd_group` / `pp_bwd_group` (activations /
    gradients between stages). A group is None in the single-process state.
    """

    def __init__(self, config: ParallelConfig, *, timeout_s: float | None = None, **model_shape):
        """Builds the grid over the initialised default process group. `model_shape` (num_layers,
        num_attention_heads, num_kv_heads, vocab_size) is validated with the layout before any group is
        created."""
        if not dist.is_initialized():
            raise RuntimeError(
                "ParallelState needs an initialised torch.distributed process group "
                "(call internlm2.parallel.init_distributed() first, or use ParallelState.single())")
        world, rank = dist.get_world_size(), dist.get_rank()
        config.validate(world, **model_shape)
        self.config = config
        self.rank, self.world_size = rank, world
        self.device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        # Blocking point-to-point receives wait forever unless given a timeout (collectives use the
        # group's): the pipeline passes this one, so a dead peer fails the step instead of hanging it.
        self.timeout = timeout or _default_group_timeout()
        self.grid = torch.arange(world).view(config.pp, config.dp, config.cp, config.tp)
        self.coordinate = tuple(int(c) for c in (self.grid == rank).nonzero()[0])
        self.mesh = init_device_mesh(
            self.device_type, tuple(self.grid.shape), mesh_dim_names=DIMS)
        self.pp_group, self.dp_group, self.cp_group, self.tp_group = (self.mesh.get_group(d) for d in DIMS)
        self.world_group = dist.group.WORLD
        if timeout is not None:  # the mesh's groups inherit the default group's timeout unless told otherwise
            for group in (self.pp_group, self.dp_group, self.cp_group, self.tp_group):
                dist.set_timeout(timeout, group)
        # Groups beyond the mesh's single dimensions. Every rank creates every group, in the same order.
        g = self.grid
        dp_cp_lists = [g[pi, :, :, ti].flatten() for pi in range(config.pp) for ti in range(config.tp)]
        self.dp_cp_group = self._new_groups(dp_cp_lists, timeout)
        zero = config.zero1_size or config.dp * config.cp
        self.zero_group = self._new_groups(
            [ranks[i:i + zero] for ranks in dp_cp_lists for i in range(0, len(ranks), zero)], timeout)
        self.zero_replica_group = self._new_groups(
            [ranks[i::zero] for ranks in dp_cp_lists for i in range(zero)], timeout)
        self.pp_fwd_group = self.pp_group
        self.pp_bwd_group = self._new_groups(
            [g[:, di, ci, ti] for di in range(config.dp) for ci in range(config.cp) for ti in range(config.tp)],
            timeout)

    def _new_groups(self, rank_lists, timeout):
        """Creates one group per rank list (all ranks call this identically); returns this rank's."""
        mine = None
        for ranks in rank_lists:
            ranks = [int(r) for r in ranks]
            group = dist.new_group(ranks, timeout=timeout)
            if self.rank in ranks:
                mine = group
        return mine

    @classmethod
    def single(cls, config: ParallelConfig | None = None) -> "ParallelState":
        """One process, no process group: all sizes 1, all collectives are no-ops."""
        config = config or ParallelConfig()
        config.validate(1)
        self = cls.__new__(cls)
        self.config = config
        self.rank, self.world_size = 0, 1
        self.device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self.grid = torch.zeros(1, 1, 1, 1, dtype=torch.long)
        self.coordinate = (0, 0, 0, 0)
        self.mesh = None
        self.timeout = None
        for name in ("world", "pp", "dp", "cp", "tp", "dp_cp", "zero", "zero_replica", "pp_fwd", "pp_bwd"):
            setattr(self, f"{name}_group", None)
        return self

    # sizes and ranks ------------------------------------------------------------------------------
    tp_size = property(lambda self: self.config.tp)
    pp_size = property(lambda self: self.config.pp)
    dp_size = property(lambda self: self.config.dp)
    cp_size = property(lambda self: self.config.cp)
    pp_rank = property(lambda self: self.coordinate[0])
    dp_rank = property(lambda self: self.coordinate[1])
    cp_rank = property(lambda self: self.coordinate[2])
    tp_rank = property(lambda self: self.coordinate[3])
    sequence_parallel = property(lambda self: self.config.sequence_parallel and self.config.tp > 1)
    virtual_stages = property(lambda self: self.config.virtual_stages)

    @property
    def dp_cp_size(self) -> int:
        return self.config.dp * self.config.cp

    @property
    def dp_cp_rank(self) -> int:
        return self.dp_rank * self.config.cp + self.cp_rank

    @property
    def zero_size(self) -> int:
        return self.config.zero1_size or self.dp_cp_size

    @property
    def zero_rank(self) -> int:
        return self.dp_cp_rank % self.zero_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.config.pp - 1

    def neighbour(self, dim: str, offset: int) -> int:
        """Global rank `offset` steps along grid dimension `dim` ("pp", "dp", "cp" or "tp"), wrapping
        around, the other coordinates unchanged."""
        axis = DIMS.index(dim)
        coordinate = list(self.coordinate)
        coordinate[axis] = (coordinate[axis] + offset) % self.grid.shape[axis]
        return int(self.grid[tuple(coordinate)])

    # Pipeline neighbours wrap around, as interleaved schedules need; the CP ring is a ring.
    next_stage_rank = property(lambda self: self.neighbour("pp", 1))
    prev_stage_rank = property(lambda self: self.neighbour("pp", -1))
    cp_next_rank = property(lambda self: self.neighbour("cp", 1))
    cp_prev_rank = property(lambda self: self.neighbour("cp", -1))

    @cached_property
    def device(self) -> torch.device:
        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def __repr__(self) -> str:
        c = self.config
        return (f"ParallelState(rank={self.rank}/{self.world_size}, tp={self.tp_rank}/{c.tp}, "
                f"pp={self.pp_rank}/{c.pp}, dp={self.dp_rank}/{c.dp}, cp={self.cp_rank}/{c.cp}, "
                f"zero1={self.zero_size}, sp={self.sequence_parallel}, virtual_stages={c.virtual_stages})")
