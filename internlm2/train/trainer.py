"""The staged training loop: every stage of a run, any parallel layout, exact resume.

A run is `TrainConfig.stages`; the trainer walks them in order, switching sequence length, RoPE base, data
mixture, batch size and learning-rate schedule at each boundary. Its position is `TrainerState` (global
step, stage, step within the stage, samples consumed in the stage): with the model and optimizer states
and every rank's RNG, that is all a checkpoint needs to continue bit for bit (see checkpoint.py).

What is trained is a `Task` (the model class, the loss of a micro-batch, what normalises it, and the data:
where it is and how a stage's rows are made); pretraining's is `NextTokenTask`, the mean next-token loss
over every target token of the global batch, on packed document rows; SFT's is in sft.py, the reward
model's in rlhf/rm_training.py. A task may also set the hooks whose defaults are pretraining's (see
`NextTokenTask`): `collate` (a micro-batch from its rows), `pad_fills` (pad values of its per-token
tensors, see `pad_for_layout`), `fresh_parameters` (parameters `init_from` lacks: a new head, initialised
as a new model's) and `eval_metrics` (what a held-out evaluation logs). The engine
runs the micro-batches, divides by the normaliser and steps; a non-finite loss or gradient norm skips the
step (logged), too many in a row stop the run naming the step and the cause.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from internlm2.constants import DTYPES, IGNORE_INDEX
from internlm2.data import Tokenizer, collate_packed
from internlm2.errors import CheckpointError, UserError
from internlm2.model import InternLM2ForCausalLM, load_into
from internlm2.model.heads import BackboneOutput
from internlm2.train import checkpoint as ckpt
from internlm2.train.checkpoint_dir import CheckpointDirectory, ready_run_directory
from internlm2.train.config import StageConfig, TrainConfig
from internlm2.train.data_setup import (DataPaths, check_eval_rows, eval_batches, micro_batches, pad_for_layout, resolve_data,
                                        stage_dataset, to_device)
from internlm2.train.engine import Engine, StepOutcome, checkpoint_bytes, init_weights
from internlm2.train.flops import DecoderShape, document_lengths, training_flops
from internlm2.train.init_from import init_source
from internlm2.train.metrics import MFUError, Peak, device_peak, peak_memory_bytes, reset_peak_memory, throughput
from internlm2.train.metrics_log import MetricsLogger
from internlm2.train.preemption import StopSignals
from internlm2.train.preflight import plan_run
from internlm2.train.runtime import Runtime
from internlm2.train.schedule import WarmupCosine
from internlm2.train.timers import Timers

UNKNOWN_PEAK = Peak(None, "unknown", "no utilisation: the measured peak was below the achieved rate")
MODEL_UNIT = ckpt.MODEL_UNIT


class TrainingStopped(UserError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why and where."""


class NextTokenTask:
    """The mean next-token loss over the target tokens of the global batch (labels != IGNORE_INDEX)."""

    model_class = InternLM2ForCausalLM

    @staticmethod
    def resolve_data(cfg: TrainConfig, rank: int, barrier: Callable[[], None]) -> DataPaths:
        return resolve_data(cfg.data, Path(cfg.run_dir), rank, barrier)

    stage_dataset = staticmethod(stage_dataset)  # (sources, tokenizer, seq_len) -> the stage's rows

    @staticmethod
    def loss(out: BackboneOutput, mb: dict) -> tuple[torch.Tensor, dict]:
        return out.head.loss(out, mb["labels"], reduction="sum"), {}

    @staticmethod
    def normalizer(mbs: list[dict]) -> int:
        return sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in mbs)

    # ---- the optional hooks (see the module docstring) ----
    collate = staticmethod(collate_packed)
    pad_fills: dict | None = None
    fresh_parameters: tuple[str, ...] = ()

    @staticmethod
    def eval_metrics(metrics: dict) -> dict:
        return {"eval_loss": metrics["loss"], "eval_perplexity": math.exp(min(metrics["loss"], 50.0))}


def _hook(task, name: str):
    """The task's optional hook `name`, else pretraining's."""
    return getattr(task, name, getattr(NextTokenTask, name))


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed in the whole run
    stage: int = 0  # index of the current stage
    stage_step: int = 0  # optimizer steps completed in the current stage
    consumed_samples: int = 0  # packed rows consumed in the current stage (all DP ranks)
    tokens: int = 0  # tokens trained on in the whole run
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    loss_ema: float | None = None  # running mean of the loss, for spike detection

    def to_dict(self) -> dict:
        return asdict(self)


class Trainer:
    def __init__(self, cfg: TrainConfig, task=None):
        self.cfg, self.task = cfg, task or NextTokenTask()
        task = self.task
        self.run_dir = Path(cfg.run_dir)
        plan = plan_run(cfg)  # every check that needs no process group and no data, first
        self.runtime = Runtime.start(plan.layout, deterministic=cfg.deterministic, seed=cfg.seed, **plan.model_shape)
        self.rank, self.device, self.parallel = self.runtime.rank, self.runtime.device, self.runtime.parallel
        self.stop_signals = StopSignals.from_environment(self.device, self.rank)  # before any data is made
        self.data = task.resolve_data(cfg, self.rank, self.runtime.barrier)
        self.tokenizer = Tokenizer.load(self.data.tokenizer)
        if self.tokenizer.vocab_size > plan.model.vocab_size:
            raise UserError(f"model.vocab_size={plan.model.vocab_size} is smaller than the tokenizer's "
                            f"{self.tokenizer.vocab_size} pieces")
        self.timers = Timers(cuda_sync=self.device.type == "cuda")
        o = cfg.optim
        self.engine = Engine.build(task.model_class, plan.model, self.parallel, dtype=DTYPES[cfg.dtype],
                                   device=self.device, seed=cfg.seed, recompute=cfg.recompute, timers=self.timers,
                                   optim=dict(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                              mode=o.mode),
                                   weights=None if cfg.init_from is None else self._init_weights)
        self.state = TrainerState()
        self.checkpoints = CheckpointDirectory(self.run_dir / "checkpoints", cfg.checkpoint.keep, self.rank,
                                               self.runtime.barrier)
        self.shape = DecoderShape.of(plan.model)

    def _init_weights(self, chunks) -> None:
        """`init_from`'s weights into this rank's chunks: an HF directory's, or a training checkpoint's unit
        (its weights only; the run starts at step 0). The task's `fresh_parameters` start as a new model's."""
        fresh = _hook(self.task, "fresh_parameters")
        if fresh:
            init_weights(chunks, self.cfg.seed, self.parallel)  # the source then overwrites all the others
        if init_source(self.cfg.init_from).is_checkpoint:
            ckpt.load_weights(Path(self.cfg.init_from), MODEL_UNIT, chunks, self.parallel, fresh=fresh)
        else:
            self._load_hf(chunks, fresh)

    def _load_hf(self, chunks, fresh=()) -> None:
        """`init_from`'s weights into this rank's chunks: each rank streams its own tensor-parallel shards."""
        load_into(chunks, self.cfg.init_from, self.parallel, config=chunks[0].config, fresh=fresh)

    # ---- the run --------------------------------------------------------------------------------
    def run(self) -> TrainerState:
        cfg = self.cfg
        self.checkpoints.remove_incomplete()
        resumed = self._resume()
        ready_run_directory(self.run_dir, cfg, checkpoint_bytes(self.engine), self.rank, self.runtime.from_rank0)
        self.peak = device_peak(self.device, dtype=DTYPES[cfg.dtype])
        logger = MetricsLogger(self.run_dir, rank=self.rank, total_steps=cfg.total_steps, start_step=self.state.step,
                               tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress)
        if resumed and self.rank == 0:
            print(f"resumed from {resumed} at step {self.state.step} (stage {cfg.stages[self.state.stage].name})",
                  flush=True)
        try:
            with self.stop_signals.catching():
                while self.state.stage < len(cfg.stages):
                    self._run_stage(cfg.stages[self.state.stage], logger)
                    self.state.stage += 1
                    self.state.stage_step = self.state.consumed_samples = 0
        finally:
            logger.close()
        return self.state

    def _run_stage(self, stage: StageConfig, logger: MetricsLogger) -> None:
        cfg, p, state = self.cfg, self.parallel, self.state
        self.engine.update_model_config(rope_theta=stage.rope_theta or self.engine.model_config.rope_theta)
        dataset = self.task.stage_dataset(stage.data or self.data.train, self.tokenizer, stage.seq_len)
        batches = micro_batches(dataset, stage, seed=cfg.seed + state.stage, dp_rank=p.dp_rank, dp_size=p.dp_size,
                                consumed_samples=state.consumed_samples, num_workers=cfg.data.num_workers,
                                collate=_hook(self.task, "collate"))
        accumulation = stage.global_batch_size // (stage.micro_batch_size * p.dp_size)
        schedule = self._schedule(stage)
        eval_set = (self.task.stage_dataset([self.data.eval], self.tokenizer, stage.seq_len)
                    if self.data.eval is not None and cfg.eval.every else None)
        if eval_set is not None:  # the rows the preflight counted may pack into fewer (reward-model pairs)
            check_eval_rows(len(eval_set), cfg.eval.rows, stage, p.dp_size, self.data.eval.path)
        while state.stage_step < stage.steps:
            lr = schedule(state.stage_step)
            self.engine.set_lr(lr)
            reset_peak_memory(self.device)
            start = time.perf_counter()
            with self.timers("data"):
                mbs = [self._prepare(next(batches)) for _ in range(accumulation)]
            metrics, outcome, counts = self.train_step(mbs)
            seconds = time.perf_counter() - start
            state.step += 1
            state.stage_step += 1
            state.consumed_samples += stage.global_batch_size
            self._after_step(stage, metrics, outcome, counts, lr, seconds, logger)
            if eval_set is not None and state.step % cfg.eval.every == 0:
                logger.log(state.step, _hook(self.task, "eval_metrics")(self.evaluate(eval_set, stage)))
            stop = self.stop_signals.stop_requested()  # a collective: the same answer on every rank
            if stop or state.stage_step == stage.steps or state.step % cfg.checkpoint.every == 0:
                self.save_checkpoint()
            if stop:
                raise self.stop_signals.stopped(state.step)

    def _prepare(self, batch: dict) -> dict:
        """A collated micro-batch on the device, padded as the layout needs (`pad_for_layout`)."""
        return to_device(pad_for_layout(batch, self.parallel, self.tokenizer.pad_id, _hook(self.task, "pad_fills")),
                         self.device)

    def _schedule(self, stage: StageConfig) -> Callable[[int], float]:
        """This stage's learning rate by its own step: its own schedule, or its span of the run-wide one."""
        if stage.lr is not None:
            return WarmupCosine(stage.lr.peak_lr, stage.lr.warmup_steps, stage.steps, stage.lr.min_lr_ratio)
        o = self.cfg.optim
        start = sum(s.steps for s in self.cfg.stages[: self.state.stage])
        run_wide = WarmupCosine(o.lr, o.warmup_steps, self.cfg.total_steps, o.min_lr_ratio)
        return lambda stage_step: run_wide(start + stage_step)

    def train_step(self, mbs: list[dict]) -> tuple[dict, StepOutcome, dict]:
        """One optimizer step over this rank's micro-batches: (metrics, outcome, throughput counts)."""
        counts = torch.tensor([sum(mb["input_ids"].numel() for mb in mbs),
                               sum(training_flops(self.shape, document_lengths(mb["cu_seqlens"])) for mb in mbs)],
                              dtype=torch.float64, device=self.device)
        if self.runtime.distributed:  # CP ranks hold the same rows: count them over DP only
            torch.distributed.all_reduce(counts, group=self.parallel.dp_group)
        metrics = self.engine.forward_backward(mbs, self.task.loss, self.task.normalizer(mbs))
        outcome = self.engine.step(self.cfg.optim.grad_clip)
        return metrics, outcome, {"tokens": int(counts[0]), "flops": int(counts[1])}

    def _after_step(self, stage: StageConfig, metrics: dict, outcome: StepOutcome, counts: dict, lr: float,
                    seconds: float, logger: MetricsLogger) -> None:
        state, guards = self.state, self.cfg.guards
        loss = metrics["loss"]
        values = {**metrics, "grad_norm": outcome.grad_norm, "lr": lr, "stage": stage.name,
                  "peak_memory_gib": peak_memory_bytes(self.device) / 2**30}
        rates = dict(**counts, seconds=seconds, num_devices=self.parallel.world_size)
        try:
            values.update(throughput(**rates, peak=self.peak))
        except MFUError as err:  # a measured CPU peak can undershoot on a busy machine: report, don't stop
            values.update(throughput(**rates, peak=UNKNOWN_PEAK))
            values["mfu_note"] = str(err)
        times = self.timers.elapsed()
        # Forward and backward interleave in the pipeline schedule: backward (with the receives, sends and
        # overlapped gradient reductions inside it) is what the schedule took beyond the forward passes.
        times["backward"] = times.pop("forward_backward", 0.0) - times.get("forward", 0.0)
        values.update({f"time_{k}_s": v for k, v in times.items()})
        if outcome.skipped:
            state.skipped_steps += 1
            state.nonfinite_in_a_row += 1
            values["skipped"] = f"non-finite {outcome.cause}"
            logger.log(state.step, values)
            if state.nonfinite_in_a_row >= guards.max_nonfinite_in_a_row:
                raise TrainingStopped(f"step {state.step} (stage {stage.name}): {state.nonfinite_in_a_row} steps in "
                                      f"a row had a non-finite {outcome.cause}; stopping "
                                      "(guards.max_nonfinite_in_a_row)")
            return
        state.nonfinite_in_a_row = 0
        state.tokens += counts["tokens"]
        if state.loss_ema is not None and loss > guards.spike_factor * state.loss_ema:
            values["loss_spike"] = loss / state.loss_ema
            if self.rank == 0:
                print(f"step {state.step}: loss spike {loss:.4f} is {values['loss_spike']:.1f}x its running mean",
                      flush=True)
        state.loss_ema = loss if state.loss_ema is None else 0.9 * state.loss_ema + 0.1 * loss
        if state.step % self.cfg.logging.every == 0 or state.stage_step == stage.steps:
            logger.log(state.step, values)

    def evaluate(self, dataset, stage: StageConfig) -> dict[str, float]:
        """The task's loss and metrics over the held-out rows (`eval.rows`, the same rows for every layout)."""
        p = self.parallel
        mbs = [self._prepare(mb) for mb in eval_batches(dataset, stage.micro_batch_size, self.cfg.eval.rows,
                                                         p.dp_rank, p.dp_size, collate=_hook(self.task, "collate"))]
        return self.engine.evaluate(mbs, self.task.loss, self.task.normalizer(mbs))

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        loop = {"trainer": self.state.to_dict(), "stages": [s.name for s in self.cfg.stages]}
        with self.timers("checkpoint"):
            return self.checkpoints.save(
                self.state.step, lambda d: ckpt.save(d, {MODEL_UNIT: self.engine}, loop, self.cfg, self.parallel))

    def _resume(self) -> Path | None:
        # The run's own latest verified checkpoint wins: `checkpoint.load` only seeds a run that has none.
        source = ckpt.choose_resume(self.checkpoints, self.cfg.checkpoint.load, self.parallel)
        if source is None:
            return None
        loop = ckpt.load(source, {MODEL_UNIT: self.engine}, self.parallel)
        names = [s.name for s in self.cfg.stages]
        if loop["stages"] != names[: len(loop["stages"])]:
            raise CheckpointError(f"{source}: saved with stages {loop['stages']}, but the config has {names}; a run "
                                  "can only be extended with later stages")
        for key, value in loop["trainer"].items():
            setattr(self.state, key, value)
        return source
