"""PPO on one CPU process: the sampler's log-probabilities against the training forward, the experience
(reward-model score with the domain prompt on the last response token, the KL penalty's sign, GAE), the
critic warm-up freezing the actor bitwise and then training it, the frozen reference and reward model and
the memory reported per model."""

import pytest
import torch

from internlm2.config import from_dict
from internlm2.data import Tokenizer
from internlm2.data.chat import Message, render
from internlm2.model import InternLM2ForCausalLM, load_pretrained
from internlm2.model.generation import SamplingParams, generate
from internlm2.rlhf.advantages import gae
from internlm2.rlhf.ppo import PPOTrainer
from internlm2.rlhf.ppo_config import PPOConfig
from internlm2.rlhf.rollout import collate_rollouts, sequence_rows
from tests.rlhf.ppo_world import CONDITIONS, make_world, model_config, ppo_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("ppo_world"))


def trainer(world, run_dir, **overrides) -> PPOTrainer:
    return PPOTrainer(from_dict(PPOConfig, ppo_config(world, run_dir, **overrides)))


@pytest.mark.parametrize("kernels", ["reference", "fused"])
def test_sampler_logprobs_equal_the_training_forward_at_temperature_1_top_p_1(world, kernels):
    tokenizer = Tokenizer.load(world / "tokenizer")
    torch.manual_seed(1)
    model = InternLM2ForCausalLM(model_config(tokenizer, kernels=kernels)).eval()
    prompts = [tokenizer.encode(t, bos=True) for t in ("user asks list 3", "the answer is", "hope this helps 12 and")]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1.0)
    out = generate(model, prompts, params, torch.Generator().manual_seed(0))
    for prompt, tokens, logprobs in zip(prompts, out.tokens, out.logprobs):
        ids = torch.tensor(prompt + tokens)
        targets = torch.full_like(ids, -100)
        targets[len(prompt) - 1:-1] = torch.tensor(tokens)
        cu = torch.tensor([0, len(ids)], dtype=torch.int32)
        with torch.no_grad():
            backbone = model.backbone(ids, cu_seqlens=cu)
            forward = model.output.token_logprobs(backbone, targets)[len(prompt) - 1:-1]
        torch.testing.assert_close(torch.tensor(logprobs), forward, rtol=0, atol=1e-5)
    # top-p renormalises what it keeps: the sampler's distribution is not the policy's
    truncated = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.5),
                         torch.Generator().manual_seed(0))
    assert all(lp <= 0 for row in truncated.logprobs for lp in row)
    assert max(lp for row in truncated.logprobs for lp in row) > max(lp for row in out.logprobs for lp in row) - 1.0


def test_experience_scores_with_the_domain_prompt_on_the_last_response_token(world, tmp_path):
    t = trainer(world, tmp_path / "run", **{"ppo.kl_coef": 0.1, "ppo.normalize_scores": False})
    with torch.no_grad():  # an actor that differs from the reference, so the KL penalty is not 0
        for p in t.actor.named_parameters().values():
            p.add_(0.05 * torch.randn_like(p))
    rollouts = t.rollouts()
    mbs, metrics, raw, _ = t.experience(rollouts)
    rm = load_pretrained(world / "rm", kernels="reference")
    lm = load_pretrained(world / "actor", kernels="reference")
    tokenizer = Tokenizer.load(world / "tokenizer")
    conditioned = 0
    for k, r in enumerate(rollouts):
        # the reward model sees the condition's system prompt; the actor's input never does
        system = [Message("system", CONDITIONS[r.condition])] if r.condition else []
        conditioned += bool(system)
        ids = render([*system, *r.messages, Message("assistant", r.text)], tokenizer)[0] + [tokenizer.unk_id]
        cu = torch.tensor([0, len(ids)], dtype=torch.int32)
        with torch.no_grad():
            expected = rm(torch.tensor(ids), cu_seqlens=cu, positions=torch.tensor([len(ids) - 1]))
        assert abs(raw[k] - float(expected)) < 1e-5
        assert r.prompt_ids == render(r.messages, tokenizer, generation_prompt=True)[0]
    assert conditioned > 0
    start = 0
    for mb in mbs:
        n = len(mb["last_action"])
        scores = torch.tensor(raw[start:start + n]).clamp(-5, 5)
        mask = mb["action_mask"]
        kl_part = -0.1 * (mb["old_logprobs"] - mb["ref_logprobs"]) * mask
        bonus = mb["rewards"] - kl_part
        # the score sits on each response's last action and nowhere else
        assert torch.equal(bonus.nonzero().flatten(), mb["last_action"][scores != 0])
        torch.testing.assert_close(bonus[mb["last_action"]], scores, rtol=0, atol=1e-6)
        # old/reference log-probabilities are the training forward's, with the penalty's sign:
        # a token the actor likes more than the reference costs reward
        with torch.no_grad():
            out = lm.backbone(mb["input_ids"], cu_seqlens=mb["cu_seqlens"])
            ref_logp = lm.output.token_logprobs(out, mb["targets"])
        torch.testing.assert_close(mb["ref_logprobs"], ref_logp, rtol=0, atol=1e-5)
        likes_more = mask & (mb["old_logprobs"] > mb["ref_logprobs"] + 1e-3)
        assert likes_more.any() and (kl_part[likes_more] < 0).all()
        cu = mb["cu_seqlens"]
        advantages, returns = gae(sequence_rows(mb["rewards"], cu), sequence_rows(mb["old_values"], cu),
                                  sequence_rows(mask, cu), gamma=1.0, lam=0.99)
        torch.testing.assert_close(sequence_rows(mb["advantages"], cu), advantages)
        torch.testing.assert_close(sequence_rows(mb["returns"], cu), returns)
        start += n
    assert metrics["kl"] > 0


def test_critic_warmup_leaves_the_actor_bitwise_unchanged_then_trains_it(world, tmp_path):
    t = trainer(world, tmp_path / "run", **{"ppo.iterations": 3, "ppo.critic_warmup": 2})
    t.ptx = t._ptx_stream()
    initial = {n: p.detach().clone() for n, p in t.actor.named_parameters().items()}
    critic_initial = {n: p.detach().clone() for n, p in t.critic.named_parameters().items()}
    for _ in range(2):
        m = t.train_iteration()
        t.state.iteration += 1
        assert not m["actor_trains"] and "policy_loss" not in m
    assert all(torch.equal(p, initial[n]) for n, p in t.actor.named_parameters().items())
    assert not all(torch.equal(p, critic_initial[n]) for n, p in t.critic.named_parameters().items())
    m = t.train_iteration()
    assert m["actor_trains"] and {"policy_loss", "ptx_loss", "clip_fraction"} <= set(m)
    assert not all(torch.equal(p, initial[n]) for n, p in t.actor.named_parameters().items())
    t.runtime.close()


def test_collated_actions_are_the_positions_before_each_response_token():
    from internlm2.rlhf.rollout import Rollout

    rollouts = [Rollout(0, [], None, {}, [1, 2, 3], [7, 8], "stop"), Rollout(1, [], None, {}, [4], [9, 10, 11], "length")]
    mb = collate_rollouts(rollouts)
    assert mb["input_ids"].tolist() == [1, 2, 3, 7, 8, 4, 9, 10, 11]
    assert mb["targets"].tolist() == [-100, -100, 7, 8, -100, 9, 10, 11, -100]
    assert mb["action_mask"].tolist() == [t != -100 for t in mb["targets"].tolist()]
    assert mb["last_action"].tolist() == [3, 7]
    assert mb["cu_seqlens"].tolist() == [0, 5, 9]


def test_reference_and_reward_model_are_frozen_and_the_memory_report_counts_each_model(world, tmp_path):
    t = trainer(world, tmp_path / "run")
    report = t.memory_report()
    for name, engine in (("actor", t.actor), ("critic", t.critic), ("reference", t.reference),
                         ("reward_model", t.reward)):
        params = sum(p.numel() for p in engine.named_parameters().values())
        assert report[name]["weights_mib"] == pytest.approx(params * 4 / 2**20)  # float32
        frozen = name in ("reference", "reward_model")
        assert report[name]["trained"] is not frozen
        assert all(p.requires_grad is not frozen for p in engine.named_parameters().values())
        # one process, float32: a gradient, a master copy and two Adam moments per parameter; frozen: none
        assert report[name]["grads_and_optimizer_mib"] == pytest.approx(0 if frozen else 4 * params * 4 / 2**20)
    t.runtime.close()
