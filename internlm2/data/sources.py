"""Where documents come from: input paths (text files, JSONL files, directories of them, the built-in
corpus) resolved to files in a fixed order, cut into byte spans, and read back as records that carry
their location for error messages.

A text file is one document. A JSONL file holds one record per line; a line belongs to the span in
which it starts, so spans cut anywhere in a file partition its lines exactly.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from internlm2.data import builtin_corpus
from internlm2.data.errors import DataError, Skips


@dataclass(frozen=True)
class InputFile:
    """A file to read; size and modification time let a resumed preparation notice changed inputs."""

    path: str
    size: int
    mtime_ns: int

    @property
    def is_jsonl(self) -> bool:
        return self.path.endswith(".jsonl")

    @classmethod
    def of(cls, path: Path) -> "InputFile":
        st = path.stat()
        return cls(str(path.resolve()), st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Span:
    """Bytes [start, end) of a file: a whole text file, or part of a JSONL file."""

    file: InputFile
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def resolve_inputs(specs: Sequence[str | os.PathLike]) -> list[InputFile]:
    """Files named by `specs`, in order: files as given, directories walked recursively in sorted path
    order (hidden entries skipped), and `builtin:stdlib` as the built-in corpus."""
    if not specs:
        raise DataError("no input given")
    files: list[InputFile] = []
    for spec in specs:
        if str(spec) == builtin_corpus.NAME:
            files += map(InputFile.of, builtin_corpus.stdlib_files())
            continue
        path = Path(spec)
        if path.is_file():
            files.append(InputFile.of(path))
        elif path.is_dir():
            found = sorted((p.relative_to(path) for p in path.rglob("*") if p.is_file()), key=Path.as_posix)
            found = [path / rel for rel in found if not any(part.startswith(".") for part in rel.parts)]
            if not found:
                raise DataError(f"{path}: directory holds no files")
            files += map(InputFile.of, found)
        else:
            raise DataError(f"{path}: no such file or directory")
    return files


def spans_within(files: Sequence[InputFile], max_bytes: int | None = None) -> list[Span]:
    """One span per file, stopping once `max_bytes` bytes are taken (a JSONL file is cut there; a text
    file, being one document, is taken whole). Empty files are left out."""
    spans, taken = [], 0
    for f in files:
        if max_bytes is not None and taken >= max_bytes:
            break
        end = f.size if max_bytes is None or not f.is_jsonl else min(f.size, max_bytes - taken)
        if end > 0:
            spans.append(Span(f, 0, end))
            taken += end
    return spans


class Location:
    """Where a record came from; the line number is counted only when the location is printed."""

    __slots__ = ("path", "offset")

    def __init__(self, path: str, offset: int | None = None):
        self.path, self.offset = path, offset

    def __str__(self) -> str:
        if self.offset is None:
            return self.path
        newlines = 0
        with open(self.path, "rb") as f:
            left = self.offset
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                newlines += chunk.count(b"\n")
                left -= len(chunk)
        return f"{self.path}:{newlines + 1}"


def read_records(span: Span, skips: Skips) -> Iterator[tuple[Location, object]]:
    """(location, record) pairs of a span: the text of a text file, or each parsed JSON line of a JSONL
    span. Undecodable files and invalid JSON lines go to `skips`; blank lines are not records."""
    path = span.file.path
    if not span.file.is_jsonl:
        try:
            yield Location(path), Path(path).read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            skips.record("not_utf8", path, f"not UTF-8 text ({e.reason} at byte {e.start})")
        return
    with open(path, "rb") as f:
        if span.start > 0:
            f.seek(span.start - 1)
            f.readline()  # the line that began before the span belongs to the previous one
        pos = f.tell()
        while pos < span.end:
            line = f.readline()
            if not line:
                break
            if line.strip():
                try:
                    yield Location(path, pos), json.loads(line)
                except ValueError as e:
                    skips.record("invalid_json", str(Location(path, pos)), f"invalid JSON ({e})")
            pos += len(line)


def read_texts(span: Span, text_key: str, skips: Skips) -> Iterator[tuple[Location, str]]:
    """Documents of a span as text: a text file's content, or the `text_key` field of each JSONL
    record. Records without that string field and empty documents go to `skips`."""
    for where, record in read_records(span, skips):
        if span.file.is_jsonl:
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                skips.record("no_text", str(where), f"record has no string field {text_key!r}")
                continue
            record = record[text_key]
        if not record.strip():
            skips.record("empty", str(where), "empty document", fatal=False)
            continue
        yield where, record
