"""SwiGLU on CUDA: internlm2's kernel vs eager F.silu(gate) * up and torch.compile of it, forward and
forward+backward, with achieved bandwidth (bytes the op must move / time) and its fraction of the device's
measured copy bandwidth.

Shapes are [tokens, ffn] of InternLM2's MLP at 8k tokens (1.8B: ffn 8192; 7B: ffn 14336), bf16 (the
training dtype). Bytes: forward reads gate and up and writes out; backward reads grad_out, gate, up and
writes two gradients.

    python -m benchmarks.bench_swiglu_cuda [--repeats N]
"""

import argparse

import torch
import torch.nn.functional as F

from benchmarks.harness import Report, measured_copy_bandwidth, median_time, write_partial_results_on_sigterm
from internlm2 import ops

SHAPES = [(8192, 8192), (8192, 14336)]


def eager(gate, up):
    return F.silu(gate) * up


IMPLEMENTATIONS = {"internlm2": ops.swiglu, "eager": eager, "torch.compile(eager)": torch.compile(eager)}


def run(repeats: int) -> Report:
    copy_bw = measured_copy_bandwidth("cuda")
    report = Report("SwiGLU CUDA benchmark", ["shape", "pass", "impl", "ms", "speedup vs eager", "GB/s", "% of copy BW"])
    report.notes.append(f"measured device copy bandwidth: {copy_bw / 1e9:.0f} GB/s; bf16")
    for shape in SHAPES:
        gate, up, grad = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        n_bytes = gate.numel() * gate.element_size()
        for backward in (False, True):
            times = {}
            for name, fn in IMPLEMENTATIONS.items():
                if backward:
                    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()

                    def step(fn=fn, g=g, u=u):
                        g.grad = u.grad = None
                        fn(g, u).backward(grad)
                else:

                    def step(fn=fn):
                        with torch.no_grad():
                            fn(gate, up)

                times[name] = median_time(step, "cuda", repeats=repeats)
            moved = n_bytes * (3 + (5 if backward else 0))
            for name, t in times.items():
                report.add("x".join(map(str, shape)), "fwd+bwd" if backward else "fwd", name, t * 1e3,
                           times["eager"] / t, moved / t / 1e9, 100 * moved / t / copy_bw)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    write_partial_results_on_sigterm("swiglu_cuda")
    run(args.repeats).write("swiglu_cuda")


if __name__ == "__main__":
    main()
