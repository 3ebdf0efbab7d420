"""The scalar head: scores equal the backbone's hidden states times v_head at the asked positions, in every
input layout; the reward-model HF layout (InternLM2ForRewardModel) round-trips, loads the released
layout, and a reward model starts from a causal LM's backbone with a fresh head."""

import json

import pytest
import torch

from internlm2.model import InternLM2ForCausalLM, InternLM2ForScore, load_into, load_pretrained, save_pretrained
from tests.test_model_support import random_ids, random_model, tiny_config

REWARD_TOKEN = 300


def _score_model(config):
    lm = random_model(config)
    scorer = InternLM2ForScore(config).eval()
    with torch.no_grad():
        for name, p in scorer.named_parameters():
            p.copy_(torch.randn(p.shape) * 0.2 if name == "v_head.weight" else dict(lm.named_parameters())[name])
    return lm, scorer


def test_scores_are_the_hidden_states_times_v_head_in_packed_and_padded_layouts():
    config = tiny_config(reward_token_id=REWARD_TOKEN)
    lm, scorer = _score_model(config)
    ids = random_ids((20,), config.vocab_size)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    with torch.no_grad():
        hidden = lm(ids, cu_seqlens=cu, return_logits=False).hidden_states.double()
        want = hidden @ scorer.v_head.weight.double().squeeze(0)
        positions = torch.tensor([6, 19])
        torch.testing.assert_close(scorer(ids, cu_seqlens=cu, positions=positions).double(), want[positions],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scorer(ids, cu_seqlens=cu).double(), want, rtol=1e-5, atol=1e-5)
        padded = torch.zeros(2, 13, dtype=torch.long)
        mask = torch.zeros(2, 13, dtype=torch.long)
        padded[0, 6:], mask[0, 6:] = ids[:7], 1  # left-padded
        padded[1], mask[1] = ids[7:], 1
        scores = scorer(padded, attention_mask=mask)
        torch.testing.assert_close(scores[0, 6:].double(), want[:7], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scores[1].double(), want[7:], rtol=1e-5, atol=1e-5)
        assert (scores[0, :6] == 0).all()


def test_reward_model_layout_round_trips_and_names_its_head(tmp_path):
    config = tiny_config(reward_token_id=REWARD_TOKEN)
    _, scorer = _score_model(config)
    save_pretrained(scorer, tmp_path / "rm")
    hf = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert hf["architectures"] == ["InternLM2ForRewardModel"] and hf["reward_token_id"] == REWARD_TOKEN
    assert hf["auto_map"]["AutoModel"] == "modeling_internlm2.InternLM2ForRewardModel"
    again = load_pretrained(tmp_path / "rm", kernels="reference")
    assert isinstance(again, InternLM2ForScore) and again.config.reward_token_id == REWARD_TOKEN
    for name, p in scorer.named_parameters():
        assert torch.equal(p, dict(again.named_parameters())[name]), name
    lm_hf = json.loads(_saved_lm(tmp_path, config).read_text())
    assert "reward_token_id" not in lm_hf  # only reward models carry it


def _saved_lm(tmp_path, config):
    save_pretrained(random_model(config.replace(reward_token_id=None)), tmp_path / "lm")
    return tmp_path / "lm" / "config.json"


def test_a_reward_model_starts_from_a_causal_lm_backbone_with_a_fresh_head(tmp_path):
    config = tiny_config(reward_token_id=REWARD_TOKEN)
    lm = random_model(config.replace(reward_token_id=None))
    save_pretrained(lm, tmp_path / "sft")
    scorer = InternLM2ForScore(config)
    head = scorer.v_head.weight.detach().clone()
    load_into([scorer], tmp_path / "sft", fresh=["v_head.weight"])
    assert torch.equal(scorer.v_head.weight, head)
    lm_params = dict(lm.named_parameters())
    for name, p in scorer.named_parameters():
        if name != "v_head.weight":
            assert torch.equal(p, lm_params[name]), name
    with pytest.raises(ValueError, match="parameter v_head.weight .* has no such tensor"):
        load_into([InternLM2ForScore(config)], tmp_path / "sft")  # a missing head must be declared fresh
    assert isinstance(load_pretrained(tmp_path / "sft"), InternLM2ForCausalLM)
