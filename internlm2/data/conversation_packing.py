"""SFT rows: whole conversations packed into rows of the stage's sequence length, never cut across rows.

`PackedDataset` cuts a document stream into rows; a conversation must not be cut (its answer would be
trained without its question), so SFT plans rows over whole conversations instead:

- `first_fit`: conversations in data order, each into the first row with room for it;
- `best_fit`: longest first, each into the row it leaves the least room in (best-fit decreasing: the
  fewest rows, so the least padding).

A row holds its conversations back to back, each its own sequence for attention (`cu_seqlens`) with
positions restarting at 0, then padding (`pad_id`, no target) as one more sequence up to `seq_len`. Labels
are the next token of the same conversation where that token is a training target (the mask of chat.py:
assistant content and its `<|im_end|>`); `train_on="last"` keeps only each conversation's last assistant
turn (the last run of trained tokens). A conversation longer than `seq_len` is truncated to its first
`seq_len` tokens or dropped (`overlong`); one that keeps no trained token after truncation is an error
naming its file and line, or a counted skip (`on_error`). `report` counts all of it.

Rows are a plan of conversation indices made once when the dataset opens (a pure function of the data and
the options, the same on every rank); tokens are read on access. The row dict is `PackedDataset`'s, so
`collate_packed`, `MixtureDataset` (with pretraining rows) and the samplers take SFT rows as they are.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from internlm2.constants import IGNORE_INDEX
from internlm2.data.errors import DataError, Skips
from internlm2.data.prepared import PreparedDataset

PACKINGS = ("first_fit", "best_fit")
OVERLONG = ("truncate", "drop")
TRAIN_ON = ("all", "last")


class _LeftmostAtLeast:
    """`n` slots holding `value`, with two operations in O(log n): set a slot's value, and find the first slot
    whose value is at least x (a max segment tree, in a Python list: this runs once per conversation)."""

    def __init__(self, n: int, value: int):
        self.size = 1 << max(1, n - 1).bit_length()
        self.tree = [-1] * (2 * self.size)
        self.tree[self.size:self.size + n] = [value] * n
        for i in range(self.size - 1, 0, -1):
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])

    def get(self, slot: int) -> int:
        return self.tree[slot + self.size]

    def set(self, slot: int, value: int) -> None:
        i = slot + self.size
        self.tree[i] = value
        i //= 2
        while i:
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])
            i //= 2

    def first_at_least(self, x: int) -> int | None:
        if self.tree[1] < x:
            return None
        i = 1
        while i < self.size:
            i = 2 * i if self.tree[2 * i] >= x else 2 * i + 1
        return i - self.size


def first_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Items (by index, in order) into bins of `capacity`: each into the first bin with room."""
    room = _LeftmostAtLeast(len(lengths), capacity)  # bin b's room; bins not opened yet are empty
    bins: list[list[int]] = []
    for item, n in enumerate(lengths.tolist()):
        b = room.first_at_least(n)
        if b == len(bins):
            bins.append([])
        bins[b].append(item)
        room.set(b, room.get(b) - n)
    return bins


def best_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Items into bins of `capacity`, longest first (ties in index order), each into the bin it leaves the
    least room in. Bins are kept by their room: slot r of the tree is r while some bin has room r."""
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]
    rooms = _LeftmostAtLeast(capacity + 1, -1)
    bins: list[list[int]] = []
    for item in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[item])
        r = rooms.first_at_least(n)
        if r is None:
            b, r = len(bins), capacity
            bins.append([])
        else:
            b = by_room[r].pop()
            if not by_room[r]:
                rooms.set(r, -1)
        bins[b].append(item)
        by_room[r - n].append(b)
        rooms.set(r - n, r - n)
    return bins


def last_run(mask: np.ndarray) -> np.ndarray:
    """`mask` with only its last run of ones kept."""
    out = np.zeros_like(mask)
    ones = np.flatnonzero(mask)
    if ones.size:
        end = int(ones[-1]) + 1
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        out[start:end] = 1
    return out


class ConversationPackedDataset(Dataset):
    """Rows of `seq_len` tokens of whole conversations from a chat `PreparedDataset` (see the module
    docstring). `report`: conversations, rows, truncated, dropped, skipped, fill (the
    fraction of row tokens that are conversation tokens)."""

    def __init__(self, prepared: PreparedDataset, seq_len: int, *, pad_id: int,
                 packing: Literal["first_fit", "best_fit"] = "first_fit",
                 overlong: Literal["truncate", "drop"] = "truncate", train_on: Literal["all", "last"] = "all",
                 on_error: Literal["fail", "skip"] = "fail"):
        for value, allowed, what in ((packing, PACKINGS, "packing"), (overlong, OVERLONG, "overlong"),
                                     (train_on, TRAIN_ON, "train_on"), (on_error, ("fail", "skip"), "on_error")):
            if value not in allowed:
                raise DataError(f"{what} {value!r}: expected one of {allowed}")
        if not prepared.has_mask:
            raise DataError(f"{prepared.path}: not chat data (prepare it with --format chat); pretraining text is "
                            "packed by PackedDataset")
        if seq_len < 2:
            raise DataError(f"sequence length {seq_len} must be at least 2")
        self.prepared, self.seq_len, self.pad_id, self.train_on = prepared, seq_len, pad_id, train_on
        self.tokenizer_fingerprint = prepared.tokenizer_fingerprint
        lengths = prepared.document_lengths()
        self.skips = Skips(on_error == "fail")
        keep = np.ones(len(lengths), dtype=bool)
        long = np.flatnonzero(lengths > seq_len)
        if overlong == "drop":
            keep[long] = False
        else:
            for i in long.tolist():
                if not self._targets(int(i)).any():
                    keep[i] = False
                    self.skips.record("no_trained_token", prepared.where(int(i)),
                                      f"a conversation of {lengths[i]} tokens truncated to seq_len={seq_len} keeps "
                                      f"no trained assistant token (train_on={train_on})")
        self.conversations = np.flatnonzero(keep)
        if not self.conversations.size:  # nothing to train on: stop before training, saying why
            why = "overlong=drop drops them" if overlong == "drop" else "truncated, none keeps a trained token"
            raise DataError(f"{prepared.path}: no conversation to train on in rows of {seq_len} tokens: all "
                            f"{len(lengths)} are longer, and {why}")
        kept = np.minimum(lengths[self.conversations], seq_len)
        plan = (first_fit if packing == "first_fit" else best_fit)(kept, seq_len)
        self._row_starts = np.cumsum([0] + [len(b) for b in plan])
        self._row_items = self.conversations[np.concatenate([np.asarray(b, dtype=np.int64) for b in plan])]
        skipped = sum(self.skips.counts.values())
        self.report = {
            "conversations": int(self.conversations.size), "rows": len(plan),
            "truncated": len(long) - skipped if overlong == "truncate" else 0,
            "dropped": len(long) if overlong == "drop" else 0, "skipped": skipped,
            "fill": float(kept.sum() / (len(plan) * seq_len)),
        }

    def __len__(self) -> int:
        return len(self._row_starts) - 1

    def _targets(self, i: int) -> np.ndarray:
        """Per token of conversation `i` (truncated to seq_len): is the *next* token a training target."""
        _, mask = self.prepared.document(i)
        mask = mask.astype(bool)
        if self.train_on == "last":
            mask = last_run(mask)
        mask = mask[:self.seq_len]
        return np.append(mask[1:], False)

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} of {len(self)}")
        T = self.seq_len
        input_ids = np.full(T, self.pad_id, dtype=np.int64)
        labels = np.full(T, IGNORE_INDEX, dtype=np.int64)
        bounds, at = [0], 0
        for i in self._row_items[self._row_starts[row]:self._row_starts[row + 1]].tolist():
            tokens = self.prepared.document(i)[0].astype(np.int64)
            n = min(len(tokens), T)
            input_ids[at:at + n] = tokens[:n]
            targets = self._targets(i)
            labels[at:at + n - 1] = np.where(targets[:n - 1], tokens[1:n], IGNORE_INDEX)
            at += n
            bounds.append(at)
        if at < T:
            bounds.append(T)  # the padding, a sequence of its own
        cu_seqlens = np.asarray(bounds, dtype=np.int64)
        position_ids = np.arange(T) - np.repeat(cu_seqlens[:-1], np.diff(cu_seqlens))
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": torch.from_numpy(cu_seqlens.astype(np.int32)),
        }
