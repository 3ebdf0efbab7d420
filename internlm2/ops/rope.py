"""Rotary position embedding in HF's "rotate_half" layout, with InternLM2's dynamic NTK scaling.

`rope_cos_sin` builds float32 tables [T, head_dim] for the position ids of a (packed) batch; positions
restart at 0 for every packed sequence, so the tables follow the data without knowing cu_seqlens.
`apply_rope` rotates x [T, ..., head_dim] (e.g. q [T, Hq, D] or a strided view of the fused qkv
projection) and returns a new contiguous tensor; cos and sin are constants (no gradient flows into them).
"""

import math
from dataclasses import dataclass

import torch

from internlm2.ops._precision import accumulate_dtype

_cos_sin = torch.ops.internlm2.rope_cos_sin
_apply = torch.ops.internlm2.apply_rope


@dataclass(frozen=True)
class DynamicNTKScaling:
    """InternLM2's dynamic NTK scaling (HF `rope_scaling={"type": "dynamic", "factor": f}`).

    Beyond `max_position_embeddings` the rotary base grows with the sequence length, stretching the
    lowest frequencies over the longer context:
        theta' = theta * (factor * seq_len / max_position_embeddings - (factor - 1)) ** (d / (d - 2))
    At or below max_position_embeddings theta is unchanged.

    `seq_len` is the current sequence length: the key length of the forward call (prompt plus cache when
    generating) or, for packed training rows, the longest packed sequence. None derives it from the
    position ids as max(position_ids) + 1, which reads them on the host.
    """

    factor: float
    max_position_embeddings: int
    seq_len: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.factor) and self.factor >= 1.0):
            raise ValueError(f"DynamicNTKScaling: factor must be finite and >= 1, got {self.factor}")
        if self.max_position_embeddings <= 0:
            raise ValueError(
                f"DynamicNTKScaling: max_position_embeddings must be positive, got {self.max_position_embeddings}"
            )
        if self.seq_len is not None and self.seq_len < 0:
            raise ValueError(f"DynamicNTKScaling: seq_len must be >= 0, got {self.seq_len}")

    def effective_theta(self, theta: float, head_dim: int, seq_len: int) -> float:
        """The rotary base to use for a sequence of `seq_len` tokens."""
        if seq_len <= self.max_position_embeddings:
            return float(theta)
        growth = self.factor * seq_len / self.max_position_embeddings - (self.factor - 1.0)
        return float(theta) * growth ** (head_dim / (head_dim - 2))


def resolve_theta(position_ids: torch.Tensor, head_dim: int, theta: float, scaling: DynamicNTKScaling | None) -> float:
    """The effective rotary base for these positions: `theta` itself, or its dynamic NTK scaling."""
    if scaling is None:
        return float(theta)
    if not isinstance(scaling, DynamicNTKScaling):
        raise TypeError(f"rope_cos_sin: scaling must be a DynamicNTKScaling or None, got {type(scaling).__name__}")
    if head_dim <= 2:
        raise ValueError(f"rope_cos_sin: dynamic NTK scaling needs head_dim > 2, got {head_dim}")
    seq_len = scaling.seq_len
    if seq_len is None:
        seq_len = int(position_ids.max()) + 1 if position_ids.numel() else 0
    return scaling.effective_theta(theta, head_dim, seq_len)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, scaling: DynamicNTKScaling | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [T, head_dim] float32 for `position_ids` [T] (int32/int64).

    Each frequency theta^(-2i/head_dim) appears twice (columns i and i + head_dim/2), HF's layout; angles
    are computed in float64 so long positions keep full float32 accuracy.
    """
    return _cos_sin(position_ids, int(head_dim), resolve_theta(position_ids, head_dim, theta, scaling))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [T, ..., D] (any strides with x.stride(-1) == 1; fp32, bf16 or fp16) by the tables
    cos/sin [T, D] float32: x * cos + rotate_half(x) * sin, computed in float32. Returns a contiguous
    tensor of x's shape and dtype; differentiable in x."""
    return _apply(x, cos, sin, False)


def rope_cos_sin_reference(
    position_ids: torch.Tensor, head_dim: int, theta: float, scaling: DynamicNTKScaling | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch cos/sin tables (float64 angles, float32 result), the oracle for `rope_cos_sin`."""
    base = resolve_theta(position_ids, head_dim, theta, scaling)
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=position_ids.device) / head_dim)
    angles = position_ids.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch rotation in float32 (float64 for float64 inputs), cast back to x's dtype."""
    acc = accumulate_dtype(x.dtype)
    table_shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.to(acc).view(table_shape), sin.to(acc).view(table_shape)
    xf = x.to(acc)
    return (xf * c + rotate_half(xf) * s).to(x.dtype)


@torch.library.register_fake("internlm2::rope_cos_sin")
def _cos_sin_fake(position_ids, head_dim, theta):
    shape = (position_ids.shape[0], head_dim)
    return position_ids.new_empty(shape, dtype=torch.float32), position_ids.new_empty(shape, dtype=torch.float32)


@torch.library.register_fake("internlm2::apply_rope")
def _apply_fake(x, cos, sin, inverse=False):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _apply_rope_backward(ctx, grad_out):
    cos, sin = ctx.saved_tensors
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    # The rotation is orthogonal: its gradient is the opposite rotation (the kernel's exact transpose).
    return _apply(grad_out, cos, sin, not ctx.inverse), None, None, None


torch.library.register_autograd("internlm2::apply_rope", _apply_rope_backward, setup_context=_setup_context)
