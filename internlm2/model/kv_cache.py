"""The key/value cache of batched generation.

One preallocated buffer per layer, `[B, kv_heads, capacity, head_dim]` (the layout of the
`kv_cache_attention` kernel: each sequence's keys of one head are contiguous rows), and the number of
tokens each sequence holds. The prompts of a batch have different lengths: the prefill runs on the packed
prompts (no padding computed) and scatters each sequence's keys and values to slots `0..len-1`; every
decode step adds one token per sequence at slot `len` and attends over slots `0..len` of its own row (the
kernel reads no slot past a sequence's length, so rows of different lengths cost what they hold).
Finished sequences can be dropped (`keep`), so a batch whose answers end at different times stops paying
for the finished ones.
"""

from __future__ import annotations

from typing import Callable

import torch

from internlm2.model.packing import Packing


class KVCache:
    def __init__(self, layer_ids, batch_size: int, capacity: int, kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, kv_heads, capacity, head_dim)
        # Slots are written before they are read (attention stops at each sequence's length): no zeroing.
        self.keys = {i: torch.empty(shape, dtype=dtype, device=device) for i in layer_ids}
        self.values = {i: torch.empty(shape, dtype=dtype, device=device) for i in layer_ids}
        self.capacity = capacity
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_length = 0  # host copy of lengths.max(): checks capacity without a sync
        self._decode_key_lengths: torch.Tensor | None = None  # lengths + 1 as int32, once per decode step

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def is_empty(self) -> bool:
        return self.max_length == 0

    def write_prefill(self, layer_id: int, k: torch.Tensor, v: torch.Tensor, packing: Packing) -> None:
        """Stores the packed prompt keys/values [T, kv_heads, D] (one sequence per cache row)."""
        rows, slots = self._prefill_index(packing)
        self.keys[layer_id][rows, :, slots] = k
        self.values[layer_id][rows, :, slots] = v

    def _prefill_index(self, packing: Packing) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = (packing.cu_seqlens[1:] - packing.cu_seqlens[:-1]).long()
        rows = torch.arange(self.batch_size, device=lengths.device).repeat_interleave(lengths, output_size=packing.num_tokens)
        slots = torch.arange(packing.num_tokens, device=lengths.device) - packing.cu_seqlens[:-1].long()[rows]
        return rows, slots

    def decode_attention(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         attention: Callable) -> torch.Tensor:
        """Adds one token per sequence (k/v [B, kv_heads, D]) and attends q [B, heads, D] over each
        sequence's cached tokens plus the new one with `attention` (the model's `kv_cache_attention`:
        the kernel or its reference). -> [B, heads, D]."""
        rows = torch.arange(self.batch_size, device=q.device)
        keys, values = self.keys[layer_id], self.values[layer_id]
        keys[rows, :, self.lengths] = k
        values[rows, :, self.lengths] = v
        if self._decode_key_lengths is None:  # the same for every layer of the step
            self._decode_key_lengths = (self.lengths + 1).to(torch.int32)
        return attention(q, keys, values, self._decode_key_lengths)

    def check_step(self, packing: Packing) -> None:
        """Checks that a forward call fits: a prefill of one prompt per cache row into an empty cache,
        or one new token per sequence with room left."""
        if self.is_empty:
            sequences = packing.cu_seqlens.numel() - 1
            if sequences != self.batch_size or packing.token_index is not None:
                raise ValueError(
                    f"KV cache prefill: expected {self.batch_size} packed prompts (one per cache row), got "
                    f"{'a padded batch' if packing.token_index is not None else sequences}"
                )
            if packing.max_seqlen > self.capacity:
                raise ValueError(f"KV cache prefill: prompt of {packing.max_seqlen} tokens > capacity {self.capacity}")
        else:
            if packing.num_tokens != self.batch_size:
                raise ValueError(
                    f"KV cache decode: expected one new token per sequence ({self.batch_size}), got {packing.num_tokens}"
                )
            if self.max_length + 1 > self.capacity:
                raise ValueError(f"KV cache full: {self.max_length} tokens stored, capacity {self.capacity}")

    def advance(self, packing: Packing) -> None:
        """Commits the tokens of the forward call that just ran: the prefill's prompts or one token each."""
        if self.is_empty:
            self.lengths += (packing.cu_seqlens[1:] - packing.cu_seqlens[:-1]).long()
            self.max_length = packing.max_seqlen
        else:
            self.lengths += 1
            self.max_length += 1
        self._decode_key_lengths = None

    def keep(self, rows: torch.Tensor) -> None:
        """Keeps only the sequences `rows` (in that order), e.g. the unfinished ones."""
        for store in (self.keys, self.values):
            for i in store:
                store[i] = store[i].index_select(0, rows)
        self.lengths = self.lengths.index_select(0, rows)
        self.max_length = int(self.lengths.max()) if rows.numel() else 0
        self._decode_key_lengths = None
