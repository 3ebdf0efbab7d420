"""Pipeline parallelism: which layers each stage holds, and running a schedule over point-to-point messages.

Partition. `stage_layer_ids(num_layers, config)` gives the layer ids of every global stage (stage
s = chunk * pp + pp_rank): an even split, or `config.stage_layout`. `local_stages(num_layers, parallel)`
gives this rank's chunks as `StageSpec`s (layer ids, whether the chunk holds the embedding (global stage 0)
and the head (the last global stage)); a model builds one module per spec.

Execution. `run_pipeline(parallel, chunks, microbatches, forward_step)` runs this rank's action list
(`pipeline_schedule.build_schedule`: gradient accumulation at pp=1, 1F1B, or interleaved 1F1B with
virtual stages). `forward_step(chunk_index, module, inputs, microbatch)` runs one chunk on one
micro-batch: `inputs` is None on global stage 0, else the activation received from the previous stage;
it returns the activation to send on, or on the last stage the scalar to differentiate (the caller
scales it: the schedule sums the micro-batches' gradients as they are). `grad_sync` (the optimizer's)
wraps each chunk's last backward so gradient reduction overlaps the rest; `timeline` records each
action's compute span. `forward_only` runs the forwards alone (evaluation, inference) in
`forward_schedule`'s order, which takes any number of micro-batches.

Messages. Activations travel on `parallel.pp_fwd_group`, gradients on `parallel.pp_bwd_group`: two
communicators, so that on each (sender, receiver) channel messages arrive in the order they were sent,
also at pp=2 where the same two ranks exchange both (Megatron-LM#750). Sends are asynchronous and receives
block, so a schedule that `pipeline_schedule.simulate` completes cannot deadlock. A sent tensor is kept
alive only until its send completes (checked after every action), so a stage holds about as many
activations as the schedule has in flight, not one per micro-batch. Activations may change shape between
micro-batches (packed rows): each is preceded by a small header with its shape and dtype; gradients have
the shape of the activation they belong to.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from internlm2.parallel import comm
from internlm2.parallel.pipeline_schedule import Action, build_schedule, forward_schedule
from internlm2.parallel.state import ParallelConfig, ParallelState

_HEADER_LEN = 8  # ndim, dtype code, up to 6 sizes
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@dataclass(frozen=True)
class StageSpec:
    stage: int
    layer_ids: tuple[int, ...]
    with_embedding: bool
    with_head: bool


def stage_layer_ids(num_layers: int, config: ParallelConfig) -> list[tuple[int, ...]]:
    """Layer ids of every global stage (pp * virtual_stages of them), validated."""
    config.validate(num_layers=num_layers)
    if config.stage_layout is not None:
        return [tuple(stage) for stage in config.stage_layout]
    stages = config.pp * config.virtual_stages
    per = num_layers // stages
    return [tuple(range(s * per, (s + 1) * per)) for s in range(stages)]


def local_stages(num_layers: int, parallel: ParallelState) -> list[StageSpec]:
    """This rank's model chunks, in chunk order."""
    layers = stage_layer_ids(num_layers, parallel.config)
    pp, last = parallel.pp_size, len(layers) - 1
    out = []
    for chunk in range(parallel.virtual_stages):
        s = chunk * pp + parallel.pp_rank
        out.append(StageSpec(s, layers[s], with_embedding=s == 0, with_head=s == last))
    return out


def _send_activation(x: torch.Tensor, parallel: ParallelState, pending: list) -> None:
    if x.dim() > _HEADER_LEN - 2 or x.dtype not in _DTYPES:
        raise ValueError(f"pipeline: cannot send an activation of shape {tuple(x.shape)} and dtype {x.dtype} "
                         f"(at most {_HEADER_LEN - 2} dims, dtype in {_DTYPES})")
    header = [x.dim(), _DTYPES.index(x.dtype), *x.shape] + [0] * (_HEADER_LEN - 2 - x.dim())
    header = torch.tensor(header, dtype=torch.int64, device=x.device)
    payload = x.detach().contiguous()
    group, dst = parallel.pp_fwd_group, parallel.next_stage_rank
    pending.append((comm.isend(header, dst, group), header))
    pending.append((comm.isend(payload, dst, group), payload))


def _recv_activation(parallel: ParallelState, requires_grad: bool = True) -> torch.Tensor:
    group, src = parallel.pp_fwd_group, parallel.prev_stage_rank
    header = comm.recv(torch.empty(_HEADER_LEN, dtype=torch.int64, device=parallel.device), src, group,
                       parallel.timeout).tolist()
    ndim, dtype = header[0], _DTYPES[header[1]]
    x = torch.empty(header[2:2 + ndim], dtype=dtype, device=parallel.device)
    return comm.recv(x, src, group, parallel.timeout).requires_grad_(requires_grad)


@dataclass
class TimedAction:
    """One action's compute span on this rank (after its input arrived), in time.perf_counter seconds."""

    action: Action
    start: float
    end: float


def run_pipeline(parallel: ParallelState, chunks: list[nn.Module], microbatches: list[Any],
                 forward_step: Callable[[int, nn.Module, torch.Tensor | None, Any], torch.Tensor],
                 timeline: list[TimedAction] | None = None,
                 grad_sync: Callable[[], AbstractContextManager] | None = None) -> list[torch.Tensor]:
    """Forward and backward of every micro-batch through this rank's chunks; gradients accumulate in the
    parameters' `.grad`. Returns the (detached) per-micro-batch scalars of the last stage on the rank
    holding it, [] elsewhere. With `timeline`, appends each action's compute span (waiting excluded).
    `grad_sync` (e.g. `DistributedOptimizer.grad_sync`) wraps each chunk's last backward, so gradient
    reduction can start while the remaining backwards run."""
    pp, v, m = parallel.pp_size, parallel.virtual_stages, len(microbatches)
    if len(chunks) != v:
        raise ValueError(f"run_pipeline: got {len(chunks)} model chunks, expected virtual_stages={v}")
    last_stage = pp * v - 1
    inputs: dict[tuple[int, int], torch.Tensor | None] = {}
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    losses: dict[int, torch.Tensor] = {}
    pending: list = []  # (work, tensor kept alive until the send completes)
    actions = build_schedule(parallel.pp_rank, pp, v, m)
    last_backward = {a.chunk: i for i, a in enumerate(actions) if a.kind == "B"}
    for index, action in enumerate(actions):
        stage = action.chunk * pp + parallel.pp_rank
        key = (action.chunk, action.microbatch)
        if action.kind == "F":
            x = None if stage == 0 else _recv_activation(parallel)
            start = time.perf_counter()
            y = forward_step(action.chunk, chunks[action.chunk], x, microbatches[action.microbatch])
            if stage == last_stage:
                if y.dim() != 0:
                    raise ValueError(f"forward_step on the last stage must return a scalar loss, got shape "
                                     f"{tuple(y.shape)}")
                losses[action.microbatch] = y.detach()
            else:
                _send_activation(y, parallel, pending)
            inputs[key], outputs[key] = x, y
        else:
            x, y = inputs.pop(key), outputs.pop(key)
            grad = None if stage == last_stage else comm.recv(
                torch.empty_like(y), parallel.next_stage_rank, parallel.pp_bwd_group, parallel.timeout)
            start = time.perf_counter()
            with grad_sync() if grad_sync is not None and last_backward[action.chunk] == index else nullcontext():
                torch.autograd.backward(y, grad)
            if x is not None:
                grad_x = x.grad if x.grad is not None else torch.zeros_like(x)
                pending.append((comm.isend(grad_x, parallel.prev_stage_rank, parallel.pp_bwd_group), grad_x))
        if timeline is not None:
            timeline.append(TimedAction(action, start, time.perf_counter()))
        _release_completed(pending)
    _wait_all(pending, parallel)
    return [losses[i] for i in sorted(losses)]


@torch.no_grad()
def forward_only(parallel: ParallelState, chunks: list[nn.Module], microbatches: list[Any],
                 forward_step: Callable[[int, nn.Module, torch.Tensor | None, Any], torch.Tensor],
                 ) -> list[torch.Tensor]:
    """Forward of every micro-batch through the pipeline without gradients (evaluation), in the training
    schedule's forward order. Returns the per-micro-batch outputs of the last stage (whatever
    `forward_step` returns there: losses, tuples, dicts) on the rank holding it, [] elsewhere."""
    pp, v = parallel.pp_size, parallel.virtual_stages
    if len(chunks) != v:
        raise ValueError(f"forward_only: got {len(chunks)} model chunks, expected virtual_stages={v}")
    last_stage = pp * v - 1
    outputs: dict[int, torch.Tensor] = {}
    pending: list = []
    for action in forward_schedule(parallel.pp_rank, pp, v, len(microbatches)):
        stage = action.chunk * pp + parallel.pp_rank
        x = None if stage == 0 else _recv_activation(parallel, requires_grad=False)
        y = forward_step(action.chunk, chunks[action.chunk], x, microbatches[action.microbatch])
        if stage == last_stage:
            outputs[action.microbatch] = y
        else:
            _send_activation(y, parallel, pending)
        _release_completed(pending)
    _wait_all(pending, parallel)
    return [outputs[i] for i in sorted(outputs)]


def _release_completed(pending: list) -> None:
    """Drops the sends that have completed, and with them the last reference to what they sent."""
    pending[:] = [(work, tensor) for work, tensor in pending if not work.is_completed()]


def _wait_all(pending: list, parallel: ParallelState) -> None:
    for work, _ in pending:
        work.wait(parallel.timeout)
    pending.clear()
