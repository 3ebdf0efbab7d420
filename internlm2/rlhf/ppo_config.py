"""The PPO run's configuration (`internlm2 ppo --config FILE --set key=value ...`).

Defaults are the InternLM2 report's choices (§4.2.3; `../shared/reference/internlm2_paper.md` §6.3):
KL coefficient 0.01, GAE gamma 1 and lambda 0.99, no advantage normalisation, no value clipping, actor
lr 1e-6, critic lr 5e-6, top-p 0.9, 50 critic-only warm-up iterations, a pretraining loss with weight
0.5; the clipped policy ratio 0.2 (xtuner's; the report does not say) and the rest configurable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from internlm2.errors import ConfigError
from internlm2.train.config import (CheckpointConfig, DataSource, LoggingConfig, OptimConfig, ParallelSection)


@dataclass
class PromptsConfig:
    """PPO's prompts: JSONL records `{"prompt": ..., "condition": NAME}` (internlm2.data.PromptDataset);
    other fields of a record go to the checker untouched (e.g. the reference answer)."""

    train: str
    on_error: Literal["fail", "skip"] = "fail"


@dataclass
class RolloutConfig:
    prompts_per_iteration: int = 64  # over all data-parallel ranks, one response each
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    micro_batch_size: int = 8  # rollouts per forward pass of the actor, reference and critic
    # prompts per batched generation (None: a DP rank's whole share); a fixed size makes the rollouts
    # independent of the number of DP ranks (each batch's draws are keyed by its first prompt)
    generation_batch_size: int | None = None

    def validate(self):
        if self.prompts_per_iteration < 1 or self.max_new_tokens < 1 or self.micro_batch_size < 1:
            raise ConfigError("prompts_per_iteration, max_new_tokens and micro_batch_size must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"temperature: PPO samples its rollouts, so it must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")


@dataclass
class PPOSection:
    iterations: int = 400  # per round
    kl_coef: float = 0.01
    gamma: float = 1.0
    lam: float = 0.99
    clip: float = 0.2  # of the policy ratio
    value_clip: float | None = None  # the report clips no values
    score_clip: float = 5.0  # reward-model scores are clipped to [-score_clip, score_clip] ...
    normalize_scores: bool = True  # ... then normalised by their running mean and std
    normalize_advantages: bool = False  # the report does not
    epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass (the rollout batch cut into this many)
    critic_warmup: int = 50  # first iterations that train only the critic (the actor stays as it is)

    def validate(self):
        if self.iterations < 1 or self.epochs < 1 or self.mini_batches < 1 or self.critic_warmup < 0:
            raise ConfigError("iterations, epochs and mini_batches must be >= 1 and critic_warmup >= 0")
        if self.kl_coef < 0 or not 0 < self.clip < 1 or self.score_clip <= 0:
            raise ConfigError("need kl_coef >= 0, 0 < clip < 1 and score_clip > 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")


@dataclass
class PTXConfig:
    """The pretraining loss mixed into the actor's update (InternLM2: weight 0.5, about half as much
    pretraining data as PPO data). Rows are packed from prepared datasets (`internlm2 prepare-data`)."""

    data: list[DataSource]
    coef: float = 0.5
    seq_len: int = 512
    rows_per_iteration: int = 8  # over all data-parallel ranks
    micro_batch_size: int = 4

    def validate(self):
        if not self.data or self.coef < 0 or min(self.seq_len, self.rows_per_iteration, self.micro_batch_size) < 1:
            raise ConfigError("ptx: give data, coef >= 0 and positive seq_len, rows_per_iteration, micro_batch_size")


@dataclass
class DetectorConfig:
    """The fast path's reward-hacking detectors, comparing the first and last `window` of a round's
    iterations (each as a fraction of the round)."""

    window: float = 0.25
    length_rise: float = 0.2  # mean response length up by this fraction ...
    reward_tolerance: float = 0.0  # ... while the true reward rose by at most this much
    ngram_sizes: tuple[int, ...] = (2, 3, 4)  # word n-grams watched for spreading
    ngram_late_share: float = 0.3  # an n-gram in at least this share of late responses ...
    ngram_rise: float = 0.2  # ... and in this much more of them than early on
    max_phrases: int = 3
    custom: list[str] = field(default_factory=list)  # "module:function" detectors (see fast_path.py)

    def validate(self):
        if not 0 < self.window <= 0.5:
            raise ConfigError(f"window: must be in (0, 0.5], got {self.window}")


@dataclass
class FastPathConfig:
    """After each round but the last: detect reward-hacking patterns, build preference pairs that contrast
    early-round responses (pattern-free, chosen) with the late-round actor's responses to the same prompts
    (with the pattern, rejected), and train the reward model further on them with its own data."""

    detectors: DetectorConfig = field(default_factory=DetectorConfig)
    min_pairs: int = 20  # per pattern; fewer and the pattern is reported but not patched
    max_pairs: int = 100
    rm_data: str | None = None  # the reward model's preference JSONL, mixed with the patch pairs
    rm_steps: int = 20
    rm_pairs_per_step: int = 16
    rm_lr: float = 1.0e-5
    rm_max_length: int = 1024

    def validate(self):
        if not 1 <= self.min_pairs <= self.max_pairs:
            raise ConfigError(f"need 1 <= min_pairs <= max_pairs, got {self.min_pairs}, {self.max_pairs}")
        if self.rm_steps < 1 or self.rm_pairs_per_step < 1 or self.rm_lr <= 0:
            raise ConfigError("rm_steps and rm_pairs_per_step must be >= 1 and rm_lr > 0")


@dataclass
class PPOConfig:
    run_dir: str
    actor: str  # HF directory of the SFT model: the actor and the frozen reference start from it
    reward_model: str  # HF directory of the (conditional) reward model; its conditions.json names the domains
    prompts: PromptsConfig
    critic: str | None = None  # HF directory whose backbone starts the critic (default: the reward model's)
    checker: str | None = None  # "module:function(record, response_text) -> float": the true reward, logged only
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOSection = field(default_factory=PPOSection)
    actor_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, min_lr_ratio=1.0, weight_decay=0.0))
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6, min_lr_ratio=1.0, weight_decay=0.0))
    ptx: PTXConfig | None = None
    rounds: int = 1
    fast_path: FastPathConfig = field(default_factory=FastPathConfig)
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    seed: int = 1234
    deterministic: bool = False
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self):
        if self.rounds < 1:
            raise ConfigError(f"rounds: must be >= 1, got {self.rounds}")
        for key in ("actor_optim", "critic_optim"):
            if getattr(self, key).warmup_steps > self.total_iterations:
                raise ConfigError(f"{key}.warmup_steps: more than the run's {self.total_iterations} iterations")

    @property
    def total_iterations(self) -> int:
        return self.rounds * self.ppo.iterations
