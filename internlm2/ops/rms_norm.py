"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight over the last dimension, computed in float32."""

import math

import torch

_forward = torch.ops.internlm2.rms_norm_forward
_backward = torch.ops.internlm2.rms_norm_backward


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm of `x [..., H]` with `weight [H]` (same dtype as x: fp32, bf16 or fp16).

    Differentiable in x and weight. Inputs must be contiguous; the kernel checks shapes, dtypes and
    devices and names the offending argument.
    """
    y, _ = _forward(x, weight, float(eps))
    return y


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Plain PyTorch RMSNorm in the input dtype with (at least) float32 accumulation: float64 inputs stay
    float64, so the same function is the exact oracle in tests."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(compute)).to(x.dtype)


@torch.library.register_fake("internlm2::rms_norm_forward")
def _forward_fake(x, weight, eps):
    rows = math.prod(x.shape[:-1])
    return torch.empty_like(x), x.new_empty((rows,), dtype=torch.float32)


@torch.library.register_fake("internlm2::rms_norm_backward")
def _backward_fake(grad_y, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _rms_norm_backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_weight = _backward(grad_y.contiguous(), x, weight, rstd)
    return grad_x, grad_weight, None


torch.library.register_autograd("internlm2::rms_norm_forward", _rms_norm_backward, setup_context=_setup_context)
