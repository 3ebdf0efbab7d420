"""Tokenizer: InternLM2's real model and its chat tokens, models we train, models without chat tokens."""

import json
import pickle
import shutil

import pytest
import sentencepiece as spm
from hypothesis import given, settings, strategies as st

from internlm2.data import CHAT_TOKENS, DataError, Tokenizer, train_tokenizer
from internlm2.data.chat import Message, render
from internlm2.data.tokenizer import INTERNLM2_CHAT_TOKENS
from internlm2.data.tokenizer_training import MIN_VOCAB_SIZE, training_sentences
from tests.data.conftest import REAL_TOKENIZER

# From InternLM2's published chat format and HF tokenizer config (see ../shared/data/README.md).
REAL_IDS = {"<|plugin|>": 92538, "<|interpreter|>": 92539, "<|action_end|>": 92540, "<|action_start|>": 92541,
            "<|im_end|>": 92542, "<|im_start|>": 92543}


def test_real_model_chat_tokens_encode_to_their_ids(real_tokenizer):
    assert real_tokenizer.vocab_size == 92544
    assert real_tokenizer.special_ids == REAL_IDS
    assert (real_tokenizer.bos_id, real_tokenizer.eos_id, real_tokenizer.pad_id) == (1, 2, 2)
    for token, i in REAL_IDS.items():
        assert real_tokenizer.encode(token) == [i]
        assert real_tokenizer.decode([i]) == token
    # the raw SentencePiece model alone would spell the token out in bytes and pieces
    raw = spm.SentencePieceProcessor(model_file=str(REAL_TOKENIZER))
    assert raw.encode("<|im_start|>") != [92543]


def test_real_model_special_tokens_survive_encode_decode(real_tokenizer):
    text = ('<|im_start|>system name=<|plugin|>\n[{"name": "search"}]<|im_end|>\n<|im_start|>user\nHi 你好 123'
            '<|im_end|>\n<|im_start|>assistant\ncall<|action_start|><|plugin|>\n{"q": 1}<|action_end|><|im_end|>\n')
    ids = real_tokenizer.encode(text, bos=True)
    assert ids[0] == 1 and ids[1] == 92543
    assert sum(i in REAL_IDS.values() for i in ids) == 10  # 3 im_start, 3 im_end, 2 plugin, 2 action
    assert real_tokenizer.decode(ids) == text
    # InternLM2's chat format: "<|im_start|>user\n" is [92543, 1008, 364]
    assert real_tokenizer.encode("<|im_start|>user\n") == [92543, 1008, 364]


def test_tokenizer_config_beside_the_model_gives_the_mapping(tmp_path, real_tokenizer):
    shutil.copy(REAL_TOKENIZER, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        "92500": {"content": "<|im_start|>", "special": True}, "0": {"content": "<unk>"}}}))
    tok = Tokenizer.load(tmp_path)
    assert tok.special_ids["<|im_start|>"] == 92500
    assert tok.special_ids["<|im_end|>"] == 92542  # the rest from InternLM2's convention
    assert tok.encode("<|im_start|>x") == [92500, *real_tokenizer.encode("x")]
    assert tok.fingerprint != real_tokenizer.fingerprint
    (tmp_path / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"x": {"content": "<|im_end|>"}}}')
    with pytest.raises(DataError, match="tokenizer_config.json"):
        Tokenizer.load(tmp_path)


def test_trained_model_layout(small_tokenizer):
    tok = small_tokenizer
    assert tok.vocab_size == 1024
    assert [tok.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert tok.special_ids == {t: 3 + k for k, t in enumerate(CHAT_TOKENS)}
    assert tok.id_to_piece(9) == "<0x00>"  # byte pieces follow the reserved ids
    assert [tok.decode([i]) for i in tok.encode("x = 1234567")[-7:]] == list("1234567")  # digits split
    assert tok.encode("<|im_end|>") == [4]


@settings(max_examples=80, deadline=None)
@given(st.text(max_size=80) | st.text(alphabet="<|>im_startend \n\t01" + "".join(CHAT_TOKENS), max_size=60))
def test_trained_model_round_trips_any_text(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text
    assert small_tokenizer.encode_batch([text, "abc"]) == [small_tokenizer.encode(text), small_tokenizer.encode("abc")]


def test_training_is_deterministic(tmp_path):
    docs = ["def f(x):\n    return x * 2\n\n# comment %d\n" % i for i in range(300)]
    a = train_tokenizer(docs, tmp_path / "a", 300, seed=3)
    b = train_tokenizer(docs, tmp_path / "b", 300, seed=3)
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()
    assert a.fingerprint == b.fingerprint
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["tokenizer.model"]  # no temporary left


def test_pickles_by_value(small_tokenizer):
    clone = pickle.loads(pickle.dumps(small_tokenizer))
    assert clone.fingerprint == small_tokenizer.fingerprint
    assert clone.encode("<|im_start|>user\nhello") == small_tokenizer.encode("<|im_start|>user\nhello")


def test_model_without_chat_tokens(tmp_path):
    """A plain SentencePiece model (as LLaMA's): loads, encodes the token names as text, refuses ChatML."""
    model = tmp_path / "plain.model"
    with open(model, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world <|im_start|> " * 3] * 50), model_writer=f,
                                       vocab_size=300, model_type="bpe", byte_fallback=True, minloglevel=2)
    tok = Tokenizer.load(model)
    assert tok.special_ids == {}
    assert tok.decode(tok.encode("<|im_start|>")) == "<|im_start|>" and len(tok.encode("<|im_start|>")) > 1
    with pytest.raises(DataError, match=r"no '<\|im_start\|>' token"):
        render([Message("user", "hi"), Message("assistant", "yo")], tok)


def test_bad_models_and_training_inputs_are_refused(tmp_path):
    with pytest.raises(DataError, match="not found"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"not a protobuf at all")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        Tokenizer.load(tmp_path / "bad.model")
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(["text"], tmp_path, MIN_VOCAB_SIZE - 1)
    with pytest.raises(DataError, match="no text"):
        train_tokenizer([], tmp_path, 1000)
    with pytest.raises(DataError, match="smaller --vocab-size"):
        train_tokenizer(["tiny corpus"] * 10, tmp_path, 50_000)
    assert not (tmp_path / "tokenizer.model").exists()


def test_convention_applies_only_where_the_spare_pieces_are(real_tokenizer):
    assert all(real_tokenizer.id_to_piece(i) == spare for i, spare in INTERNLM2_CHAT_TOKENS.values())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(alphabet="ab \né", max_size=30) | st.just("x" * 9000) | st.just("é" * 5000), max_size=8))
def test_training_sentences_cover_the_text_in_bounded_pieces(parts):
    doc = "\n".join(parts)
    sentences = list(training_sentences([doc]))
    assert "".join(sentences) == doc
    assert all(0 < len(s.encode()) <= 8192 for s in sentences)
