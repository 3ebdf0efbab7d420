"""The tokenizer files of an HF checkpoint, as InternLM2's released models carry them.

- `tokenizer.model`: the SentencePiece model. InternLM2's raw model keeps the chat tokens as spare pieces
  (`[UNUSED_TOKEN_141..146]`) that its HF tokenizer config renames; the exported model names them itself
  (same ids, same piece type), so every reader finds them: ours, transformers, InternLM2's own tokenizer.
  A model that already names them (every one `train_tokenizer` makes) is written byte for byte.
- `tokenizer_config.json`: BOS added and EOS not, pad = EOS, `<unk>`/`<s>`/`</s>` and the chat tokens as
  special added tokens at their ids, the ChatML chat template (chat_template.py: tools included).
- `special_tokens_map.json`: the same special tokens.

The tokenizer class is transformers' `LlamaTokenizer`, not InternLM2's `InternLM2Tokenizer`: that one is
remote code, and an export must tokenize without it. Both are the SentencePiece model itself: our models
have no dummy prefix, which `add_prefix_space: false` and `legacy: false` keep transformers from adding.
"""

from __future__ import annotations

import json

from internlm2.data.chat_template import chat_template
from internlm2.data.tokenizer import CHAT_TOKENS, MODEL_FILE, Tokenizer

def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def _model_naming_chat_tokens(tokenizer: Tokenizer) -> bytes:
    """The SentencePiece model with each chat token's piece renamed to the token (unchanged bytes when every
    one is named already)."""
    names = {i: t for t, i in tokenizer.special_ids.items() if tokenizer.id_to_piece(i) != t}
    return _rename_pieces(tokenizer.model_proto, names) if names else tokenizer.model_proto


# The model file is a protobuf `ModelProto` whose field 1 repeats `SentencePiece {1: piece, 2: score, 3:
# type}`. It is edited in wire format rather than through sentencepiece's generated protobuf module:
# transformers 4.x registers the same .proto file name, and a process holding both fails to load either.

def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _fields(message: bytes):
    """(field number, wire type, the field's bytes including its key) of a protobuf message, in order."""
    pos = 0
    while pos < len(message):
        start = pos
        key, pos = _read_varint(message, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _read_varint(message, pos)
        elif wire == 2:
            length, pos = _read_varint(message, pos)
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} in a SentencePiece model")
        yield key >> 3, wire, message[start:pos]


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _payload(raw: bytes) -> bytes:
    _, pos = _read_varint(raw, 0)
    length, pos = _read_varint(raw, pos)
    return raw[pos:pos + length]


def _rename_pieces(model: bytes, names: dict[int, str]) -> bytes:
    out, index = bytearray(), 0
    for field, wire, raw in _fields(model):
        if field == 1 and wire == 2:
            if index in names:
                piece = b"".join(_length_delimited(1, names[index].encode()) if (f, w) == (1, 2) else r
                                 for f, w, r in _fields(_payload(raw)))
                raw = _length_delimited(1, piece)
            index += 1
        out += raw
    return bytes(out)


def hf_tokenizer_files(tokenizer: Tokenizer) -> dict[str, bytes]:
    """File name -> contents of the HF tokenizer files for `tokenizer` (see the module docstring)."""
    chat = [t for t in CHAT_TOKENS if t in tokenizer.special_ids]
    roles = {"unk_token": tokenizer.unk_id, "bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id,
             "pad_token": tokenizer.pad_id}
    names = {"additional_special_tokens": chat,
             **{role: tokenizer.id_to_piece(i) for role, i in roles.items() if i >= 0}}
    special = {i: tokenizer.id_to_piece(i) for i in (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) if i >= 0}
    special.update({tokenizer.special_ids[t]: t for t in chat})
    config = {
        **names,
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "added_tokens_decoder": {str(i): _added_token(content) for i, content in sorted(special.items())},
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "LlamaTokenizer",
    }
    if {"<|im_start|>", "<|im_end|>"} <= set(chat):
        config["chat_template"] = chat_template()
    return {
        MODEL_FILE: _model_naming_chat_tokens(tokenizer),
        "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode(),
        "special_tokens_map.json": (json.dumps(names, indent=2, ensure_ascii=False) + "\n").encode(),
    }
