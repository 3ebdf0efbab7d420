"""RoPE on CPU: internlm2's apply_rope vs the eager HF composite x * cos + rotate_half(x) * sin, forward and
forward+backward, on a contiguous q [T, Hq, D] and on q as a strided view of the fused wqkv output
([T, Hkv, group + 2, D][:, :, :group], what the model passes). Ratios come from one run.

    python -m benchmarks.bench_rope_cpu [--repeats N]
"""

import argparse

import torch

from benchmarks.harness import Report, load_note, median_time, write_partial_results_on_sigterm
from internlm2 import ops
from internlm2.ops.rope import rotate_half

TOKENS, HEADS_KV, GROUP, HEAD_DIM = 4096, 8, 2, 128  # 1.8B: 16 query heads, 8 KV heads


def eager(x, cos, sin):
    """HF's apply_rotary_pos_emb on [T, ..., D]: tables broadcast over heads, math in x's dtype."""
    table_shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    c, s = cos.view(table_shape).to(x.dtype), sin.view(table_shape).to(x.dtype)
    return x * c + rotate_half(x) * s


IMPLEMENTATIONS = {"internlm2 apply_rope": ops.apply_rope, "eager HF composite": eager}


def inputs(layout: str, dtype):
    if layout == "q contiguous":
        return torch.randn(TOKENS, HEADS_KV * GROUP, HEAD_DIM, dtype=dtype)
    qkv = torch.randn(TOKENS, HEADS_KV, GROUP + 2, HEAD_DIM, dtype=dtype)
    return qkv[:, :, :GROUP]


def run(repeats: int) -> Report:
    report = Report("RoPE CPU benchmark", ["x", "dtype", "pass", "impl", "ms", "speedup vs eager"])
    report.notes.append(load_note())
    report.notes.append(f"T={TOKENS}, Hq={HEADS_KV * GROUP} ({HEADS_KV} KV heads x group {GROUP}), D={HEAD_DIM}")
    cos, sin = ops.rope_cos_sin(torch.arange(TOKENS), HEAD_DIM, 1e6)
    for layout in ("q contiguous", "q view of fused qkv"):
        for dtype in (torch.float32, torch.bfloat16):
            x = inputs(layout, dtype)
            grad = torch.randn(x.shape, dtype=dtype)
            for backward in (False, True):
                times = {}
                for name, fn in IMPLEMENTATIONS.items():
                    if backward:
                        leaf = x.detach().requires_grad_()

                        def step(fn=fn, leaf=leaf):
                            leaf.grad = None
                            fn(leaf, cos, sin).backward(grad)
                    else:

                        def step(fn=fn):
                            with torch.no_grad():
                                fn(x, cos, sin)

                    times[name] = median_time(step, repeats=repeats)
                base = times["eager HF composite"]
                for name, t in times.items():
                    report.add(layout, str(dtype).removeprefix("torch."), "fwd+bwd" if backward else "fwd", name,
                               t * 1e3, base / t)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    write_partial_results_on_sigterm("rope_cpu")
    run(args.repeats).write("rope_cpu")


if __name__ == "__main__":
    main()
