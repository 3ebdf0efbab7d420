"""SwiGLU: silu(gate) * up, elementwise, computed in float32 whatever the input dtype."""

import torch
import torch.nn.functional as F

from internlm2.ops._precision import accumulate_dtype

_forward = torch.ops.internlm2.swiglu_forward
_backward = torch.ops.internlm2.swiglu_backward


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for `gate` and `up` of one shape and dtype (fp32, bf16 or fp16), both contiguous.

    Differentiable in both inputs; the backward recomputes silu from `gate` instead of saving it.
    """
    return _forward(gate, up)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch SwiGLU in float32 (float64 for float64 inputs), cast back to the input dtype."""
    acc = accumulate_dtype(gate.dtype)
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


@torch.library.register_fake("internlm2::swiglu_forward")
def _forward_fake(gate, up):
    return torch.empty_like(gate)


@torch.library.register_fake("internlm2::swiglu_backward")
def _backward_fake(grad_out, gate, up):
    return torch.empty_like(gate), torch.empty_like(up)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    return _backward(grad_out.contiguous(), gate, up)


torch.library.register_autograd("internlm2::swiglu_forward", _swiglu_backward, setup_context=_setup_context)
