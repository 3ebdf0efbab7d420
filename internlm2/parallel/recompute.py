"""Activation recomputation per layer: "none", "selective" (the attention core) or "full" (the layer).

- "full": the layer keeps only its input; its whole forward, tensor-parallel collectives included, runs
  again during backward (torch.utils.checkpoint, non-reentrant).
- "selective": Megatron's selective recomputation: only the attention core (the attention kernel, or the
  score matmuls, masking, softmax and log-sum-exp of a plain-PyTorch attention) is dropped and recomputed;
  every other op's output, the linear layers' and the collectives' included, is kept, so nothing is
  communicated twice. Implemented as a selective-checkpoint policy over the ops the layer runs, so it needs
  no cooperation from the model beyond naming its layers.

`apply_activation_recompute(layers, mode)` wraps each given module's forward (typically the decoder
layers of every model chunk); the model's code does not change.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "selective", "full")

_aten = torch.ops.aten
# Ops that only the attention core runs inside a transformer layer (fused kernels and the plain-PyTorch
# score path). Matmuls of the linear layers are aten.mm/addmm, never bmm, so they stay saved.
ATTENTION_CORE_OPS = frozenset(op for op in (
    getattr(getattr(torch.ops.internlm2, "flash_attention_forward", None), "default", None),
    _aten.bmm.default, _aten.baddbmm.default, _aten._softmax.default, _aten.logsumexp.default,
    _aten.exp.default, _aten.masked_fill.Scalar, _aten.triu.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_cudnn_attention.default,
) if op is not None)


def _keep_all_but_attention_core(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.PREFER_RECOMPUTE if op in ATTENTION_CORE_OPS else CheckpointPolicy.MUST_SAVE


def _selective_contexts():
    # Collectives fill buffers in place (all-reduce, reduce-scatter/all-gather outputs); both the buffer and
    # the collective are kept, so recomputation reuses their final values instead of communicating again.
    return create_selective_checkpoint_contexts(_keep_all_but_attention_core, allow_cache_entry_mutation=True)


def recomputed(fn, mode: str):
    """`fn` run under the given recomputation mode (returned unchanged for "none")."""
    if mode not in MODES:
        raise ValueError(f"activation recompute mode must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return fn
    extra = {"context_fn": _selective_contexts} if mode == "selective" else {}

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        return checkpoint(fn, *args, use_reentrant=False, **extra, **kwargs)

    return run


def apply_activation_recompute(layers: Iterable[nn.Module], mode: str) -> None:
    """Makes each module in `layers` recompute its activations in backward as `mode` says."""
    for layer in layers:
        if "forward" in vars(layer):
            raise ValueError(f"{type(layer).__name__}: activation recomputation is already applied")
        if mode != "none":
            layer.forward = recomputed(layer.forward, mode)
