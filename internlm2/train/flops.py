"""Training FLOPs of an InternLM2/Llama-style decoder, from its shape and the documents in a batch.

The count (one multiply-add = 2 FLOPs; only matmuls are counted: norms, RoPE, softmax, SwiGLU's elementwise
product and the loss are a small fraction and every public MFU convention leaves them out):

Per token, forward, each of the L layers runs these matmuls against weights (h = hidden size, d = head dim,
nq / nkv = query / key-value heads, f = FFN width, V = vocabulary):

    wqkv   h -> (nq + 2 nkv) d     (GQA: nkv key and nkv value heads)
    wo     nq d -> h
    w1, w3 h -> f                  (SwiGLU gate and up)
    w2     f -> h

and once per token the output head h -> V. The embedding is a lookup, not a matmul (0 FLOPs). So the weight
matmuls cost 2 N FLOPs per token, with N = L (h (nq + 2 nkv) d + nq d h + 3 h f) + h V the number of weights
that take part in matmuls (the "N" of the 6N rule, embedding excluded).

Attention. For one document of s tokens, per layer and query head, Q K^T is an [s, d] x [d, s] product and
P V an [s, s] x [s, d] product: 2 s^2 d FLOPs each, 4 nq d s^2 in all. Under a causal mask only the lower
triangle is needed, so (as FlashAttention's benchmarks count it) half of that: 2 nq d s^2. Packed rows hold
several documents and attention never crosses a document boundary, so a row costs the sum over its
documents of s_i^2, not (row length)^2. Summed over layers: 2 L nq d sum_i s_i^2 (causal).

Training. The backward pass of a matmul Y = X W computes dX and dW, two matmuls of the forward's size, so
forward + backward = 3 x forward, for the attention matmuls too. With full activation recomputation every
decoder layer runs its forward once more in the backward (4 x for the layers), while the output head is not
recomputed (3 x). PaLM's MFU counts model FLOPs without recomputation; the recomputed count is what
Megatron reports as hardware FLOPs (HFU): pass `recompute=True` only for that.

For a single unpacked row of length s with causal=False this is the familiar 6 N + 12 L nq d s per token
(PaLM, nanoGPT, torchtitan), and with recompute Megatron's 96 B s L h^2 (1 + s / 6h + V / 16 L h) for the
GPT shape; tests check both. Those conventions count the full s^2 and so report MFU above 100% at long
sequence lengths under causal attention; ours counts what a causal kernel must compute.

Every count is an exact integer (Python ints do not overflow).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class DecoderShape:
    """The sizes that determine a decoder's FLOPs (the field names are ModelConfig's)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DecoderShape.{f.name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def of(cls, config) -> "DecoderShape":
        """The shape of any config object with these field names (e.g. `internlm2.model.ModelConfig`).
        `head_size` (a property) wins over `head_dim`; a missing or None head dim is hidden / heads."""
        head_dim = getattr(config, "head_size", None) or getattr(config, "head_dim", None)
        if head_dim is None:
            head_dim = config.hidden_size // config.num_attention_heads
        return cls(
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
        )

    @property
    def layer_matmul_params(self) -> int:
        """Weights in one layer's matmuls: wqkv, wo, w1, w2, w3."""
        h, d, f = self.hidden_size, self.head_dim, self.intermediate_size
        nq, nkv = self.num_attention_heads, self.num_key_value_heads
        return h * (nq + 2 * nkv) * d + nq * d * h + 3 * h * f

    @property
    def head_matmul_params(self) -> int:
        return self.hidden_size * self.vocab_size

    @property
    def matmul_params(self) -> int:
        """N of the 6N rule: every weight that takes part in a matmul (the embedding does not)."""
        return self.num_layers * self.layer_matmul_params + self.head_matmul_params


def document_lengths(cu_seqlens: Sequence[int] | Iterable[int]) -> list[int]:
    """Document lengths from cumulative boundaries `[0, s_0, s_0 + s_1, ...]` (a list or a 1-D tensor)."""
    tolist = getattr(cu_seqlens, "tolist", None)
    if tolist is not None and getattr(cu_seqlens, "ndim", 1) != 1:
        raise ValueError(f"cu_seqlens must be 1-D, got shape {tuple(cu_seqlens.shape)}")
    bounds = [int(b) for b in (tolist() if tolist is not None else cu_seqlens)]
    if len(bounds) < 2 or bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0 and have at least 2 entries, got {bounds[:8]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if min(lengths) < 0:
        raise ValueError(f"cu_seqlens must never decrease, got {bounds[:16]}")
    return lengths


def _sum_of_squares(lengths: Iterable[int]) -> tuple[int, int]:
    tokens = squares = 0
    for s in lengths:
        s = int(s)
        if s < 0:
            raise ValueError(f"document lengths must be >= 0, got {s}")
        tokens += s
        squares += s * s
    return tokens, squares


def attention_flops(shape: DecoderShape, lengths: Iterable[int], *, causal: bool = True) -> int:
    """Forward FLOPs of Q K^T and P V over all layers for documents of these lengths."""
    _, squares = _sum_of_squares(lengths)
    full = 4 * shape.num_layers * shape.num_attention_heads * shape.head_dim * squares
    return full // 2 if causal else full


def forward_flops(shape: DecoderShape, lengths: Iterable[int], *, causal: bool = True) -> int:
    """Forward FLOPs of a batch whose documents have these lengths (packed or one per row)."""
    lengths = list(lengths)
    tokens, _ = _sum_of_squares(lengths)
    return 2 * shape.matmul_params * tokens + attention_flops(shape, lengths, causal=causal)


def training_flops(
    shape: DecoderShape, lengths: Iterable[int], *, causal: bool = True, recompute: bool = False
) -> int:
    """Forward + backward FLOPs of one batch. `recompute`: full activation recomputation of every decoder
    layer (hardware FLOPs; MFU by PaLM's definition uses recompute=False)."""
    lengths = list(lengths)
    tokens, _ = _sum_of_squares(lengths)
    head = 2 * shape.head_matmul_params * tokens
    layers = forward_flops(shape, lengths, causal=causal) - head
    return (4 if recompute else 3) * layers + 3 * head


def training_flops_per_token(
    shape: DecoderShape, seq_len: int, *, causal: bool = True, recompute: bool = False
) -> float:
    """Training FLOPs per token for rows holding one document of `seq_len` tokens each."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    return training_flops(shape, [seq_len], causal=causal, recompute=recompute) / seq_len
