#!/usr/bin/env python3
"""One small flash-attention forward + backward for compute-sanitizer (scripts/gpu_check.sh runs it under
`compute-sanitizer --tool memcheck` with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that every tensor is its own
allocation and a read or write past one is caught rather than landing in a neighbour in the cache).

bf16, head dim 128, GQA 8 query heads over 2 KV heads, varlen: sequences of 1, 37, 128 and 200 tokens (a
single token, partial tiles, a full tile, a sequence crossing tiles), causal; the backward under both GQA
schedules (INTERNLM2_FLASH_BWD_GQA=serial and split). `--device cpu` runs the same calls on the CPU kernels
(the check's dry run).

    PYTHONPATH=. python scripts/gpu_memcheck_case.py [--device cuda|cpu]
"""

import argparse
import os
import sys

import torch

from internlm2 import ops

LENGTHS = [1, 37, 128, 200]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    device = ap.parse_args().device
    g = torch.Generator(device=device).manual_seed(0)
    total = sum(LENGTHS)
    q, k, v = (torch.randn(total, h, 128, device=device, generator=g).to(torch.bfloat16).requires_grad_()
               for h in (8, 2, 2))
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device=device)
    grad_out = torch.randn(q.shape, device=device, generator=g).to(torch.bfloat16)
    for schedule in ("serial", "split"):
        os.environ["INTERNLM2_FLASH_BWD_GQA"] = schedule
        out, lse = ops.flash_attention(q, k, v, cu, max(LENGTHS), causal=True, return_lse=True)
        grads = torch.autograd.grad((out * grad_out).sum() + lse.sum(), (q, k, v))
        if device == "cuda":
            torch.cuda.synchronize()
        finite = all(torch.isfinite(t).all() for t in (out, lse, *grads))
        print(f"{schedule}: fwd+bwd ran, outputs {'finite' if finite else 'NOT FINITE'}", flush=True)
        if not finite:
            sys.exit(1)


if __name__ == "__main__":
    main()
