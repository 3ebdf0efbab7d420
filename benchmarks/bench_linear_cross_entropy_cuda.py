"""Linear cross-entropy on CUDA at InternLM2's vocabulary (92544): internlm2's chunked op (cuBLAS matmuls
per chunk + the fused cross_entropy_chunk_ kernel) vs F.cross_entropy on the full logits, fwd+bwd time and
peak CUDA memory (allocated above the inputs), in one run.

Baselines: HF's way (logits upcast to float32 before the loss) and F.cross_entropy on the bf16 logits.
Hidden size 4096 (7B), bf16, every 8th token ignored. The chunk kernel alone is also timed on one chunk of
logits, with its bandwidth (the bytes it must move: read the chunk and write the gradient in place) as a
fraction of the measured copy bandwidth.

    python -m benchmarks.bench_linear_cross_entropy_cuda [--repeats N]
"""

import argparse

import torch
import torch.nn.functional as F

from benchmarks.harness import (
    Report,
    cuda_peak_memory,
    measured_copy_bandwidth,
    median_time,
    write_partial_results_on_sigterm,
)
from internlm2 import ops
from internlm2.ops.linear_cross_entropy import DEFAULT_CHUNK_BYTES

VOCAB, HIDDEN = 92544, 4096
TOKENS = [4096, 16384]

IMPLEMENTATIONS = {
    "internlm2 linear_cross_entropy": ops.linear_cross_entropy,
    "F.cross_entropy(float32 logits)": lambda h, w, labels: F.cross_entropy((h @ w.t()).float(), labels),
    "F.cross_entropy(bf16 logits)": lambda h, w, labels: F.cross_entropy(h @ w.t(), labels),
}


def run(repeats: int) -> Report:
    report = Report("Linear cross-entropy CUDA benchmark", ["tokens", "impl", "fwd+bwd ms", "speedup vs float32 logits",
                                                            "peak MiB", "memory vs float32 logits"])
    w = (torch.randn(VOCAB, HIDDEN, device="cuda") / HIDDEN**0.5).to(torch.bfloat16).requires_grad_()
    for tokens in TOKENS:
        h = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16).requires_grad_()
        labels = torch.randint(0, VOCAB, (tokens,), device="cuda")
        labels[::8] = -100
        times, peaks = {}, {}
        for name, fn in IMPLEMENTATIONS.items():
            def step(fn=fn):
                h.grad = w.grad = None
                fn(h, w, labels).backward()
            times[name] = median_time(step, "cuda", repeats=repeats)
            h.grad = w.grad = None
            peaks[name] = cuda_peak_memory(step)
            torch.cuda.empty_cache()
        base = "F.cross_entropy(float32 logits)"
        for name in IMPLEMENTATIONS:
            report.add(tokens, name, times[name] * 1e3, times[base] / times[name], peaks[name] / 2**20,
                       peaks[name] / peaks[base])

    copy_bw = measured_copy_bandwidth("cuda")
    rows = DEFAULT_CHUNK_BYTES // (VOCAB * 2)  # one chunk of bf16 logits as linear_cross_entropy cuts them
    logits = torch.randn(rows, VOCAB, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, VOCAB, (rows,), device="cuda")
    scale = torch.tensor(1.0, device="cuda")
    t = median_time(lambda: torch.ops.internlm2.cross_entropy_chunk_(logits, labels, -100, 0.0, scale), "cuda",
                    repeats=repeats)
    moved = 2 * logits.numel() * logits.element_size()
    report.notes.append(f"cross_entropy_chunk_ alone on [{rows}, {VOCAB}] bf16: {t * 1e6:.1f} us, "
                        f"{moved / t / 1e9:.0f} GB/s = {100 * moved / t / copy_bw:.0f}% of the measured copy bandwidth "
                        f"({copy_bw / 1e9:.0f} GB/s)")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    write_partial_results_on_sigterm("linear_cross_entropy_cuda")
    run(args.repeats).write("linear_cross_entropy_cuda")


if __name__ == "__main__":
    main()
