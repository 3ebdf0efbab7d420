"""Token shards on disk: the unit that corpus preparation writes and training reads.

A shard `NAME` is four files in one directory:
- `NAME.bin`   the documents' tokens back to back (uint16 when the vocabulary fits, else uint32);
- `NAME.idx`   int64 document offsets into the tokens, [num_docs + 1], from 0 to num_tokens;
- `NAME.mask`  (chat data only) uint8 per token, 1 where the token is a training target;
- `NAME.loc`   (chat data only) int64 [num_docs, 2], where each document's record is: the index of its
               span in `source` and its byte offset in that file, so a problem found at training time
               (SFT truncation) names the file and line;
- `NAME.json`  the header: format version, dtype, counts, tokenizer fingerprint, a BLAKE2 checksum of
               the data files, and what the shard was made from (`source`) and what was skipped.

The header is written last, after the data files are renamed into place, so a shard is complete exactly
when its header exists. Opening a shard checks the header against the file sizes and the document
offsets, so truncated or mismatched files are refused with the reason; `verify=True` also checks the
checksum (every byte is read once).
"""

import hashlib
import os
from pathlib import Path

import numpy as np

from internlm2.data.errors import DataError
from internlm2.data.files import read_versioned_json, write_json_atomic

FORMAT = "internlm2-token-shard"
VERSION = 1
_DATA_SUFFIXES = (".bin", ".idx", ".mask", ".loc")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Streams documents into a shard under temporary names; `finish` publishes it, `abort` removes it."""

    def __init__(self, directory: Path, name: str, vocab_size: int, with_mask: bool):
        self.directory, self.name = Path(directory), name
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self._files = {s: open(self._tmp(s), "wb") for s in _DATA_SUFFIXES if s in (".bin", ".idx") or with_mask}
        self._hash = {s: hashlib.blake2b(digest_size=16) for s in self._files}
        self._offsets = [0]

    def _tmp(self, suffix: str) -> Path:
        return self.directory / f".{self.name}{suffix}.tmp"

    def _write(self, suffix: str, data: bytes) -> None:
        self._files[suffix].write(data)
        self._hash[suffix].update(data)

    def add(self, ids, mask=None, location: tuple[int, int] = (-1, -1)) -> None:
        """Appends one document (`mask`: per-token training-target flags, required for chat shards;
        `location`: (span index, byte offset) of its record, kept by chat shards)."""
        tokens = np.asarray(ids, dtype=np.int64)
        if tokens.size == 0:
            raise ValueError("a shard document needs at least one token")
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(f"token ids outside the vocabulary [0, {self.vocab_size})")
        if (mask is None) != (".mask" not in self._files):
            raise ValueError("a mask is required for every document of a masked shard and no other")
        self._write(".bin", tokens.astype(self.dtype).tobytes())
        if mask is not None:
            flags = np.asarray(mask, dtype=np.uint8)
            if flags.shape != tokens.shape:
                raise ValueError(f"mask has {flags.size} entries for {tokens.size} tokens")
            self._write(".mask", flags.tobytes())
            self._write(".loc", np.asarray(location, dtype=np.int64).tobytes())
        self._offsets.append(self._offsets[-1] + tokens.size)

    def finish(self, tokenizer_fingerprint: str, source: list, skipped: dict) -> dict:
        """Writes the index and the header (`source`: what the shard was made from; `skipped`: counted
        skips); returns the header."""
        self._write(".idx", np.asarray(self._offsets, dtype=np.int64).tobytes())
        for f in self._files.values():
            f.close()
        for suffix in self._files:
            os.replace(self._tmp(suffix), self.directory / f"{self.name}{suffix}")
        header = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "num_tokens": self._offsets[-1],
            "num_docs": len(self._offsets) - 1,
            "has_mask": ".mask" in self._files,
            "has_locations": ".loc" in self._files,
            "tokenizer": tokenizer_fingerprint,
            "checksum": {s: h.hexdigest() for s, h in sorted(self._hash.items())},
            "skipped": skipped,
            "source": source,
        }
        write_json_atomic(self.directory / f"{self.name}.json", header)
        return header

    def abort(self) -> None:
        for suffix, f in self._files.items():
            f.close()
            self._tmp(suffix).unlink(missing_ok=True)


def read_header(directory: Path, name: str) -> dict | None:
    """The shard's header, or None when the shard is not complete (no header yet)."""
    path = Path(directory) / f"{name}.json"
    if not path.is_file():
        return None
    return read_versioned_json(path, FORMAT, VERSION, "token shard header")


class Shard:
    """A complete shard, validated on open; tokens, offsets and mask are memory-mapped lazily (and
    dropped when pickled, so DataLoader workers map the files themselves instead of copying them)."""

    def __init__(self, directory: Path, name: str, verify: bool = False):
        self.directory, self.name = Path(directory), name
        header = read_header(directory, name)
        if header is None:
            raise DataError(f"{self.directory / name}: shard is missing or incomplete (no header)")
        self.header = header
        self.num_tokens, self.num_docs = header["num_tokens"], header["num_docs"]
        self.has_mask, self.tokenizer = header["has_mask"], header["tokenizer"]
        self.has_locations = header.get("has_locations", False)  # chat shards made before .loc files lack them
        self.dtype = np.dtype(header["dtype"])
        expected = {".bin": self.num_tokens * self.dtype.itemsize, ".idx": (self.num_docs + 1) * 8}
        if self.has_mask:
            expected[".mask"] = self.num_tokens
        if self.has_locations:
            expected[".loc"] = self.num_docs * 16
        for suffix, size in expected.items():
            path = self.directory / f"{name}{suffix}"
            actual = path.stat().st_size if path.is_file() else None
            if actual != size:
                raise DataError(f"{path}: {'missing' if actual is None else f'{actual} bytes'}, header says {size} "
                                "(truncated or corrupt shard)")
        offsets = self.offsets
        if offsets[0] != 0 or offsets[-1] != self.num_tokens or np.any(np.diff(offsets) <= 0):
            raise DataError(f"{self.directory / name}.idx: document offsets are not increasing from 0 to "
                            f"{self.num_tokens} (corrupt shard)")
        if verify:
            self.verify()

    def verify(self) -> None:
        """Checks every data file against the checksum in the header."""
        for suffix, digest in self.header["checksum"].items():
            h = hashlib.blake2b(digest_size=16)
            with open(self.directory / f"{self.name}{suffix}", "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
            if h.hexdigest() != digest:
                raise DataError(f"{self.directory / self.name}{suffix}: checksum mismatch (corrupt shard)")

    def _map(self, suffix: str, dtype) -> np.ndarray:
        maps = self.__dict__.setdefault("_maps", {})
        if suffix not in maps:
            path = self.directory / f"{self.name}{suffix}"
            # numpy cannot map an empty file; a shard whose every document was skipped has one
            maps[suffix] = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.empty(0, dtype)
        return maps[suffix]

    @property
    def tokens(self) -> np.ndarray:
        return self._map(".bin", self.dtype)

    @property
    def offsets(self) -> np.ndarray:
        return self._map(".idx", np.int64)

    @property
    def mask(self) -> np.ndarray | None:
        return self._map(".mask", np.uint8) if self.has_mask else None

    @property
    def locations(self) -> np.ndarray | None:
        """[num_docs, 2] (span index, byte offset) of each document's record, or None."""
        return self._map(".loc", np.int64).reshape(-1, 2) if self.has_locations else None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_maps"}
