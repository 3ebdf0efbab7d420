"""Context parallelism: each packed sequence split over the CP ranks, attention computed as a ring.

Split (`zigzag_split`). Every sequence of length L (a multiple of 2 * cp) is cut into 2 * cp chunks of
c = L / (2 cp) tokens; CP rank i keeps chunks i and 2cp-1-i (Megatron / Llama-3's load balancing: under a
causal mask each rank then has the same amount of attention work). The rank's tokens are laid out per
sequence as [chunk i, chunk 2cp-1-i]; `CPSplit.index` selects them from the full packed row (input ids,
labels), `position_ids` keeps their positions in the sequence (for RoPE).

Ring (`ring_attention`). The ranks pass their K/V round the ring, cp - 1 times; after s shifts rank i holds
rank j = i - s's K/V and adds what its queries see of it:
- j == i: its own tokens, causal (chunk i precedes chunk 2cp-1-i);
- j < i: both of its query halves see all of j's first chunk and none of its second;
- j > i: only its second chunk sees j's tokens, all of them.
Each piece is one attention call over equal-length halves (per sequence c query and c key tokens, so one
`cu_seqlens` serves both), non-causal except the diagonal. Partial results are merged exactly through
their log-sum-exps: lse = logaddexp(lse_a, lse_b), out = out_a e^(lse_a - lse) + out_b e^(lse_b - lse).
Everything is differentiable: the attention op's backward takes the gradient of its lse, and the K/V
shift's backward sends gradients the other way round the ring. Autograd keeps each step's K/V for the
backward (cp blocks of local K/V); activation recomputation bounds that per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from internlm2 import ops
from internlm2.parallel import comm
from internlm2.parallel.state import ParallelState


@dataclass
class CPSplit:
    """This CP rank's share of a packed row (see the module docstring)."""

    index: torch.Tensor  # int64 [T/cp]: positions of this rank's tokens in the full packed row
    position_ids: torch.Tensor  # int64 [T/cp]: their positions within their sequences
    cu_seqlens: torch.Tensor  # int32: this rank's tokens per sequence (2c each)
    half_cu_seqlens: torch.Tensor  # int32: one chunk per sequence (c each)
    first: torch.Tensor  # int64: local positions of the first chunks (chunk i of each sequence)
    second: torch.Tensor  # int64: local positions of the second chunks (chunk 2cp-1-i)
    max_chunk: int


def zigzag_split(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> CPSplit:
    """Splits the packed sequences described by `cu_seqlens` (int32 [B+1]) for CP rank `cp_rank`."""
    bounds = [int(b) for b in cu_seqlens.tolist()]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    bad = [(i, n) for i, n in enumerate(lengths) if n % (2 * cp_size)]
    if bad:
        raise ValueError(f"context parallel: every packed sequence's length must be a multiple of 2*cp = "
                         f"{2 * cp_size}; (sequence, length) {bad[:8]} are not (pad them)")
    index, positions, chunks = [], [], []
    for start, length in zip(bounds[:-1], lengths):
        c = length // (2 * cp_size)
        for chunk in (cp_rank, 2 * cp_size - 1 - cp_rank):
            index.append(torch.arange(start + chunk * c, start + (chunk + 1) * c))
            positions.append(torch.arange(chunk * c, (chunk + 1) * c))
        chunks.append(c)
    device = cu_seqlens.device
    c = torch.tensor(chunks, dtype=torch.int64)
    half_cu = torch.cat([torch.zeros(1, dtype=torch.int64), c.cumsum(0)])
    starts = 2 * half_cu[:-1]
    first = torch.cat([torch.arange(s, s + n) for s, n in zip(starts.tolist(), chunks)]
                      or [torch.zeros(0, dtype=torch.int64)])
    second = first + c.repeat_interleave(c)
    return CPSplit(
        index=torch.cat(index).to(device), position_ids=torch.cat(positions).to(device),
        cu_seqlens=(2 * half_cu).to(torch.int32).to(device), half_cu_seqlens=half_cu.to(torch.int32).to(device),
        first=first.to(device), second=second.to(device), max_chunk=max(chunks, default=0))


class _RingShift(torch.autograd.Function):
    """Forward: send to the next CP rank, receive from the previous. Backward: the reverse."""

    @staticmethod
    def forward(ctx, x, parallel):
        ctx.parallel = parallel
        return _shift(x, parallel, parallel.cp_next_rank, parallel.cp_prev_rank)

    @staticmethod
    def backward(ctx, grad):
        p = ctx.parallel
        return _shift(grad.contiguous(), p, p.cp_prev_rank, p.cp_next_rank), None


def _shift(x: torch.Tensor, parallel: ParallelState, dst: int, src: int) -> torch.Tensor:
    out = torch.empty_like(x)
    work = comm.isend(x.contiguous(), dst, parallel.cp_group)
    comm.recv(out, src, parallel.cp_group, parallel.timeout)
    work.wait(parallel.timeout)
    return out


def _merge(acc, out, lse):
    """Adds a partial attention result (out [T, H, D], lse [H, T]) to the running one, exactly."""
    if acc is None:
        return out.to(lse.dtype), lse
    acc_out, acc_lse = acc
    new_lse = torch.logaddexp(acc_lse, lse)
    w_acc = torch.exp(acc_lse - new_lse).t().unsqueeze(-1)
    w_new = torch.exp(lse - new_lse).t().unsqueeze(-1)
    return acc_out * w_acc + out.to(lse.dtype) * w_new, new_lse


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, split: CPSplit, parallel: ParallelState, *,
                   softmax_scale: float | None = None, attention: Callable = ops.flash_attention) -> torch.Tensor:
    """Causal attention of this CP rank's tokens (q [T/cp, Hq, D], k/v [T/cp, Hkv, D], laid out as
    `split` says) against the whole sequences, the other ranks' K/V coming round the ring. `attention`
    is an `ops.flash_attention`-compatible function (returning the lse with `return_lse=True`)."""
    cp, rank = parallel.cp_size, parallel.cp_rank
    if cp == 1:
        return attention(q, k, v, split.cu_seqlens, 2 * split.max_chunk, causal=True, softmax_scale=softmax_scale)
    kw = dict(softmax_scale=softmax_scale, return_lse=True)
    halves = (split.first, split.second)
    acc: list = [None, None]
    kv = torch.stack([k, v])
    for step in range(cp):
        if step:
            kv = _RingShift.apply(kv, parallel)
        source = (rank - step) % cp
        ks, vs = kv[0], kv[1]
        if source == rank:
            out, lse = attention(q, ks, vs, split.cu_seqlens, 2 * split.max_chunk, causal=True, **kw)
            for h, idx in enumerate(halves):
                acc[h] = _merge(acc[h], out[idx], lse[:, idx])
            continue
        if source < rank:
            pairs = [(0, 0), (1, 0)]  # (query half, key half): everything sees the source's first chunk
        else:
            pairs = [(1, 0), (1, 1)]  # only the second query chunk sees the source, all of it
        for qh, kh in pairs:
            out, lse = attention(q[halves[qh]], ks[halves[kh]], vs[halves[kh]], split.half_cu_seqlens,
                                 split.max_chunk, causal=False, **kw)
            acc[qh] = _merge(acc[qh], out, lse)
    order = torch.argsort(torch.cat([split.first, split.second]))  # back to the local token order
    return torch.cat([acc[0][0], acc[1][0]])[order].to(q.dtype)


class _SumOverContext(torch.autograd.Function):
    """Forward: all-reduce over CP. Backward: all-reduce too, since every CP rank's objective reads the
    whole sum (the adjoint of "each rank uses the total"), unlike Megatron's reduce-from-region."""

    @staticmethod
    def forward(ctx, x, parallel):
        ctx.parallel = parallel
        return comm.all_reduce(x.clone(), parallel.cp_group)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_reduce(grad.contiguous().clone(), ctx.parallel.cp_group), None


def sum_over_context(x: torch.Tensor, parallel: ParallelState) -> torch.Tensor:
    """The sum of `x` over the CP ranks, on each of them (e.g. per-sequence values each rank filled in for
    the tokens it holds). A loss computed from it is the same on every CP rank: count it once (divide by
    cp) when losses are summed over CP ranks."""
    if parallel.cp_size == 1:
        return x
    return _SumOverContext.apply(x, parallel)
