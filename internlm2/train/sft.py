"""Supervised fine-tuning (InternLM2 report §4.1): the staged trainer with SFT's data and loss.

The run is pretraining's (`Trainer`: stages, any parallel layout, exact resume, verified checkpoints,
HF export) with an `SFTTask`:

- data: prepared datasets (`internlm2 prepare-data`); chat data (`--format chat`, ChatML with the
  assistant-only mask) is packed whole-conversation (conversation_packing.py: first-fit or best-fit,
  truncate or drop what is longer than a row, counted), pretraining text (`--format text`) is cut into
  rows as pretraining does, and a stage mixes them by weight (the report mixes long-context books and code
  into SFT). `data.tasks` makes the verifiable demo tasks (internlm2/tasks) under the run directory.
- loss: on the assistant's content and closing `<|im_end|>` (all assistant turns, or the last: `sft.
  train_on`), normalised by the global number of trained tokens (`token`, the default: the mean over the
  global batch, pretraining's formula) or per conversation (`conversation`: each conversation's mean token
  loss, averaged over the conversations of the global batch; a pretraining row's document pieces count as
  conversations). Both are exact under packing, accumulation and data parallelism: the engine divides the
  summed loss once by the global count.
- model: `init_from` (an HF directory or a pretraining run's checkpoint, see init_from.py); `model` only
  changes fields of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch

from internlm2.config import ConfigError
from internlm2.constants import IGNORE_INDEX
from internlm2.data import ConversationPackedDataset, PackedDataset, PreparedDataset, Tokenizer
from internlm2.data.prepare import PrepareOptions, prepare
from internlm2.model.heads import BackboneOutput
from internlm2.train.config import DataConfig, DataSource, OptimConfig, StageConfig, TrainConfig
from internlm2.train.data_setup import DataPaths, stage_dataset
from internlm2.train.engine import Ratio
from internlm2.train.preflight import run_tokenizer
from internlm2.train.trainer import NextTokenTask


@dataclass
class SFTOptions:
    train_on: Literal["all", "last"] = "all"  # which assistant turns are trained
    packing: Literal["first_fit", "best_fit"] = "best_fit"
    overlong: Literal["truncate", "drop"] = "truncate"  # a conversation longer than a row
    loss_normalization: Literal["token", "conversation"] = "token"
    on_error: Literal["fail", "skip"] = "fail"  # a conversation that keeps no trained token when truncated


@dataclass
class TaskData:
    """The verifiable demo tasks (internlm2/tasks), made under `<run_dir>/data` on first use: `train_per_task`
    training conversations per task, added to `data.train` with `weight`, and `eval_per_task` held-out ones
    (the eval set unless `data.eval` is given; their prompts are also what `task_eval` asks)."""

    train_per_task: int = 500
    eval_per_task: int = 50
    seed: int = 0
    weight: float = 1.0
    tasks: list[str] | None = None  # None: all of them

    def validate(self):
        if self.train_per_task < 1 or self.eval_per_task < 1 or self.weight <= 0:
            raise ConfigError("train_per_task, eval_per_task: must be >= 1; weight: must be > 0")


@dataclass
class SFTData(DataConfig):
    """`train`: prepared chat and/or text datasets with weights; `tokenizer` defaults to init_from's."""

    tasks: TaskData | None = None

    def validate(self):
        if self.builtin is not None:
            raise ConfigError("builtin: that is pretraining's demo corpus; SFT's demo data is `tasks: {}`")
        if not self.train and self.tasks is None:
            raise ConfigError("train: give at least one prepared dataset, or `tasks: {}`")


@dataclass
class TaskEval:
    """Before and after training, greedy answers to the held-out task prompts, scored per task (exact match,
    correct, format); written to `<run_dir>/task_eval.json`. Needs `data.tasks`."""

    max_new_tokens: int = 64
    batch_size: int = 32


@dataclass
class SFTConfig(TrainConfig):
    model: dict = field(default_factory=dict)  # fields of init_from's model to change
    stages: list[StageConfig] = field(default_factory=list)
    data: SFTData = field(default_factory=SFTData)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4e-5))  # the report's 7B/20B SFT lr
    sft: SFTOptions = field(default_factory=SFTOptions)
    task_eval: TaskEval | None = None

    def validate(self):
        if self.init_from is None:
            raise ConfigError("init_from: SFT starts from a model (an HF directory or a training checkpoint)")
        if self.task_eval is not None and self.data.tasks is None:
            raise ConfigError("task_eval: evaluates the demo tasks; it needs data.tasks")
        super().validate()


def task_data_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "data"


def make_task_data(cfg: TaskData, tokenizer: Tokenizer, data_dir: Path) -> None:
    """The demo tasks as JSONL (`tasks_<split>.jsonl`) and prepared chat datasets (`tasks_<split>/`); each
    step is skipped when its output exists (the data tools write atomically and resume)."""
    from internlm2.tasks.verifiable import TASK_NAMES, make_examples, write_jsonl

    data_dir.mkdir(parents=True, exist_ok=True)
    for split, per_task in (("train", cfg.train_per_task), ("eval", cfg.eval_per_task)):
        jsonl = data_dir / f"tasks_{split}.jsonl"
        if not jsonl.is_file():
            tmp = write_jsonl(make_examples(split, per_task, cfg.seed, cfg.tasks or TASK_NAMES),
                              data_dir / f".tasks_{split}.jsonl.tmp")
            tmp.replace(jsonl)
        summary = prepare([str(jsonl)], tokenizer, data_dir / f"tasks_{split}", PrepareOptions(format="chat"))
        if summary["made_now"]:
            print(f"data: prepared the {split} tasks: {summary['num_docs']} conversations, {summary['num_tokens']} "
                  "tokens", flush=True)


def _sequences(labels: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets per sequence, each token's sequence) of packed pieces (`cu_seqlens`) or padded rows."""
    targets = (labels != IGNORE_INDEX).float()
    if cu_seqlens is None:
        rows = torch.arange(labels.shape[0], device=labels.device)
        return targets.sum(-1), rows[:, None].expand(labels.shape)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=labels.device), lengths)
    return torch.zeros(len(lengths), device=labels.device).index_add(0, sequence, targets), sequence


def sequence_weights(labels: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Per token: 1 / (its sequence's target count) where the token has a target, else 0."""
    counts, sequence = _sequences(labels, cu_seqlens)
    return (labels != IGNORE_INDEX).float() / counts[sequence].clamp(min=1)


def trained_sequences(mb: dict) -> int:
    """Sequences of a micro-batch with at least one target (the per-conversation normaliser)."""
    return int(torch.count_nonzero(_sequences(mb["labels"], mb.get("cu_seqlens"))[0]))


class SFTTask:
    """SFT's data and loss for the `Trainer` (see the module docstring)."""

    model_class = NextTokenTask.model_class

    def __init__(self, options: SFTOptions, report: Callable[[str], None] | None = None):
        self.options = options
        self.report = report or (lambda line: None)

    # ---- data -----------------------------------------------------------------------------------
    def resolve_data(self, cfg: SFTConfig, rank: int, barrier: Callable[[], None]) -> DataPaths:
        tokenizer = run_tokenizer(cfg)
        train, held_out = list(cfg.data.train), cfg.data.eval
        if cfg.data.tasks is not None:
            data_dir = task_data_dir(cfg.run_dir)
            if rank == 0:
                make_task_data(cfg.data.tasks, Tokenizer.load(tokenizer), data_dir)
            barrier()
            train.insert(0, DataSource(str(data_dir / "tasks_train"), cfg.data.tasks.weight))
            held_out = held_out or DataSource(str(data_dir / "tasks_eval"))
        return DataPaths(tokenizer, train, held_out)

    def stage_dataset(self, sources: list[DataSource], tokenizer: Tokenizer, seq_len: int):
        return stage_dataset(sources, tokenizer, seq_len, partial(self._rows, tokenizer=tokenizer))

    def _rows(self, prepared: PreparedDataset, seq_len: int, tokenizer: Tokenizer):
        if not prepared.has_mask:
            return PackedDataset(prepared, seq_len)
        o = self.options
        rows = ConversationPackedDataset(prepared, seq_len, pad_id=tokenizer.pad_id, packing=o.packing,
                                         overlong=o.overlong, train_on=o.train_on, on_error=o.on_error)
        r = rows.report
        self.report(f"sft data {prepared.path} at seq_len {seq_len}: {r['conversations']} conversations in "
                    f"{r['rows']} rows ({o.packing}, {r['fill']:.1%} filled); longer than a row: {r['truncated']} "
                    f"truncated, {r['dropped']} dropped, {r['skipped']} skipped")
        if r["skipped"]:
            self.report(rows.skips.summary())
        return rows

    # ---- loss -----------------------------------------------------------------------------------
    def loss(self, out: BackboneOutput, mb: dict) -> tuple[torch.Tensor, dict]:
        if self.options.loss_normalization == "token":
            return NextTokenTask.loss(out, mb)
        logp = out.head.token_logprobs(out, mb["labels"])
        weights = out.tokens(sequence_weights(mb["labels"], mb.get("cu_seqlens")), "weights")
        targets = out.tokens(mb["labels"], "labels") != IGNORE_INDEX
        return -(logp * weights).sum(), {"token_loss": Ratio(-(logp * targets).sum(), targets.sum())}

    def normalizer(self, mbs: list[dict]) -> int:
        if self.options.loss_normalization == "token":
            return NextTokenTask.normalizer(mbs)
        return sum(trained_sequences(mb) for mb in mbs)
