"""Generalised advantage estimation over response tokens (PPO; InternLM2 uses gamma 1, lambda 0.99).

Tensors are `[batch, time]`; `mask` marks the response tokens (the actions). Rewards and values at other
positions are ignored, and the value after the last response token is 0 (the episode ends there):

    delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = delta_t + gamma * lambda * A_{t+1},    R_t = A_t + V_t

where t+1 is the next *response* token of the row (prompt tokens and padding in between are skipped, so a
left- or right-padded batch gives the same advantages). Returns are the critic's regression targets.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), float32 `[batch, time]`, 0 outside the mask."""
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(f"gae: rewards, values and mask must be [batch, time] of one shape, got "
                         f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}")
    mask = mask.bool()
    rewards, values = rewards.float() * mask, values.float() * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(rewards.shape[0], dtype=torch.float32, device=rewards.device)
    next_advantage = torch.zeros_like(next_value)
    for t in range(rewards.shape[1] - 1, -1, -1):  # right to left; non-response steps pass the carry on
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        here = delta + gamma * lam * next_advantage
        m = mask[:, t]
        advantages[:, t] = torch.where(m, here, torch.zeros_like(here))
        next_value = torch.where(m, values[:, t], next_value)
        next_advantage = torch.where(m, here, next_advantage)
    return advantages, (advantages + values) * mask
