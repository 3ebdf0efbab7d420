"""Learning-rate schedule: linear warmup to the peak, cosine decay to a floor (InternLM2: 10% of peak)."""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosine:
    peak_lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        if self.peak_lr <= 0:
            raise ValueError(f"peak_lr must be > 0, got {self.peak_lr}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be within [0, total_steps={self.total_steps}]")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be within [0, 1], got {self.min_lr_ratio}")

    def __call__(self, step: int) -> float:
        """The learning rate for optimizer step `step` (0-based); constant at the floor after total_steps."""
        floor = self.peak_lr * self.min_lr_ratio
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps == 0 or step >= self.total_steps:
            return floor if decay_steps else self.peak_lr
        progress = (step - self.warmup_steps) / decay_steps
        return floor + (self.peak_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
