"""The reward model's losses (InternLM2 report §4.2.1, Eqs. 1-3), computed in float32.

- `focal_ranking_loss(chosen, rejected, gamma)`: RankNet's -log P(chosen > rejected), P = sigmoid(r_c -
  r_r), decayed by (1 - 2 max(0, P - 1/2))^gamma: a pair the model already ranks right contributes less
  the more confident it is; a wrongly ranked pair (P <= 1/2) keeps the plain RankNet loss.
- `log_barrier_penalty(scores, bound)`: -(log(x + bound) + log(bound - x)), smallest at 0, so scores stay
  inside (-bound, bound) and their scale stays stable across reward-model versions (PPO's reward
  hyper-parameters need no retuning). Within 1e-3 of a bound and beyond it the barrier continues as its
  tangent line there, so the penalty stays finite and its gradient keeps pushing the score back (a plain
  clamp would give it no gradient at all out there).
- `reward_model_loss`: ranking + lambda * penalty per pair (the penalty of both scores), lambda 0.02.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_GAMMA = 2.0
DEFAULT_BOUND = 5.0
DEFAULT_PENALTY_WEIGHT = 0.02
_INSIDE = 1e-3  # how far inside the bounds out-of-range scores are clamped


def focal_ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor, gamma: float = DEFAULT_GAMMA) -> torch.Tensor:
    """Per-pair loss -(1 - 2 max(0, P - 1/2))^gamma log P, P = sigmoid(chosen - rejected), float32."""
    margin = chosen.float() - rejected.float()
    decay = (1 - 2 * torch.relu(torch.sigmoid(margin) - 0.5)) ** gamma
    return -decay * F.logsigmoid(margin)  # logsigmoid: log P without underflow for large negative margins


def log_barrier_penalty(scores: torch.Tensor, bound: float = DEFAULT_BOUND) -> torch.Tensor:
    """Per-score -(log(x + bound) + log(bound - x)), float32; finite at and beyond the bounds."""
    if bound <= 0:
        raise ValueError(f"log_barrier_penalty: bound must be > 0, got {bound}")
    x = scores.float()
    inside = x.clamp(-bound + _INSIDE, bound - _INSIDE)
    barrier = -(torch.log(inside + bound) + torch.log(bound - inside))
    slope = 1 / (bound - inside) - 1 / (inside + bound)  # d barrier / dx at the clamped point
    return barrier + slope.detach() * (x - inside)


def reward_model_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, gamma: float = DEFAULT_GAMMA,
                      bound: float = DEFAULT_BOUND,
                      penalty_weight: float = DEFAULT_PENALTY_WEIGHT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ranking, penalty) per pair: total = ranking + penalty_weight * penalty, where a pair's
    penalty is that of its chosen score plus that of its rejected score."""
    ranking = focal_ranking_loss(chosen, rejected, gamma)
    penalty = log_barrier_penalty(chosen, bound) + log_barrier_penalty(rejected, bound)
    return ranking + penalty_weight * penalty, ranking, penalty
