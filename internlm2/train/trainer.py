"""The trainer: one loop for every stage of a run, any parallel layout, exact resume.

A run is `TrainConfig.stages`; the trainer walks them in order, switching sequence length, RoPE base, data
mixture, batch size and learning-rate schedule at each boundary. Its position is `TrainerState` (global
step, stage, step within the stage, samples consumed in the stage): with the model and optimizer states
and every rank's RNG, that is all a checkpoint needs to continue bit for bit (see checkpoint.py).

One optimizer step: this rank's micro-batches (gradient accumulation) go through `run_pipeline` (plain
accumulation at pp=1, 1F1B or interleaved 1F1B otherwise); each micro-batch's loss is the sum over its
tokens scaled so that the gradients are those of the mean over every non-ignored token of the global
batch, however tokens fall into rows, micro-batches and ranks; then the distributed optimizer reduces,
clips and steps. A non-finite loss or gradient norm skips the step (logged); too many in a row stop the
run naming the step and the cause.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from internlm2.config import save_yaml
from internlm2.data import Tokenizer
from internlm2.data.packing import pad_pieces
from internlm2.model import InternLM2ForCausalLM, ModelConfig
from internlm2.parallel import ParallelConfig, ParallelState, init_distributed
from internlm2.parallel.optimizer import DistributedOptimizer
from internlm2.parallel.pipeline import forward_only, local_stages, run_pipeline
from internlm2.parallel.recompute import apply_activation_recompute
from internlm2.parallel.tensor_parallel import local_shard
from internlm2.train import checkpoint as ckpt
from internlm2.train.checkpoint_dir import CheckpointDirectory, CheckpointError, check_writable
from internlm2.train.config import StageConfig, TrainConfig
from internlm2.train.data_setup import eval_batches, micro_batches, resolve_data, stage_dataset, to_device
from internlm2.train.flops import DecoderShape, document_lengths, training_flops
from internlm2.train.launch_env import pg_timeout_s
from internlm2.train.metrics import MFUError, Peak, device_peak, peak_memory_bytes, reset_peak_memory, throughput
from internlm2.train.metrics_log import MetricsLogger
from internlm2.train.preemption import StopSignals
from internlm2.train.schedule import WarmupCosine
from internlm2.train.timers import Timers

IGNORE_INDEX = -100
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
UNKNOWN_PEAK = Peak(None, "unknown", "no utilisation: the measured peak was below the achieved rate")


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why and where."""


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


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    flops: int
    skipped: bool = False
    cause: str = ""
    extra: dict = field(default_factory=dict)


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        timeout = pg_timeout_s(600.0)
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed:
            init_distributed(timeout_s=timeout)
        world = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
                       else torch.device("cpu"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.seed)

        self.data = resolve_data(cfg.data, self.run_dir, self.rank, self.barrier)
        self.tokenizer = Tokenizer.load(self.data.tokenizer)
        p = cfg.parallel
        dp = p.dp if p.dp is not None else world // (p.tp * p.pp * p.cp)
        self.parallel_config = ParallelConfig(tp=p.tp, pp=p.pp, dp=dp, cp=p.cp, virtual_stages=p.virtual_stages,
                                              zero1_size=p.zero1_size, sequence_parallel=p.sequence_parallel)
        self.model_config = self._model_config()
        shape = dict(num_layers=self.model_config.num_layers, num_attention_heads=self.model_config.num_attention_heads,
                     num_kv_heads=self.model_config.num_key_value_heads, vocab_size=self.model_config.vocab_size)
        if self.distributed:
            self.parallel = ParallelState(self.parallel_config, timeout_s=timeout, **shape)
        else:
            self.parallel_config.validate(1, **shape)
            self.parallel = ParallelState.single(self.parallel_config)
        self._check_layout_supports_stages()

        dtype = _DTYPES[cfg.dtype]
        self.chunks = [
            InternLM2ForCausalLM(self.model_config, self.parallel, layer_ids=spec.layer_ids,
                                 with_embedding=spec.with_embedding, with_head=spec.with_head, dtype=dtype,
                                 device=self.device)
            for spec in local_stages(self.model_config.num_layers, self.parallel)
        ]
        self._init_weights()
        apply_activation_recompute([layer for c in self.chunks for layer in c.model.layers.values()], cfg.recompute)
        o = cfg.optim
        self.optimizer = DistributedOptimizer(
            [(n, q) for c in self.chunks for n, q in c.named_parameters()], self.parallel, lr=o.lr, betas=o.betas,
            eps=o.eps, weight_decay=o.weight_decay, mode=o.mode)
        self.state = TrainerState()
        self.checkpoints = CheckpointDirectory(self.run_dir / "checkpoints", cfg.checkpoint.keep, self.rank, self.barrier)
        self.shape = DecoderShape.of(self.model_config)
        self.timers = Timers(cuda_sync=self.device.type == "cuda")
        self.stop_signals = StopSignals.from_environment(self.device, self.rank)

    # ---- construction ---------------------------------------------------------------------------
    def _model_config(self) -> ModelConfig:
        model = dict(self.cfg.model)
        tp = self.cfg.parallel.tp
        vocab = self.tokenizer.vocab_size
        if self.cfg.data.builtin is not None and "vocab_size" not in model:
            # The demo's tokenizer decides the vocabulary, padded for efficient matmuls and TP splits.
            model["vocab_size"] = _round_up(vocab, 64 * tp)
        config = ModelConfig.from_dict(model)
        if config.vocab_size < vocab:
            raise ValueError(f"model.vocab_size={config.vocab_size} is smaller than the tokenizer's {vocab} pieces")
        return config

    def _check_layout_supports_stages(self) -> None:
        p = self.parallel
        for s in self.cfg.stages:
            rows = s.global_batch_size // (s.micro_batch_size * p.dp_size)
            if s.global_batch_size % (s.micro_batch_size * p.dp_size):
                raise ValueError(f"stage {s.name}: global_batch_size={s.global_batch_size} is not divisible by "
                                 f"micro_batch_size * dp = {s.micro_batch_size} * {p.dp_size}")
            if p.pp_size > 1 and rows < p.pp_size and p.virtual_stages > 1:
                raise ValueError(f"stage {s.name}: interleaved pipelining needs at least pp={p.pp_size} "
                                 f"micro-batches per step, got {rows}")
            if p.sequence_parallel and p.cp_size == 1 and (s.seq_len * s.micro_batch_size) % p.tp_size:
                raise ValueError(f"stage {s.name}: sequence parallel needs seq_len * micro_batch_size = "
                                 f"{s.seq_len * s.micro_batch_size} divisible by tp={p.tp_size}")

    @torch.no_grad()
    def _init_weights(self) -> None:
        """InternLM2's init (matrices N(0, initializer_range), norms 1), identical for every parallel layout:
        each full tensor is drawn from a generator keyed by (seed, parameter name) and cut to this rank's
        shard, so a run starts from the same weights whatever its (tp, pp, dp)."""
        if self.cfg.init_from is not None:
            self._load_hf(self.cfg.init_from)
            return
        std = self.model_config.initializer_range
        for chunk in self.chunks:
            for name, param in chunk.named_parameters():
                if param.dim() < 2:
                    param.fill_(1.0)
                    continue
                shape = list(param.shape)
                dim = getattr(param, "tensor_parallel_dim", None)
                if dim is not None:
                    shape[dim] *= self.parallel.tp_size
                g = torch.Generator(device=param.device).manual_seed(_name_seed(self.cfg.seed, name))
                full = torch.empty(shape, dtype=torch.float32, device=param.device).normal_(0.0, std, generator=g)
                param.copy_(local_shard(name, param, full, self.parallel))

    def _load_hf(self, directory: str) -> None:
        from internlm2.parallel import load_full_state_dict

        source = InternLM2ForCausalLM.from_pretrained(directory, dtype=torch.float32, device="cpu")
        if source.config.vocab_size != self.model_config.vocab_size:
            raise ValueError(f"init_from {directory}: vocabulary {source.config.vocab_size} != model.vocab_size "
                             f"{self.model_config.vocab_size}")
        full = source.state_dict()
        for chunk in self.chunks:
            names = dict(chunk.named_parameters())
            load_full_state_dict(chunk, {k: v.to(self.device) for k, v in full.items() if k in names}, self.parallel)

    # ---- collectives ----------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _from_rank0(self, value):
        """Rank 0's `value` on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _all_reduce(self, t: torch.Tensor, group=None) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, group=group)
        return t

    # ---- the run --------------------------------------------------------------------------------
    def run(self) -> TrainerState:
        cfg = self.cfg
        self.checkpoints.remove_incomplete()
        resumed = self._resume()
        problem = None
        if self.rank == 0:
            try:
                check_writable(self.run_dir, _checkpoint_bytes(self.chunks, self.parallel))
                save_yaml(cfg, self.run_dir / "config.yaml")
            except (CheckpointError, OSError) as err:
                problem = str(err)
        problem = self._from_rank0(problem)  # every rank stops at once, none waits in a barrier for a timeout
        if problem is not None:
            raise CheckpointError(problem)
        self.peak = device_peak(self.device, dtype=_DTYPES[cfg.dtype])
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
        theta = stage.rope_theta or self.model_config.rope_theta
        for chunk in self.chunks:
            chunk.config = chunk.config.replace(rope_theta=theta)
        dataset = stage_dataset(stage.data or self.data.train, self.tokenizer, stage.seq_len)
        batches = micro_batches(dataset, stage, seed=cfg.seed + state.stage, dp_rank=p.dp_rank, dp_size=p.dp_size,
                                consumed_samples=state.consumed_samples, num_workers=cfg.data.num_workers)
        accumulation = stage.global_batch_size // (stage.micro_batch_size * p.dp_size)
        schedule = self._schedule(stage)
        eval_set = (stage_dataset([self.data.eval], self.tokenizer, stage.seq_len)
                    if self.data.eval is not None and cfg.eval.every else None)
        while state.stage_step < stage.steps:
            lr = schedule(state.stage_step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            reset_peak_memory(self.device)
            start = time.perf_counter()
            with self.timers("data"):
                mbs = [self._prepare(next(batches)) for _ in range(accumulation)]
            result = self.train_step(mbs)
            seconds = time.perf_counter() - start
            state.step += 1
            state.stage_step += 1
            state.consumed_samples += stage.global_batch_size
            self._after_step(stage, result, lr, seconds, logger)
            if eval_set is not None and state.step % cfg.eval.every == 0:
                eval_loss = self.evaluate(eval_set, stage)
                logger.log(state.step, {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))})
            stop = self.stop_signals.stop_requested()  # a collective: the same answer on every rank
            if stop or state.stage_step == stage.steps or state.step % cfg.checkpoint.every == 0:
                self.save_checkpoint()
            if stop:
                raise self.stop_signals.stopped(state.step)

    def _prepare(self, batch: dict) -> dict:
        """A collated micro-batch on the device; under context parallelism every packed piece is padded so
        it splits into 2*cp equal chunks (and each rank's share into TP shards under sequence parallel)."""
        p = self.parallel
        if p.cp_size > 1:
            multiple = 2 * p.cp_size
            batch = pad_pieces(batch, multiple, multiple * (p.tp_size if p.sequence_parallel else 1),
                               self.tokenizer.pad_id)
        return to_device(batch, self.device)

    def _schedule(self, stage: StageConfig) -> Callable[[int], float]:
        """This stage's learning rate by its own step: its own schedule, or its span of the run-wide one."""
        if stage.lr is not None:
            return WarmupCosine(stage.lr.peak_lr, stage.lr.warmup_steps, stage.steps, stage.lr.min_lr_ratio)
        o = self.cfg.optim
        start = sum(s.steps for s in self.cfg.stages[: self.state.stage])
        run_wide = WarmupCosine(o.lr, o.warmup_steps, self.cfg.total_steps, o.min_lr_ratio)
        return lambda stage_step: run_wide(start + stage_step)

    def train_step(self, mbs: list[dict]) -> StepResult:
        """One optimizer step over this rank's micro-batches."""
        p = self.parallel
        tokens_here = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in mbs)
        counts = torch.tensor([tokens_here, sum(mb["input_ids"].numel() for mb in mbs),
                               sum(training_flops(self.shape, document_lengths(mb["cu_seqlens"])) for mb in mbs)],
                              dtype=torch.float64, device=self.device)
        self._all_reduce(counts, p.dp_group)  # CP ranks hold the same rows: count them once
        target_tokens, tokens, flops = (int(x) for x in counts.tolist())
        # run_pipeline divides each micro-batch loss by their number and the optimizer averages gradients
        # over DP x CP ranks (a CP rank's loss covers its share of the rows' tokens): undo both, then divide
        # by the global number of target tokens.
        scale = len(mbs) * p.dp_cp_size / max(target_tokens, 1)

        self.optimizer.zero_grad()
        with self.timers("forward_backward"):
            losses = run_pipeline(p, self.chunks, mbs, lambda _c, module, x, mb: self._timed_forward(module, x, mb, scale),
                                  grad_sync=self.optimizer.grad_sync)
        # Mean token loss: the last stages hold sum * scale per micro-batch (CP ranks: their shares); TP
        # ranks hold copies.
        loss = torch.tensor(sum(float(x) for x in losses), dtype=torch.float64, device=self.device)
        self._all_reduce(loss)
        loss = float(loss) / (len(mbs) * p.dp_cp_size * p.tp_size)
        with self.timers("optimizer"):
            norm = float(self.optimizer.grad_norm())
            cause = "loss" if not math.isfinite(loss) else "gradient norm" if not math.isfinite(norm) else ""
            if cause:
                self.optimizer.zero_grad()
            else:
                self.optimizer.step(self.cfg.optim.grad_clip)
        return StepResult(loss, norm, tokens, flops, skipped=bool(cause), cause=cause)

    def _after_step(self, stage: StageConfig, r: StepResult, lr: float, seconds: float, logger: MetricsLogger) -> None:
        state, guards = self.state, self.cfg.guards
        values = {"loss": r.loss, "grad_norm": r.grad_norm, "lr": lr, "stage": stage.name,
                  "peak_memory_gib": peak_memory_bytes(self.device) / 2**30}
        rates = dict(tokens=r.tokens, flops=r.flops, seconds=seconds, num_devices=self.parallel.world_size)
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
        if r.skipped:
            state.skipped_steps += 1
            state.nonfinite_in_a_row += 1
            values["skipped"] = f"non-finite {r.cause}"
            logger.log(state.step, values)
            if state.nonfinite_in_a_row >= guards.max_nonfinite_in_a_row:
                raise TrainingStopped(f"step {state.step} (stage {stage.name}): {state.nonfinite_in_a_row} steps in a "
                                      f"row had a non-finite {r.cause}; stopping (guards.max_nonfinite_in_a_row)")
            return
        state.nonfinite_in_a_row = 0
        state.tokens += r.tokens
        if state.loss_ema is not None and r.loss > guards.spike_factor * state.loss_ema:
            values["loss_spike"] = r.loss / state.loss_ema
            if self.rank == 0:
                print(f"step {state.step}: loss spike {r.loss:.4f} is {values['loss_spike']:.1f}x its running mean",
                      flush=True)
        state.loss_ema = r.loss if state.loss_ema is None else 0.9 * state.loss_ema + 0.1 * r.loss
        if state.step % self.cfg.logging.every == 0 or state.stage_step == stage.steps:
            logger.log(state.step, values)

    @torch.no_grad()
    def evaluate(self, dataset, stage: StageConfig) -> float:
        """Mean token loss over the first `eval.batches` global batches of the held-out set."""
        p = self.parallel
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for chunk in self.chunks:
            chunk.eval()
        for mb in eval_batches(dataset, stage.micro_batch_size, self.cfg.eval.batches, p.dp_rank, p.dp_size):
            mb = self._prepare(mb)
            loss_sum = self._forward_only(mb)
            if loss_sum is not None:
                total[0] += loss_sum
            total[1] += int((mb["labels"] != IGNORE_INDEX).sum())
        for chunk in self.chunks:
            chunk.train()
        self._all_reduce(total)
        # Loss sums come from last-stage ranks (TP copies, CP shares); every rank counted its DP share's
        # tokens.
        return float(total[0] / p.tp_size / (total[1] / (p.tp_size * p.pp_size * p.cp_size)))

    def _forward_only(self, mb: dict) -> float | None:
        """Loss sum of one micro-batch through this rank's stages (pp > 1: activations over p2p)."""
        losses = forward_only(self.parallel, self.chunks, [mb], lambda _c, module, x, mb: self._stage_forward(module, x, mb))
        return float(losses[0]) if losses else None

    def _timed_forward(self, module, hidden, mb, loss_scale):
        with self.timers("forward"):
            return self._stage_forward(module, hidden, mb, loss_scale)

    @staticmethod
    def _stage_forward(module, hidden: torch.Tensor | None, mb: dict, loss_scale: float = 1.0) -> torch.Tensor:
        """One model chunk on one micro-batch: hidden states for the next stage, or on the last stage the
        sum of the token losses times `loss_scale`."""
        inputs = {"input_ids": mb["input_ids"]} if hidden is None else {"hidden_states": hidden}
        # Positions restart at every packed piece, which the model derives from cu_seqlens.
        packing = dict(cu_seqlens=mb["cu_seqlens"], max_seqlen=mb["max_seqlen"])
        if not module.with_head:
            return module(**inputs, **packing).hidden_states
        return module(**inputs, **packing, labels=mb["labels"], loss_reduction="sum").loss * loss_scale

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        with self.timers("checkpoint"):
            return self.checkpoints.save(self.state.step, lambda d: ckpt.save(d, self))

    def _resume(self) -> Path | None:
        # The run's own latest checkpoint wins: `checkpoint.load` only seeds a run that has none yet.
        source = self.checkpoints.latest()
        if source is None and self.cfg.checkpoint.load:
            source = Path(self.cfg.checkpoint.load)
        if source is None:
            return None
        ckpt.load(source, self)
        return source


def _name_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run seed and a parameter name (stable across processes and Python runs)."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _checkpoint_bytes(chunks, parallel: ParallelState) -> int:
    """About how much one checkpoint of the whole model takes: parameters plus fp32 master and moments."""
    local = sum(p.numel() * (p.element_size() + 12) for c in chunks for p in c.parameters())
    return local * parallel.tp_size * parallel.pp_size
