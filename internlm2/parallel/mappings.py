"""Autograd-aware collectives between tensor-parallel regions (Megatron's mapping semantics).

Each function is a pair (forward collective, backward collective) such that gradients are exact:

| function                    | forward                         | backward                        |
|-----------------------------|---------------------------------|---------------------------------|
| copy_to_region              | identity                        | all-reduce                      |
| reduce_from_region          | all-reduce                      | identity                        |
| scatter_to_region(dim)      | keep this rank's chunk of dim   | all-gather dim                  |
| gather_from_region(dim)     | all-gather dim                  | keep this rank's chunk          |
| gather_from_sequence(...)   | all-gather dim 0 (tokens)       | reduce-scatter dim 0, or chunk  |
| reduce_scatter_to_sequence  | reduce-scatter dim 0            | all-gather dim 0                |

`group` is a process group (usually `parallel.tp_group`); None or a size-1 group makes every function the
identity. Sequence parallel shards dim 0 of the activations, so models keep hidden states token-major:
`[tokens, hidden]` for packed rows (or `[seq, batch, hidden]`); tokens must divide by the group size.
"""

from __future__ import annotations

import torch

from internlm2.parallel import comm


def split_chunk(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's contiguous chunk of `x` along `dim` (the size must divide by the group size)."""
    n = comm.group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"cannot split size {x.shape[dim]} of dim {dim} (shape {tuple(x.shape)}) into "
                         f"{n} equal tensor-parallel chunks")
    return x.chunk(n, dim)[comm.group_rank(group)].contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_reduce(grad.contiguous(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return comm.all_reduce(x.clone(memory_format=torch.contiguous_format), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return split_chunk(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, ctx.group, ctx.dim), None, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return comm.all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return split_chunk(grad, ctx.group, ctx.dim), None, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, grad_is_partial):
        ctx.group, ctx.grad_is_partial = group, grad_is_partial
        return comm.all_gather(x, group, 0)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_is_partial:
            return comm.reduce_scatter(grad, ctx.group, 0), None, None
        return split_chunk(grad, ctx.group, 0), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.reduce_scatter(x, group, 0)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, ctx.group, 0), None


def _apply(fn, x, group, *args):
    if comm.group_size(group) == 1:
        return x
    return fn.apply(x, group, *args)


def copy_to_region(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a TP region: identity forward; gradients of the replicas are summed backward."""
    return _apply(_CopyToRegion, x, group)


def reduce_from_region(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a TP region: sum the ranks' partial results forward; identity backward."""
    return _apply(_ReduceFromRegion, x, group)


def scatter_to_region(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """Keep this rank's chunk of `dim`; backward all-gathers."""
    return _apply(_ScatterToRegion, x, group, dim)


def gather_from_region(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """All-gather the ranks' chunks along `dim`; backward keeps this rank's chunk."""
    return _apply(_GatherFromRegion, x, group, dim)


def scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Enter sequence parallel: keep this rank's chunk of the tokens (dim 0); backward all-gathers."""
    return _apply(_ScatterToRegion, x, group, 0)


def gather_from_sequence(x: torch.Tensor, group, grad_is_partial: bool = True) -> torch.Tensor:
    """All-gather the token shards (dim 0). Backward: reduce-scatter when the consumer is a TP region whose
    ranks each produce a partial gradient (column-parallel input), else keep this rank's chunk."""
    return _apply(_GatherFromSequence, x, group, grad_is_partial)


def reduce_scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a TP region into sequence parallel: sum partial results and keep this rank's tokens."""
    return _apply(_ReduceScatterToSequence, x, group)
