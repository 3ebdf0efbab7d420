"""The conditional reward model's training objective on the shared engine.

A micro-batch is a packed row of preference pairs (reward_data.py); the scalar head scores each
sequence at its reward token; the loss of a pair is the focal ranking loss plus lambda times the
log-barrier penalty of both scores (losses.py); the engine normalises by the number of pairs of the
global batch. Metrics: ranking loss, penalty, accuracy (chosen scored above rejected), mean chosen and
rejected scores, margin, and accuracy per condition.

Under context parallelism every CP rank gets all the micro-batch's scores (the scalar head sums them
over CP), so each rank's loss is the whole micro-batch's: it is divided by cp here, because the engine
sums losses over DP x CP ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from internlm2.model import InternLM2ForScore
from internlm2.model.heads import BackboneOutput
from internlm2.rlhf.losses import DEFAULT_BOUND, DEFAULT_GAMMA, DEFAULT_PENALTY_WEIGHT, reward_model_loss
from internlm2.rlhf.reward_data import reward_positions
from internlm2.train.engine import Ratio

NO_CONDITION = "none"  # the per-condition accuracy of pairs without a condition


class RewardModelTask:
    model_class = InternLM2ForScore

    def __init__(self, conditions: Sequence[str] = (), *, gamma: float = DEFAULT_GAMMA, bound: float = DEFAULT_BOUND,
                 penalty_weight: float = DEFAULT_PENALTY_WEIGHT):
        self.conditions = list(conditions)
        self.gamma, self.bound, self.penalty_weight = gamma, bound, penalty_weight

    def scores(self, out: BackboneOutput, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) scores of the micro-batch's pairs, float32 [P] each."""
        scores = out.head.scores_at(out, reward_positions(mb["reward_slots"]))
        return scores[0::2], scores[1::2]

    def loss(self, out: BackboneOutput, mb: dict) -> tuple[torch.Tensor, dict]:
        chosen, rejected = self.scores(out, mb)
        total, ranking, penalty = reward_model_loss(chosen, rejected, gamma=self.gamma, bound=self.bound,
                                                    penalty_weight=self.penalty_weight)
        copies = out.parallel.cp_size  # every CP rank holds the same scores
        correct = (chosen > rejected).float()
        metrics = {
            "ranking_loss": ranking.sum() / copies,
            "penalty": penalty.sum() / copies,
            "accuracy": correct.sum() / copies,
            "chosen_score": chosen.sum() / copies,
            "rejected_score": rejected.sum() / copies,
            "margin": (chosen - rejected).sum() / copies,
        }
        for k, name in enumerate([*self.conditions, NO_CONDITION]):
            mine = mb["conditions"] == (k if k < len(self.conditions) else -1)
            metrics[f"accuracy/{name}"] = Ratio(correct[mine].sum() / copies, mine.sum() / copies)
        return total.sum() / copies, metrics

    @staticmethod
    def normalizer(mbs: Sequence[dict]) -> int:
        return sum(len(mb["conditions"]) for mb in mbs)
