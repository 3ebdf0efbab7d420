"""Flash attention on CUDA: internlm2's kernels vs SDPA's flash and cuDNN backends (each named) and
torch.nn.attention.varlen when this torch has it, all in one run on one GPU.

TFLOP/s use FlashAttention's formula: forward 4 * batch * seqlen^2 * heads * head_dim (halved when causal;
heads = query heads, so GQA does not lower it), backward 2.5x that; for packed varlen batches the s^2 term
is summed per sequence. Shapes follow FlashAttention's benchmark: batch * seqlen = 16k tokens, hidden 2048
(32 heads at d=64, 16 at d=128), seqlen 1k-16k; plus InternLM2-7B's GQA (32 query / 8 KV heads, d=128)
and a packed batch of unequal sequences. Forward and backward are timed separately (backward: the op's
backward alone, from saved outputs), medians over CUDA events.

GQA shapes come first and time internlm2's backward under both schedules (INTERNLM2_FLASH_BWD_GQA: the
whole query group per CTA, "serial", the default; one query head per CTA, "split"), with short sequences
and few KV heads where the serial schedule launches fewer CTAs than an H100/H200 has SMs: these rows decide
the default.

    python -m benchmarks.bench_flash_attention_cuda [--repeats N] [--quick]
"""

import argparse
import inspect
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.harness import Report, median_time, write_partial_results_on_sigterm

TOTAL_TOKENS = 16384
HIDDEN = 2048
SEQLENS = [1024, 2048, 4096, 8192, 16384]
VARLEN_LENGTHS = [3000, 517, 4096, 1200, 2500, 33, 1800, 3236]  # sums to 16384
# (batch, seqlen, query heads, KV heads) at d=128: InternLM2-7B's 32/8 (1.8B: 16/8, 20B: 48/8) at a few
# token counts; serial backward CTAs = KV heads * batch * seqlen / 128 (64 for the first, 1024 for the last).
GQA_SHAPES = [(1, 1024, 32, 8), (1, 4096, 32, 8), (1, 4096, 16, 8), (4, 4096, 32, 8), (2, 8192, 48, 8)]
GQA_SCHEDULES = ("serial", "split")


def attention_flops(lengths, heads, head_dim, causal):
    """Forward FLOPs by FlashAttention's formula, summed over the packed sequences."""
    return sum(4 * n * n * heads * head_dim // (2 if causal else 1) for n in lengths)


def packed_inputs(lengths, heads_q, heads_kv, head_dim):
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, head_dim, device="cuda", dtype=torch.bfloat16)
               for h in (heads_q, heads_kv, heads_kv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return q, k, v, cu


def internlm2_steps(q, k, v, cu, max_len, causal, schedule="serial"):
    """(forward, backward) closures over internlm2's ops; backward from saved outputs, as autograd runs it,
    under the GQA `schedule` (the CUDA backward reads INTERNLM2_FLASH_BWD_GQA on each call: the closures are
    timed right after this returns)."""
    os.environ["INTERNLM2_FLASH_BWD_GQA"] = schedule
    scale = q.shape[-1] ** -0.5
    fwd = torch.ops.internlm2.flash_attention_forward
    bwd = torch.ops.internlm2.flash_attention_backward
    out, lse = fwd(q, k, v, cu, max_len, causal, scale)
    grad = torch.randn_like(out)
    return (lambda: fwd(q, k, v, cu, max_len, causal, scale),
            lambda: bwd(grad, q, k, v, out, lse, None, cu, max_len, causal, scale))


def autograd_steps(attend, q, k, v):
    """(forward, backward) closures for a differentiable attention function of (q, k, v)."""
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out = attend(qg, kg, vg)
    grad = torch.randn_like(out)

    def forward():
        with torch.no_grad():
            attend(q, k, v)

    return forward, lambda: torch.autograd.grad(out, (qg, kg, vg), grad, retain_graph=True)


def sdpa(backend, batch, seqlen, causal):
    """SDPA on [B, H, S, D] views of the packed [B * S, H, D] tensors (the layout FlashAttention reads)."""
    def attend(q, k, v):
        views = [t.view(batch, seqlen, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v)]
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(*views, is_causal=causal, enable_gqa=views[0].shape[1] != views[1].shape[1])
        return out.transpose(1, 2)
    return attend


def torch_varlen(cu, max_len, causal):
    """torch.nn.attention.varlen.varlen_attn with the keyword this torch spells causality with, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    kw = {}
    if "is_causal" in params:
        kw["is_causal"] = causal
    elif causal:
        kw["window_size"] = (-1, 0)

    def attend(q, k, v):
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            else:
                k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)
    return attend


def run(repeats: int, quick: bool) -> Report:
    report = Report("Flash attention CUDA benchmark", [
        "batch x seqlen", "d", "heads q/kv", "mask", "impl", "fwd ms", "fwd TFLOP/s", "bwd ms", "bwd TFLOP/s",
        "fwd+bwd time / internlm2"])
    report.notes.append("bf16; FlashAttention's FLOP formula (4*b*s^2*h*d, /2 causal; bwd 2.5x); varlen sums per sequence")
    report.notes.append("internlm2 = serial GQA backward (the default); internlm2 split = one query head per CTA")
    for batch, seqlen, heads_q, heads_kv in GQA_SHAPES[:2] if quick else GQA_SHAPES:
        measure_dense(report, batch, seqlen, heads_q, heads_kv, 128, True, repeats)
    measure_varlen(report, VARLEN_LENGTHS, 32, 8, 128, True, repeats)
    for head_dim in (64, 128):
        heads = HIDDEN // head_dim
        for causal in (True, False):
            for seqlen in [2048, 8192] if quick else SEQLENS:
                measure_dense(report, TOTAL_TOKENS // seqlen, seqlen, heads, heads, head_dim, causal, repeats)
    # InternLM2-7B attention without the causal mask (the causal rows came first).
    measure_dense(report, 4, 4096, 32, 8, 128, False, repeats)
    measure_varlen(report, VARLEN_LENGTHS, 32, 8, 128, False, repeats)
    return report


def internlm2_impls(q, k, v, cu, max_len, causal):
    """internlm2 under each GQA backward schedule (one row when there is no group to split)."""
    schedules = GQA_SCHEDULES if q.shape[1] > k.shape[1] else GQA_SCHEDULES[:1]
    return {("internlm2" if s == "serial" else f"internlm2 {s}"): lambda s=s: internlm2_steps(q, k, v, cu, max_len, causal, s)
            for s in schedules}


def measure_dense(report, batch, seqlen, heads_q, heads_kv, head_dim, causal, repeats):
    lengths = [seqlen] * batch
    q, k, v, cu = packed_inputs(lengths, heads_q, heads_kv, head_dim)
    impls = internlm2_impls(q, k, v, cu, seqlen, causal)
    for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)):
        impls[name] = lambda backend=backend: autograd_steps(sdpa(backend, batch, seqlen, causal), q, k, v)
    time_all(report, f"{batch} x {seqlen}", lengths, heads_q, heads_kv, head_dim, causal, impls, repeats)


def measure_varlen(report, lengths, heads_q, heads_kv, head_dim, causal, repeats):
    q, k, v, cu = packed_inputs(lengths, heads_q, heads_kv, head_dim)
    max_len = max(lengths)
    impls = internlm2_impls(q, k, v, cu, max_len, causal)
    varlen = torch_varlen(cu, max_len, causal)
    if varlen is None:
        report.notes.append("torch.nn.attention.varlen is not in this torch: no varlen baseline")
    else:
        impls["torch varlen_attn"] = lambda: autograd_steps(varlen, q, k, v)
    time_all(report, f"varlen {len(lengths)} seqs", lengths, heads_q, heads_kv, head_dim, causal, impls, repeats)


def time_all(report, label, lengths, heads_q, heads_kv, head_dim, causal, impls, repeats):
    flops = attention_flops(lengths, heads_q, head_dim, causal)
    results = {}
    for name, make in impls.items():
        try:
            forward, backward = make()
            results[name] = (median_time(forward, "cuda", repeats=repeats),
                             median_time(backward, "cuda", repeats=repeats))
        except (RuntimeError, NotImplementedError) as e:  # a backend that does not take this shape
            report.notes.append(f"{name} unavailable for {label} d{head_dim} {'causal' if causal else 'full'}: "
                                f"{str(e).splitlines()[0][:120]}")
        torch.cuda.empty_cache()
    base = results.get("internlm2")
    for name, (tf, tb) in results.items():
        report.add(label, head_dim, f"{heads_q}/{heads_kv}", "causal" if causal else "full", name,
                   tf * 1e3, flops / tf / 1e12, tb * 1e3, 2.5 * flops / tb / 1e12,
                   (tf + tb) / sum(base) if base else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="seqlens 2k and 8k only")
    args = ap.parse_args()
    write_partial_results_on_sigterm("flash_attention_cuda")
    run(args.repeats, args.quick).write("flash_attention_cuda")


if __name__ == "__main__":
    main()
