"""SFT rows: whole conversations packed first-fit / best-fit (against brute-force packers), every row
token for token against rows built from `render` directly, truncation and dropping counted, a conversation
left without a trained token named by file and line (or skipped), the last-turn-only mask, and mixtures
with pretraining rows."""

import random

import numpy as np
import pytest
import torch

from internlm2.constants import IGNORE_INDEX
from internlm2.data import DataError, MixtureDataset, PackedDataset, PrepareOptions, PreparedDataset, prepare
from internlm2.data.chat import parse_messages, render
from internlm2.data.conversation_packing import ConversationPackedDataset, best_fit, first_fit, last_run
from tests.data.conftest import write_jsonl

SEQ_LEN = 96


def naive_first_fit(lengths, capacity):
    bins, rooms = [], []
    for i, n in enumerate(lengths):
        b = next((b for b, room in enumerate(rooms) if room >= n), None)
        if b is None:
            bins.append([])
            rooms.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        rooms[b] -= n
    return bins


def naive_best_fit_loads(lengths, capacity):
    """Bin loads of best-fit decreasing, by scanning every bin for each item."""
    loads = []
    for n in sorted(lengths, reverse=True):
        fits = [b for b, load in enumerate(loads) if load + n <= capacity]
        if fits:
            loads[max(fits, key=lambda b: loads[b])] += n
        else:
            loads.append(n)
    return sorted(loads)


@pytest.mark.parametrize("seed", range(5))
def test_packers_match_brute_force(seed):
    rng = random.Random(seed)
    capacity = rng.choice([8, 50, 97])
    lengths = np.array([rng.randint(1, capacity) for _ in range(rng.randint(1, 300))])
    assert first_fit(lengths, capacity) == naive_first_fit(lengths.tolist(), capacity)
    bins = best_fit(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(lengths[b].sum() <= capacity for b in bins)
    assert sorted(int(lengths[b].sum()) for b in bins) == naive_best_fit_loads(lengths.tolist(), capacity)


def conversation(i: int, rng: random.Random) -> list[dict]:
    turns = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
    for t in range(1 + i % 2):
        turns += [{"role": "user", "content": f"question {i}.{t} " + "x " * rng.randint(1, 8)},
                  {"role": "assistant", "content": f"answer {i}.{t} " + "y " * rng.randint(1, 50)}]
    return turns


@pytest.fixture(scope="module")
def chat(tmp_path_factory, small_tokenizer):
    """Conversations of varied length (some longer than SEQ_LEN) prepared as chat data, with their
    rendering by `render` as the oracle."""
    rng = random.Random(0)
    conversations = [conversation(i, rng) for i in range(40)]
    directory = tmp_path_factory.mktemp("chat")
    write_jsonl(directory / "sft.jsonl", [{"messages": c} for c in conversations])
    prepare([directory / "sft.jsonl"], small_tokenizer, directory / "data", PrepareOptions(format="chat"))
    rendered = [render(parse_messages(c), small_tokenizer) for c in conversations]
    return PreparedDataset(directory / "data"), rendered


def expected_piece(ids, mask, seq_len, last_only=False):
    """(tokens, labels) of one conversation in a row, from its rendering."""
    mask = np.array(mask, dtype=bool)
    if last_only:  # the last assistant turn: its run of mask ones
        ones = np.flatnonzero(mask)
        start = ones[-1]
        while mask[start - 1]:
            start -= 1
        mask[:start] = False
    ids, mask = ids[:seq_len], mask[:seq_len]
    labels = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    return list(ids), labels


@pytest.mark.parametrize("packing", ["first_fit", "best_fit"])
@pytest.mark.parametrize("train_on", ["all", "last"])
def test_rows_hold_whole_conversations_token_for_token(chat, small_tokenizer, packing, train_on):
    prepared, rendered = chat
    rows = ConversationPackedDataset(prepared, SEQ_LEN, pad_id=small_tokenizer.pad_id, packing=packing,
                                     overlong="truncate", train_on=train_on, on_error="skip")
    expected = [expected_piece(ids, mask, SEQ_LEN, train_on == "last") for ids, mask in rendered]
    kept = [k for k, (_, labels) in enumerate(expected) if set(labels) != {IGNORE_INDEX}]
    lengths = [len(ids) for ids, _ in rendered]
    long = sum(n > SEQ_LEN for n in lengths)
    assert long > 0 and rows.report["truncated"] + rows.report["skipped"] == long
    assert rows.report["skipped"] == len(rendered) - len(kept) and (train_on == "last") == (len(kept) < len(rendered))
    assert rows.report["conversations"] == len(kept) and rows.report["rows"] == len(rows)
    fill = sum(min(lengths[k], SEQ_LEN) for k in kept) / (len(rows) * SEQ_LEN)
    assert rows.report["fill"] == pytest.approx(fill)
    seen = []
    for r in range(len(rows)):
        row = rows[r]
        cu = row["cu_seqlens"].tolist()
        assert cu[0] == 0 and cu[-1] == SEQ_LEN and row["input_ids"].shape == (SEQ_LEN,)
        assert torch.equal(row["position_ids"], torch.cat([torch.arange(b - a) for a, b in zip(cu, cu[1:])]))
        for a, b in zip(cu, cu[1:]):
            tokens, labels = row["input_ids"][a:b].tolist(), row["labels"][a:b].tolist()
            if tokens[0] != small_tokenizer.bos_id:  # the padding: pad tokens, no targets
                assert b == SEQ_LEN and set(tokens) == {small_tokenizer.pad_id} and set(labels) == {IGNORE_INDEX}
                continue
            match = [k for k in kept if (tokens, labels) == expected[k]]
            assert match, f"row {r} holds a piece that is no whole (truncated) conversation"
            seen.append(match[0])
    assert sorted(seen) == kept  # each conversation exactly once


def test_too_long_conversations_are_dropped_or_named_when_nothing_is_left_to_train(tmp_path, small_tokenizer):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    late = [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "the answer"}]
    long_answer = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "y " * 200}]
    write_jsonl(tmp_path / "sft.jsonl", [{"messages": c} for c in (good, good, late, long_answer)])
    prepare([tmp_path / "sft.jsonl"], small_tokenizer, tmp_path / "data", PrepareOptions(format="chat"))
    prepared = PreparedDataset(tmp_path / "data")
    pad = small_tokenizer.pad_id
    with pytest.raises(DataError, match=r"sft\.jsonl:3: a conversation of \d+ tokens truncated to seq_len=64 keeps "
                                        r"no trained assistant token"):
        ConversationPackedDataset(prepared, 64, pad_id=pad)
    skipped = ConversationPackedDataset(prepared, 64, pad_id=pad, on_error="skip")
    assert (skipped.report["skipped"], skipped.report["truncated"], skipped.report["conversations"]) == (1, 1, 3)
    assert "sft.jsonl:3" in skipped.skips.summary()
    dropped = ConversationPackedDataset(prepared, 64, pad_id=pad, overlong="drop")
    assert (dropped.report["dropped"], dropped.report["conversations"]) == (2, 2)
    with pytest.raises(DataError, match="no conversation to train on in rows of 4 tokens: all 4 are longer, and "
                                        "overlong=drop"):
        ConversationPackedDataset(prepared, 4, pad_id=pad, overlong="drop")


def test_text_data_is_refused_and_mixes_with_conversations(chat, tmp_path, small_tokenizer):
    prepared, _ = chat
    write_jsonl(tmp_path / "text.jsonl", [{"text": "def f(x):\n    return x\n" * 20}] * 10)
    prepare([tmp_path / "text.jsonl"], small_tokenizer, tmp_path / "text")
    text = PreparedDataset(tmp_path / "text")
    with pytest.raises(DataError, match="not chat data"):
        ConversationPackedDataset(text, SEQ_LEN, pad_id=0)
    conversations = ConversationPackedDataset(prepared, SEQ_LEN, pad_id=small_tokenizer.pad_id)
    mix = MixtureDataset([conversations, PackedDataset(text, SEQ_LEN)], [3, 1])
    kinds = {mix.locate(i)[0] for i in range(8)}
    assert kinds == {0, 1} and all(mix[i]["input_ids"].shape == (SEQ_LEN,) for i in range(8))


def test_last_run():
    assert last_run(np.array([0, 1, 1, 0, 1, 1, 1, 0], dtype=bool)).tolist() == [0, 0, 0, 0, 1, 1, 1, 0]
    assert last_run(np.array([1, 0, 0], dtype=bool)).tolist() == [1, 0, 0]
    assert not last_run(np.zeros(3, dtype=bool)).any()
