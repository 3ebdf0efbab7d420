"""SwiGLU on CPU: internlm2's kernel vs the eager composite F.silu(gate) * up, forward and forward+backward.

Shapes are [tokens, ffn] of InternLM2's MLP (1.8B: ffn 8192; 7B: ffn 14336). Ratios come from one run.

Each output of these sizes is a fresh mmap from glibc, so page faults weigh on both sides; with
THP_MEM_ALLOC_ENABLE=1 torch's CPU allocator asks for huge pages and the times show the kernels
themselves (the result file then ends in _thp).

    [THP_MEM_ALLOC_ENABLE=1] python -m benchmarks.bench_swiglu_cpu [--repeats N]
"""

import argparse
import os

import torch
import torch.nn.functional as F

from benchmarks.harness import Report, load_note, median_time, write_partial_results_on_sigterm
from internlm2 import ops

SHAPES = [(4096, 8192), (2048, 14336)]
IMPLEMENTATIONS = {
    "internlm2 swiglu": ops.swiglu,
    "eager F.silu(gate) * up": lambda gate, up: F.silu(gate) * up,
}


def huge_pages() -> bool:
    return os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"


def run(repeats: int) -> Report:
    report = Report("SwiGLU CPU benchmark", ["shape", "dtype", "pass", "impl", "ms", "speedup vs eager"])
    report.notes.append(load_note())
    report.notes.append(f"huge pages for large tensors (THP_MEM_ALLOC_ENABLE): {huge_pages()}")
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            gate, up = (torch.randn(shape, dtype=dtype) for _ in range(2))
            grad = torch.randn(shape, dtype=dtype)
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

                    times[name] = median_time(step, repeats=repeats)
                base = times["eager F.silu(gate) * up"]
                for name, t in times.items():
                    report.add("x".join(map(str, shape)), str(dtype).removeprefix("torch."),
                               "fwd+bwd" if backward else "fwd", name, t * 1e3, base / t)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    stem = "swiglu_cpu_thp" if huge_pages() else "swiglu_cpu"
    write_partial_results_on_sigterm(stem)
    run(args.repeats).write(stem)


if __name__ == "__main__":
    main()
