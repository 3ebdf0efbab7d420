"""Cross-entropy over a vocabulary split across tensor-parallel ranks (Megatron's vocab-parallel loss).

Each TP rank holds logits for its vocabulary chunk `[vocab_start, vocab_start + V/tp)`. Per token the
ranks agree on the global max (all-reduce MAX), then on the sum of exponentials and the label's logit
(one all-reduce SUM of both), so no rank ever holds full-vocabulary logits:
    loss = logsumexp(all logits) - logit[label]  (+ z_loss_weight * logsumexp^2)
and d(loss)/d(logits) = softmax * (1 + 2 z lse) - onehot(label), restricted to the rank's chunk.

`vocab_parallel_linear_cross_entropy` is the fused form `loss(hidden @ W_local.T)`: tokens are processed in
chunks, each chunk's local logits turned into their gradient and multiplied straight into grad_hidden and
grad_weight during the forward (as `ops.linear_cross_entropy` does on one device), so peak memory is
O(chunk x V/tp). The gradient of `hidden` is this rank's partial sum over its vocabulary chunk; the TP
mapping in front of it (copy-to-region, or the sequence-parallel all-gather) sums it over ranks. At tp=1
the single-device op given as `single_device` (e.g. `internlm2.ops.linear_cross_entropy`) is used.
"""

from __future__ import annotations

from typing import Callable

import torch

from internlm2.constants import IGNORE_INDEX
from internlm2.parallel import comm
from internlm2.parallel.mappings import copy_to_region, gather_from_sequence
from internlm2.parallel.state import ParallelState

REDUCTIONS = ("mean", "sum", "none")
DEFAULT_CHUNK_ELEMENTS = 1 << 24  # local logits per chunk (64 MiB in float32)


def _accumulate(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _sharded_chunk(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group, ignore_index: int,
                   z_loss_weight: float, grad_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token losses [n] (float32, 0 where ignored) of local logits [n, V_local]; with grad_scale
    (scalar or [n]) also grad_scale * d(loss)/d(logits) in float32."""
    n, v_local = logits.shape
    lf = logits.to(_accumulate(logits.dtype))
    gmax = comm.all_reduce(lf.max(dim=-1).values.contiguous(), group, "max")
    shifted = lf - gmax.unsqueeze(1)
    exp = shifted.exp()
    local = labels - vocab_start
    valid = labels != ignore_index
    inside = valid & (local >= 0) & (local < v_local)
    rows = inside.nonzero().squeeze(1)
    stats = torch.zeros(2, n, dtype=lf.dtype, device=logits.device)
    stats[0] = exp.sum(dim=-1)
    stats[1, rows] = shifted[rows, local[rows]]
    comm.all_reduce(stats, group)
    log_sum = stats[0].log()
    lse = gmax + log_sum
    losses = (log_sum - stats[1] + z_loss_weight * lse.square()) * valid
    if grad_scale is None:
        return losses, None
    scale = grad_scale * valid
    grad = exp.mul_((scale * (1 + 2 * z_loss_weight * lse) / stats[0]).unsqueeze(1))
    grad[rows, local[rows]] -= scale[rows]
    return losses, grad


def _mean_scale(labels: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    # No token to average over gives loss 0 and zero gradients, as ops.linear_cross_entropy does.
    return 1.0 / (labels != ignore_index).sum().clamp(min=1).to(_accumulate(dtype))


def _check(hidden, weight, labels, reduction, parallel):
    if reduction not in REDUCTIONS:
        raise ValueError(f"vocab-parallel cross-entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"vocab-parallel cross-entropy: weight must be [V/tp, {hidden.shape[-1]}], got "
                         f"{tuple(weight.shape)}")
    tokens = hidden.shape[0] * (parallel.tp_size if parallel.sequence_parallel else 1)
    if hidden.dim() != 2 or labels.shape != (tokens,):
        raise ValueError(f"vocab-parallel cross-entropy: hidden must be [T, H] (a 1/tp token shard under sequence "
                         f"parallel) and labels [T]; got hidden {tuple(hidden.shape)}, labels {tuple(labels.shape)}")


def _chunked_pass(hidden, weight, labels, vocab_start, group, ignore_index, z_loss_weight, chunk_size, grad_scale,
                  grad_hidden, grad_weight):
    losses = torch.empty(hidden.shape[0], dtype=_accumulate(hidden.dtype), device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(start + chunk_size, hidden.shape[0])
        h = hidden[start:end]
        scale = None if grad_scale is None else (grad_scale if grad_scale.dim() == 0 else grad_scale[start:end])
        losses[start:end], grad = _sharded_chunk(h @ weight.t(), labels[start:end], vocab_start, group,
                                                 ignore_index, z_loss_weight, scale)
        if grad is None:
            continue
        if grad_hidden is not None:
            grad_hidden[start:end] = (grad @ weight.to(grad.dtype)).to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight.addmm_(grad.t(), h.to(grad.dtype))
    return losses


def _grad_buffers(ctx, hidden, weight):
    """grad_hidden (hidden's dtype) and grad_weight (accumulated in float32 or wider), as needed."""
    grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
    grad_weight = (torch.zeros(weight.shape, dtype=_accumulate(weight.dtype), device=weight.device)
                   if ctx.needs_input_grad[1] else None)
    return grad_hidden, grad_weight


class _VocabParallelLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, group, ignore_index, reduction, z_loss_weight, chunk_size):
        ctx.args = (vocab_start, group, ignore_index, z_loss_weight, chunk_size)
        ctx.reduction, ctx.weight_dtype = reduction, weight.dtype
        if reduction == "none":  # the per-token upstream gradient is unknown yet: recompute in backward
            ctx.save_for_backward(hidden, weight, labels)
            return _chunked_pass(hidden, weight, labels, *ctx.args, None, None, None)
        scale = (_mean_scale(labels, ignore_index, hidden.dtype) if reduction == "mean"
                 else torch.ones((), dtype=_accumulate(hidden.dtype), device=hidden.device))
        grad_hidden, grad_weight = _grad_buffers(ctx, hidden, weight)
        want = grad_hidden is not None or grad_weight is not None
        losses = _chunked_pass(hidden, weight, labels, *ctx.args, scale if want else None, grad_hidden, grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return losses.sum() * scale

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.reduction == "none":
            hidden, weight, labels = ctx.saved_tensors
            grad_hidden, grad_weight = _grad_buffers(ctx, hidden, weight)
            upstream = grad_loss.to(_accumulate(hidden.dtype)).contiguous()
            _chunked_pass(hidden, weight, labels, *ctx.args, upstream, grad_hidden, grad_weight)
        else:
            grad_hidden, grad_weight = ctx.saved_tensors
            if grad_hidden is not None:
                grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
            if grad_weight is not None:
                grad_weight = grad_weight * grad_loss
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return (grad_hidden, grad_weight, *(None,) * 7)


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, parallel: ParallelState, *,
    ignore_index: int = IGNORE_INDEX, reduction: str = "mean", z_loss_weight: float = 0.0, chunk_size: int | None = None,
    single_device: Callable | None = None,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` where `weight [V/tp, H]` is this rank's vocabulary shard.

    hidden [T, H] (the token shard [T/tp, H] under sequence parallel), labels [T] int64 (all tokens, the
    same on every TP rank). reduction "mean" (over non-ignored tokens), "sum" or "none" ([T]). Float32
    result, differentiable in hidden and weight. `single_device(hidden, weight, labels, ignore_index=,
    reduction=)` is called instead when tp=1.
    """
    _check(hidden, weight, labels, reduction, parallel)
    if parallel.tp_size == 1 and single_device is not None and not z_loss_weight:
        return single_device(hidden, weight, labels, ignore_index=ignore_index, reduction=reduction)
    group = parallel.tp_group
    hidden = gather_from_sequence(hidden, group) if parallel.sequence_parallel else copy_to_region(hidden, group)
    chunk_size = chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // max(1, weight.shape[0]))
    vocab_start = parallel.tp_rank * weight.shape[0]
    return _VocabParallelLinearCE.apply(hidden, weight, labels, vocab_start, group, int(ignore_index), reduction,
                                        float(z_loss_weight), int(chunk_size))


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start, group, ignore_index, reduction):
        scale = {"mean": _mean_scale(labels, ignore_index, logits.dtype),
                 "sum": torch.ones((), dtype=_accumulate(logits.dtype), device=logits.device)}.get(reduction)
        need = ctx.needs_input_grad[0] and reduction != "none"
        losses, grad = _sharded_chunk(logits, labels, vocab_start, group, ignore_index, 0.0, scale if need else None)
        ctx.reduction, ctx.dtype = reduction, logits.dtype
        if reduction == "none":
            ctx.args = (vocab_start, group, ignore_index)
            ctx.save_for_backward(logits, labels)
            return losses
        ctx.save_for_backward(grad)
        return losses.sum() * scale

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.reduction == "none":
            logits, labels = ctx.saved_tensors
            _, grad = _sharded_chunk(logits, labels, *ctx.args, 0.0, grad_loss.to(_accumulate(logits.dtype)))
        else:
            (grad,) = ctx.saved_tensors
            grad = grad * grad_loss
        return grad.to(ctx.dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, parallel: ParallelState, *,
                                 ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of vocabulary-sharded logits [N, V/tp] (rank r holds chunk r) against labels [N].

    Equals `F.cross_entropy(full_logits, labels, ignore_index=..., reduction=...)` in float32 ("mean" over
    non-ignored tokens; 0 when there are none)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"vocab_parallel_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"vocab_parallel_cross_entropy: logits must be [N, V/tp] and labels [N]; got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    vocab_start = parallel.tp_rank * logits.shape[1]
    return _VocabParallelCE.apply(logits, labels, vocab_start, parallel.tp_group, int(ignore_index), reduction)


@torch.no_grad()
def vocab_parallel_entropy(hidden: torch.Tensor, weight: torch.Tensor, parallel: ParallelState,
                           chunk_size: int | None = None) -> torch.Tensor:
    """Entropy of softmax(hidden @ W.T) per token, float32 [T], where `weight [V/tp, H]` is this rank's
    vocabulary shard and `hidden [T, H]` holds all tokens: H = lse - sum(p * z), with the max, the sum of
    exponentials and the exp-weighted logit sum agreed over TP, chunked like the loss."""
    group = parallel.tp_group
    chunk_size = chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // max(1, weight.shape[0]))
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        z = (hidden[start:start + chunk_size] @ weight.t()).float()
        zmax = comm.all_reduce(z.max(dim=-1).values.contiguous(), group, "max")
        exp = (z - zmax.unsqueeze(1)).exp()
        stats = torch.stack([exp.sum(-1), (exp * z).sum(-1)])
        comm.all_reduce(stats, group)
        out[start:start + chunk_size] = stats[0].log() + zmax - stats[1] / stats[0]
    return out
