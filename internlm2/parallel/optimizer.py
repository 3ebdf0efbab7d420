"""AdamW over data-parallel ranks: ZeRO-1 (sharded fp32 master weights and moments) or plain DDP.

Gradients. Every parameter gets a slice of a flat gradient bucket (float32 by default, whatever the
parameters' dtype); a post-accumulate-grad hook adds each backward's `.grad` into it and frees `.grad`, so
micro-batches accumulate in float32 (Megatron's `main_grad`). Buckets hold parameters in reverse
registration order (roughly the order backward produces them) up to `bucket_elements`, and never mix
tensor-parallel (sharded) with TP-replicated parameters or parameter groups, so each bucket is reduced,
counted in the norm and updated as one flat tensor.

Reduction (`reduce_grads`) sums the gradients over the DP x CP ranks: each rank's backward already
carries its share of the global objective (the caller divides its loss by the global normalizer, e.g. the
batch's target tokens over all ranks, Megatron's per-token loss), so nothing is averaged here.
- "ddp": all-reduce each bucket; every rank updates everything (the reference mode).
- "zero1": reduce-scatter each bucket over the ZeRO group (`zero1_size` consecutive DP x CP ranks), then
  all-reduce the shard over the replica group when zero1_size < dp*cp (InternEvo's in-node `zero1`);
  each rank keeps the float32 master weights and AdamW moments of its shard only, updates them, and
  all-gathers the updated parameters within the ZeRO group.
Under sequence parallel, TP-replicated parameters (norms) saw only their rank's tokens: their reduced
shards are then summed over TP. With `run_pipeline(..., grad_sync=optimizer.grad_sync)` each bucket's
reduction starts asynchronously as soon as the last backward has produced all its gradients.

Checkpoints: `per_param_state()` / `load_per_param_state()` give and take every parameter's master weight
and moments by name in the parameter's shape, independent of ZeRO sharding and bucketing.

Norm and clipping count every element once (see grad_norm.py): shards add up over the ZeRO group,
TP-replicated buckets count on TP rank 0, stages add up over PP. The update is torch.optim.AdamW's
(decoupled weight decay, bias correction) on float32 masters, written back in the parameters' dtype.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn

from internlm2.parallel import comm
from internlm2.parallel.grad_norm import clip_coefficient, counted_here, reduce_norm_squares
from internlm2.parallel.state import ParallelState
from internlm2.parallel.tensor_parallel import is_tensor_parallel

MODES = ("zero1", "ddp")


def default_no_decay(name: str, param: nn.Parameter) -> bool:
    """Vectors (norm weights, biases) get no weight decay; matrices do."""
    return param.dim() < 2


class _Bucket:
    def __init__(self, group_index: int, tensor_parallel: bool):
        self.group_index, self.tensor_parallel = group_index, tensor_parallel
        self.params: list[tuple[str, nn.Parameter]] = []
        self.offsets: list[int] = []
        self.numel = 0
        self.ready = 0  # parameters accumulated inside `grad_sync` this step
        self.launched = False
        self.inflight = None  # the running reduction's work
        self.scattered: torch.Tensor | None = None  # reduce-scatter output, before the replica all-reduce

    def add(self, name: str, param: nn.Parameter) -> None:
        self.params.append((name, param))
        self.offsets.append(self.numel)
        self.numel += param.numel()

    def allocate(self, shards: int, shard_index: int, sharded: bool, grad_dtype: torch.dtype) -> None:
        first = self.params[0][1]
        self.padded = math.ceil(self.numel / shards) * shards
        self.grad = torch.zeros(self.padded, dtype=grad_dtype, device=first.device)
        size = self.padded // shards if sharded else self.padded
        self.lo = shard_index * size if sharded else 0
        self.hi = self.lo + size
        self.master = self.flat_params()[self.lo:self.hi].clone()
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)

    def flat_params(self) -> torch.Tensor:
        """The parameters' current values as one padded float32 vector."""
        flat = torch.zeros(self.padded, dtype=torch.float32, device=self.grad.device)
        for (_, p), off in zip(self.params, self.offsets):
            flat[off:off + p.numel()] = p.detach().reshape(-1).float()
        return flat

    def grad_view(self, index: int) -> torch.Tensor:
        (_, p), off = self.params[index], self.offsets[index]
        return self.grad[off:off + p.numel()].view_as(p)

    @property
    def shard_grad(self) -> torch.Tensor:
        return self.grad[self.lo:self.hi]


class DistributedOptimizer:
    """AdamW for the parameters of this rank's model chunks, reduced over `parallel`'s DP x CP ranks.

    named_parameters: (name, parameter) pairs (all chunks of this rank). `no_decay(name, param)` picks the
    parameters without weight decay. `param_groups` (a list of dicts with "lr", "weight_decay", "betas",
    "eps") may be edited between steps, e.g. by a learning-rate schedule.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, nn.Parameter]], parallel: ParallelState, *,
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, mode: str = "zero1", bucket_elements: int = 1 << 24,
                 grad_dtype: torch.dtype = torch.float32,
                 no_decay: Callable[[str, nn.Parameter], bool] = default_no_decay):
        if mode not in MODES:
            raise ValueError(f"DistributedOptimizer: mode must be one of {MODES}, got {mode!r}")
        if bucket_elements < 1:
            raise ValueError(f"DistributedOptimizer: bucket_elements must be >= 1, got {bucket_elements}")
        self.parallel, self.mode = parallel, mode
        self.param_groups = [{"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay},
                             {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0}]
        named = [(n, p) for n, p in named_parameters if p.requires_grad]
        if len({id(p) for _, p in named}) != len(named):
            raise ValueError("DistributedOptimizer: a parameter is listed twice (tied weights are not supported)")
        for name, p in named:  # two optimizers' hooks on one parameter would steal each other's gradients
            owner = getattr(p, "_distributed_optimizer", None)
            if owner is not None and owner() is not None:
                raise ValueError(f"DistributedOptimizer: parameter {name} already belongs to another "
                                 "DistributedOptimizer; call its remove_hooks() first")
        self.buckets = self._make_buckets(named, bucket_elements, no_decay)
        sharded = mode == "zero1"
        shards = parallel.zero_size if sharded else 1
        for bucket in self.buckets:
            bucket.allocate(shards, parallel.zero_rank, sharded, grad_dtype)
        self._where = {}  # param -> (bucket, index)
        self._hooks = []
        for bucket in self.buckets:
            for i, (_, p) in enumerate(bucket.params):
                self._where[p] = (bucket, i)
                self._hooks.append(p.register_post_accumulate_grad_hook(self._accumulate))
                p._distributed_optimizer = weakref.ref(self)
        self.step_count = 0
        self._reduced = False
        self._norm: torch.Tensor | None = None  # of the current reduced gradients
        self._syncing = False
        self.launched_in_backward = 0  # buckets whose reduction started during backward this step

    @staticmethod
    def _make_buckets(named, bucket_elements, no_decay) -> list[_Bucket]:
        buckets, open_ = [], {}
        for name, p in reversed(named):
            key = (1 if no_decay(name, p) else 0, is_tensor_parallel(p))
            bucket = open_.get(key)
            if bucket is None or (bucket.numel and bucket.numel + p.numel() > bucket_elements):
                bucket = open_[key] = _Bucket(*key)
                buckets.append(bucket)
            bucket.add(name, p)
        return buckets

    def _accumulate(self, param: nn.Parameter) -> None:
        bucket, i = self._where[param]
        bucket.grad_view(i).add_(param.grad)
        param.grad = None
        self._reduced, self._norm = False, None
        if self._syncing:
            bucket.ready += 1
            if bucket.ready == len(bucket.params):
                self._launch(bucket)
                self.launched_in_backward += 1

    @contextmanager
    def grad_sync(self):
        """Inside, the last backward of a model chunk is running: each bucket whose parameters have all
        received their gradient starts its DP reduction at once, asynchronously, overlapping the rest of
        the backward. `run_pipeline(..., grad_sync=optimizer.grad_sync)` does this; without it the
        reduction happens in `reduce_grads`."""
        self._syncing = True
        try:
            yield
        finally:
            self._syncing = False

    # ---- gradients ------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        for bucket in self.buckets:
            self._wait(bucket)
            bucket.grad.zero_()
            bucket.ready = 0
        self._reduced, self._norm = False, None
        self.launched_in_backward = 0

    def _launch(self, bucket: _Bucket) -> None:
        """Starts the bucket's DP x CP reduction: all-reduce (ddp), reduce-scatter over the ZeRO group,
        or, with one rank per ZeRO group, the all-reduce over the replicas."""
        parallel = self.parallel
        if self.mode == "ddp":
            bucket.inflight = comm.all_reduce_async(bucket.grad, parallel.dp_cp_group)
        elif comm.group_size(parallel.zero_group) > 1:
            bucket.scattered = torch.empty_like(bucket.shard_grad)
            bucket.inflight = comm.reduce_scatter_flat(bucket.scattered, bucket.grad, parallel.zero_group,
                                                       async_op=True)
        else:
            bucket.inflight = comm.all_reduce_async(bucket.shard_grad, parallel.zero_replica_group)
        bucket.launched = True

    def _wait(self, bucket: _Bucket) -> None:
        if bucket.inflight is not None:
            bucket.inflight.wait()
            bucket.inflight = None

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """Sums gradients over DP x CP (all of each bucket in "ddp" mode, this rank's shard in "zero1"
        mode), and TP-replicated ones over TP under sequence parallel (on the reduced shard: replicated
        buckets have the same layout on every TP rank)."""
        if self._reduced:
            return
        parallel = self.parallel
        for bucket in self.buckets:
            if not bucket.launched:
                self._launch(bucket)
            self._wait(bucket)
            if bucket.scattered is not None:
                bucket.shard_grad.copy_(bucket.scattered)
                bucket.scattered = None
                comm.all_reduce(bucket.shard_grad, parallel.zero_replica_group)
            if parallel.sequence_parallel and not bucket.tensor_parallel:
                comm.all_reduce(bucket.shard_grad, parallel.tp_group)
            bucket.launched, bucket.ready = False, 0
        self._reduced = True

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the reduced gradients, every element counted once (float64 scalar)."""
        self.reduce_grads()
        if self._norm is not None:
            return self._norm
        local = torch.zeros((), dtype=torch.float64, device=self.parallel.device)
        for bucket in self.buckets:
            if counted_here(bucket.tensor_parallel, self.parallel):
                local += torch.linalg.vector_norm(bucket.shard_grad, dtype=torch.float32).double().square()
        shard_group = self.parallel.zero_group if self.mode == "zero1" else None
        self._norm = reduce_norm_squares(local, self.parallel, shard_group).sqrt()
        return self._norm

    @torch.no_grad()
    def full_grads(self) -> dict[str, torch.Tensor]:
        """The reduced gradient of every parameter of this rank (this rank's TP shard), by name; in
        "zero1" mode the shards are all-gathered over the ZeRO group (for tests and debugging)."""
        self.reduce_grads()
        out = {}
        for bucket in self.buckets:
            flat = self._gather_shard(bucket, bucket.shard_grad)
            for (name, p), off in zip(bucket.params, bucket.offsets):
                out[name] = flat[off:off + p.numel()].view(p.shape).clone()
        return out

    # ---- update ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, max_grad_norm: float | None = None) -> torch.Tensor:
        """Reduces the gradients (if not done yet), clips them to `max_grad_norm` (None: no clipping),
        applies AdamW and writes the new weights into the parameters. Returns the norm before clipping."""
        norm = self.grad_norm()
        coef = clip_coefficient(norm, max_grad_norm).float() if max_grad_norm is not None else None
        self.step_count += 1
        for bucket in self.buckets:
            grad = bucket.shard_grad.float()
            if coef is not None:
                grad = grad * coef
            self._adamw(bucket, grad, self.param_groups[bucket.group_index])
            self._write_params(bucket)
        return norm

    def _adamw(self, bucket: _Bucket, grad: torch.Tensor, group: dict) -> None:
        # torch.optim.AdamW's single-tensor update, on the float32 master shard.
        lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        t = self.step_count
        bucket.master.mul_(1 - lr * wd)
        bucket.exp_avg.lerp_(grad, 1 - beta1)
        bucket.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (bucket.exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
        bucket.master.addcdiv_(bucket.exp_avg, denom, value=-lr / (1 - beta1 ** t))

    def _write_params(self, bucket: _Bucket) -> None:
        flat = self._gather_shard(bucket, bucket.master.to(bucket.params[0][1].dtype))
        for (_, p), off in zip(bucket.params, bucket.offsets):
            p.copy_(flat[off:off + p.numel()].view_as(p))

    # ---- checkpoints ----------------------------------------------------------------------------
    STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")

    @torch.no_grad()
    def per_param_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every parameter's float32 master weight and AdamW moments, by name, in the parameter's shape
        (its TP shard), independent of the ZeRO sharding: a collective over the ZeRO group in "zero1"
        mode. With `step_count`, this is what a reshardable checkpoint stores."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for bucket in self.buckets:
            flats = {key: self._gather_shard(bucket, getattr(bucket, key)) for key in self.STATE_KEYS}
            for (name, p), off in zip(bucket.params, bucket.offsets):
                out[name] = {key: flat[off:off + p.numel()].view(p.shape).clone() for key, flat in flats.items()}
        return out

    @torch.no_grad()
    def load_per_param_state(self, state: dict[str, dict[str, torch.Tensor]], step_count: int) -> None:
        """Restores what `per_param_state` returned (possibly saved under another layout and resharded to
        this rank's TP shapes); each rank keeps its ZeRO shard. Missing names or wrong shapes raise."""
        for bucket in self.buckets:
            for key in self.STATE_KEYS:
                flat = torch.zeros(bucket.padded, dtype=torch.float32, device=bucket.master.device)
                for (name, p), off in zip(bucket.params, bucket.offsets):
                    if name not in state or key not in state[name]:
                        raise KeyError(f"optimizer state: no {key!r} for parameter {name!r}")
                    value = state[name][key]
                    if tuple(value.shape) != tuple(p.shape):
                        raise ValueError(f"optimizer state: {name}.{key} has shape {tuple(value.shape)}, "
                                         f"expected {tuple(p.shape)}")
                    flat[off:off + p.numel()] = value.reshape(-1).to(flat.device, torch.float32)
                getattr(bucket, key).copy_(flat[bucket.lo:bucket.hi])
        self.step_count = int(step_count)

    def _gather_shard(self, bucket: _Bucket, shard: torch.Tensor) -> torch.Tensor:
        if self.mode == "ddp" or comm.group_size(self.parallel.zero_group) == 1:
            return shard
        full = torch.empty(bucket.padded, dtype=shard.dtype, device=shard.device)
        comm.all_gather_flat(full, shard.contiguous(), self.parallel.zero_group)
        return full

    def state_bytes(self) -> int:
        """Bytes this rank holds besides the parameters: the gradient buckets, float32 masters and moments."""
        return sum(t.numel() * t.element_size() for b in self.buckets for t in (b.grad, b.master, b.exp_avg,
                                                                                  b.exp_avg_sq))

    def remove_hooks(self) -> None:
        """Detaches the optimizer from its parameters (their gradients go back to `.grad`)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for p in self._where:
            p._distributed_optimizer = None

