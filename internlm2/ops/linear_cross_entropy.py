"""Cross-entropy of `hidden @ weight.T` without materialising the full [tokens, vocab] logits.

Tokens are processed in chunks: each chunk's logits are computed, turned in place into d(loss)/d(logits)
by the `cross_entropy_chunk_` kernel (one pass: log-sum-exp, loss, softmax gradient), and multiplied
straight into grad_hidden and grad_weight. Peak memory is O(chunk x vocab) instead of O(tokens x vocab).

For reduction "mean"/"sum" the gradients are produced during the forward (as Liger-Kernel does), so the
whole op costs three matmuls like the unfused version and the backward only scales them; "none" needs
the per-token upstream gradient, so its backward recomputes the logits chunk by chunk.
"""

import math

import torch
import torch.nn.functional as F

from internlm2.constants import IGNORE_INDEX
from internlm2.ops._precision import accumulate_dtype

_chunk_kernel = torch.ops.internlm2.cross_entropy_chunk_

REDUCTIONS = ("mean", "sum", "none")
# Bytes of logits per chunk of tokens: large enough that the chunk matmuls run at full speed (on CPU, bf16
# matmuls of a few hundred rows are several times slower than of a thousand), small next to full logits.
DEFAULT_CHUNK_BYTES = 256 << 20
# Vocabulary rows per partial weight gradient when it is accumulated in float32 (low-precision weights):
# the partial is a cache-sized temporary instead of a second weight-sized one.
WEIGHT_GRAD_BLOCK = 8192


def _check_arguments(hidden, weight, labels, reduction, chunk_size, z_loss_weight):
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() < 1:
        raise ValueError("linear_cross_entropy: hidden must have shape [..., H], got a scalar")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"linear_cross_entropy: weight must have shape [V, {hidden.shape[-1]}] (H of hidden "
            f"{tuple(hidden.shape)}), got {tuple(weight.shape)}"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"linear_cross_entropy: labels must have shape {tuple(hidden.shape[:-1])} (hidden without its last "
            f"dimension), got {tuple(labels.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"linear_cross_entropy: weight has dtype {weight.dtype} but hidden has {hidden.dtype}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    if not (math.isfinite(z_loss_weight) and z_loss_weight >= 0):
        raise ValueError(f"linear_cross_entropy: z_loss_weight must be finite and >= 0, got {z_loss_weight}")


def _chunked_pass(hidden, weight, labels, ignore_index, z_loss_weight, chunk_size, grad_scale, grad_hidden, grad_weight):
    """Per-token losses [N] float32; with `grad_scale` (scalar or [N]) also fills grad_hidden (rows) and
    accumulates grad_weight (float32) with grad_scale * d(loss)/d(hidden | weight)."""
    tokens = hidden.shape[0]
    losses = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
    for start in range(0, tokens, chunk_size):
        end = min(start + chunk_size, tokens)
        h = hidden[start:end]
        logits = h @ weight.t()
        scale = None if grad_scale is None else (grad_scale if grad_scale.dim() == 0 else grad_scale[start:end])
        losses[start:end], _ = _chunk_kernel(logits, labels[start:end], ignore_index, z_loss_weight, scale)
        if scale is None:
            continue
        # `logits` now holds scale * d(loss)/d(logits).
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if grad_weight is None:
            continue
        if grad_weight.dtype == logits.dtype:
            grad_weight.addmm_(logits.t(), h)
        else:
            # Each chunk's partial is rounded once to the input dtype (as the unfused matmul rounds its
            # result) and summed in float32; summing in bf16 would add a rounding per chunk.
            for v0 in range(0, grad_weight.shape[0], WEIGHT_GRAD_BLOCK):
                grad_weight[v0 : v0 + WEIGHT_GRAD_BLOCK].add_(logits[:, v0 : v0 + WEIGHT_GRAD_BLOCK].t() @ h)
    return losses


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, z_loss_weight, chunk_size):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.reduction = reduction
        ctx.args = (ignore_index, z_loss_weight, chunk_size)
        if reduction == "none":
            losses = _chunked_pass(hidden, weight, labels, ignore_index, z_loss_weight, chunk_size, None, None, None)
            ctx.save_for_backward(hidden, weight, labels)
            return losses
        if reduction == "mean":
            valid = (labels != ignore_index).sum()
            # No token to average over gives loss 0 and zero gradients (F.cross_entropy would give nan).
            scale = 1.0 / valid.clamp(min=1).to(torch.float32)
        else:
            scale = torch.ones((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        losses = _chunked_pass(
            hidden,
            weight,
            labels,
            ignore_index,
            z_loss_weight,
            chunk_size,
            scale if (want_hidden or want_weight) else None,
            grad_hidden,
            grad_weight,
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.used = False
        return losses.sum() * scale

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.reduction == "none":
            hidden, weight, labels = ctx.saved_tensors
            ignore_index, z_loss_weight, chunk_size = ctx.args
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
            _chunked_pass(
                hidden, weight, labels, ignore_index, z_loss_weight, chunk_size,
                grad_loss.to(torch.float32).contiguous(), grad_hidden, grad_weight,
            )
            return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None, None, None
        if ctx.used:
            raise RuntimeError("linear_cross_entropy: backward ran twice through the same graph (retain_graph=True "
                               "is not supported: the gradients were computed in the forward and are consumed once)")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled in place: these buffers are as large as the inputs and used only here.
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    z_loss_weight: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of the logits `hidden @ weight.T` against `labels`, computed chunk by chunk.

    hidden [..., H] and weight [V, H] of one float dtype, labels [...] int64 in [0, V) or ignore_index.
    reduction "mean" averages over the non-ignored tokens (0 when there are none), "sum" adds them up,
    "none" returns the per-token losses (0 for ignored tokens) with labels' shape. z_loss_weight adds
    z_loss_weight * logsumexp(logits)^2 per token (PaLM's z-loss). chunk_size: tokens per chunk (default:
    as many as fit in 256 MiB of logits). The loss is float32; differentiable in hidden and weight.
    """
    _check_arguments(hidden, weight, labels, reduction, chunk_size, z_loss_weight)
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_BYTES // (max(1, weight.shape[0]) * hidden.element_size()))
    loss = _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), int(ignore_index), reduction,
        float(z_loss_weight), int(chunk_size),
    )
    return loss.view(labels.shape) if reduction == "none" else loss


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    z_loss_weight: float = 0.0,
) -> torch.Tensor:
    """Plain PyTorch: full logits in the input dtype, cross-entropy in float32 (float64 for float64)."""
    _check_arguments(hidden, weight, labels, reduction, None, z_loss_weight)
    logits = (hidden @ weight.t()).to(accumulate_dtype(hidden.dtype))
    losses = F.cross_entropy(logits.flatten(0, -2), labels.reshape(-1), ignore_index=ignore_index, reduction="none")
    if z_loss_weight:
        valid = labels.reshape(-1) != ignore_index
        losses = losses + z_loss_weight * torch.logsumexp(logits.flatten(0, -2), dim=-1).square() * valid
    if reduction == "none":
        return losses.view(labels.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (labels != ignore_index).sum().clamp(min=1)


@torch.library.register_fake("internlm2::cross_entropy_chunk_")
def _chunk_fake(logits, labels, ignore_index, z_loss_weight, grad_scale):
    rows = logits.shape[0]
    return logits.new_empty((rows,), dtype=torch.float32), logits.new_empty((rows,), dtype=torch.float32)
