"""Corpus preparation: round trip against direct tokenization, worker-count independence, resume, and
every kind of bad input (invalid JSONL, empty and undecodable documents, corrupt shards, other tokenizers)."""

import json
import os

import numpy as np
import pytest
import sentencepiece as spm

from internlm2.cli import main as cli_main
from internlm2.data import DataError, PreparedDataset, PrepareOptions, Tokenizer, prepare
from internlm2.data.chat import parse_messages, render, tool_call_text
from tests.data.conftest import write_jsonl

TEXTS = [f"def f{i}(x):\n    return x ** {i}  # {'é' * (i % 3)} 你好\n" * (1 + i % 7) for i in range(40)]


def make_corpus(root):
    """A directory of text files and JSONL (whose records split across small shards); returns the
    documents in the order preparation reads them."""
    (root / "b").mkdir(parents=True)
    for i, text in enumerate(TEXTS[:5]):
        (root / f"a{i}.txt").write_text(text)
    write_jsonl(root / "b" / "part.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS[5:])])
    (root / ".hidden.txt").write_text("never read")
    return TEXTS


def files_of(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def direct_tokens(tokenizer, texts, bos=True, eos=True):
    """The oracle: the plain SentencePiece model, document by document."""
    sp = spm.SentencePieceProcessor(model_file=tokenizer.source)
    return [[sp.bos_id()] * bos + sp.encode(t) + [sp.eos_id()] * eos for t in texts]


def all_documents(prepared):
    return [prepared.document(i)[0].tolist() for i in range(prepared.num_docs)]


@pytest.mark.parametrize("bos,eos", [(True, True), (False, False)])
def test_round_trip_equals_direct_tokenization(tmp_path, small_tokenizer, bos, eos):
    texts = make_corpus(tmp_path / "corpus")
    options = PrepareOptions(shard_bytes=700, bos=bos, eos=eos)
    summary = prepare([tmp_path / "corpus"], small_tokenizer, tmp_path / "out", options)
    assert summary["shards"] > 3 and summary["num_docs"] == len(texts) and summary["skipped"] == {}
    prepared = PreparedDataset(tmp_path / "out", expected_tokenizer=small_tokenizer.fingerprint, verify=True)
    expected = direct_tokens(small_tokenizer, texts, bos, eos)
    assert all_documents(prepared) == expected
    stream, mask, starts = prepared.read(0, prepared.num_tokens)
    assert stream.tolist() == sum(expected, []) and mask is None
    assert starts.tolist() == np.cumsum([0] + [len(d) for d in expected[:-1]]).tolist()
    assert prepared.shards[0].tokens.dtype == np.uint16


def test_output_does_not_depend_on_worker_count(tmp_path, small_tokenizer):
    make_corpus(tmp_path / "corpus")
    options = PrepareOptions(shard_bytes=500)
    one = prepare([tmp_path / "corpus"], small_tokenizer, tmp_path / "one", options, workers=1)
    two = prepare([tmp_path / "corpus"], small_tokenizer, tmp_path / "two", options, workers=2)
    assert one == two and one["shards"] > 4
    assert files_of(tmp_path / "one") == files_of(tmp_path / "two")


def test_resume_keeps_finished_shards_and_redoes_the_rest(tmp_path, small_tokenizer):
    make_corpus(tmp_path / "corpus")
    options = PrepareOptions(shard_bytes=600)
    prepare([tmp_path / "corpus"], small_tokenizer, tmp_path / "out", options)
    complete = files_of(tmp_path / "out")
    # A crash before shard 2's header was written: its data files may be half there.
    (tmp_path / "out" / "shard_00002.json").unlink()
    (tmp_path / "out" / "shard_00002.bin").write_bytes(b"\x00" * 3)
    summary = prepare([tmp_path / "corpus"], small_tokenizer, tmp_path / "out", options, workers=2)
    assert summary["made_now"] == 1
    assert files_of(tmp_path / "out") == complete
    assert prepare([tmp_path / "corpus"], small_tokenizer, tmp_path / "out", options)["made_now"] == 0


def test_failure_leaves_finished_shards_and_no_temporaries_then_resumes(tmp_path, small_tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"text": t} for t in TEXTS[:10]])
    write_jsonl(corpus / "b.jsonl", [{"text": "fine"}, '{"text": "unterminated', {"text": "also fine"}])
    options = PrepareOptions(shard_bytes=300)
    with pytest.raises(DataError, match=r"b.jsonl:2: invalid JSON"):
        prepare([corpus], small_tokenizer, tmp_path / "out", options)
    names = os.listdir(tmp_path / "out")
    assert not [n for n in names if n.endswith(".tmp")]
    assert "shard_00000.json" in names
    summary = prepare([corpus], small_tokenizer, tmp_path / "out", options, on_error="skip")
    assert 0 < summary["made_now"] < summary["shards"]
    assert summary["skipped"] == {"invalid_json": 1} and "b.jsonl:2" in summary["skip_examples"]["invalid_json"]
    assert all_documents(PreparedDataset(tmp_path / "out")) == direct_tokens(
        small_tokenizer, TEXTS[:10] + ["fine", "also fine"])


def test_bad_records_are_counted_with_file_and_line(tmp_path, small_tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"text": "one"}, {"txt": "wrong key"}, {"text": "  \n"}, "[1, 2]", "",
                                     {"text": 5}, {"text": "two"}])
    (corpus / "b.txt").write_bytes(b"caf\xe9 latin-1")
    (corpus / "c.txt").write_text("")
    (corpus / "d.txt").write_text("three")
    summary = prepare([corpus], small_tokenizer, tmp_path / "out", on_error="skip")
    assert summary["skipped"] == {"no_text": 3, "empty": 1, "not_utf8": 1}
    assert "a.jsonl:2" in summary["skip_examples"]["no_text"] and "a.jsonl:3" in summary["skip_examples"]["empty"]
    assert "b.txt" in summary["skip_examples"]["not_utf8"]
    assert all_documents(PreparedDataset(tmp_path / "out")) == direct_tokens(small_tokenizer, ["one", "two", "three"])
    with pytest.raises(DataError, match=r"a.jsonl:2: record has no string field 'text'"):
        prepare([corpus], small_tokenizer, tmp_path / "fail")


def test_nothing_to_prepare_is_an_error(tmp_path, small_tokenizer):
    write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": " "}])
    with pytest.raises(DataError, match=r"no documents were prepared:\n  skipped 2 \(empty\)"):
        prepare([tmp_path / "empty.jsonl"], small_tokenizer, tmp_path / "out")
    with pytest.raises(DataError, match="no such file"):
        prepare([tmp_path / "missing"], small_tokenizer, tmp_path / "out2")


def test_changed_inputs_options_or_tokenizer_are_refused_on_resume(tmp_path, small_tokenizer, real_tokenizer):
    make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    prepare([tmp_path / "corpus"], small_tokenizer, out, PrepareOptions(shard_bytes=800))
    with pytest.raises(DataError, match="another plan.*options"):
        prepare([tmp_path / "corpus"], small_tokenizer, out, PrepareOptions(shard_bytes=900))
    with pytest.raises(DataError, match="another plan.*tokenizer"):
        prepare([tmp_path / "corpus"], real_tokenizer, out, PrepareOptions(shard_bytes=800))
    (tmp_path / "corpus" / "a0.txt").write_text("changed")
    with pytest.raises(DataError, match="inputs changed"):
        prepare([tmp_path / "corpus"], small_tokenizer, out, PrepareOptions(shard_bytes=800))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and not a prepared dataset"):
        prepare([tmp_path / "corpus"], small_tokenizer, tmp_path / "other")
    with pytest.raises(DataError, match="prepared with tokenizer .* not the expected"):
        PreparedDataset(out, expected_tokenizer=real_tokenizer.fingerprint)


def test_shard_from_another_tokenizer_is_refused(tmp_path, small_tokenizer):
    make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    prepare([tmp_path / "corpus"], small_tokenizer, out, PrepareOptions(shard_bytes=800))
    header = json.loads((out / "shard_00001.json").read_text())
    header["tokenizer"] = "0123456789abcdef"
    (out / "shard_00001.json").write_text(json.dumps(header))
    with pytest.raises(DataError, match="shard_00001: made with tokenizer 0123456789abcdef"):
        PreparedDataset(out)
    with pytest.raises(DataError, match="shard_00001: made with tokenizer 0123456789abcdef"):
        prepare([tmp_path / "corpus"], small_tokenizer, out, PrepareOptions(shard_bytes=800))


def swap_offsets(path):
    offsets = np.fromfile(path, dtype=np.int64)
    offsets[[1, 2]] = offsets[[2, 1]]
    offsets.tofile(path)


@pytest.mark.parametrize("damage,error", [
    (lambda d: d.joinpath("shard_00001.bin").write_bytes(d.joinpath("shard_00001.bin").read_bytes()[:-2]),
     r"shard_00001.bin: \d+ bytes, header says \d+ \(truncated"),
    (lambda d: d.joinpath("shard_00001.idx").unlink(), r"shard_00001.idx: missing"),
    (lambda d: swap_offsets(d / "shard_00001.idx"),
     r"shard_00001.idx: document offsets"),
    (lambda d: d.joinpath("shard_00001.json").write_text("{garbage"), r"shard_00001.json: not a token shard header"),
    (lambda d: d.joinpath("shard_00001.json").unlink(), r"preparation is incomplete \(shard_00001 is missing\)"),
    (lambda d: d.joinpath("dataset.json").write_text("[]"), r"dataset.json: not a prepared-dataset manifest"),
])
def test_corrupt_or_truncated_shards_are_detected(tmp_path, small_tokenizer, damage, error):
    make_corpus(tmp_path / "corpus")
    prepare([tmp_path / "corpus"], small_tokenizer, tmp_path / "out", PrepareOptions(shard_bytes=800))
    damage(tmp_path / "out")
    with pytest.raises(DataError, match=error):
        PreparedDataset(tmp_path / "out")


def test_flipped_bytes_fail_the_checksum(tmp_path, small_tokenizer):
    make_corpus(tmp_path / "corpus")
    prepare([tmp_path / "corpus"], small_tokenizer, tmp_path / "out", PrepareOptions(shard_bytes=800))
    path = tmp_path / "out" / "shard_00001.bin"
    data = bytearray(path.read_bytes())
    data[3] ^= 0x40
    path.write_bytes(bytes(data))
    PreparedDataset(tmp_path / "out")  # sizes still agree
    with pytest.raises(DataError, match="shard_00001.bin: checksum mismatch"):
        PreparedDataset(tmp_path / "out", verify=True)
    with pytest.raises(DataError, match="shard_00001.bin: checksum mismatch"):  # resume checks finished shards
        prepare([tmp_path / "corpus"], small_tokenizer, tmp_path / "out", PrepareOptions(shard_bytes=800))


def test_chat_format(tmp_path, small_tokenizer):
    conversations = [
        [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}" * (i + 1)}]
        for i in range(6)
    ]
    bad = [{"role": "assistant", "content": "speaks first"}]
    records = [{"messages": c} for c in conversations[:3]] + [{"messages": bad}, {"x": 1}]
    path = write_jsonl(tmp_path / "sft.jsonl", records + [{"messages": c} for c in conversations[3:]])
    options = PrepareOptions(format="chat", shard_bytes=200)
    with pytest.raises(DataError, match="sft.jsonl:4: message 0 is assistant first"):
        prepare([path], small_tokenizer, tmp_path / "fail", options)
    summary = prepare([path], small_tokenizer, tmp_path / "out", options, on_error="skip")
    assert summary["skipped"] == {"bad_conversation": 1, "no_messages": 1}
    prepared = PreparedDataset(tmp_path / "out")
    assert prepared.has_mask and prepared.num_docs == 6
    for i, conversation in enumerate(conversations):
        ids, mask = render(parse_messages(conversation), small_tokenizer)
        tokens, flags = prepared.document(i)
        assert tokens.tolist() == ids and flags.astype(int).tolist() == mask
    with pytest.raises(DataError, match="the chat format reads JSONL"):
        prepare(["builtin:stdlib"], small_tokenizer, tmp_path / "x", options)


def test_chat_tool_calls_are_checked_and_every_conversation_knows_its_line(tmp_path, small_tokenizer):
    schema = json.dumps([{"name": "calculator", "parameters": {"expression": "string"}}])

    def tool_use(name):
        return {"messages": [
            {"role": "system", "content": schema, "name": "plugin"}, {"role": "user", "content": "6 * 7?"},
            {"role": "assistant", "content": tool_call_text(name, {"expression": "6 * 7"})},
            {"role": "environment", "content": '{"result": 42}', "name": "plugin"},
            {"role": "assistant", "content": "42"}]}
    records = [tool_use("calculator"), tool_use("search"),
               {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
               "not json {", tool_use("calculator")]
    path = write_jsonl(tmp_path / "tools.jsonl", records)
    options = PrepareOptions(format="chat", shard_bytes=300)
    with pytest.raises(DataError, match=r"tools\.jsonl:2: message 2 calls unknown tool 'search'; the conversation "
                                        r"declares \['calculator'\]"):
        prepare([path], small_tokenizer, tmp_path / "fail", options)
    summary = prepare([path], small_tokenizer, tmp_path / "out", options, on_error="skip")
    assert summary["skipped"] == {"bad_conversation": 2, "invalid_json": 1}
    assert "tools.jsonl:2: message 2 calls unknown tool" in summary["skip_examples"]["bad_conversation"]
    prepared = PreparedDataset(tmp_path / "out")
    assert [prepared.where(i) for i in range(prepared.num_docs)] == [f"{path.resolve()}:1", f"{path.resolve()}:5"]


def test_max_bytes_takes_a_prefix_in_input_order(tmp_path, small_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS])
    lines = path.read_bytes().split(b"\n")
    limit = len(lines[0]) + len(lines[1]) + 5  # inside the third line: it starts before the limit
    prepare([path], small_tokenizer, tmp_path / "out", PrepareOptions(max_bytes=limit))
    assert all_documents(PreparedDataset(tmp_path / "out")) == direct_tokens(small_tokenizer, TEXTS[:3])


def test_cli_on_the_builtin_corpus(tmp_path, capsys):
    assert cli_main(["train-tokenizer", "--vocab-size", "600", "--max-bytes", "300K", "--out",
                     str(tmp_path / "tok")]) == 0
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.vocab_size == 600 and "600 pieces" in capsys.readouterr().out
    args = ["prepare-data", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "data"),
            "--max-bytes", "200K", "--shard-bytes", "64K", "--workers", "2", "--json"]
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    prepared = PreparedDataset(tmp_path / "data", expected_tokenizer=tok.fingerprint)
    assert summary["num_tokens"] == prepared.num_tokens > 30_000 and summary["shards"] >= 2
    first = prepared.document(0)[0]
    assert first[0] == tok.bos_id and first[-1] == tok.eos_id
    assert cli_main(args) == 0 and json.loads(capsys.readouterr().out)["made_now"] == 0
