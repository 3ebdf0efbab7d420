"""Packed rows, collate, mixture and data loading, checked against a plain-Python packing of the documents."""

import itertools

import numpy as np
import pytest
import torch

from internlm2.data import (IGNORE_INDEX, DataError, MixtureDataset, PackedDataset, PreparedDataset, PrepareOptions,
                           ResumableSampler, collate_packed, prepare)
from internlm2.data.chat import parse_messages, render
from internlm2.data.mixture import BLOCK, block_shares
from tests.data.conftest import write_jsonl

# Lengths from one token up to several rows, so documents end mid-row, at row ends, and span rows.
WORDS = ["x", "word", "a b c", "the quick brown fox " * 3, "lorem ipsum dolor sit amet " * 30, "1", "q",
         "def f(x):\n    return x\n" * 12, "z z", "end of corpus"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, small_tokenizer):
    out = tmp_path_factory.mktemp("packed")
    write_jsonl(out / "docs.jsonl", [{"text": w} for w in WORDS])
    prepare([out / "docs.jsonl"], small_tokenizer, out / "data", PrepareOptions(bos=False, eos=False, shard_bytes=150))
    data = PreparedDataset(out / "data")
    assert len(data.shards) > 2 and data.num_docs == len(WORDS)
    return data


def reference_rows(docs, T, targets=None):
    """Plain-Python packing: the stream of documents cut every T tokens, each document piece its own
    sequence. `targets[d][k]`: whether token k of document d may be a training target."""
    stream = [(d, k, t) for d, doc in enumerate(docs) for k, t in enumerate(doc)]
    rows = []
    for r in range(len(stream) // T):
        piece = stream[r * T:(r + 1) * T]
        row = {"input_ids": [t for _, _, t in piece], "labels": [], "position_ids": [], "cu_seqlens": [0]}
        for i, (d, k, _) in enumerate(piece):
            g = r * T + i
            follows = g + 1 < len(stream) and stream[g + 1][0] == d
            trainable = follows and (targets is None or targets[d][k + 1])
            row["labels"].append(stream[g + 1][2] if trainable else IGNORE_INDEX)
            if i > 0 and piece[i - 1][0] != d:
                row["cu_seqlens"].append(i)
            row["position_ids"].append(i - row["cu_seqlens"][-1])
        row["cu_seqlens"].append(T)
        rows.append(row)
    return rows


def as_lists(row):
    return {k: row[k].tolist() for k in ("input_ids", "labels", "position_ids", "cu_seqlens")}


@pytest.mark.parametrize("seq_len", [1, 3, 16, 61, 200])
def test_rows_match_the_reference_packing(prepared, seq_len):
    docs = [prepared.document(i)[0].tolist() for i in range(prepared.num_docs)]
    expected = reference_rows(docs, seq_len)
    rows = PackedDataset(prepared, seq_len)
    assert len(rows) == len(expected) == prepared.num_tokens // seq_len
    for r in range(len(rows)):
        row = rows[r]
        assert row["input_ids"].dtype == row["labels"].dtype == row["position_ids"].dtype == torch.int64
        assert row["cu_seqlens"].dtype == torch.int32
        assert as_lists(row) == expected[r], f"row {r}"


def test_attention_never_crosses_documents(prepared):
    """Every cu_seqlens segment lies inside one document, positions restart at each segment, and no label
    crosses a segment boundary except a document's continuation in the next row."""
    doc_of_token = np.repeat(np.arange(prepared.num_docs),
                             [len(prepared.document(i)[0]) for i in range(prepared.num_docs)])
    rows = PackedDataset(prepared, 37)
    for r in range(len(rows)):
        row = rows[r]
        cu = row["cu_seqlens"].tolist()
        for a, b in zip(cu, cu[1:]):
            assert b > a and len(set(doc_of_token[r * 37 + a:r * 37 + b])) == 1
            assert row["position_ids"][a:b].tolist() == list(range(b - a))
            assert (row["labels"][a:b - 1] != IGNORE_INDEX).all()  # text data: every inner token has a target
            assert row["labels"][b - 1] == IGNORE_INDEX or b == 37


def test_collate_concatenates_rows_with_offset_boundaries(prepared):
    rows = PackedDataset(prepared, 16)
    batch = collate_packed([rows[i] for i in (5, 0, 9)])
    assert batch["input_ids"].shape == (48,)
    assert torch.equal(batch["input_ids"], torch.cat([rows[i]["input_ids"] for i in (5, 0, 9)]))
    assert torch.equal(batch["labels"], torch.cat([rows[i]["labels"] for i in (5, 0, 9)]))
    expected_cu = [0]
    for k, i in enumerate((5, 0, 9)):
        expected_cu += [16 * k + int(c) for c in rows[i]["cu_seqlens"][1:]]
    assert batch["cu_seqlens"].tolist() == expected_cu and batch["cu_seqlens"].dtype == torch.int32
    assert batch["max_seqlen"] == max(np.diff(expected_cu))
    segment_positions = torch.cat([torch.arange(b - a) for a, b in zip(expected_cu, expected_cu[1:])])
    assert torch.equal(batch["position_ids"], segment_positions)


def test_chat_rows_train_only_on_assistant_tokens(tmp_path, small_tokenizer):
    conversations = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Q{i} " * (i + 1)},
                      {"role": "assistant", "content": f"A{i} " * (2 * i + 1)}] for i in range(8)]
    write_jsonl(tmp_path / "sft.jsonl", [{"messages": c} for c in conversations])
    prepare([tmp_path / "sft.jsonl"], small_tokenizer, tmp_path / "data", PrepareOptions(format="chat"))
    rendered = [render(parse_messages(c), small_tokenizer) for c in conversations]
    docs, masks = [ids for ids, _ in rendered], [m for _, m in rendered]
    rows = PackedDataset(PreparedDataset(tmp_path / "data"), 29)
    expected = reference_rows(docs, 29, targets=masks)
    assert [as_lists(rows[r]) for r in range(len(rows))] == expected
    trained = torch.cat([rows[r]["labels"] for r in range(len(rows))])
    trained = trained[trained != IGNORE_INDEX]
    assert "Q1" not in small_tokenizer.decode(trained) and "A1" in small_tokenizer.decode(trained)


def test_too_short_dataset_or_bad_length_is_refused(prepared):
    with pytest.raises(DataError, match="fewer than one row"):
        PackedDataset(prepared, prepared.num_tokens + 1)
    with pytest.raises(DataError, match="must be positive"):
        PackedDataset(prepared, 0)
    with pytest.raises(IndexError):
        PackedDataset(prepared, 8)[10**6]


def test_mixture_draws_by_weight_and_repeats_small_datasets(prepared):
    a, b = PackedDataset(prepared, 8), PackedDataset(prepared, 8)
    mix = MixtureDataset([a, b], [3, 1], num_samples=2 * BLOCK + 400)
    located = [mix.locate(i) for i in range(len(mix))]
    per_block = np.bincount([k for k, _ in located[:BLOCK]])
    assert per_block.tolist() == [7500, 2500]
    # dataset 0 is read in order, wrapping around its length; the two interleave evenly
    firsts = [j for k, j in located if k == 0]
    assert firsts == [i % len(a) for i in range(len(firsts))]
    assert max(len(list(g)) for k, g in itertools.groupby(k for k, _ in located[:BLOCK]) if k == 0) == 3
    assert torch.equal(mix[1]["input_ids"], (a if located[1][0] == 0 else b)[located[1][1]]["input_ids"])
    assert block_shares([0.65, 0.08, 0.26, 0.01]).tolist() == [6500, 800, 2600, 100]
    assert block_shares([1, 1, 1]).sum() == BLOCK


def test_mixture_refuses_mismatched_datasets_and_bad_weights(prepared, tmp_path, real_tokenizer):
    short, long = PackedDataset(prepared, 8), PackedDataset(prepared, 16)
    with pytest.raises(DataError, match="differ in seq_len"):
        MixtureDataset([short, long], [1, 1])
    write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world " * 20}])
    prepare([tmp_path / "d.jsonl"], real_tokenizer, tmp_path / "other")
    with pytest.raises(DataError, match="differ in tokenizer_fingerprint"):
        MixtureDataset([short, PackedDataset(PreparedDataset(tmp_path / "other"), 8)], [1, 1])
    for weights, error in (([1], "2 datasets but 1 weights"), ([1, 0], "positive finite"),
                           ([1, float("nan")], "positive finite"), ([1, 1e-6], "rounds to nothing")):
        with pytest.raises(DataError, match=error):
            MixtureDataset([short, short], weights)


def test_loader_with_workers_resumes_exactly(prepared):
    """DataLoader worker processes (the shards' memory maps are reopened there, not pickled) give the same
    batches as direct indexing, and a sampler resumed from the consumed count continues the stream."""
    rows = PackedDataset(prepared, 8)

    def batches(consumed, steps, workers):
        sampler = ResumableSampler(len(rows), 2, seed=7, dp_rank=1, dp_size=2, consumed_samples=consumed)
        loader = torch.utils.data.DataLoader(rows, batch_sampler=sampler, collate_fn=collate_packed,
                                             num_workers=workers)
        return list(itertools.islice(loader, steps))

    full = batches(0, 6, workers=2)
    resumed = batches(4 * 3, 3, workers=0)
    for got, want in zip(full[3:], resumed):
        assert all(torch.equal(got[k], want[k]) for k in ("input_ids", "labels", "position_ids", "cu_seqlens"))
    sampler = ResumableSampler(len(rows), 2, seed=7, dp_rank=1, dp_size=2)
    direct = collate_packed([rows[i] for i in next(iter(sampler))])
    assert torch.equal(full[0]["input_ids"], direct["input_ids"])
