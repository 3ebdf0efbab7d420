"""The training run's configuration (`internlm2 pretrain --config FILE --set key=value ...`).

A run is a list of stages: each has its sequence length, RoPE base, data mixture, step count, batch size
and optionally its own learning-rate schedule, so InternLM2's 4k -> 32k curriculum (RoPE base 50,000 ->
1,000,000, then annealing) is configuration, not code; see configs/internlm2-7b-pretrain.yaml.
"""

from dataclasses import dataclass, field
from typing import Any, Literal

from internlm2.config import ConfigError


@dataclass
class DataSource:
    """A prepared dataset (`internlm2 prepare-data` output directory) and its mixture weight."""

    path: str
    weight: float = 1.0

    def validate(self):
        if self.weight <= 0:
            raise ConfigError(f"weight: must be > 0, got {self.weight}")


@dataclass
class BuiltinData:
    """Makes the demo data when it is missing: a tokenizer trained on Python's standard-library sources
    and a prepared dataset of them, under `<run dir>/data`."""

    vocab_size: int = 4096
    max_bytes: int = 8_000_000  # of stdlib source text to prepare
    eval_fraction: float = 0.02  # held-out documents for evaluation

    def validate(self):
        if not 0 < self.eval_fraction < 0.5:
            raise ConfigError(f"eval_fraction: must be within (0, 0.5), got {self.eval_fraction}")


@dataclass
class DataConfig:
    tokenizer: str | None = None  # directory with tokenizer.model (None with `builtin`)
    train: list[DataSource] = field(default_factory=list)  # default mixture for every stage
    eval: DataSource | None = None  # held-out data for evaluation (weight ignored)
    builtin: BuiltinData | None = None  # demo data made on first use instead of train/eval/tokenizer
    num_workers: int = 1

    def validate(self):
        if self.builtin is None and (self.tokenizer is None or not self.train):
            raise ConfigError("tokenizer/train: give a tokenizer and at least one train dataset, or `builtin: {}`")
        if self.builtin is not None and (self.tokenizer is not None or self.train or self.eval is not None):
            raise ConfigError("builtin: the demo data makes its own tokenizer and datasets; drop builtin to give "
                              "tokenizer/train/eval")


@dataclass
class LRSchedule:
    peak_lr: float
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1


@dataclass
class StageConfig:
    name: str
    steps: int
    seq_len: int
    global_batch_size: int  # packed rows per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 1  # packed rows per forward pass on one rank
    rope_theta: float | None = None  # None: the model's
    data: list[DataSource] | None = None  # None: data.train
    lr: LRSchedule | None = None  # None: this stage's span of the run-wide schedule (optim)

    def validate(self):
        for key in ("steps", "seq_len", "global_batch_size", "micro_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.rope_theta is not None and self.rope_theta <= 1:
            raise ConfigError(f"rope_theta: must be > 1, got {self.rope_theta}")


@dataclass
class OptimConfig:
    lr: float = 3e-4  # run-wide peak, warmup then cosine to min_lr_ratio * lr over all stages
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    mode: Literal["zero1", "ddp"] = "zero1"

    def validate(self):
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"grad_clip: must be > 0 or null, got {self.grad_clip}")


@dataclass
class ParallelSection:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int | None = None  # None: world size / (tp * pp * cp)
    virtual_stages: int = 1
    sequence_parallel: bool = False
    zero1_size: int | None = None  # DP ranks sharing one optimizer-state copy (None: all)


@dataclass
class CheckpointConfig:
    every: int = 100  # optimizer steps between checkpoints (and one at the end of every stage)
    keep: int = 3
    export_hf: bool = True  # save_pretrained() into <run dir>/hf at the end
    load: str | None = None  # a checkpoint directory to start from (default: the run's latest)


@dataclass
class GuardConfig:
    max_nonfinite_in_a_row: int = 3  # steps with a NaN/inf loss or grad norm are skipped; this many stops
    spike_factor: float = 3.0  # loss above this many times its running mean is logged as a spike


@dataclass
class EvalConfig:
    """The held-out loss: the first `rows` packed rows of the eval set at each stage's sequence length,
    the same rows whatever the parallel layout (a resumed run with another dp continues the same curve)."""

    every: int = 50  # optimizer steps between held-out evaluations (0: never)
    rows: int = 32

    def validate(self):
        if self.every < 0 or self.rows < 1:
            raise ConfigError(f"every/rows: need every >= 0 and rows >= 1, got {self.every}, {self.rows}")


@dataclass
class LoggingConfig:
    every: int = 1
    tensorboard: bool = True
    progress: bool = True


@dataclass
class SampleConfig:
    """A generation at the end of the run, printed and saved, so a demo shows what the model learned."""

    prompt: str = "def "
    max_new_tokens: int = 48
    temperature: float = 0.8  # 0: greedy
    top_p: float = 0.95
    seed: int = 0


@dataclass
class TrainConfig:
    run_dir: str
    model: dict[str, Any]  # ModelConfig fields; `preset: NAME` starts from a preset (with init_from: changes to it)
    stages: list[StageConfig]
    data: DataConfig = field(default_factory=DataConfig)
    init_from: str | None = None  # an HF directory or a training checkpoint to start from (see init_from.py)
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    recompute: Literal["none", "selective", "full"] = "none"
    seed: int = 1234
    deterministic: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig | None = None

    def validate(self):
        from internlm2.model import ModelConfig

        if not self.stages:
            raise ConfigError("stages: a run needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stages: stage names must be unique, got {names}")
        if self.optim.warmup_steps > self.total_steps:
            raise ConfigError(f"optim.warmup_steps: {self.optim.warmup_steps} is more than the run's "
                              f"{self.total_steps} steps")
        if self.init_from is None:  # else `model` changes init_from's config, checked with it (preflight)
            try:
                ModelConfig.from_dict(self.model)
            except ValueError as err:
                raise ConfigError(f"model: {err}") from None

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)
