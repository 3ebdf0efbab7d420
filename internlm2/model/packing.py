"""Padded batches and packed rows, and the one packed form the model computes on.

The model computes on packed tokens only: `[T, ...]` with `cu_seqlens` (int32 [N+1], sequence starts) and
per-token position ids that restart at 0 for every sequence. A padded batch `[B, S]` with an attention
mask becomes packed by dropping its padding (each row's kept tokens form one sequence, whether the row is
left- or right-padded), and outputs are scattered back to `[B, S, ...]` with zeros at the padding. So there
is one attention code path, and padding costs no compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from internlm2.parallel import ParallelState
from internlm2.parallel.context_parallel import CPSplit, zigzag_split


@dataclass
class Packing:
    cu_seqlens: torch.Tensor  # int32 [N+1]
    position_ids: torch.Tensor  # int64 [T]
    max_seqlen: int
    # The tokens this call computes, as flat indices into the caller's inputs (None: all of them): the
    # non-padding tokens of a padded batch [B, S] (then padded_shape is (B, S)), or this rank's share of a
    # packed row under context parallelism (then context is the split).
    token_index: torch.Tensor | None = None
    padded_shape: tuple[int, int] | None = None
    context: CPSplit | None = None

    @property
    def num_tokens(self) -> int:
        return self.position_ids.shape[0]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """The caller's token inputs (padded `[B, S, ...]` or packed `[T, ...]`) -> the computed tokens."""
        if self.token_index is None:
            return x
        flat = x.reshape(-1, *x.shape[2:]) if self.padded_shape is not None else x
        return flat.index_select(0, self.token_index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """Computed tokens `[T, ...]` -> the caller's layout: padded `[B, S, ...]` with zeros at the padding;
        packed and context-parallel outputs stay as they are."""
        if self.padded_shape is None:
            return x
        b, s = self.padded_shape
        out = x.new_zeros((b * s, *x.shape[1:]))
        out.index_copy_(0, self.token_index, x)
        return out.view(b, s, *x.shape[1:])


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position ids [T] restarting at 0 at every sequence start."""
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    return torch.arange(total, device=cu_seqlens.device) - starts.repeat_interleave(lengths, output_size=total)


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> list[int]:
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor [num_sequences + 1], got {cu_seqlens.dtype} "
            f"{tuple(cu_seqlens.shape)}"
        )
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at the number of tokens ({total}); got "
            f"{bounds if len(bounds) <= 16 else bounds[:8] + ['...'] + bounds[-4:]}"
        )
    return bounds


def packing_for(
    shape: tuple[int, ...],
    device: torch.device,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    what: str = "input_ids",
) -> Packing:
    """The packing of inputs of `shape` (`[B, S]` padded or `[T]` packed; `what` names the tensor in errors)."""
    if len(shape) == 2:
        if cu_seqlens is not None:
            raise ValueError(f"cu_seqlens is for packed {what} [T]; got padded {what} {tuple(shape)}")
        b, s = shape
        if attention_mask is None:
            mask = torch.ones(shape, dtype=torch.bool, device=device)
        else:
            if tuple(attention_mask.shape) != tuple(shape):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {what}'s {tuple(shape)}")
            mask = attention_mask.to(device=device, dtype=torch.bool)
        lengths = mask.sum(1)
        token_index = mask.flatten().nonzero().squeeze(1)
        if position_ids is None:
            positions = (mask.cumsum(1) - 1).flatten().index_select(0, token_index)
        else:
            if tuple(position_ids.shape) != tuple(shape):
                raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected {what}'s {tuple(shape)}")
            positions = position_ids.flatten().index_select(0, token_index).long()
        nonempty = lengths[lengths > 0]
        cu = F.pad(nonempty.cumsum(0), (1, 0)).to(torch.int32)
        longest = int(nonempty.max()) if nonempty.numel() else 0
        return Packing(cu, positions, longest, token_index, (b, s))
    if len(shape) != 1:
        raise ValueError(f"{what} must be padded [B, S] or packed [T], got shape {tuple(shape)}")
    if attention_mask is not None:
        raise ValueError(f"attention_mask is for padded {what} [B, S]; packed {what} [T] take cu_seqlens")
    total = shape[0]
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, total], dtype=torch.int32, device=device)
    bounds = _check_cu_seqlens(cu_seqlens, total)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"max_seqlen ({max_seqlen}) is smaller than the longest packed sequence ({longest})")
    if position_ids is None:
        position_ids = positions_from_cu_seqlens(cu_seqlens, total)
    elif tuple(position_ids.shape) != (total,):
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected ({total},) like {what}")
    return Packing(cu_seqlens, position_ids.long(), longest)


def context_parallel_packing(cu_seqlens: torch.Tensor, parallel: ParallelState) -> Packing:
    """This CP rank's zigzag share of the packed row described by `cu_seqlens` (every sequence's length
    must be a multiple of 2 * cp)."""
    split = zigzag_split(cu_seqlens, parallel.cp_size, parallel.cp_rank)
    return Packing(split.cu_seqlens, split.position_ids, 2 * split.max_chunk, token_index=split.index, context=split)
