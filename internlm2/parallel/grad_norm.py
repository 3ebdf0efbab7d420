"""The global gradient norm across TP, PP and DP, counting every parameter exactly once.

A tensor-parallel parameter's shards are disjoint, so their squared norms add up over the TP group; a
parameter replicated over TP (norm weights, a row-parallel bias) has the same gradient on every TP rank
and is counted on TP rank 0 only. Pipeline stages hold disjoint parameters (their squares add up over the
PP group). Data-parallel replicas hold identical reduced gradients and are not added at all, except for
ZeRO shards, which are disjoint and add up over the shard group (see optimizer.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from internlm2.parallel import comm
from internlm2.parallel.state import ParallelState
from internlm2.parallel.tensor_parallel import is_tensor_parallel


def counted_here(tensor_parallel: bool, parallel: ParallelState) -> bool:
    """Whether this rank adds a parameter's gradient to the norm (sharded over TP, or TP rank 0)."""
    return tensor_parallel or parallel.tp_rank == 0


def reduce_norm_squares(local: torch.Tensor, parallel: ParallelState, shard_group=None) -> torch.Tensor:
    """Sums a float32 (or float64) scalar of squared norms over the TP, PP and optional shard group."""
    local = local.reshape(1).clone()
    for group in (parallel.tp_group, parallel.pp_group, shard_group):
        comm.all_reduce(local, group)
    return local[0]


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s factor: max_norm / (norm + 1e-6), at most 1."""
    return (max_norm / (total_norm + 1e-6)).clamp(max=1.0)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float | None,
                    parallel: ParallelState) -> torch.Tensor:
    """Global L2 norm of the `.grad`s of this rank's parameters (already reduced over DP), scaled in
    place so the norm is at most `max_norm` (None: only measure). Returns the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    device = params[0].grad.device if params else parallel.device
    local = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if counted_here(is_tensor_parallel(p), parallel):
            local += torch.linalg.vector_norm(p.grad, dtype=torch.float32).double().square()
    total = reduce_norm_squares(local, parallel).sqrt()
    if max_norm is not None:
        coef = clip_coefficient(total, max_norm)
        for p in params:
            p.grad.mul_(coef.to(p.grad.dtype))
    return total
