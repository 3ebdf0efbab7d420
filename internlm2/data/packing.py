"""Packed training rows: the document stream cut into rows of the stage's sequence length.

Row r holds tokens [r*T, (r+1)*T) of a prepared dataset's stream, so one set of shards serves every
curriculum stage (4k, 32k, ...). Documents that cross a row boundary are split (the remainder starts the
next row), and every document piece in a row is its own sequence for attention:

    input_ids    int64 [T]
    labels       int64 [T]   the next token of the same document; -100 at each document's last token
                             (no target inside the document) and where the target is masked (chat data:
                             not an assistant token). The last position's target is the first token of
                             the next row when that continues the same document.
    position_ids int64 [T]   0, 1, 2, ... restarting at every document piece
    cu_seqlens   int32 [num_pieces + 1]  piece boundaries, from 0 to T (FlashAttention varlen)

`collate_packed` joins a micro-batch of rows into one packed sequence of B*T tokens, the model's input.
"""

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from internlm2.constants import IGNORE_INDEX
from internlm2.data.errors import DataError
from internlm2.data.prepared import PreparedDataset



class PackedDataset(Dataset):
    """Rows of `seq_len` tokens over a `PreparedDataset`; len = num_tokens // seq_len (the stream's
    last partial row is left out)."""

    def __init__(self, prepared: PreparedDataset, seq_len: int):
        if seq_len < 1:
            raise DataError(f"sequence length {seq_len} must be positive")
        if prepared.num_tokens < seq_len:
            raise DataError(f"{prepared.path}: {prepared.num_tokens} tokens, fewer than one row of {seq_len}")
        self.prepared, self.seq_len = prepared, seq_len
        self.tokenizer_fingerprint = prepared.tokenizer_fingerprint

    def __len__(self) -> int:
        return self.prepared.num_tokens // self.seq_len

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} of {len(self)}")
        T = self.seq_len
        start = row * T
        tokens, mask, doc_starts = self.prepared.read(start, min(start + T + 1, self.prepared.num_tokens))
        rel = doc_starts - start  # document starts within [0, T] (T: the next row begins a document)
        labels = np.full(T, IGNORE_INDEX, dtype=np.int64)
        labels[: tokens.size - 1] = tokens[1:]
        labels[rel[rel >= 1] - 1] = IGNORE_INDEX  # no target across a document boundary
        if mask is not None:
            labels[: tokens.size - 1][~mask[1:]] = IGNORE_INDEX
        piece_starts = np.concatenate([[0], rel[(rel > 0) & (rel < T)]])
        cu_seqlens = np.append(piece_starts, T)
        position_ids = np.arange(T) - np.repeat(piece_starts, np.diff(cu_seqlens))
        return {
            "input_ids": torch.from_numpy(tokens[:T].copy()),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": torch.from_numpy(cu_seqlens.astype(np.int32)),
        }


def collate_packed(rows: Sequence[dict[str, torch.Tensor]]) -> dict:
    """One packed sequence from a micro-batch of rows: `input_ids`, `labels`, `position_ids` [B*T],
    `cu_seqlens` int32 [total pieces + 1] with each row's boundaries offset by the tokens before it,
    and `max_seqlen` (int), the longest piece."""
    if not rows:
        raise ValueError("collate_packed needs at least one row")
    offsets = np.cumsum([0] + [len(r["input_ids"]) for r in rows])
    cu = [rows[0]["cu_seqlens"][:1]] + [r["cu_seqlens"][1:] + int(off) for r, off in zip(rows, offsets[:-1])]
    cu_seqlens = torch.cat(cu).to(torch.int32)
    return {
        "input_ids": torch.cat([r["input_ids"] for r in rows]),
        "labels": torch.cat([r["labels"] for r in rows]),
        "position_ids": torch.cat([r["position_ids"] for r in rows]),
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
    }


def pad_pieces(batch: dict, multiple: int, total_multiple: int, pad_id: int, fills: dict | None = None) -> dict:
    """`batch` (a `collate_packed` result) with every packed piece padded at its end to a multiple of
    `multiple` tokens, and the last piece padded further until the total is a multiple of
    `total_multiple`. Pad tokens are `pad_id` with no target (IGNORE_INDEX) and continue their piece's
    positions; under causal attention the real tokens never see them, so the loss over real tokens is
    unchanged. Context parallelism needs this: it splits every piece into 2*cp equal chunks.

    Other per-token tensors of the batch (1-D, one value per token) are padded with their value in
    `fills` (e.g. a reward model's scored-token slots with -1); one without a fill is an error."""
    if multiple < 1 or total_multiple < 1:
        raise ValueError(f"multiple {multiple} and total_multiple {total_multiple} must be positive")
    cu = batch["cu_seqlens"].tolist()
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    padded = [-(-n // multiple) * multiple for n in lengths]
    while sum(padded) % total_multiple:
        padded[-1] += multiple
    if padded == lengths:
        return batch
    fills = {"input_ids": pad_id, "labels": IGNORE_INDEX, **(fills or {})}
    total = cu[-1]
    per_token = [k for k, v in batch.items() if k != "position_ids" and isinstance(v, torch.Tensor)
                 and v.dim() == 1 and v.shape[0] == total]
    unfilled = sorted(set(per_token) - set(fills))
    if unfilled:
        raise ValueError(f"pad_pieces: no fill value for the per-token tensor(s) {unfilled}")
    parts = {k: [] for k in [*per_token, "position_ids"]}
    for start, n, m in zip(cu[:-1], lengths, padded):
        for k in per_token:
            value = batch[k]
            parts[k] += [value[start:start + n], torch.full((m - n,), fills[k], dtype=value.dtype)]
        pos = batch["position_ids"][start:start + n]
        first = int(pos[0]) if n else 0
        parts["position_ids"] += [pos, torch.arange(first + n, first + m, dtype=pos.dtype)]
    cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(padded)]), dtype=torch.int32)
    return {**batch, **{k: torch.cat(v) for k, v in parts.items()}, "cu_seqlens": cu_seqlens,
            "max_seqlen": max(padded)}
