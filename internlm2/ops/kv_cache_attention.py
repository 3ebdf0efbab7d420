"""Attention of new query tokens against a KV cache: decoding, and prefill with a cache.

The cache holds B sequences, `[B, Hkv, S, D]` for keys and for values (S slots per sequence); sequence b
has `k_lengths[b]` keys in slots `0 .. k_lengths[b] - 1`, the new tokens' keys already written. The new
queries are packed, `q [Tq, Hq, D]`, by `cu_seqlens_q` (None: one query per sequence, as in decoding), so
query and key lengths differ per sequence. GQA as in `flash_attention` (query head h reads KV head
h // (Hq // Hkv)). Causal attention is aligned to the end of the cache: query i of a sequence with L new
queries sees the keys j <= k_lengths[b] - L + i, so the last new token sees the whole cache.

Inference only: the op has no backward. On CUDA the kernel takes bf16/fp16 with head dims 64 and 128;
other inputs there run the reference.
"""

import torch

from internlm2.ops._precision import accumulate_dtype
from internlm2.ops.flash_attention import longest_sequence

_forward = torch.ops.internlm2.kv_cache_attention


def cuda_kernel_supports(q: torch.Tensor) -> bool:
    """Whether the CUDA kernel takes these inputs (else the op runs the reference on the GPU)."""
    return q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] in (64, 128)


def kv_cache_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_lengths: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
):
    """softmax(q k^T * softmax_scale [+ causal mask]) v of each sequence's new queries over its cached keys.

    q, k_cache, v_cache contiguous, one dtype (fp32, bf16 or fp16); k_lengths and cu_seqlens_q int32 on q's
    device. softmax_scale defaults to D ** -0.5; max_seqlen_q (a bound on every sequence's new queries) is
    derived from cu_seqlens_q when not given (a host read). Returns out [Tq, Hq, D], and with return_lse
    also lse [Hq, Tq] float32 (natural log); a query that sees no key gets out 0 and lse -inf.
    """
    if q.is_cuda and not cuda_kernel_supports(q):
        return kv_cache_attention_reference(q, k_cache, v_cache, k_lengths, cu_seqlens_q, max_seqlen_q, causal,
                                            softmax_scale, return_lse)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    if max_seqlen_q is None:
        max_seqlen_q = 1 if cu_seqlens_q is None else longest_sequence(cu_seqlens_q, q.shape[0])
    out, lse = _forward(q, k_cache, v_cache, k_lengths, cu_seqlens_q, int(max_seqlen_q), bool(causal),
                        float(softmax_scale))
    return (out, lse) if return_lse else out


def kv_cache_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_lengths: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
):
    """Plain PyTorch, one sequence at a time, the oracle for `kv_cache_attention`.

    Matmuls in the input dtype, softmax and lse in float32 (float64 for float64 inputs), as
    `flash_attention_reference`. `max_seqlen_q` is accepted for a drop-in signature.
    """
    batch, heads_kv, _, head_dim = k_cache.shape
    heads_q = q.shape[1]
    group = heads_q // heads_kv
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    acc = accumulate_dtype(q.dtype)
    starts = list(range(batch + 1)) if cu_seqlens_q is None else cu_seqlens_q.tolist()
    out = q.new_zeros(q.shape)
    lse = q.new_full((heads_q, q.shape[0]), float("-inf"), dtype=acc)
    for b, k_len in enumerate(k_lengths.tolist()):
        start, end = starts[b], starts[b + 1]
        if end == start or k_len == 0:
            continue
        qs = q[start:end].transpose(0, 1)  # [Hq, L, D]
        ks = k_cache[b, :, :k_len].repeat_interleave(group, dim=0)  # [Hq, k_len, D]
        vs = v_cache[b, :, :k_len].repeat_interleave(group, dim=0)
        scores = torch.matmul(qs, ks.transpose(1, 2)).to(acc) * scale  # [Hq, L, k_len]
        if causal:
            queries = torch.arange(end - start, device=q.device)[:, None]
            keys = torch.arange(k_len, device=q.device)[None, :]
            scores = scores.masked_fill(keys > k_len - (end - start) + queries, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # [Hq, L]; -inf where a query sees no key
        probs = torch.exp(scores - row_lse.nan_to_num(neginf=0.0)[..., None])
        out[start:end] = torch.matmul(probs.to(q.dtype), vs).transpose(0, 1)
        lse[:, start:end] = row_lse
    return (out, lse) if return_lse else out


@torch.library.register_fake("internlm2::kv_cache_attention")
def _forward_fake(q, k_cache, v_cache, k_lengths, cu_seqlens_q, max_seqlen_q, causal, softmax_scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
