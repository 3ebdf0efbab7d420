"""Fixtures shared by the data-pipeline tests: a small tokenizer trained once per session on the built-in
corpus, the real InternLM2 tokenizer when it is present, and a helper that writes JSONL files."""

import json
from pathlib import Path

import pytest

from internlm2.data import Tokenizer, train_tokenizer
from internlm2.data.errors import Skips
from internlm2.data.sources import read_texts, resolve_inputs, spans_within

REAL_TOKENIZER = Path(__file__).resolve().parents[3] / "shared" / "data" / "internlm2_tokenizer.model"


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> Tokenizer:
    """A 1024-piece tokenizer trained on the first 600 KB of the standard library's sources."""
    spans = spans_within(resolve_inputs(["builtin:stdlib"]), 600_000)
    skips = Skips(fail=True)
    docs = (text for span in spans for _, text in read_texts(span, "text", skips))
    return train_tokenizer(docs, tmp_path_factory.mktemp("tok"), 1024, max_sentences=50_000)


@pytest.fixture(scope="session")
def real_tokenizer() -> Tokenizer:
    if not REAL_TOKENIZER.is_file():
        pytest.skip(f"InternLM2's tokenizer.model is not at {REAL_TOKENIZER} (a fresh clone has no ../shared/data)")
    return Tokenizer.load(REAL_TOKENIZER)


def write_jsonl(path: Path, records) -> Path:
    """Writes records (dicts, or raw strings written as they are) one per line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path
