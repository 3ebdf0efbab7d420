"""The engine every training stage shares: a model's parts on this rank, their optimizer, the parallel state.

A stage (pretraining, SFT, reward model, PPO's actor and critic) is task logic over an `Engine`: what a
micro-batch holds, its loss, its metrics. The engine does the rest, the same way for every layout:

- `forward_backward(micro_batches, loss_fn, normalizer)`: every micro-batch through this rank's pipeline
  chunks (plain accumulation at pp=1, 1F1B or interleaved 1F1B otherwise) and back. On the last stage
  `loss_fn(output, micro_batch)` gets the `BackboneOutput` (hidden states, the head, the token layout) and
  returns this rank's local *sum* of the loss and a dict of metric sums. The engine divides once, by the
  normalizer all-reduced over data-parallel ranks before the forward (target tokens for pretraining and
  SFT, pairs for a reward model, action tokens for PPO), so gradients are those of the global mean
  however the work falls into rows, micro-batches and ranks; the pipeline and the optimizer only sum.
- `forward(micro_batches, fn)` and `evaluate(micro_batches, loss_fn, normalizer)`: the same without
  gradients (held-out loss, reference log-probs, values, rewards), pipeline included.
- `step(grad_clip)`: reduce, clip and apply AdamW; a non-finite loss or gradient norm skips the step.

Metrics come back as one dict per call, reduced over every rank with one rule: the loss and each metric
sum are summed over the last pipeline stage's DP and CP ranks (TP ranks hold copies) and divided by the
normalizer; a `Ratio(total, count)` metric is divided by its own summed count instead (accuracy per
condition, say), and left out of a call whose count is 0 (no NaN in the logs). The reported loss is the sum of the very values that were differentiated, so the logged
training loss and the evaluation loss are the same formula. A `loss_fn` must return the same metric
names on every call and every rank.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from internlm2.model.heads import BackboneOutput
from internlm2.parallel import ParallelState, comm
from internlm2.parallel.optimizer import DistributedOptimizer
from internlm2.parallel.pipeline import forward_only, local_stages, run_pipeline
from internlm2.parallel.recompute import apply_activation_recompute
from internlm2.parallel.tensor_parallel import local_shard
from internlm2.train.timers import Timers

# Micro-batch keys the backbone reads besides the token ids (see InternLM2Model.forward). Positions are
# not among them: they restart at every packed piece, which the model derives from cu_seqlens (and under
# context parallelism from the split).
BACKBONE_INPUTS = ("cu_seqlens", "max_seqlen", "attention_mask")


@dataclass(frozen=True)
class Ratio:
    """A metric reported as total / count over the whole step (both summed over ranks), for metrics whose
    denominator is not the step's normalizer."""

    total: torch.Tensor | float
    count: torch.Tensor | float


LossFn = Callable[[BackboneOutput, dict], tuple[torch.Tensor, dict[str, "torch.Tensor | Ratio"]]]


@dataclass(frozen=True)
class StepOutcome:
    grad_norm: float
    skipped: bool  # a non-finite loss or gradient norm: no update was applied
    cause: str = ""  # "loss" or "gradient norm" when skipped


class Engine:
    """This rank's model chunks (one per virtual pipeline stage), their optimizer (None: a frozen model)
    and the parallel state they run under."""

    def __init__(self, chunks: Sequence[nn.Module], parallel: ParallelState,
                 optimizer: DistributedOptimizer | None = None, timers: Timers | None = None):
        self.chunks, self.parallel, self.optimizer = list(chunks), parallel, optimizer
        self.timers = timers or Timers()
        self.last_loss: float | None = None

    @classmethod
    def build(cls, model_class: type[nn.Module], config, parallel: ParallelState, *, dtype: torch.dtype,
              device: torch.device, seed: int, recompute: str = "none", optim: dict | None = None,
              weights: Callable[[list[nn.Module]], None] | None = None, timers: Timers | None = None) -> "Engine":
        """This rank's pipeline chunks of `model_class(config)`, with activation recompute and, given `optim`
        (DistributedOptimizer keywords), an optimizer; without it the model is frozen (no gradients, no
        optimizer state). `weights(chunks)` fills the parameters (e.g. from an HF checkpoint) before the
        optimizer takes its float32 masters from them; by default `init_weights`, the same for every layout."""
        chunks = [model_class(config, parallel, layer_ids=spec.layer_ids, with_embedding=spec.with_embedding,
                              with_head=spec.with_head, dtype=dtype, device=device)
                  for spec in local_stages(config.num_layers, parallel)]
        if weights is None:
            init_weights(chunks, seed, parallel)
        else:
            weights(chunks)
        apply_activation_recompute([layer for c in chunks for layer in c.model.layers.values()], recompute)
        optimizer = None
        if optim is not None:
            optimizer = DistributedOptimizer([(n, p) for c in chunks for n, p in c.named_parameters()], parallel,
                                             **optim)
        else:
            for p in (p for c in chunks for p in c.parameters()):
                p.requires_grad_(False)
        return cls(chunks, parallel, optimizer, timers)

    # ---- the model ------------------------------------------------------------------------------
    @property
    def model_config(self):
        """The configuration the model computes with now (e.g. the current stage's RoPE base)."""
        return self.chunks[0].config

    def update_model_config(self, **changes) -> None:
        for chunk in self.chunks:
            chunk.config = chunk.config.replace(**changes)

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for c in self.chunks for n, p in c.named_parameters()}

    @property
    def is_last_stage(self) -> bool:
        return self.parallel.pp_rank == self.parallel.pp_size - 1

    # ---- computation ----------------------------------------------------------------------------
    def forward_backward(self, micro_batches: Sequence[dict], loss_fn: LossFn, normalizer: float, *,
                         accumulate: bool = False, final: bool = True) -> dict[str, float]:
        """Forward and backward of this rank's micro-batches; gradients accumulate in the optimizer.
        `normalizer`: this DP rank's count (the same on its TP, CP and PP peers), all-reduced here.
        Returns the call's metrics ("loss" and loss_fn's), the same on every rank.

        One step may combine objectives with their own normalisers (PPO's policy loss per action token
        and its pretraining loss per target token): `accumulate=True` adds to the gradients of the call
        before instead of starting from zero, and every call but the step's last passes `final=False`, so
        the gradient reduction overlapped with the backward starts only once all gradients are in."""
        if self.optimizer is None:
            raise RuntimeError("forward_backward: this engine's model is frozen (built without an optimizer)")
        scale = 1.0 / self._global_count(normalizer)
        parts: list[tuple[torch.Tensor, dict]] = []

        def stage(_chunk, module, hidden, mb):
            with self.timers("forward"):
                out = self._run_chunk(module, hidden, mb)
                if not isinstance(out, BackboneOutput):
                    return out
                local_sum, metrics = loss_fn(out, mb)
                scaled = local_sum * scale  # what is differentiated, and what the loss metric sums
                parts.append((scaled.detach(), metrics))
                return scaled

        if not accumulate:
            self.optimizer.zero_grad()
        with self.timers("forward_backward"):
            run_pipeline(self.parallel, self.chunks, list(micro_batches), stage,
                         grad_sync=self.optimizer.grad_sync if final else None)
        metrics = self._reduce(parts, scale)
        self.last_loss = metrics["loss"]
        return metrics

    @torch.no_grad()
    def forward(self, micro_batches: Sequence[dict], fn: Callable[[BackboneOutput, dict], Any]) -> list:
        """`fn(output, micro_batch)` for every micro-batch, without gradients, in eval mode. Returns the
        results in micro-batch order on the ranks of the last pipeline stage, [] elsewhere."""
        for chunk in self.chunks:
            chunk.eval()
        try:
            def stage(_chunk, module, hidden, mb):
                out = self._run_chunk(module, hidden, mb)
                return fn(out, mb) if isinstance(out, BackboneOutput) else out

            return forward_only(self.parallel, self.chunks, list(micro_batches), stage)
        finally:
            for chunk in self.chunks:
                chunk.train()

    def evaluate(self, micro_batches: Sequence[dict], loss_fn: LossFn, normalizer: float) -> dict[str, float]:
        """Metrics of `loss_fn` over `micro_batches` without gradients, normalised and reduced exactly as
        `forward_backward` does (the same formula, so held-out and training losses compare)."""
        scale = 1.0 / self._global_count(normalizer)

        def scaled(out, mb):
            local_sum, metrics = loss_fn(out, mb)
            return (local_sum * scale).detach(), metrics

        return self._reduce(self.forward(micro_batches, scaled), scale)

    def step(self, grad_clip: float | None) -> StepOutcome:
        """Reduces and clips the gradients and applies the update; skips it (zeroing the gradients) when the
        last loss or the gradient norm is not finite."""
        with self.timers("optimizer"):
            norm = float(self.optimizer.grad_norm())
            loss_ok = self.last_loss is None or math.isfinite(self.last_loss)
            cause = "loss" if not loss_ok else "gradient norm" if not math.isfinite(norm) else ""
            if cause:
                self.optimizer.zero_grad()
            else:
                self.optimizer.step(grad_clip)
        return StepOutcome(norm, bool(cause), cause)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ---- internals ------------------------------------------------------------------------------
    @staticmethod
    def _run_chunk(module: nn.Module, hidden: torch.Tensor | None, mb: dict):
        """One model chunk on one micro-batch: the activation for the next stage, or on the stage with the
        head the `BackboneOutput` for the loss."""
        inputs = {"input_ids": mb["input_ids"]} if hidden is None else {"hidden_states": hidden}
        out = module.backbone(**inputs, **{k: mb[k] for k in BACKBONE_INPUTS if k in mb})
        return out if module.with_head else out.stage_output()

    def _global_count(self, local: float) -> float:
        count = torch.tensor([float(local)], dtype=torch.float64, device=self.parallel.device)
        comm.all_reduce(count, self.parallel.dp_group)
        return max(float(count), 1.0)

    def _reduce(self, parts: list[tuple[torch.Tensor, dict]], scale: float) -> dict[str, float]:
        """The step's metrics from the last stage's per-micro-batch (scaled loss, metric sums), reduced
        over all ranks (see the module docstring)."""
        p = self.parallel
        if self.is_last_stage and not parts:
            raise ValueError("engine: every data-parallel rank needs at least one micro-batch")
        spec = _metric_spec(parts[0][1]) if parts else None
        if p.pp_size > 1:  # ranks before the last stage learn the metric names from it
            box = [spec]
            dist.broadcast_object_list(box, src=_last_stage_rank(p), group=p.pp_group)
            spec = box[0]
        names, ratios = spec
        width = 1 + len(names) + len(ratios)
        values = torch.zeros(width + len(ratios), dtype=torch.float64, device=p.device)
        for scaled, metrics in parts:
            values[0] += _number(scaled)
            for i, name in enumerate(names):
                values[1 + i] += _number(metrics[name])
            for i, name in enumerate(ratios):
                values[1 + len(names) + i] += _number(metrics[name].total)
                values[width + i] += _number(metrics[name].count)
        comm.all_reduce(values, p.world_group)
        values /= p.tp_size  # TP ranks hold copies of the same values
        out = {"loss": float(values[0])}
        out.update({name: float(values[1 + i]) * scale for i, name in enumerate(names)})
        for i, name in enumerate(ratios):
            count = float(values[width + i])
            if count:
                out[name] = float(values[1 + len(names) + i]) / count
        return out


def _number(x) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def _metric_spec(metrics: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(names of plain metric sums, names of Ratio metrics), in a fixed order."""
    if "loss" in metrics:
        raise ValueError("loss_fn: the metric name 'loss' is the engine's (the normalised loss)")
    names = tuple(sorted(k for k, v in metrics.items() if not isinstance(v, Ratio)))
    ratios = tuple(sorted(k for k, v in metrics.items() if isinstance(v, Ratio)))
    return names, ratios


def _last_stage_rank(parallel: ParallelState) -> int:
    """Global rank of this rank's pipeline peer on the last stage."""
    return dist.get_global_rank(parallel.pp_group, parallel.pp_size - 1)


@torch.no_grad()
def init_weights(chunks: Sequence[nn.Module], seed: int, parallel: ParallelState) -> None:
    """InternLM2's init (matrices N(0, initializer_range), norms 1), identical for every parallel layout:
    each full tensor is drawn from a generator keyed by (seed, parameter name) and cut to this rank's
    shard, so a run starts from the same weights whatever its (tp, pp, dp)."""
    for chunk in chunks:
        std = chunk.config.initializer_range
        for name, param in chunk.named_parameters():
            if param.dim() < 2:
                param.fill_(1.0)
                continue
            shape = list(param.shape)
            dim = getattr(param, "tensor_parallel_dim", None)
            if dim is not None:
                shape[dim] *= parallel.tp_size
            g = torch.Generator(device=param.device).manual_seed(_name_seed(seed, name))
            full = torch.empty(shape, dtype=torch.float32, device=param.device).normal_(0.0, std, generator=g)
            param.copy_(local_shard(name, param, full, parallel))


def _name_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run seed and a parameter name (stable across processes and Python runs)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def checkpoint_bytes(engine: Engine) -> int:
    """About how much one checkpoint of the engine's whole model takes: parameters plus, when it trains,
    float32 masters and moments."""
    extra = 12 if engine.optimizer is not None else 0
    local = sum(p.numel() * (p.element_size() + extra) for p in engine.named_parameters().values())
    return local * engine.parallel.tp_size * engine.parallel.pp_size
