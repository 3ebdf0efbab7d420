"""The Python face of internlm2's kernels.

Every op has: the public function (dispatching to `torch.ops.internlm2.*`, CPU or CUDA by the tensors'
device), fake (meta) and autograd registrations so it works under torch.compile and opcheck, and a
`*_reference` in plain PyTorch that serves as the oracle in tests and as the `kernels: reference` path.
Where no CUDA kernel was built for an input (flash attention in fp32, or at a head dim other than 64/128),
the op runs its reference and warns once per case (KernelFallbackWarning; `fallbacks_taken()` lists them).
"""

from internlm2.ops._fallback import KernelFallbackWarning, fallbacks_taken
from internlm2.ops.flash_attention import flash_attention, flash_attention_reference
from internlm2.ops.kv_cache_attention import kv_cache_attention, kv_cache_attention_reference
from internlm2.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from internlm2.ops.rms_norm import rms_norm, rms_norm_reference
from internlm2.ops.rope import (
    DynamicNTKScaling,
    apply_rope,
    apply_rope_reference,
    rope_cos_sin,
    rope_cos_sin_reference,
)
from internlm2.ops.swiglu import swiglu, swiglu_reference

__all__ = [
    "DynamicNTKScaling",
    "KernelFallbackWarning",
    "apply_rope",
    "apply_rope_reference",
    "fallbacks_taken",
    "flash_attention",
    "flash_attention_reference",
    "kv_cache_attention",
    "kv_cache_attention_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope_cos_sin",
    "rope_cos_sin_reference",
    "swiglu",
    "swiglu_reference",
]
