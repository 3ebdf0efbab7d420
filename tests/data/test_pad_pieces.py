"""pad_pieces: context parallelism's padding of packed pieces leaves the loss over real tokens unchanged."""

import pytest
import torch

from internlm2.data.packing import IGNORE_INDEX, pad_pieces
from internlm2.model import InternLM2ForCausalLM, preset_config


def batch(lengths, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    ids = torch.randint(0, vocab, (total,), generator=g)
    labels = torch.roll(ids, -1)
    labels[cu[1:].long() - 1] = IGNORE_INDEX
    pos = torch.cat([torch.arange(n) for n in lengths])
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": cu, "max_seqlen": max(lengths)}


def test_pieces_become_multiples_and_real_tokens_keep_their_place():
    b = batch([5, 1, 7])
    out = pad_pieces(b, 4, 8, pad_id=0)
    assert out["cu_seqlens"].tolist() == [0, 8, 12, 24]  # 8, 4, then 8 + 4 more for a total multiple of 8
    for (s, e), (ps, _) in zip([(0, 5), (5, 6), (6, 13)], [(0, 8), (8, 12), (12, 24)]):
        n = e - s
        assert torch.equal(out["input_ids"][ps:ps + n], b["input_ids"][s:e])
        assert torch.equal(out["labels"][ps:ps + n], b["labels"][s:e])
    assert out["position_ids"][12:24].tolist() == list(range(12))
    assert (out["labels"][5:8] == IGNORE_INDEX).all() and out["max_seqlen"] == 12
    assert pad_pieces(out, 4, 8, pad_id=0) is out  # already aligned: unchanged


def test_loss_over_real_tokens_is_unchanged():
    config = preset_config("internlm2-tiny", vocab_size=64, kernels="reference")
    model = InternLM2ForCausalLM(config)
    b = batch([9, 3, 14], vocab=64, seed=1)
    padded = pad_pieces(b, 4, 4, pad_id=2)

    def loss(x):
        return model(x["input_ids"], cu_seqlens=x["cu_seqlens"], labels=x["labels"], loss_reduction="sum").loss

    torch.testing.assert_close(loss(padded), loss(b), rtol=1e-6, atol=1e-5)


def test_other_per_token_tensors_are_padded_with_their_fill():
    b = batch([5, 3])
    b["slots"] = torch.tensor([-1, -1, -1, -1, 0, -1, -1, 1])  # a reward model's scored tokens
    out = pad_pieces(b, 4, 4, pad_id=0, fills={"slots": -1})
    assert out["slots"].tolist() == [-1, -1, -1, -1, 0, -1, -1, -1, -1, -1, 1, -1]
    with pytest.raises(ValueError, match=r"no fill value for the per-token tensor\(s\) \['slots'\]"):
        pad_pieces(b, 4, 4, pad_id=0)
