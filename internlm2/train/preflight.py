"""Everything about a run that can be checked before any process group waits or any data is made.

`plan_run(cfg)` resolves the model configuration (`init_from`'s when given, see init_from.py; else its
vocabulary from the tokenizer, padded for the layout), the parallel layout against the launcher's world
size and the model's shape, each stage's batch arithmetic against the layout, the held-out set against
the data-parallel size, and every path the run reads (the tokenizer: `data.tokenizer`, else init_from's).
A problem raises `ConfigError` naming its cause (`parallel.tp=3 ...`, not a later `dp=0`), which the CLI
prints as one line, within a second of starting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from internlm2.data import PreparedDataset, Tokenizer
from internlm2.errors import ConfigError
from internlm2.model import ModelConfig
from internlm2.parallel import ParallelConfig
from internlm2.train.config import TrainConfig
from internlm2.train.init_from import init_source
from internlm2.train.runtime import launched_world_size


@dataclass(frozen=True)
class RunPlan:
    layout: ParallelConfig
    model: ModelConfig

    @property
    def model_shape(self) -> dict:
        return self.shape_of(self.model)

    @staticmethod
    def shape_of(m: ModelConfig) -> dict:
        """What the layout is validated against (`ParallelConfig.validate`'s model keywords)."""
        return dict(num_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                    num_kv_heads=m.num_key_value_heads, vocab_size=m.vocab_size)


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def run_tokenizer(cfg: TrainConfig) -> Path:
    """The tokenizer a run reads (not the built-in demo's, which is trained later): `data.tokenizer`, else
    the one that comes with `init_from`."""
    if cfg.data.tokenizer is not None:
        return Path(cfg.data.tokenizer)
    source = init_source(cfg.init_from) if cfg.init_from is not None else None
    if source is None or source.tokenizer is None:
        raise ConfigError(f"data.tokenizer: not given, and init_from {cfg.init_from} brings no tokenizer")
    return source.tokenizer


def tokenizer_vocab_size(cfg: TrainConfig) -> int:
    """Pieces of the run's tokenizer (the built-in demo's as configured: it is trained later)."""
    if cfg.data.builtin is not None:
        return cfg.data.builtin.vocab_size
    return Tokenizer.load(run_tokenizer(cfg)).vocab_size


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    """`cfg.model` with the vocabulary filled in: the demo's tokenizer decides it, padded for efficient
    matmuls and TP splits, unless the config gives one (which must hold the tokenizer's pieces)."""
    vocab = tokenizer_vocab_size(cfg)
    if cfg.init_from is not None:
        config = init_source(cfg.init_from).model_config(cfg.model)
    else:
        model = dict(cfg.model)
        if cfg.data.builtin is not None and "vocab_size" not in model:
            model["vocab_size"] = _round_up(vocab, 64 * cfg.parallel.tp)
        try:
            config = ModelConfig.from_dict(model)
        except ValueError as err:
            raise ConfigError(f"model: {err}") from None
    if config.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={config.vocab_size} is smaller than the tokenizer's {vocab} pieces")
    return config


def resolve_layout(cfg: TrainConfig, world_size: int, model_shape: dict) -> ParallelConfig:
    """The layout for the launched world, validated against the model's shape; when tp*pp*cp does not
    divide the world, the error also names what else is wrong with the sizes."""
    p = cfg.parallel
    choices = dict(virtual_stages=p.virtual_stages, sequence_parallel=p.sequence_parallel)
    try:
        layout = ParallelConfig.for_world(world_size, tp=p.tp, pp=p.pp, cp=p.cp, dp=p.dp, zero1_size=p.zero1_size,
                                          **choices)
    except ConfigError as err:
        try:
            ParallelConfig(tp=p.tp, pp=p.pp, cp=p.cp, **choices).validate(**model_shape)
        except ConfigError as more:
            raise ConfigError(f"{err}; {str(more).removeprefix('parallel layout: ')}") from None
        raise
    layout.validate(world_size, **model_shape)
    return layout


def check_stages(cfg: TrainConfig, layout: ParallelConfig) -> None:
    """Each stage's batch arithmetic against the layout, and the held-out set's micro-batches."""
    for s in cfg.stages:
        where = f"stages.{s.name}"
        if s.global_batch_size % (s.micro_batch_size * layout.dp):
            raise ConfigError(f"{where}: global_batch_size={s.global_batch_size} is not divisible by "
                              f"micro_batch_size * dp = {s.micro_batch_size} * {layout.dp}")
        micro_batches = s.global_batch_size // (s.micro_batch_size * layout.dp)
        if layout.virtual_stages > 1 and micro_batches % layout.pp:
            raise ConfigError(f"{where}: interleaved pipelining (virtual_stages={layout.virtual_stages}) needs the "
                              f"micro-batches per step ({micro_batches}) to be a multiple of pp={layout.pp}")
        if layout.sequence_parallel and layout.cp == 1 and (s.seq_len * s.micro_batch_size) % layout.tp:
            raise ConfigError(f"{where}: sequence parallel needs seq_len * micro_batch_size = "
                              f"{s.seq_len * s.micro_batch_size} divisible by tp={layout.tp}")
        eval_micro_batches = math.ceil(cfg.eval.rows / s.micro_batch_size)
        if cfg.eval.every and eval_micro_batches < layout.dp:
            raise ConfigError(f"eval.rows={cfg.eval.rows}: {eval_micro_batches} micro-batches of stage {s.name} "
                              f"cannot give each of dp={layout.dp} ranks one")


def check_paths(cfg: TrainConfig) -> None:
    """Every file the run reads exists and opens (prepared datasets with the run's tokenizer)."""
    if cfg.data.builtin is None:
        fingerprint = Tokenizer.load(run_tokenizer(cfg)).fingerprint
        sources = [*cfg.data.train, *([cfg.data.eval] if cfg.data.eval else []),
                   *(d for s in cfg.stages for d in (s.data or []))]
        for source in sources:
            PreparedDataset(source.path, fingerprint)
    if cfg.checkpoint.load is not None and not Path(cfg.checkpoint.load).is_dir():
        raise ConfigError(f"checkpoint.load: {cfg.checkpoint.load} does not exist")


def plan_run(cfg: TrainConfig, world_size: int | None = None) -> RunPlan:
    world_size = launched_world_size() if world_size is None else world_size
    model = resolve_model_config(cfg)
    layout = resolve_layout(cfg, world_size, RunPlan.shape_of(model))
    check_stages(cfg, layout)
    check_paths(cfg)
    return RunPlan(layout, model)
