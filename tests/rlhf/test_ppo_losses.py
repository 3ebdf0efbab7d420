"""PPO's rewards and losses against the formulas written out element by element, and the running reward
statistics against NumPy over everything seen."""

import numpy as np
import torch

from internlm2.rlhf.ppo_losses import RunningMoments, policy_loss, token_rewards, value_loss


def test_kl_penalty_sign_and_the_score_on_the_last_action():
    logp = torch.tensor([-1.0, -0.5, -2.0, -1.0, -3.0])
    ref = torch.tensor([-1.5, -0.5, -1.0, -1.0, -1.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])
    rewards = token_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, last=torch.tensor([2, 4]), kl_coef=0.1)
    # more likely than the reference -> penalised; less likely -> a bonus; no penalty off the mask
    torch.testing.assert_close(rewards, torch.tensor([-0.05, 0.0, 0.1 + 2.0, 0.0, 0.2 - 1.0]))


def test_clipped_surrogate_element_by_element():
    g = torch.Generator().manual_seed(0)
    logp, old = torch.randn(50, generator=g) * 0.3, torch.randn(50, generator=g) * 0.3
    adv, mask = torch.randn(50, generator=g), (torch.rand(50, generator=g) < 0.7).float()
    loss, clipped = policy_loss(logp, old, adv, mask, clip=0.2)
    want, count = 0.0, 0
    for lp, lo, a, m in zip(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist()):
        r = np.exp(lp - lo)
        c = min(max(r, 0.8), 1.2)
        want += -min(r * a, c * a) * m
        count += int(c * a < r * a) * m
    assert abs(loss.item() - want) < 1e-4 and clipped.item() == count
    at_one, none = policy_loss(old, old, adv, mask)  # first epoch: ratio 1, the loss is -sum(A)
    assert abs(at_one.item() + (adv * mask).sum().item()) < 1e-5 and none.item() == 0


def test_value_loss_and_its_optional_clip():
    v, r, old = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 0.0]), torch.tensor([1.5, 1.0])
    mask = torch.ones(2)
    assert value_loss(v, r, mask).item() == 0.5 * (1 + 9)
    # the larger of the plain and the clipped loss: clipped values 1.5 + clamp(-0.5) = 1.3 and 1 + clamp(2) =
    # 1.2 lose less here, so the plain loss stays
    assert abs(value_loss(v, r, mask, old, clip=0.2).item() - (0.5 * 1 + 0.5 * 9)) < 1e-6
    v2 = torch.tensor([2.4, 0.5])  # clipped: 1.7 (loses 0.045 < 0.08 plain) and 0.8 (loses 0.32 > 0.125 plain)
    assert abs(value_loss(v2, r, mask, old, clip=0.2).item() - (0.08 + 0.32)) < 1e-6


def test_running_moments_equal_numpy_over_all_values_seen():
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randn(n, generator=g) * 3 + 1 for n in (1, 7, 30, 2)]
    stats = RunningMoments()
    for c in chunks:
        stats.update(c)
    every = torch.cat(chunks).double().numpy()
    assert abs(stats.mean - every.mean()) < 1e-9 and abs(stats.std - every.std()) < 1e-9
    again = RunningMoments()
    again.load_state_dict(stats.state_dict())
    torch.testing.assert_close(again.normalize(torch.tensor([1.0])), stats.normalize(torch.tensor([1.0])))
