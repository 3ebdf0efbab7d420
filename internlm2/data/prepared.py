"""A prepared dataset (the output of `prepare-data`) opened for reading as one token stream.

Documents are numbered and laid end to end in shard order; `read(start, stop)` returns any range of that
stream with the document starts inside it, which is all packing needs.
"""

import os
from pathlib import Path

import numpy as np

from internlm2.data.errors import DataError
from internlm2.data.files import read_versioned_json
from internlm2.data.prepare import MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION
from internlm2.data.shards import Shard
from internlm2.data.sources import Location


class PreparedDataset:
    """The shards of a prepared directory, validated on open.

    `expected_tokenizer` (a `Tokenizer.fingerprint`) refuses data made with another tokenizer;
    `verify=True` also checks every shard's checksum. Attributes: `num_tokens`, `num_docs`,
    `tokenizer_fingerprint`, `vocab_size`, `has_mask` (chat data: per-token training targets)."""

    def __init__(self, path: str | os.PathLike, expected_tokenizer: str | None = None, verify: bool = False):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise DataError(f"{self.path}: not a prepared dataset (no {MANIFEST}); run `internlm2 prepare-data`")
        manifest = read_versioned_json(manifest_path, MANIFEST_FORMAT, MANIFEST_VERSION, "prepared-dataset manifest")
        self.tokenizer_fingerprint = manifest["tokenizer"]["fingerprint"]
        self.vocab_size = manifest["tokenizer"]["vocab_size"]
        if expected_tokenizer is not None and expected_tokenizer != self.tokenizer_fingerprint:
            raise DataError(f"{self.path}: prepared with tokenizer {self.tokenizer_fingerprint}, "
                            f"not the expected {expected_tokenizer}")
        self.shards = []
        for entry in manifest["shards"]:
            if not (self.path / f"{entry['name']}.json").is_file():
                raise DataError(f"{self.path}: preparation is incomplete ({entry['name']} is missing); run "
                                "`internlm2 prepare-data` again with the same arguments to finish it")
            shard = Shard(self.path, entry["name"], verify=verify)
            if shard.tokenizer != self.tokenizer_fingerprint:
                raise DataError(f"{self.path / entry['name']}: made with tokenizer {shard.tokenizer}, "
                                f"the manifest says {self.tokenizer_fingerprint}")
            self.shards.append(shard)
        self.has_mask = manifest["options"]["format"] == "chat"
        self._token_starts = np.cumsum([0] + [s.num_tokens for s in self.shards])
        self._doc_starts = np.cumsum([0] + [s.num_docs for s in self.shards])
        self.num_tokens = int(self._token_starts[-1])
        self.num_docs = int(self._doc_starts[-1])

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens of document `i` (and its mask for chat data)."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} of {self.num_docs}")
        k = int(np.searchsorted(self._doc_starts, i, side="right")) - 1
        shard, local = self.shards[k], i - self._doc_starts[k]
        lo, hi = shard.offsets[local], shard.offsets[local + 1]
        return np.asarray(shard.tokens[lo:hi]), None if shard.mask is None else np.asarray(shard.mask[lo:hi])

    def document_lengths(self) -> np.ndarray:
        """Tokens of every document, int64 [num_docs]."""
        return _concat([np.diff(s.offsets) for s in self.shards], np.int64)

    def where(self, i: int) -> str:
        """Where document `i` came from: `file:line` of its record (chat data), else the dataset and index."""
        k = int(np.searchsorted(self._doc_starts, i, side="right")) - 1
        shard = self.shards[k]
        if shard.locations is None:
            return f"{self.path} document {i}"
        span, offset = (int(v) for v in shard.locations[i - self._doc_starts[k]])
        return str(Location(shard.header["source"][span][0], offset))

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Tokens [start, stop) of the stream as int64, their mask (chat data) and the stream offsets of
        the documents that start inside the range."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) of {self.num_tokens}")
        tokens, masks, doc_starts = [], [], []
        k = int(np.searchsorted(self._token_starts, start, side="right")) - 1
        while start < stop:
            shard, base = self.shards[k], int(self._token_starts[k])
            lo, hi = start - base, min(stop - base, shard.num_tokens)
            tokens.append(shard.tokens[lo:hi])
            if self.has_mask:
                masks.append(shard.mask[lo:hi])
            offsets = shard.offsets
            doc_starts.append(offsets[np.searchsorted(offsets, lo):np.searchsorted(offsets, hi)] + base)
            start = base + hi
            k += 1
        return (_concat(tokens, np.int64), _concat(masks, np.bool_) if self.has_mask else None,
                _concat(doc_starts, np.int64))


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype)
