"""PPO's per-token rewards and losses (InternLM2 report §4.2.3), as sums for the engine to normalise.

Every tensor is per token over the tokens a forward computed; `mask` marks the actions (positions whose
next token is a response token). The engine divides the returned sums by the number of action tokens of
the global batch.

- `token_rewards`: the per-token KL penalty -kl_coef * (logp - logp_ref) on every action, plus the
  (clipped, normalised) reward-model score on each response's last action.
- `policy_loss`: the clipped surrogate -min(r A, clip(r, 1 - eps, 1 + eps) A), r = exp(logp - logp_old).
- `value_loss`: 0.5 (V - R)^2, optionally clipped around the old values (the report uses no clipping).
"""

from __future__ import annotations

import torch


def token_rewards(scores: torch.Tensor, logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor,
                  last: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-action rewards [..., T]: -kl_coef * (logp - logp_ref) where `mask`, plus `scores[i]` at each
    sequence's last action `last[i]` (flat indices into the token dimension)."""
    rewards = -kl_coef * (logp - logp_ref) * mask
    return rewards.index_put((last,), scores.to(rewards.dtype), accumulate=True)


def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over actions of the clipped surrogate loss, number of actions whose ratio was clipped)."""
    ratio = torch.exp(logp - logp_old)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    loss = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped).float()  # the clip took effect (the gradient is cut there)
    return (loss * mask).sum(), (was_clipped * mask).sum()


def value_loss(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, old_values: torch.Tensor | None = None,
               clip: float | None = None) -> torch.Tensor:
    """Sum over actions of 0.5 (V - R)^2; with `clip`, the larger of that and the loss of the values
    clipped to old_values +- clip (PPO2's value clipping)."""
    loss = 0.5 * (values - returns) ** 2
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, 0.5 * (clipped - returns) ** 2)
    return (loss * mask).sum()


class RunningMoments:
    """Running mean and variance of the reward-model scores over all rollouts so far (Chan et al.'s
    parallel update), for normalising rewards; its state goes into checkpoints."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        values = values.double().flatten()
        n = values.numel()
        if n == 0:
            return
        mean, m2 = float(values.mean()), float(((values - values.mean()) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5 if self.count > 1 else 1.0

    def normalize(self, values: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        return (values - self.mean) / (self.std + eps)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
