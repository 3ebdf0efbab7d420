"""SentencePiece tokenizer with InternLM2's chat tokens.

`Tokenizer.load(path)` opens any SentencePiece model: one trained by `train_tokenizer` (the chat tokens
are control pieces under their own names) or InternLM2's released `tokenizer.model`, where the chat
tokens still carry spare names (`[UNUSED_TOKEN_141..146]`, ids 92538-92543). Their ids are resolved, in
order, from a `tokenizer_config.json` beside the model (HF `added_tokens_decoder`), from a piece with the
token's own name, and from InternLM2's convention when the spare pieces sit at the known ids.

Chat tokens in text are always split out before SentencePiece sees it, so `encode("<|im_start|>")` is
that token's id for every model that has it, never a byte sequence.
"""

import hashlib
import json
import os
import re
from pathlib import Path

import sentencepiece as spm

from internlm2.data.errors import DataError

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>", "<|plugin|>")

# InternLM2's released model: chat token -> (id, spare piece name in the raw model file).
INTERNLM2_CHAT_TOKENS = {
    "<|plugin|>": (92538, "[UNUSED_TOKEN_141]"),
    "<|interpreter|>": (92539, "[UNUSED_TOKEN_142]"),
    "<|action_end|>": (92540, "[UNUSED_TOKEN_143]"),
    "<|action_start|>": (92541, "[UNUSED_TOKEN_144]"),
    "<|im_end|>": (92542, "[UNUSED_TOKEN_145]"),
    "<|im_start|>": (92543, "[UNUSED_TOKEN_146]"),
}

MODEL_FILE = "tokenizer.model"

# The released InternLM2 model logs a warning about a null-character piece on every load; it is harmless.
spm.set_min_log_level(2)


class Tokenizer:
    """A SentencePiece model plus the ids of the chat tokens it has.

    Attributes: `vocab_size`, `unk_id`, `bos_id`, `eos_id`, `pad_id` (the model's pad, else EOS as InternLM2's HF
    config does), `special_ids` (chat token -> id, only those the model has), `fingerprint` (16 hex
    digits naming the model and its chat-token ids; prepared shards record it)."""

    def __init__(self, model_proto: bytes, special_ids: dict[str, int] | None = None, source: str = "<memory>"):
        """`special_ids=None` resolves the chat tokens as `load` describes (config beside `source`, own
        names, InternLM2's convention); a dict gives them explicitly."""
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as e:
            raise DataError(f"{source}: not a SentencePiece model ({e})") from None
        self._proto = model_proto
        self.source = source
        self.vocab_size = self._sp.get_piece_size()
        if special_ids is None:
            config = Path(source).parent / "tokenizer_config.json"
            special_ids = self._resolve_chat_ids(config if Path(source).is_file() else None)
        for token, i in special_ids.items():
            if token not in CHAT_TOKENS or not 0 <= i < self.vocab_size:
                raise DataError(f"{source}: chat token {token!r} -> id {i} is not a chat token inside the vocabulary")
        self.special_ids = dict(special_ids)
        self._special_by_id = {i: t for t, i in self.special_ids.items()}
        self._split = re.compile("(" + "|".join(map(re.escape, self.special_ids)) + ")") if self.special_ids else None
        self.unk_id = self._sp.unk_id()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        digest = hashlib.sha256(model_proto)
        digest.update(json.dumps(sorted(self.special_ids.items())).encode())
        self.fingerprint = digest.hexdigest()[:16]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Loads `path` (a model file, or a directory holding `tokenizer.model`)."""
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise DataError(f"{path}: tokenizer model not found")
        return cls(path.read_bytes(), None, str(path))

    def _resolve_chat_ids(self, config: Path | None) -> dict[str, int]:
        found = _chat_ids_from_config(config, self.vocab_size) if config is not None and config.is_file() else {}
        for token in CHAT_TOKENS:
            if token in found:
                continue
            own = self._sp.piece_to_id(token)
            if self._sp.id_to_piece(own) == token:
                found[token] = own
                continue
            i, spare = INTERNLM2_CHAT_TOKENS[token]
            if i < self.vocab_size and self._sp.id_to_piece(i) == spare:
                found[token] = i
        return found

    def special_id(self, token: str) -> int:
        """The id of a chat token; a clear error for models without it (e.g. a plain LLaMA model)."""
        try:
            return self.special_ids[token]
        except KeyError:
            raise DataError(f"{self.source}: the tokenizer has no {token!r} token (chat formats need it)") from None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, chat tokens split out first; BOS/EOS added when asked."""
        ids = self._encode_plain_or_split(text)
        return self._add_bos_eos(ids, bos, eos)

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False,
                     threads: int = -1) -> list[list[int]]:
        """`encode` for many texts; texts without chat tokens go to SentencePiece in one call that uses
        `threads` threads (-1: all cores; pool workers pass 1 so they do not oversubscribe)."""
        plain = [i for i, t in enumerate(texts) if not self._has_special(t)]
        out: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(plain, self._sp.encode([texts[i] for i in plain], num_threads=threads)):
            out[i] = ids
        for i, t in enumerate(texts):
            if self._has_special(t):
                out[i] = self._encode_plain_or_split(t)
        return [self._add_bos_eos(ids, bos, eos) for ids in out]

    def decode(self, ids) -> str:
        """Text of `ids`; chat tokens come back as their names, BOS/EOS as nothing."""
        parts, run = [], []
        for i in map(int, ids):
            token = self._special_by_id.get(i)
            if token is None:
                run.append(i)
                continue
            parts.append(self._sp.decode(run))
            parts.append(token)
            run = []
        parts.append(self._sp.decode(run))
        return "".join(parts)

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model."""
        return self._proto

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def _has_special(self, text: str) -> bool:
        return self._split is not None and "<|" in text

    def _encode_plain_or_split(self, text: str) -> list[int]:
        if not self._has_special(text):
            return self._sp.encode(text)
        ids: list[int] = []
        for k, part in enumerate(self._split.split(text)):
            if k % 2:  # re.split puts the captured separators at odd positions
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def _add_bos_eos(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id < 0:
                raise DataError(f"{self.source}: the tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        if eos:
            if self.eos_id < 0:
                raise DataError(f"{self.source}: the tokenizer has no EOS token")
            ids = [*ids, self.eos_id]
        return ids

    # Pickled by value (the model bytes) so DataLoader and pool workers need no file access.
    def __getstate__(self):
        return {"proto": self._proto, "special_ids": self.special_ids, "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["special_ids"], state["source"])


def _chat_ids_from_config(config: Path, vocab_size: int) -> dict[str, int]:
    """Chat token ids from an HF `tokenizer_config.json` (`added_tokens_decoder`: {"92543": {"content":
    "<|im_start|>", ...}}); other tokens in it are ignored."""
    try:
        decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        found = {entry["content"]: int(i) for i, entry in decoder.items() if entry["content"] in CHAT_TOKENS}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{config}: unreadable added_tokens_decoder ({e!r})") from None
    for token, i in found.items():
        if not 0 <= i < vocab_size:
            raise DataError(f"{config}: {token!r} has id {i}, outside the model's {vocab_size} pieces")
    return found
