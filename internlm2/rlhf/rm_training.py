"""Training the conditional reward model (InternLM2 report §4.2.1) on the staged trainer.

The run is SFT's (`Trainer`: stages, any parallel layout, exact resume, verified checkpoints) with an
`RMTask`:

- model: `init_from`, an SFT model (an HF directory or a training checkpoint), its LM head replaced by
  the one-output `v_head` (initialised as a new model's head); `rm.reward_token` (a piece name or an id)
  becomes the model's `reward_token_id`, the token appended to every sequence whose score is read.
- data: preference JSONL files (internlm2/data/preference.py), `data.train` and the held-out
  `data.eval`; `rm.conditions` maps each domain name to the system prompt a pair's `condition` puts
  first. Files are read and checked when the run starts (reward_data.py: bad records, identical
  chosen/rejected, too long with the reward token fail naming file and line, or are counted by
  `rm.on_error`).
- batches: a stage's `seq_len` is the token budget of one micro-batch (the report: 16,384 tokens); the
  pairs are shuffled by the run's seed and packed in that order into micro-batches of at most that many
  tokens, a pair's chosen and rejected always together (`budget_micro_batches`). Those packed
  micro-batches are the stage's rows: `micro_batch_size` is 1 and `global_batch_size` counts micro-batches
  per step over all DP ranks; every epoch visits the same micro-batches in a new (seed, epoch) order, and
  resume is a count of them, as for pretraining rows.
- loss and metrics: reward_model.py (focal ranking loss + lambda * log-barrier penalty per pair, the mean
  over the pairs of the global batch; accuracy, scores, margin, accuracy per condition), on the training
  batches and, every `eval.every` steps, on the first `eval.rows` micro-batches of the held-out pairs
  (logged as `eval_<metric>`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset

from internlm2.config import ConfigError
from internlm2.data import Tokenizer
from internlm2.rlhf.losses import DEFAULT_BOUND, DEFAULT_GAMMA, DEFAULT_PENALTY_WEIGHT
from internlm2.rlhf.reward_data import RewardPairs, ScoredPair, budget_micro_batches, collate_pairs, resolve_reward_token
from internlm2.rlhf.reward_model import RewardModelTask
from internlm2.rlhf.scorer import CONDITIONS_FILE
from internlm2.train.config import DataConfig, DataSource, OptimConfig, StageConfig, TrainConfig
from internlm2.train.data_setup import DataPaths
from internlm2.train.preflight import run_tokenizer

INTERNLM2_REWARD_TOKEN = "[UNUSED_TOKEN_130]"  # id 92527 in InternLM2's tokenizer, as the released RMs use


@dataclass
class RMOptions:
    conditions: dict[str, str] = field(default_factory=dict)  # domain name -> its system prompt
    reward_token: str | int = INTERNLM2_REWARD_TOKEN  # a piece of the tokenizer, by name or id
    gamma: float = DEFAULT_GAMMA  # focal ranking loss: how much a confidently right pair is discounted
    bound: float = DEFAULT_BOUND  # log-barrier penalty: scores are kept inside (-bound, bound)
    penalty_weight: float = DEFAULT_PENALTY_WEIGHT  # lambda of the total loss
    max_length: int = 8192  # tokens of one sequence with the reward token (the report: 8192)
    on_error: Literal["fail", "skip"] = "fail"  # a bad pair: stop naming it, or count it and go on

    def validate(self):
        if self.gamma < 0 or self.bound <= 0 or self.penalty_weight < 0 or self.max_length < 2:
            raise ConfigError("gamma, penalty_weight: must be >= 0; bound: > 0; max_length: >= 2")
        blank = [name for name, text in self.conditions.items() if not text.strip()]
        if blank:
            raise ConfigError(f"conditions.{blank[0]}: the system prompt is empty")


@dataclass
class RMData(DataConfig):
    """`train`: preference JSONL files (weights ignored: every pair is used once an epoch), `eval`: a
    held-out one; `tokenizer` defaults to init_from's."""

    num_workers: int = 0
    prepared = False  # the files are preference JSONL, read and checked by the task

    def validate(self):
        if self.builtin is not None:
            raise ConfigError("builtin: that is pretraining's demo corpus; a reward model trains on preference JSONL")
        if not self.train:
            raise ConfigError("train: give at least one preference JSONL file")


@dataclass
class RMConfig(TrainConfig):
    model: dict = field(default_factory=dict)  # fields of init_from's model to change
    stages: list[StageConfig] = field(default_factory=list)
    data: RMData = field(default_factory=RMData)
    # the report's recipe: AdamW, cosine 1e-5 -> 5e-6, weight decay 0.01
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, min_lr_ratio=0.5, weight_decay=0.01))
    rm: RMOptions = field(default_factory=RMOptions)

    def validate(self):
        if self.init_from is None:
            raise ConfigError("init_from: a reward model starts from an SFT model (an HF directory or a checkpoint)")
        if "reward_token_id" in self.model:
            raise ConfigError("model.reward_token_id: the reward token is rm.reward_token")
        for s in self.stages:
            if s.micro_batch_size != 1:
                raise ConfigError(f"stages.{s.name}.micro_batch_size: must be 1 (a micro-batch is one packed row of "
                                  f"pairs of at most seq_len tokens), got {s.micro_batch_size}")
            if s.seq_len < 2 * self.rm.max_length:
                raise ConfigError(f"stages.{s.name}.seq_len: the micro-batch budget {s.seq_len} cannot hold a pair "
                                  f"of two rm.max_length={self.rm.max_length} sequences")
            if s.data is not None:
                raise ConfigError(f"stages.{s.name}.data: a reward model stage trains on data.train")
        super().validate()


class PairBatches(Dataset):
    """Packed micro-batches of pairs (`collate_pairs`), at most `budget` tokens each, in a (seed) shuffle."""

    def __init__(self, pairs: Sequence[ScoredPair], budget: int, seed: int, conditions: Sequence[str]):
        self.pairs, self.conditions = pairs, list(conditions)
        self.groups = budget_micro_batches([p.tokens for p in pairs], budget, seed)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict:
        return collate_pairs([self.pairs[j] for j in self.groups[i]], self.conditions)


def one_row(rows: list[dict]) -> dict:
    """The micro-batch of a one-row batch: a row is already a packed micro-batch of pairs."""
    (row,) = rows
    return row


class RMTask(RewardModelTask):
    """The reward model's data, loss and metrics for the `Trainer` (see the module docstring). Resolves the
    reward token with the run's tokenizer and puts it in the run's model (`cfg.model`)."""

    fresh_parameters = ("v_head.weight",)
    pad_fills = {"reward_slots": -1}
    collate = staticmethod(one_row)

    def __init__(self, cfg: RMConfig, report: Callable[[str], None] | None = None):
        o = cfg.rm
        super().__init__(list(o.conditions), gamma=o.gamma, bound=o.bound, penalty_weight=o.penalty_weight)
        self.options, self.seed = o, cfg.seed
        self.report = report or (lambda line: None)
        self.reward_token_id = resolve_reward_token(Tokenizer.load(run_tokenizer(cfg)), o.reward_token)
        cfg.model = {**cfg.model, "reward_token_id": self.reward_token_id}
        self._pairs: dict[str, RewardPairs] = {}

    # ---- data -----------------------------------------------------------------------------------
    def resolve_data(self, cfg: RMConfig, rank: int, barrier: Callable[[], None]) -> DataPaths:
        """The tokenizer and the preference files, every one read and checked now (before any model)."""
        tokenizer = run_tokenizer(cfg)
        loaded = Tokenizer.load(tokenizer)
        for source in [*cfg.data.train, *([cfg.data.eval] if cfg.data.eval else [])]:
            self._open(source.path, loaded)
        return DataPaths(tokenizer, list(cfg.data.train), cfg.data.eval)

    def _open(self, path: str, tokenizer: Tokenizer) -> RewardPairs:
        if path not in self._pairs:
            o = self.options
            pairs = RewardPairs(path, tokenizer, self.reward_token_id, condition_prompts=o.conditions,
                                max_length=o.max_length, on_error=o.on_error)
            skipped = sum(pairs.skips.counts.values())
            self.report(f"rm data {path}: {len(pairs)} pairs, {sum(p.tokens for p in pairs.pairs)} tokens"
                        + (f"; {skipped} skipped\n{pairs.skips.summary()}" if skipped else ""))
            self._pairs[path] = pairs
        return self._pairs[path]

    def stage_dataset(self, sources: list[DataSource], tokenizer: Tokenizer, seq_len: int) -> PairBatches:
        pairs = [pair for s in sources for pair in self._open(s.path, tokenizer).pairs]
        batches = PairBatches(pairs, seq_len, self.seed, self.conditions)
        self.report(f"rm batches: {len(pairs)} pairs in {len(batches)} micro-batches of at most {seq_len} tokens "
                    "(an epoch)")
        return batches

    # ---- held-out metrics -----------------------------------------------------------------------
    @staticmethod
    def eval_metrics(metrics: dict) -> dict:
        return {f"eval_{k}": v for k, v in metrics.items()}


def write_conditions(conditions: dict[str, str], directory: Path) -> Path:
    """The reward model's condition prompts beside its export (`conditions.json`, read by `internlm2 score`)."""
    path = Path(directory) / CONDITIONS_FILE
    path.write_text(json.dumps(conditions, indent=1, ensure_ascii=False) + "\n")
    return path
