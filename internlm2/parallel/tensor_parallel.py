"""Megatron-style tensor-parallel layers, and the helpers that move full (HF) tensors in and out of them.

At tp=1 the layers are exactly `nn.Linear` (weight `[out, in]`, `y = x @ W.T + b`) and `nn.Embedding`.
With tp > 1 each rank holds one contiguous chunk of the full weight:

- `ColumnParallelLinear`: rows `[r*out/tp, (r+1)*out/tp)` of the full `[out, in]` weight (and of the bias),
  so its output is this rank's chunk of the features. A fused projection whose rows are grouped per head
  (InternLM2's `wqkv`: `[q_0 .. q_{g-1}, k, v]` per KV head) therefore splits into whole KV groups.
- `RowParallelLinear`: columns `[r*in/tp, (r+1)*in/tp)`; it takes the chunked features and sums the
  partial products over TP (all-reduce, or reduce-scatter into sequence-parallel tokens). Its bias is
  replicated and added once, after the sum.
- `VocabParallelEmbedding`: rows `[r*V/tp, (r+1)*V/tp)` of the `[V, H]` table; ids outside the chunk
  contribute zeros and the ranks' results are summed.

Sequence parallel (`sequence_parallel=True`, or None to follow `parallel.sequence_parallel`): activations
outside the TP regions are sharded along dim 0 (tokens). A column-parallel layer then all-gathers its input
tokens, and row-parallel / embedding layers reduce-scatter their outputs into token shards, so the norms
between them run on 1/tp of the tokens. Keep hidden states token-major (`[tokens, hidden]`).

Sharded parameters carry `param.tensor_parallel_dim` (the dimension split over TP); parameters without it
are replicated across TP (norm weights, row-parallel bias). `shard_tensor` / `gather_tensor` and
`load_full_state_dict` / `full_state_dict` convert between full tensors and a module's shards using that
attribute, which is what checkpoint code needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from internlm2.parallel import comm
from internlm2.parallel.mappings import (copy_to_region, gather_from_region, gather_from_sequence,
                                         reduce_from_region, reduce_scatter_to_sequence, scatter_to_region)
from internlm2.parallel.state import ParallelState


def is_tensor_parallel(param: torch.Tensor) -> bool:
    """True when `param` is split over TP ranks (each rank holds a different chunk)."""
    return getattr(param, "tensor_parallel_dim", None) is not None


def _mark(param: nn.Parameter, dim: int) -> nn.Parameter:
    param.tensor_parallel_dim = dim
    return param


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what}={total} is not divisible by the tensor-parallel size {parts}")
    return total // parts


def _use_sp(parallel: ParallelState, sequence_parallel: bool | None) -> bool:
    if sequence_parallel is None:
        return parallel.sequence_parallel
    return bool(sequence_parallel) and parallel.tp_size > 1


class ColumnParallelLinear(nn.Module):
    """`y = x @ W.T + b` with W's output rows split over TP. Output: this rank's feature chunk, or all
    features with `gather_output=True`. With sequence parallel the input is a token shard."""

    def __init__(self, in_features: int, out_features: int, *, parallel: ParallelState, bias: bool = False,
                 gather_output: bool = False, sequence_parallel: bool | None = None, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.parallel = parallel
        self.gather_output = gather_output
        self.sequence_parallel = _use_sp(parallel, sequence_parallel)
        self.out_per_rank = _divide(out_features, parallel.tp_size, "out_features")
        factory = {"dtype": dtype, "device": device}
        self.weight = _mark(nn.Parameter(torch.empty(self.out_per_rank, in_features, **factory)), 0)
        self.bias = _mark(nn.Parameter(torch.empty(self.out_per_rank, **factory)), 0) if bias else None
        _init_linear(self.weight, self.bias, fan_in=in_features)

    def forward(self, x: torch.Tensor, *, input_prepared: bool = False) -> torch.Tensor:
        """`input_prepared=True`: `x` already went through `column_parallel_input` (shared by several
        column-parallel layers reading the same activations, e.g. a SwiGLU's gate and up projections)."""
        if not input_prepared:
            x = column_parallel_input(x, self.parallel, self.sequence_parallel)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_region(y, self.parallel.tp_group, -1) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"({self.out_per_rank} per rank), bias={self.bias is not None}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


def column_parallel_input(x: torch.Tensor, parallel: ParallelState, sequence_parallel: bool | None = None):
    """Enters the TP region: all-gathers the token shards (sequence parallel) or marks the replicated input
    so its gradient is summed over TP. Do it once for several column-parallel layers on the same input
    (pass `input_prepared=True` to them) to avoid one collective per layer."""
    group = parallel.tp_group
    return gather_from_sequence(x, group) if _use_sp(parallel, sequence_parallel) else copy_to_region(x, group)


class RowParallelLinear(nn.Module):
    """`y = x @ W.T + b` with W's input columns split over TP. Input: this rank's feature chunk (or all
    features with `input_is_parallel=False`). Output: the full sum, or a token shard with sequence
    parallel."""

    def __init__(self, in_features: int, out_features: int, *, parallel: ParallelState, bias: bool = False,
                 input_is_parallel: bool = True, sequence_parallel: bool | None = None, dtype=None,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.parallel = parallel
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = _use_sp(parallel, sequence_parallel)
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel=True")
        self.in_per_rank = _divide(in_features, parallel.tp_size, "in_features")
        factory = {"dtype": dtype, "device": device}
        self.weight = _mark(nn.Parameter(torch.empty(out_features, self.in_per_rank, **factory)), 1)
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        _init_linear(self.weight, self.bias, fan_in=in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.parallel.tp_group
        if not self.input_is_parallel:
            x = scatter_to_region(x, group, -1)
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sequence(y, group) if self.sequence_parallel else reduce_from_region(y, group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} ({self.in_per_rank} per rank), "
                f"out_features={self.out_features}, bias={self.bias is not None}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """`nn.Embedding(num_embeddings, embedding_dim)` with the rows split over TP. With sequence parallel
    the output is this rank's token shard (dim 0 of the output)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, parallel: ParallelState,
                 sequence_parallel: bool | None = None, dtype=None, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.parallel = parallel
        self.sequence_parallel = _use_sp(parallel, sequence_parallel)
        self.rows_per_rank = _divide(num_embeddings, parallel.tp_size, "num_embeddings")
        self.vocab_start = parallel.tp_rank * self.rows_per_rank
        self.weight = _mark(nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim, dtype=dtype,
                                                     device=device)), 0)
        nn.init.normal_(self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        group = self.parallel.tp_group
        if self.parallel.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_to_sequence(out, group) if self.sequence_parallel else reduce_from_region(out, group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} ({self.rows_per_rank} per rank), {self.embedding_dim}, "
                f"sequence_parallel={self.sequence_parallel}")


def _init_linear(weight: nn.Parameter, bias: nn.Parameter | None, fan_in: int) -> None:
    # nn.Linear's default init, with the full layer's fan-in so every layout draws from one distribution.
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        if bias is not None:
            bias.uniform_(-bound, bound)


# ---- full tensors <-> shards ---------------------------------------------------------------------

def shard_tensor(full: torch.Tensor, parallel: ParallelState, dim: int) -> torch.Tensor:
    """This TP rank's contiguous chunk `tp_rank` of `full` along `dim` (a copy)."""
    n = parallel.tp_size
    if full.shape[dim] % n:
        raise ValueError(f"cannot shard dim {dim} of shape {tuple(full.shape)} over tensor-parallel size {n}")
    return full.chunk(n, dim)[parallel.tp_rank].clone()


def gather_tensor(shard: torch.Tensor, parallel: ParallelState, dim: int) -> torch.Tensor:
    """The full tensor from every TP rank's chunk along `dim` (a collective over the TP group)."""
    return comm.all_gather(shard.detach(), parallel.tp_group, dim).clone()


def local_shard(name: str, param: torch.Tensor, full: torch.Tensor, parallel: ParallelState) -> torch.Tensor:
    """`full` cut to `param`'s shard (or `full` itself for a replicated tensor), shape-checked."""
    dim = getattr(param, "tensor_parallel_dim", None)
    expected = list(param.shape)
    if dim is not None:
        expected[dim] *= parallel.tp_size
    if list(full.shape) != expected:
        raise ValueError(f"{name}: full tensor has shape {tuple(full.shape)}, expected {tuple(expected)}")
    return full if dim is None else shard_tensor(full, parallel, dim)


@torch.no_grad()
def load_full_state_dict(module: nn.Module, full_state: dict[str, torch.Tensor], parallel: ParallelState,
                         strict: bool = True) -> None:
    """Copies full (unsharded) tensors into `module`'s parameters and buffers, each rank keeping its shard.

    With `strict`, missing and unexpected names are listed in the error."""
    own = dict(module.named_parameters())
    own.update(module.named_buffers())
    if strict:
        missing, extra = sorted(set(own) - set(full_state)), sorted(set(full_state) - set(own))
        if missing or extra:
            raise KeyError(f"state dict mismatch: missing {missing}, unexpected {extra}")
    for name, tensor in own.items():
        if name in full_state:
            tensor.copy_(local_shard(name, tensor, full_state[name], parallel))


@torch.no_grad()
def full_state_dict(module: nn.Module, parallel: ParallelState) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module` as a full tensor (sharded ones all-gathered over TP)."""
    out = {}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        dim = getattr(tensor, "tensor_parallel_dim", None)
        out[name] = tensor.detach().clone() if dim is None else gather_tensor(tensor, parallel, dim)
    return out


@torch.no_grad()
def full_grads(module: nn.Module, parallel: ParallelState) -> dict[str, torch.Tensor]:
    """Every parameter's `.grad` as a full tensor (sharded ones all-gathered over TP); None-grads skipped."""
    out = {}
    for name, param in module.named_parameters():
        if param.grad is not None:
            dim = getattr(param, "tensor_parallel_dim", None)
            out[name] = param.grad.clone() if dim is None else gather_tensor(param.grad, parallel, dim)
    return out
