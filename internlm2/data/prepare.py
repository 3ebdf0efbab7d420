"""Corpus preparation: input files -> tokenized shards plus a manifest, `dataset.json`.

The inputs are cut into shards by input bytes (`shard_bytes`), in the fixed input order, before any
work starts; each shard depends only on its own byte spans, so the output is the same for any number of
worker processes. The manifest is the plan (tokenizer, options, every shard's spans with the input
files' sizes and modification times) and is written first: running again on the same directory with
the same inputs and options resumes, keeping every finished shard (checked against its checksum), and
a different plan is refused with the difference named. Workers stream: a shard's tokens go to disk as
they are made.

Formats: `text` (text files are one document each; JSONL records carry the text under `text_key`;
BOS/EOS added per document by default, as InternLM2's pretraining sees them) and `chat` (JSONL records
`{"messages": [...]}` rendered in ChatML with an assistant-only loss mask, see `chat.py`).
"""

import multiprocessing as mp
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from internlm2.data.chat import ChatFormatError, conversation_tokens
from internlm2.data.errors import DataError, Skips
from internlm2.data.files import read_versioned_json, write_json_atomic
from internlm2.data.shards import Shard, ShardWriter, read_header
from internlm2.data.sources import InputFile, Span, read_records, read_texts, resolve_inputs, spans_within
from internlm2.data.tokenizer import Tokenizer

MANIFEST = "dataset.json"
MANIFEST_FORMAT = "internlm2-prepared-dataset"
MANIFEST_VERSION = 1
FORMATS = ("text", "chat")

# Texts per SentencePiece call: large enough to amortise the call, small enough to stream.
_BATCH_DOCS, _BATCH_BYTES = 256, 4 << 20


@dataclass(frozen=True)
class PrepareOptions:
    """What decides the content of a prepared dataset (and so must match when resuming)."""

    format: str = "text"
    text_key: str = "text"
    bos: bool = True  # text format: <s> before every document
    eos: bool = True  # text format: </s> after every document
    shard_bytes: int = 16 << 20  # input bytes per shard
    max_bytes: int | None = None  # stop after this many input bytes (in input order): small demo sets

    def __post_init__(self):
        if self.format not in FORMATS:
            raise DataError(f"format {self.format!r}: expected one of {FORMATS}")
        if self.shard_bytes <= 0 or (self.max_bytes is not None and self.max_bytes <= 0):
            raise DataError("shard_bytes and max_bytes must be positive")


def shard_name(i: int) -> str:
    return f"shard_{i:05d}"


def plan_shards(spans: Sequence[Span], shard_bytes: int) -> list[list[Span]]:
    """Groups the spans into shards of about `shard_bytes` input bytes: text files whole, JSONL spans
    cut wherever a shard fills up."""
    shards, current, filled = [], [], 0
    for span in spans:
        start = span.start
        while start < span.end:
            take = span.end - start if not span.file.is_jsonl else min(span.end - start, shard_bytes - filled)
            current.append(Span(span.file, start, start + take))
            filled += take
            start += take
            if filled >= shard_bytes:
                shards.append(current)
                current, filled = [], 0
    if current:
        shards.append(current)
    return shards


def _spans_json(spans: Sequence[Span]) -> list[list]:
    return [[s.file.path, s.file.size, s.file.mtime_ns, s.start, s.end] for s in spans]


def _spans_from_json(rows: list[list]) -> list[Span]:
    return [Span(InputFile(path, size, mtime), start, end) for path, size, mtime, start, end in rows]


def make_manifest(inputs: Sequence[str], tokenizer: Tokenizer, options: PrepareOptions) -> dict:
    spans = spans_within(resolve_inputs(inputs), options.max_bytes)
    if not spans:
        raise DataError(f"no input bytes in {list(map(str, inputs))}")
    if options.format == "chat":
        for s in spans:
            if not s.file.is_jsonl:
                raise DataError(f"{s.file.path}: the chat format reads JSONL files ({{\"messages\": [...]}} per line)")
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size},
        "options": asdict(options),
        "shards": [{"name": shard_name(i), "spans": _spans_json(unit)}
                   for i, unit in enumerate(plan_shards(spans, options.shard_bytes))],
    }


def _first_difference(old: dict, new: dict) -> str:
    for key in ("tokenizer", "options"):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)} before, {new.get(key)} now"
    if len(old["shards"]) != len(new["shards"]):
        return f"{len(old['shards'])} shards before, {len(new['shards'])} now (inputs changed)"
    for a, b in zip(old["shards"], new["shards"]):
        if a != b:
            return f"{a['name']} spans {a['spans'][:2]}... before, {b['spans'][:2]}... now (inputs changed)"
    return "nothing"


def _start_or_resume(out: Path, manifest: dict) -> None:
    path = out / MANIFEST
    if path.is_file():
        old = read_versioned_json(path, MANIFEST_FORMAT, MANIFEST_VERSION, "prepared-dataset manifest")
        if old != manifest:
            raise DataError(f"{out} was prepared with another plan ({_first_difference(old, manifest)}); "
                            "use a fresh --out directory")
        return
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: not empty and not a prepared dataset; use a fresh --out directory")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, manifest)


def finished_header(out: Path, entry: dict, tokenizer_fingerprint: str) -> dict | None:
    """The header of a finished shard (checked, checksum included), or None if it is still to do."""
    header = read_header(out, entry["name"])
    if header is None:
        return None
    if header["tokenizer"] != tokenizer_fingerprint:
        raise DataError(f"{out / entry['name']}: made with tokenizer {header['tokenizer']}, "
                        f"not {tokenizer_fingerprint}; use a fresh --out directory")
    if header["source"] != entry["spans"]:
        raise DataError(f"{out / entry['name']}: made from other input spans than the manifest plans (corrupt)")
    Shard(out, entry["name"], verify=True)
    return header


# The tokenizer of the running preparation; forked workers inherit it.
_worker_tokenizer: Tokenizer | None = None


def _write_text_docs(writer: ShardWriter, spans, options: PrepareOptions, tokenizer: Tokenizer, skips: Skips):
    batch, size = [], 0

    def flush():
        for ids in tokenizer.encode_batch(batch, bos=options.bos, eos=options.eos, threads=1):
            writer.add(ids)
        batch.clear()

    for span in spans:
        for _, text in read_texts(span, options.text_key, skips):
            batch.append(text)
            size += len(text)
            if len(batch) >= _BATCH_DOCS or size >= _BATCH_BYTES:
                flush()
                size = 0
    flush()


def _write_chat_docs(writer: ShardWriter, spans, tokenizer: Tokenizer, skips: Skips):
    for k, span in enumerate(spans):
        for where, record in read_records(span, skips):
            if not isinstance(record, dict) or "messages" not in record:
                skips.record("no_messages", str(where), 'record has no "messages" field')
                continue
            try:
                ids, mask = conversation_tokens(record["messages"], tokenizer, str(where))
            except ChatFormatError as e:
                skips.record("bad_conversation", str(where), str(e).removeprefix(f"{where}: "))
                continue
            writer.add(ids, mask, (k, where.offset))


def prepare_shard(out: Path, entry: dict, options: PrepareOptions, fail: bool) -> dict:
    """Writes one shard from its spans (in a worker process or in this one); returns its header."""
    tokenizer = _worker_tokenizer
    skips = Skips(fail)
    spans = _spans_from_json(entry["spans"])
    writer = ShardWriter(out, entry["name"], tokenizer.vocab_size, with_mask=options.format == "chat")
    try:
        if options.format == "chat":
            _write_chat_docs(writer, spans, tokenizer, skips)
        else:
            _write_text_docs(writer, spans, options, tokenizer, skips)
        return writer.finish(tokenizer.fingerprint, entry["spans"],
                             {"counts": dict(skips.counts), "examples": skips.examples})
    except BaseException:
        writer.abort()
        raise


def _prepare_shard_task(args) -> tuple[str, dict]:
    return args[1]["name"], prepare_shard(*args)


def _run_tasks(tasks: list, workers: int):
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_prepare_shard_task, tasks)
        return
    # fork: workers only tokenize, and a spawned worker would re-import torch for nothing
    with mp.get_context("fork").Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap_unordered(_prepare_shard_task, tasks)


def prepare(inputs: Sequence[str], tokenizer: Tokenizer, out_dir: str | os.PathLike,
            options: PrepareOptions = PrepareOptions(), *, workers: int = 1, on_error: str = "fail",
            progress: bool = False) -> dict:
    """Prepares (or resumes preparing) `inputs` into `out_dir`. `on_error`: "fail" stops at the first
    bad record, naming its file and line; "skip" counts it and goes on. Returns a summary: shards,
    shards made now, documents, tokens, skipped records by reason with the first example of each."""
    global _worker_tokenizer
    if on_error not in ("fail", "skip"):
        raise DataError(f"on_error {on_error!r}: expected 'fail' or 'skip'")
    out = Path(out_dir)
    manifest = make_manifest(inputs, tokenizer, options)
    _start_or_resume(out, manifest)
    headers = {e["name"]: finished_header(out, e, tokenizer.fingerprint) for e in manifest["shards"]}
    todo = [e for e in manifest["shards"] if headers[e["name"]] is None]
    tasks = [(out, e, options, on_error == "fail") for e in todo]
    _worker_tokenizer = tokenizer
    try:
        with tqdm(total=sum(_nbytes(e["spans"]) for e in todo), unit="B", unit_scale=True, desc="prepare-data",
                  disable=not progress) as bar:
            for name, header in _run_tasks(tasks, workers):
                headers[name] = header
                bar.update(_nbytes(header["source"]))
    except BaseException:
        for tmp in out.glob(".shard_*.tmp"):  # left by workers the failure stopped mid-shard
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _worker_tokenizer = None
    return _summary(headers, len(todo))


def _nbytes(spans_json: list[list]) -> int:
    return sum(end - start for *_, start, end in spans_json)


def _summary(headers: dict[str, dict], made_now: int) -> dict:
    skips = Skips(fail=False)
    for h in headers.values():
        skips.merge(h["skipped"]["counts"], h["skipped"]["examples"])
    summary = {
        "shards": len(headers),
        "made_now": made_now,
        "num_docs": sum(h["num_docs"] for h in headers.values()),
        "num_tokens": sum(h["num_tokens"] for h in headers.values()),
        "skipped": dict(skips.counts),
        "skip_examples": skips.examples,
    }
    if summary["num_docs"] == 0:
        raise DataError("no documents were prepared:\n" + (skips.summary() or "  the inputs hold no documents"))
    return summary


def write_token_documents(out_dir: str | os.PathLike, documents: Iterable[Sequence[int]], tokenizer: Tokenizer,
                          source: str) -> dict:
    """A prepared dataset of documents that are token ids already (generated data, e.g. passkey
    documents made to an exact length), in the layout `prepare` writes, so training reads and mixes it
    like any other. `source` says what made the documents; it stands in for the input spans. Written
    under a temporary name and renamed, so a failure leaves nothing at `out_dir`, which must not exist."""
    out = Path(out_dir)
    if out.exists():
        raise DataError(f"{out} exists; generated datasets are written to a fresh directory")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        name = shard_name(0)
        writer = ShardWriter(tmp, name, tokenizer.vocab_size, with_mask=False)
        for ids in documents:
            writer.add(ids)
        header = writer.finish(tokenizer.fingerprint, [source], {"counts": {}, "examples": {}})
        write_json_atomic(tmp / MANIFEST, {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size},
            "options": asdict(PrepareOptions()),
            "shards": [{"name": name, "spans": [source]}],
        })
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _summary({name: header}, 1)
