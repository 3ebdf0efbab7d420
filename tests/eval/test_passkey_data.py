"""Passkey training documents: rows of exactly the stage's length made of whole documents in the eval
format, each answered with its own key; a prepared dataset that packs and mixes like any other."""

import re

from internlm2.cli import main as cli_main
from internlm2.data import MixtureDataset, PackedDataset, PreparedDataset
from internlm2.data.builtin_corpus import stdlib_root
from internlm2.data.prepare import prepare
from internlm2.eval.passkey import INSTRUCTION, QUESTION


def test_passkey_rows_hold_whole_documents_each_answering_its_key(small_tokenizer, tmp_path):
    out = tmp_path / "passkey"
    assert cli_main(["eval", "passkey-data", "--tokenizer", small_tokenizer.source, "--out", str(out),
                     "--seq-len", "400", "--rows", "12", "--seed", "3"]) == 0
    data = PreparedDataset(out, small_tokenizer.fingerprint)
    assert data.num_tokens == 400 * 12 and data.num_docs > 12  # some rows hold more than one document
    rows = PackedDataset(data, 400)
    lengths = set()
    for r in range(len(rows)):
        row = rows[r]
        cu = row["cu_seqlens"].tolist()
        for a, b in zip(cu[:-1], cu[1:]):
            doc = row["input_ids"][a:b].tolist()
            lengths.add(b - a)
            assert doc[0] == small_tokenizer.bos_id and doc[-1] == small_tokenizer.eos_id  # whole documents
            text = small_tokenizer.decode(doc)
            assert text.startswith(INSTRUCTION)
            hidden = re.findall(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.", text)
            assert len(hidden) == 1 and hidden[0][0] == hidden[0][1] and len(hidden[0][0]) == 5
            assert text.endswith(f"{QUESTION} {hidden[0][0]}")
    assert 400 in lengths and min(lengths) < 300  # lengths vary
    assert not (tmp_path / ".passkey.tmp").exists()


def test_passkey_data_mixes_by_weight_with_a_corpus(small_tokenizer, tmp_path):
    assert cli_main(["eval", "passkey-data", "--tokenizer", small_tokenizer.source, "--out", str(tmp_path / "pk"),
                     "--seq-len", "256", "--rows", "20"]) == 0
    prepare([str(stdlib_root() / "argparse.py")], small_tokenizer, tmp_path / "code")
    sets = [PackedDataset(PreparedDataset(tmp_path / d), 256) for d in ("code", "pk")]
    mix = MixtureDataset(sets, [3, 1], num_samples=400)
    share = sum(mix.locate(i)[0] == 1 for i in range(400)) / 400
    assert share == 0.25


def test_passkey_data_refuses_a_row_shorter_than_one_document(small_tokenizer, tmp_path, capsys):
    assert cli_main(["eval", "passkey-data", "--tokenizer", small_tokenizer.source, "--out", str(tmp_path / "pk"),
                     "--seq-len", "50", "--rows", "2"]) == 1
    assert "--seq-len 50 is shorter than the shortest passkey document" in capsys.readouterr().err
    assert not (tmp_path / "pk").exists() and not (tmp_path / ".pk.tmp").exists()
