"""`kernels: fused | reference`: which implementation of each op the model calls.

"fused" is `internlm2.ops` (our C++/CUDA kernels); "reference" is each op's plain-PyTorch `*_reference`,
the oracle the kernels are tested against. The model only ever calls ops through a `Kernels` object, so
the two paths run the same model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from internlm2 import ops
from internlm2.model.config import KERNELS

_OPS = ("rms_norm", "swiglu", "rope_cos_sin", "apply_rope", "flash_attention", "kv_cache_attention",
        "linear_cross_entropy")


@dataclass(frozen=True)
class Kernels:
    name: str
    rms_norm: Callable
    swiglu: Callable
    rope_cos_sin: Callable
    apply_rope: Callable
    flash_attention: Callable
    kv_cache_attention: Callable
    linear_cross_entropy: Callable


def select_kernels(name: str) -> Kernels:
    if name not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {name!r}")
    suffix = "" if name == "fused" else "_reference"
    return Kernels(name, **{op: getattr(ops, op + suffix) for op in _OPS})
