"""The reward model's losses against the report's formulas recomputed in float64, and GAE against a
brute-force sum over each row's response tokens."""

import math

import pytest
import torch

from internlm2.rlhf.advantages import gae
from internlm2.rlhf.losses import focal_ranking_loss, log_barrier_penalty, reward_model_loss


def _focal_fp64(c: float, r: float, gamma: float) -> float:
    p = 1 / (1 + math.exp(-(c - r)))
    return -((1 - 2 * max(0.0, p - 0.5)) ** gamma) * math.log(p)


def test_focal_ranking_loss_is_the_report_formula():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(200, generator=g) * 3, torch.randn(200, generator=g) * 3
    for gamma in (0.0, 1.0, 2.0):
        got = focal_ranking_loss(chosen, rejected, gamma)
        want = torch.tensor([_focal_fp64(c, r, gamma) for c, r in zip(chosen.tolist(), rejected.tolist())])
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    assert focal_ranking_loss(chosen, rejected).dtype == torch.float32


def test_wrongly_ranked_pairs_get_the_plain_ranknet_loss_and_right_ones_are_decayed():
    chosen, rejected = torch.tensor([-1.0, 0.0, 2.0]), torch.tensor([1.0, 0.0, 0.0])
    ranknet = -torch.nn.functional.logsigmoid(chosen - rejected)
    loss = focal_ranking_loss(chosen, rejected)
    torch.testing.assert_close(loss[:2], ranknet[:2])  # P <= 1/2: no decay
    p = torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(loss[2], (1 - 2 * (p - 0.5)) ** 2 * ranknet[2])
    assert loss[2] < ranknet[2]


def test_ranking_loss_has_no_overflow_for_huge_margins():
    loss = focal_ranking_loss(torch.tensor([-200.0, 200.0]), torch.tensor([0.0, 0.0]))
    assert torch.isfinite(loss).all() and abs(loss[0].item() - 200.0) < 1e-3 and loss[1].item() == 0.0


def test_log_barrier_is_smallest_at_zero_and_finite_at_and_beyond_the_bounds():
    x = torch.linspace(-4.9, 4.9, 99, dtype=torch.float64)
    want = -(torch.log(x + 5) + torch.log(5 - x))
    torch.testing.assert_close(log_barrier_penalty(x).double(), want, rtol=1e-5, atol=1e-5)
    assert log_barrier_penalty(x).argmin() == 49 and abs(log_barrier_penalty(torch.tensor(0.0)) + 2 * math.log(5)) < 1e-6
    edge = torch.tensor([-7.0, -5.0, 5.0, 7.0], requires_grad=True)
    penalty = log_barrier_penalty(edge)
    assert torch.isfinite(penalty).all()
    assert penalty[3] > penalty[2] > log_barrier_penalty(torch.tensor(4.99))  # keeps growing outwards
    penalty.sum().backward()
    assert edge.grad[0] < 0 < edge.grad[3] and edge.grad[1] < 0 < edge.grad[2]  # always pushes back inside


def test_total_reward_model_loss_adds_the_penalty_of_both_scores():
    chosen, rejected = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    total, ranking, penalty = reward_model_loss(chosen, rejected, penalty_weight=0.02)
    torch.testing.assert_close(penalty, log_barrier_penalty(chosen) + log_barrier_penalty(rejected))
    torch.testing.assert_close(total, ranking + 0.02 * penalty)


def _gae_brute_force(r, v, m, gamma, lam):
    """For each row: the response tokens in order, A_t = sum_k (gamma lam)^k delta_{t+k}."""
    adv = torch.zeros_like(r, dtype=torch.float64)
    for b in range(r.shape[0]):
        idx = m[b].nonzero().flatten().tolist()
        values = [v[b, t].item() for t in idx] + [0.0]
        deltas = [r[b, t].item() + gamma * values[k + 1] - values[k] for k, t in enumerate(idx)]
        for k, t in enumerate(idx):
            adv[b, t] = sum((gamma * lam) ** j * deltas[k + j] for j in range(len(idx) - k))
    return adv, (adv + v.double()) * m


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.99), (0.9, 0.95), (1.0, 1.0), (0.5, 0.0)])
def test_gae_equals_the_brute_force_sum_under_random_masks(gamma, lam):
    g = torch.Generator().manual_seed(1)
    r, v = torch.randn(6, 17, generator=g), torch.randn(6, 17, generator=g)
    m = torch.rand(6, 17, generator=g) < 0.6  # gaps, leading and trailing non-response positions
    m[0] = False  # a row without response tokens
    m[1] = torch.arange(17) >= 10  # left-padded prompt + response
    adv, ret = gae(r, v, m, gamma=gamma, lam=lam)
    want_adv, want_ret = _gae_brute_force(r, v, m, gamma, lam)
    torch.testing.assert_close(adv.double(), want_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), want_ret.double(), rtol=1e-5, atol=1e-5)
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all()


def test_gae_reward_on_the_last_token_with_gamma_one_lambda_one_is_the_return_to_go():
    r = torch.tensor([[0.0, 0.0, 0.0, 2.0]])
    v = torch.tensor([[0.5, 0.25, 1.0, 0.0]])
    adv, ret = gae(r, v, torch.ones(1, 4, dtype=torch.bool), gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.full((1, 4), 2.0))  # Monte-Carlo return from every token
    torch.testing.assert_close(adv, 2.0 - v)
