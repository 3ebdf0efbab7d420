"""Training a SentencePiece BPE tokenizer in InternLM2's style.

Like InternLM2's released model: BPE, byte fallback (every string encodes, no `<unk>`), digits split,
text kept verbatim (identity normalisation, no dummy prefix, whitespace runs preserved, so code
round-trips exactly), `<unk>`=0, `<s>`=1, `</s>`=2. The chat tokens are control pieces at the reserved
ids 3-8, which text can never produce by accident; `Tokenizer` splits them out of text itself.
"""

import io
import itertools
import os
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from internlm2.data.errors import DataError
from internlm2.data.files import write_atomic
from internlm2.data.tokenizer import CHAT_TOKENS, MODEL_FILE, Tokenizer

# <unk>, <s>, </s>, the chat tokens and the 256 byte pieces come before any learned piece.
MIN_VOCAB_SIZE = 3 + len(CHAT_TOKENS) + 256 + 1

# SentencePiece skips training sentences longer than this many bytes; paragraphs are cut to fit.
_MAX_SENTENCE_BYTES = 8192


def training_sentences(documents: Iterable[str]) -> Iterator[str]:
    """Paragraphs (runs of lines up to a blank line, newlines kept so pieces may learn them), each cut
    at line boundaries to fit SentencePiece's sentence limit (a single longer line is cut anywhere)."""
    for doc in documents:
        chunk: list[str] = []
        size = 0
        for line in doc.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if chunk and (size + n > _MAX_SENTENCE_BYTES or not line.strip()):
                yield "".join(chunk)
                chunk, size = [], 0
            while n > _MAX_SENTENCE_BYTES:  # 4 bytes per character at most
                cut = _MAX_SENTENCE_BYTES // 4
                yield line[:cut]
                line = line[cut:]
                n = len(line.encode("utf-8"))
            chunk.append(line)
            size += n
        if chunk:
            yield "".join(chunk)


def train_tokenizer(documents: Iterable[str], out_dir: str | os.PathLike, vocab_size: int, *, seed: int = 0,
                    max_sentences: int = 1_000_000, threads: int | None = None) -> Tokenizer:
    """Trains on `documents` and writes `out_dir/tokenizer.model` (atomically). At most `max_sentences`
    paragraphs, sampled with `seed`, are used, which bounds time and memory on large corpora."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab size {vocab_size} is too small: the reserved and byte pieces need {MIN_VOCAB_SIZE}")
    sentences = training_sentences(documents)
    try:
        first = next(sentences)
    except StopIteration:
        raise DataError("no text to train the tokenizer on") from None
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain([first], sentences),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            character_coverage=0.9995,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            control_symbols=list(CHAT_TOKENS),
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            num_threads=threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed: {e} (a smaller --vocab-size or more text may help)") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / MODEL_FILE, model.getvalue())
    return Tokenizer(model.getvalue(), None, str(out / MODEL_FILE))

