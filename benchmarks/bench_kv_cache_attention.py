"""Decoding against a KV cache: internlm2's kv_cache_attention vs the SDPA path it replaced, in one run.

The SDPA path is what generation ran before: torch's scaled_dot_product_attention (GQA-aware) over the
window of the longest sequence with a boolean mask of each sequence's length. Two measurements at 1k, 4k
and 16k cached tokens per sequence:

1. the op: one decode step's attention of one layer (1.8B's attention shape: 16 query heads over 8 KV
   heads, head dim 128), batch 1 and 4, the batch's cache rows of different lengths (L, 3L/4, L/2, L/4);
2. the model: decode tokens/s of `internlm2-small` (8 layers, 8 heads over 2 KV heads, head dim 64) whose
   cache holds L tokens, its attention through each path (`Kernels.kv_cache_attention` swapped), steps
   timed in alternation so that a shared machine's load falls on both alike.

    python -m benchmarks.bench_kv_cache_attention [--device cpu|cuda] [--dtypes float32 bfloat16] [--repeats N]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch
import torch.nn.functional as F

from benchmarks.harness import Report, alternating_times, load_note, paired_speedup
from internlm2 import ops
from internlm2.model import InternLM2ForCausalLM, KVCache, preset_config

CACHE_LENGTHS = (1024, 4096, 16384)
HEADS_Q, HEADS_KV, HEAD_DIM = 16, 8, 128
MODEL = "internlm2-small"


def sdpa_kv_cache_attention(q, k_cache, v_cache, k_lengths, cu_seqlens_q=None, max_seqlen_q=None, causal=True,
                            softmax_scale=None, return_lse=False):
    """The decode path before kv_cache_attention (one query per sequence), with kv_cache_attention's
    signature so the model can run it."""
    window = int(k_lengths.max())
    visible = torch.arange(window, device=q.device)[None, :] < k_lengths[:, None]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k_cache[:, :, :window], v_cache[:, :, :window],
                                         attn_mask=visible[:, None, None, :], enable_gqa=True, scale=softmax_scale)
    return out.squeeze(2)


PATHS = {"internlm2 kv_cache_attention": ops.kv_cache_attention, "SDPA (previous decode path)": sdpa_kv_cache_attention}


def op_case(batch: int, length: int, dtype, device):
    lengths = [length * (4 - i % 4) // 4 for i in range(batch)]  # L, 3L/4, L/2, L/4, L, ...
    q = torch.randn(batch, HEADS_Q, HEAD_DIM, dtype=dtype, device=device)
    k_cache, v_cache = (torch.randn(batch, HEADS_KV, length, HEAD_DIM, dtype=dtype, device=device) for _ in range(2))
    return q, k_cache, v_cache, torch.tensor(lengths, dtype=torch.int32, device=device)


def add_rows(report: Report, case: str, dtype, times: dict[str, list[float]], tokens: int) -> None:
    (ours_name, ours), (_, sdpa) = times.items()
    speedup = paired_speedup(ours, sdpa)
    name = str(dtype).removeprefix("torch.")
    report.add(case, name, ours_name, statistics.median(ours) * 1e3, tokens / statistics.median(ours), speedup)
    report.add(case, name, "SDPA (previous decode path)", statistics.median(sdpa) * 1e3, tokens / statistics.median(sdpa),
               1.0)


def decoding_model(dtype, device, kernels: str):
    torch.manual_seed(0)
    model = InternLM2ForCausalLM(preset_config(MODEL, kernels=kernels), dtype=dtype, device=device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


class Decoder:
    """A model with its own cache prefilled with `length` random tokens per sequence, stepping one token."""

    def __init__(self, model, attention, batch: int, length: int, steps: int, device):
        self.model = model
        self.kernels = dataclasses.replace(model.kernels, kv_cache_attention=attention)
        config = model.config
        self.cache = KVCache(model.layer_ids, batch, length + steps + 2, config.num_key_value_heads,
                             config.head_size, dtype=model.output.weight.dtype, device=device)
        ids = torch.randint(0, config.vocab_size, (batch * length,), device=device)
        cu = torch.arange(0, batch * length + 1, length, dtype=torch.int32, device=device)
        with torch.no_grad():
            model(ids, cu_seqlens=cu, kv_cache=self.cache, return_logits=False)
        self.next_ids = torch.zeros(batch, dtype=torch.long, device=device)

    @torch.no_grad()
    def step(self):
        backbone = self.model.model  # whose layers take the kernels (the LM head's are not timed here)
        saved, backbone.kernels = backbone.kernels, self.kernels
        try:
            self.model(self.next_ids, kv_cache=self.cache, return_logits=False)
        finally:
            backbone.kernels = saved


def run(dtypes, device: str, repeats: int) -> Report:
    report = Report("KV-cache attention decode benchmark",
                    ["case", "dtype", "impl", "ms per step", "tokens/s", "speedup vs SDPA (paired median)"])
    report.notes.append(load_note())
    report.notes.append(f"op: one layer's decode attention, Hq={HEADS_Q}, Hkv={HEADS_KV}, D={HEAD_DIM}; a batch's "
                        "cache rows hold L, 3L/4, L/2, L/4 tokens (repeating); tokens/s = sequences / step time")
    config = preset_config(MODEL)
    report.notes.append(f"model: {MODEL} ({config.num_layers} layers, hidden {config.hidden_size}, "
                        f"{config.num_attention_heads} heads / {config.num_key_value_heads} KV heads, head dim "
                        f"{config.head_size}), fused kernels, the cache prefilled with L random tokens; "
                        "decode steps of both paths alternate, speedup = median of per-round ratios")
    for dtype in dtypes:
        for length in CACHE_LENGTHS:
            for batch in (1, 4):
                inputs = op_case(batch, length, dtype, device)
                times = alternating_times({n: (lambda f=f: f(*inputs)) for n, f in PATHS.items()}, device, repeats, 10)
                add_rows(report, f"op, batch {batch}, L={length}", dtype, times, batch)
    for dtype in dtypes:
        model = decoding_model(dtype, device, "fused")
        for length in CACHE_LENGTHS:
            steps = 4 * repeats + 2
            decoders = {n: Decoder(model, f, 1, length, steps, device) for n, f in PATHS.items()}
            times = alternating_times({n: d.step for n, d in decoders.items()}, device, repeats, 4)
            add_rows(report, f"{MODEL} decode, batch 1, L={length}", dtype, times, 1)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    suffix = "cpu" if args.device == "cpu" else "cuda"
    run([getattr(torch, d) for d in args.dtypes], args.device, args.repeats).write(f"kv_cache_attention_{suffix}")


if __name__ == "__main__":
    main()
