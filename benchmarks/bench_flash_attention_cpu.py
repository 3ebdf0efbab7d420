"""Flash attention on CPU: internlm2's kernel vs torch.nn.functional.scaled_dot_product_attention.

SDPA on CPU runs ATen's own flash kernel (tiled, fp32 math, GQA through enable_gqa). Both sides compute
causal attention with 16 query heads over 4 KV heads (GQA 4), head dim 128: one sequence of 2048 tokens,
and 4 sequences of 512 (packed with cu_seqlens for internlm2, a batch of 4 for SDPA: the same work).
Both sides are timed in alternating rounds (a shared machine's load falls on both alike): times are
medians over rounds, speedups the median of the per-round ratios. Peak memory of forward+backward (resident memory growth
of a fresh process that builds the inputs and runs one step) is shown for 1k/2k/4k tokens: it must grow
linearly with the sequence length (a T x T score matrix would grow 4x per doubling).

    python -m benchmarks.bench_flash_attention_cpu [--repeats N] [--dtypes float32 bfloat16]
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

from benchmarks.harness import Report, alternating_times, cpu_peak_memory, load_note, paired_speedup
from internlm2 import ops

HEADS_Q, HEADS_KV, HEAD_DIM = 16, 4, 128
LAYOUTS = {"1 x 2048": (1, 2048), "4 x 512 packed": (4, 512)}
MEMORY_LENGTHS = (1024, 2048, 4096)


def make_inputs(batch, length, dtype):
    """Packed q/k/v [B*L, H, D] and cu_seqlens for internlm2; [B, H, L, D] views of the same data for SDPA."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch * length, h, HEAD_DIM, generator=g, dtype=dtype)
               for h in (HEADS_Q, HEADS_KV, HEADS_KV))
    cu = torch.arange(0, batch * length + 1, length, dtype=torch.int32)
    sdpa = [t.view(batch, length, -1, HEAD_DIM).transpose(1, 2).contiguous() for t in (q, k, v)]
    return (q, k, v, cu), sdpa


def ours(inputs, length, backward):
    q, k, v, cu = inputs
    out = ops.flash_attention(q, k, v, cu, length, causal=True)
    if backward:
        out.backward(torch.ones_like(out))


def sdpa(inputs, length, backward):
    q, k, v = inputs
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if backward:
        out.backward(torch.ones_like(out))


def flops(batch, length, backward):
    """FlashAttention's count: 4 * B * L^2 * Hq * D / 2 for causal; backward 2.5x the forward."""
    f = 4 * batch * length**2 * HEADS_Q * HEAD_DIM / 2
    return f * (3.5 if backward else 1.0)


def step(fn, inputs, length, backward):
    leaves = [t.requires_grad_(backward) for t in inputs if t.is_floating_point()]

    def run():
        for t in leaves:
            t.grad = None
        if backward:
            fn(inputs, length, True)
        else:
            with torch.no_grad():
                fn(inputs, length, False)

    return run


def peak_bytes(fn, length, dtype):
    def job():
        packed, batched = make_inputs(1, length, dtype)
        inputs = packed if fn is ours else batched
        step(fn, inputs, length, True)()

    return cpu_peak_memory(job)


def run(dtypes, repeats: int) -> Report:
    report = Report(
        "Flash attention CPU benchmark",
        ["case", "dtype", "pass", "impl", "ms", "GFLOP/s", "speedup vs SDPA", "peak MiB"],
    )
    report.notes.append(load_note())
    report.notes.append(f"causal, Hq={HEADS_Q}, Hkv={HEADS_KV} (GQA 4), D={HEAD_DIM}; SDPA with enable_gqa=True")
    report.notes.append("GFLOP/s by FlashAttention's formula (causal halves the work; backward = 2.5x forward)")
    # Memory first: cpu_peak_memory forks, and a child forked after this process ran OpenMP/MKL threads
    # hangs in its first parallel region.
    for dtype in dtypes:
        for length in MEMORY_LENGTHS:
            for impl, fn in (("internlm2", ours), ("SDPA", sdpa)):
                report.add(f"1 x {length}", str(dtype).removeprefix("torch."), "fwd+bwd memory", impl, "", "", "",
                           peak_bytes(fn, length, dtype) / 2**20)
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        for case, (batch, length) in LAYOUTS.items():
            packed, batched = make_inputs(batch, length, dtype)
            for backward in (False, True):
                times = alternating_times({"internlm2": step(ours, packed, length, backward),
                                           "SDPA": step(sdpa, batched, length, backward)}, rounds=repeats)
                t_ours, t_sdpa = statistics.median(times["internlm2"]), statistics.median(times["SDPA"])
                pass_name = "fwd+bwd" if backward else "fwd"
                f = flops(batch, length, backward)
                report.add(case, name, pass_name, "internlm2", t_ours * 1e3, f / t_ours / 1e9,
                           paired_speedup(times["internlm2"], times["SDPA"]), "")
                report.add(case, name, pass_name, "SDPA", t_sdpa * 1e3, f / t_sdpa / 1e9, 1.0, "")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()
    run([getattr(torch, d) for d in args.dtypes], args.repeats).write("flash_attention_cpu")


if __name__ == "__main__":
    main()
