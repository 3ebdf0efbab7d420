"""Flash attention over packed (varlen) sequences with grouped-query attention and the log-sum-exp.

q [T, Hq, D], k/v [T, Hkv, D] with Hq % Hkv == 0 (query head h reads KV head h // (Hq // Hkv), as HF's
repeat_kv); `cu_seqlens` int32 [B+1] marks where each packed sequence starts, so attention never crosses
sequences. The log-sum-exp [Hq, T] float32 is what ring attention merges partial results on; it is
differentiable, so a caller may use it in its loss.

On CUDA the kernels are built for bf16/fp16 with head dims 64 and 128; other inputs on a GPU run the
reference (with a KernelFallbackWarning once per case), so every model runs there, if slower.
"""

import torch

import internlm2
from internlm2.ops._fallback import note_fallback
from internlm2.ops._precision import accumulate_dtype

_forward = torch.ops.internlm2.flash_attention_forward
_backward = torch.ops.internlm2.flash_attention_backward

# The instantiations of the CUDA kernels (csrc/cuda/flash_attention.cu: dispatch, check_cuda_support).
CUDA_DTYPES = (torch.bfloat16, torch.float16)
CUDA_HEAD_DIMS = (64, 128)


def cuda_kernel_gap(dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the CUDA kernels cannot take q/k/v of this dtype and head dim; None when they can."""
    gaps = []
    if dtype not in CUDA_DTYPES:
        gaps.append(f"dtype {str(dtype).removeprefix('torch.')}")
    if head_dim not in CUDA_HEAD_DIMS:
        gaps.append(f"head dim {head_dim}")
    if not gaps:
        return None
    return f"no CUDA kernel for {' and '.join(gaps)} (they take bfloat16/float16 with head dims 64 and 128)"


def longest_sequence(cu_seqlens: torch.Tensor | None, total_tokens: int) -> int:
    """The longest packed sequence (reads cu_seqlens on the host; pass max_seqlen to avoid that)."""
    if cu_seqlens is None:
        return total_tokens
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        return 0  # the kernel's argument check names the problem
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
):
    """softmax(q k^T * softmax_scale [+ causal mask]) v per packed sequence, without the T x T matrix.

    q, k, v contiguous, one dtype (fp32, bf16 or fp16). softmax_scale (> 0) defaults to D ** -0.5.
    max_seqlen (an upper bound on every sequence's length) is derived from cu_seqlens when not given.
    Returns out [T, Hq, D], and with return_lse also lse [Hq, T] float32 (natural log). Differentiable in
    q, k, v. CUDA inputs no kernel was built for run `flash_attention_reference` (see the module doc).
    """
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    if max_seqlen is None:
        max_seqlen = longest_sequence(cu_seqlens, q.shape[0])
    gap = cuda_kernel_gap(q.dtype, q.shape[-1]) if q.is_cuda and q.dim() == 3 else None
    if gap is not None:
        internlm2._C.check_flash_attention_forward(q, k, v, cu_seqlens, int(max_seqlen), float(softmax_scale))
        note_fallback("flash_attention", gap)
        return flash_attention_reference(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, return_lse)
    out, lse = _forward(q, k, v, cu_seqlens, int(max_seqlen), bool(causal), float(softmax_scale))
    return (out, lse) if return_lse else out


def flash_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
):
    """Plain PyTorch attention, one packed sequence at a time, the oracle for `flash_attention`.

    Materialises each sequence's score matrix and repeats K/V per query group. Matmuls run in the input
    dtype, softmax and lse in float32 (float64 for float64 inputs), as HF's eager attention does.
    `max_seqlen` is accepted for a drop-in signature; the reference does not need it.
    """
    total, heads_q, head_dim = q.shape
    group = heads_q // k.shape[1]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    acc = accumulate_dtype(q.dtype)
    bounds = [0, total] if cu_seqlens is None else cu_seqlens.tolist()
    outs, lses = [q.new_empty((0, heads_q, head_dim))], [q.new_empty((heads_q, 0), dtype=acc)]
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs = q[start:end].transpose(0, 1)  # [Hq, L, D]
        ks = k[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        vs = v[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        scores = torch.matmul(qs, ks.transpose(1, 2)).to(acc) * scale  # [Hq, L, L]
        if causal:
            length = end - start
            future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [Hq, L]
        probs = torch.exp(scores - lse[..., None])
        outs.append(torch.matmul(probs.to(q.dtype), vs).transpose(0, 1))
        lses.append(lse)
    out = torch.cat(outs)
    lse = torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out


@torch.library.register_fake("internlm2::flash_attention_forward")
def _forward_fake(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.register_fake("internlm2::flash_attention_backward")
def _backward_fake(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens, max_seqlen, causal, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.attrs = (max_seqlen, causal, softmax_scale)
    # A caller that ignores lse (most do) sends no gradient for it rather than a tensor of zeros.
    ctx.set_materialize_grads(False)


def _flash_attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_q, grad_k, grad_v = _backward(
        grad_out.contiguous(),
        q,
        k,
        v,
        out,
        lse,
        None if grad_lse is None else grad_lse.contiguous(),
        cu_seqlens,
        *ctx.attrs,
    )
    return grad_q, grad_k, grad_v, None, None, None, None


torch.library.register_autograd(
    "internlm2::flash_attention_forward", _flash_attention_backward, setup_context=_setup_context
)
