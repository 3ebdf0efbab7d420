"""RoPE on CUDA: internlm2's apply_rope vs the eager rotate_half composite (float32 math, HF style) and
torch.compile of it, forward and forward+backward, with achieved bandwidth and its fraction of the
device's measured copy bandwidth. The cos/sin tables come from internlm2's rope_cos_sin (timed too).

Inputs are InternLM2-7B's q [T, 32, 128] and k [T, 8, 128] at T = 16k tokens, bf16, both contiguous and as
strided views of the fused qkv projection [T, 8, 6, 128] (no copy before rotating). Bytes: x read, out
written, cos and sin read (float32, once per token); the backward (the inverse rotation) the same.

    python -m benchmarks.bench_rope_cuda [--repeats N]
"""

import argparse

import torch

from benchmarks.harness import Report, measured_copy_bandwidth, median_time, write_partial_results_on_sigterm
from internlm2 import ops

TOKENS, KV_HEADS, GROUP, HEAD_DIM = 16384, 8, 4, 128

IMPLEMENTATIONS = {
    "internlm2": ops.apply_rope,
    "eager": ops.apply_rope_reference,
    "torch.compile(eager)": torch.compile(ops.apply_rope_reference),
}


def inputs():
    qkv = torch.randn(TOKENS, KV_HEADS, GROUP + 2, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    return {
        "q contiguous": qkv[:, :, :GROUP].reshape(TOKENS, KV_HEADS * GROUP, HEAD_DIM).contiguous(),
        "k contiguous": qkv[:, :, GROUP].contiguous(),
        "q view of qkv": qkv[:, :, :GROUP],
        "k view of qkv": qkv[:, :, GROUP],
    }


def run(repeats: int) -> Report:
    copy_bw = measured_copy_bandwidth("cuda")
    report = Report("RoPE CUDA benchmark", ["input", "shape", "pass", "impl", "ms", "speedup vs eager", "GB/s",
                                            "% of copy BW"])
    report.notes.append(f"measured device copy bandwidth: {copy_bw / 1e9:.0f} GB/s; bf16 x, float32 tables")
    positions = torch.arange(TOKENS, device="cuda")
    t_tables = median_time(lambda: ops.rope_cos_sin(positions, HEAD_DIM, 1e6), "cuda", repeats=repeats)
    report.notes.append(f"rope_cos_sin for {TOKENS} positions x {HEAD_DIM}: {t_tables * 1e3:.3f} ms")
    cos, sin = ops.rope_cos_sin(positions, HEAD_DIM, 1e6)
    for label, x in inputs().items():
        grad = torch.randn(x.shape, device="cuda", dtype=x.dtype)
        table_bytes = 2 * cos.numel() * cos.element_size()
        x_bytes = x.numel() * x.element_size()
        for backward in (False, True):
            times = {}
            for name, fn in IMPLEMENTATIONS.items():
                if backward:
                    xg = x.detach().clone().requires_grad_() if x.is_contiguous() else x.detach().requires_grad_()

                    def step(fn=fn, xg=xg):
                        xg.grad = None
                        fn(xg, cos, sin).backward(grad)
                else:

                    def step(fn=fn):
                        with torch.no_grad():
                            fn(x, cos, sin)

                times[name] = median_time(step, "cuda", repeats=repeats)
            moved = (2 * x_bytes + table_bytes) * (2 if backward else 1)
            for name, t in times.items():
                report.add(label, "x".join(map(str, x.shape)), "fwd+bwd" if backward else "fwd", name, t * 1e3,
                           times["eager"] / t, moved / t / 1e9, 100 * moved / t / copy_bw)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    write_partial_results_on_sigterm("rope_cuda")
    run(args.repeats).write("rope_cuda")


if __name__ == "__main__":
    main()
