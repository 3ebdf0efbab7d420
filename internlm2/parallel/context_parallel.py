"""Context parallelism: each packed sequence split over the CP ranks, attention computed as a ring.

Split (`zigzag_split`). Every sequence of length L (a multiple of 2 * cp) is cut into 2 * cp chunks of
c = L / (2 cp) tokens; CP rank i keeps chunks i and 2cp-1-i (Megatron / Llama-3's load balancing: under a
causal mask each rank then has the same amount of attention work). The rank's tokens are laid out per
sequence as [chunk i, chunk 2cp-1-i]; `CPSplit.index` selects them from the full packed row (input ids,
labels), `position_ids` keeps their positions in the sequence (for RoPE).

Ring (`ring_attention`). The ranks pass their K/V round the ring, cp - 1 times; after s hops rank i holds
rank j = i - s's K/V and adds what its queries see of it:
- j == i: its own tokens, causal (chunk i precedes chunk 2cp-1-i);
- j < i: both of its query halves see all of j's first chunk and none of its second;
- j > i: only its second chunk sees j's tokens, all of them.
Each piece is one attention call over equal-length halves (per sequence c query and c key tokens, so one
`cu_seqlens` serves both), non-causal except the diagonal. Partial results are merged exactly through
their log-sum-exps: lse = logaddexp(lse_a, lse_b), out = out_a e^(lse_a - lse) + out_b e^(lse_b - lse).
Each hop's send and receive are started before the step's attention and waited after it, so the
transfer of the next block overlaps the compute on the current one.

Backward. Only this rank's q, k, v, the merged output and lse are kept from the forward (not the cp
blocks of K/V that went by). The backward passes K/V round the ring again in the same order; with the
final lse each piece's probabilities are its exact share of the whole softmax, so its gradients need no
merging: dq adds up locally, and each block's dK/dV travels behind its K/V, gaining every rank's share,
and its last hop lands on the block's owner. Per layer that is 2(cp - 1) hops of K/V forward and
2(cp - 1) backward (K/V again, then dK/dV), where keeping the blocks would need cp - 1 fewer.
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


class _Transfer:
    """One ring hop in flight: `tensor` going to the next CP rank while the previous rank's arrives."""

    def __init__(self, tensor: torch.Tensor, parallel: ParallelState):
        self.send = tensor.contiguous()  # kept alive until the send completes
        self.recv = torch.empty_like(self.send)
        self.timeout = parallel.timeout
        self.works = comm.exchange(self.send, parallel.cp_next_rank, self.recv, parallel.cp_prev_rank,
                                   parallel.cp_group)

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait(self.timeout)
        self.works = []
        return self.recv


def _hop(tensor: torch.Tensor, parallel: ParallelState, overlap: bool) -> _Transfer:
    """Starts a hop; without overlap it completes before the caller computes anything else."""
    transfer = _Transfer(tensor, parallel)
    if not overlap:
        transfer.wait()
    return transfer


@dataclass(frozen=True)
class _Piece:
    """One attention call of a ring step: query rows (local positions, None: all) against key rows of
    the K/V block held at that step (None: all)."""

    rows: torch.Tensor | None
    cols: torch.Tensor | None
    causal: bool


def _pieces(split: CPSplit, source: int, rank: int) -> list[_Piece]:
    if source == rank:
        return [_Piece(None, None, True)]
    if source < rank:  # everything sees the source's first chunk, none of its second
        return [_Piece(split.first, split.first, False), _Piece(split.second, split.first, False)]
    return [_Piece(split.second, split.first, False), _Piece(split.second, split.second, False)]  # only chunk 2


def _rows(x: torch.Tensor, index: torch.Tensor | None, dim: int = 0) -> torch.Tensor:
    return x if index is None else x.index_select(dim, index)


def _lengths(split: CPSplit, piece: _Piece) -> tuple[torch.Tensor, int]:
    """cu_seqlens and max_seqlen of a piece: whole local sequences on the diagonal, one chunk each off it."""
    if piece.rows is None:
        return split.cu_seqlens, 2 * split.max_chunk
    return split.half_cu_seqlens, split.max_chunk


def _merge(acc_out: torch.Tensor, acc_lse: torch.Tensor, rows: torch.Tensor | None, out: torch.Tensor,
           lse: torch.Tensor) -> None:
    """Adds a partial result (out [t, H, D], lse [H, t]) for query `rows` to the running one, in place:
    lse = logaddexp(lse_a, lse_b), out = out_a e^(lse_a - lse) + out_b e^(lse_b - lse)."""
    old_out, old_lse = _rows(acc_out, rows), _rows(acc_lse, rows, dim=1)
    new_lse = torch.logaddexp(old_lse, lse)
    merged = (old_out * torch.exp(old_lse - new_lse).t().unsqueeze(-1)
              + out.to(acc_out.dtype) * torch.exp(lse - new_lse).t().unsqueeze(-1))
    if rows is None:
        acc_out.copy_(merged)
        acc_lse.copy_(new_lse)
    else:
        acc_out.index_copy_(0, rows, merged)
        acc_lse.index_copy_(1, rows, new_lse)


def _piece_grads(attention: Callable, dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale):
    """(dq, dk, dv) of one piece, given the merged output and lse of its query rows: with the final lse
    the piece's probabilities are its exact share of the full softmax, so its gradients are final too."""
    if attention is ops.flash_attention:
        return torch.ops.internlm2.flash_attention_backward(
            dout, q, k, v, out, lse, None, cu_seqlens, max_seqlen, causal, scale)
    # Any other flash_attention-compatible function (the reference): differentiate the piece's own
    # forward. out = sum_b w_b out_b with w_b = e^(lse_b - lse), so the piece receives w_b * dout for its
    # output and w_b * rowsum(dout * (out_b - out)) for its lse.
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        piece_out, piece_lse = attention(*leaves, cu_seqlens, max_seqlen, causal=causal, softmax_scale=scale,
                                         return_lse=True)
        share = torch.exp(piece_lse - lse)
        d = dout.to(lse.dtype)
        grad_lse = share * (d * (piece_out.to(lse.dtype) - out.to(lse.dtype))).sum(-1).t()
        grad_out = (d * share.t().unsqueeze(-1)).to(piece_out.dtype)
        return torch.autograd.grad((piece_out, piece_lse), leaves, (grad_out, grad_lse))


class _RingAttention(torch.autograd.Function):
    """The ring, forward and backward. Saved for the backward: this rank's q, k, v, output and lse only;
    the backward passes K/V round the ring again, and each block's dK/dV travels with it back to its
    owner. Every hop is started before the step's attention and waited after it (`overlap`)."""

    @staticmethod
    def forward(ctx, q, k, v, split: CPSplit, parallel: ParallelState, scale: float, attention: Callable,
                overlap: bool):
        cp, rank = parallel.cp_size, parallel.cp_rank
        kv = torch.stack([k, v])
        acc_out = acc_lse = None
        for step in range(cp):
            pending = _hop(kv, parallel, overlap) if step < cp - 1 else None
            for piece in _pieces(split, (rank - step) % cp, rank):
                cu, longest = _lengths(split, piece)
                out, lse = attention(_rows(q, piece.rows), _rows(kv[0], piece.cols), _rows(kv[1], piece.cols), cu,
                                     longest, causal=piece.causal, softmax_scale=scale, return_lse=True)
                if acc_out is None:  # the diagonal comes first and covers every row
                    acc_out, acc_lse = out.to(lse.dtype), lse
                else:
                    _merge(acc_out, acc_lse, piece.rows, out, lse)
            if pending is not None:
                kv = pending.wait()
        out = acc_out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, acc_lse)
        ctx.args = (split, parallel, scale, attention, overlap)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        split, parallel, scale, attention, overlap = ctx.args
        cp, rank = parallel.cp_size, parallel.cp_rank
        dout = dout.contiguous()
        acc = lse.dtype  # gradients summed over the ring in the softmax's precision
        kv = torch.stack([k, v])
        pending_kv = _hop(kv, parallel, overlap)
        pending_dkv = None
        dq = torch.zeros_like(q, dtype=acc)
        own_dkv = None
        for step in range(cp):
            if step:
                kv = pending_kv.wait()
                pending_kv = _hop(kv, parallel, overlap) if step < cp - 1 else None
            dkv = torch.zeros_like(kv, dtype=acc)
            for piece in _pieces(split, (rank - step) % cp, rank):
                cu, longest = _lengths(split, piece)
                grads = _piece_grads(attention, _rows(dout, piece.rows), _rows(q, piece.rows),
                                     _rows(kv[0], piece.cols), _rows(kv[1], piece.cols), _rows(out, piece.rows),
                                     _rows(lse, piece.rows, dim=1), cu, longest, piece.causal, scale)
                dq_piece, dk_piece, dv_piece = (g.to(acc) for g in grads)
                if piece.rows is None:
                    dq += dq_piece
                    dkv[0] += dk_piece
                    dkv[1] += dv_piece
                else:
                    dq.index_add_(0, piece.rows, dq_piece)
                    dkv[0].index_add_(0, piece.cols, dk_piece)
                    dkv[1].index_add_(0, piece.cols, dv_piece)
            if not step:
                own_dkv = dkv  # this rank's own block; the other ranks' shares arrive at the end
                continue
            if pending_dkv is not None:  # what the ranks before this one added to this block
                dkv += pending_dkv.wait()
            pending_dkv = _hop(dkv, parallel, overlap)
        if pending_dkv is not None:
            own_dkv += pending_dkv.wait()
        return (dq.to(q.dtype), own_dkv[0].to(k.dtype), own_dkv[1].to(v.dtype), None, None, None, None, None)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, split: CPSplit, parallel: ParallelState, *,
                   softmax_scale: float | None = None, attention: Callable = ops.flash_attention,
                   overlap: bool = True) -> torch.Tensor:
    """Causal attention of this CP rank's tokens (q [T/cp, Hq, D], k/v [T/cp, Hkv, D], laid out as
    `split` says) against the whole sequences, the other ranks' K/V coming round the ring. `attention`
    is an `ops.flash_attention`-compatible function (returning the lse with `return_lse=True`).
    overlap=False waits for every hop before computing (the baseline the overlap is measured against)."""
    if parallel.cp_size == 1:
        return attention(q, k, v, split.cu_seqlens, 2 * split.max_chunk, causal=True, softmax_scale=softmax_scale)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return _RingAttention.apply(q, k, v, split, parallel, scale, attention, overlap)


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
