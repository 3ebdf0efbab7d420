"""InternLM2ForCausalLM vs transformers' LlamaForCausalLM of the same shape and weights, in one run.

1. Training step: forward + backward of the causal-LM loss, tokens/s (our loss never materialises the
   logits; transformers' does).
2. Generation: a batch of prompts of different lengths, greedy, KV cache; new tokens/s against
   transformers' `generate` (left-padded batch, its own cache).

    python -m benchmarks.bench_model [--device cpu|cuda] [--dtype float32|bfloat16] [--seq 1024] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch

from benchmarks.harness import Report, alternating_times, paired_speedup
from internlm2.model import InternLM2ForCausalLM, preset_config, save_pretrained
from internlm2.model.generation import SamplingParams, generate


def fused_kernels_available(device: str) -> bool:
    key = "CUDA" if device.startswith("cuda") else "CPU"
    ops = ("rms_norm_forward", "swiglu_forward", "rope_cos_sin", "apply_rope", "flash_attention_forward",
           "cross_entropy_chunk_")
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"internlm2::{op}", key) for op in ops)


def add_row(report: Report, workload: str, kernels: str, tokens: int, times: dict[str, list[float]]) -> None:
    """Throughputs from the medians; the speedup is the median of the per-round ratios (paired)."""
    ours, theirs = times["internlm2"], times["transformers"]
    paired = paired_speedup(ours, theirs)
    report.add(workload, kernels, tokens / statistics.median(ours), tokens / statistics.median(theirs), paired)


def build_pair(config, dtype, device):
    """Our model and transformers' Llama with identical weights (through a Llama-layout checkpoint)."""
    from transformers import LlamaForCausalLM

    ours = InternLM2ForCausalLM(config, dtype=dtype, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, os.path.join(tmp, "llama"), fmt="llama")
        theirs = LlamaForCausalLM.from_pretrained(os.path.join(tmp, "llama"), dtype=dtype, attn_implementation="sdpa")
    return ours, theirs.to(device)


def train_step_times(ours, theirs, seq: int, device: str, repeats: int) -> dict[str, list[float]]:
    vocab = ours.config.vocab_size
    ids = torch.randint(0, vocab, (1, seq), device=device)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100

    def step_ours():
        ours.zero_grad(set_to_none=True)
        ours(ids, labels=labels).loss.backward()

    def step_theirs():
        theirs.zero_grad(set_to_none=True)
        # transformers shifts labels itself: pass the unshifted ids.
        theirs(ids, labels=ids).loss.backward()

    return alternating_times({"internlm2": step_ours, "transformers": step_theirs}, device, repeats)


def generation_times(ours, theirs, prompt_lengths, new_tokens: int, device: str, repeats: int) -> dict[str, list[float]]:
    vocab = ours.config.vocab_size
    prompts = [torch.randint(3, vocab, (n,)).tolist() for n in prompt_lengths]
    width = max(prompt_lengths)
    padded = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(padded)
    for i, p in enumerate(prompts):  # left padding, as decoder-only batched generation needs
        padded[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    padded, mask = padded.to(device), mask.to(device)
    params = SamplingParams(max_new_tokens=new_tokens, stop_token_ids=())

    @torch.no_grad()
    def gen_ours():
        generate(ours, prompts, params)

    @torch.no_grad()
    def gen_theirs():
        theirs.generate(padded, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        do_sample=False, eos_token_id=None, pad_token_id=0)

    return alternating_times({"internlm2": gen_ours, "transformers": gen_theirs}, device, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    kernels = ["reference"] + (["fused"] if fused_kernels_available(args.device) else [])
    config = preset_config("internlm2-small")
    report = Report("InternLM2 model vs transformers Llama",
                    ["workload", "kernels", "internlm2 tok/s", "transformers tok/s", "speedup (paired median)"])
    report.notes.append(
        f"shape: internlm2-small (hidden {config.hidden_size}, {config.num_layers} layers, "
        f"{config.num_attention_heads} heads / {config.num_key_value_heads} KV heads, FFN "
        f"{config.intermediate_size}, vocab {config.vocab_size}), {args.dtype}, same weights in both")
    report.notes.append("transformers: LlamaForCausalLM with attn_implementation='sdpa'")
    report.notes.append(f"{args.repeats} alternating rounds (ours, theirs, ours, ...): tok/s from the median times, "
                        f"speedup = median of the per-round time ratios; load average at start "
                        f"{os.getloadavg()[0]:.1f} (a shared machine), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    if "fused" not in kernels:
        report.notes.append("fused kernels not built for this device yet: only the reference path is measured")
    prompt_lengths = (100, 37, 64, 128, 12, 80, 50, 96)
    for name in kernels:
        ours, theirs = build_pair(config.replace(kernels=name), dtype, args.device)
        add_row(report, f"fwd+bwd, 1 x {args.seq} tokens", name, args.seq,
                train_step_times(ours, theirs, args.seq, args.device, args.repeats))
        ours.eval(), theirs.eval()
        add_row(report, f"greedy generate, {len(prompt_lengths)} prompts (12-128 tok) x {args.new_tokens} new", name,
                len(prompt_lengths) * args.new_tokens,
                generation_times(ours, theirs, prompt_lengths, args.new_tokens, args.device, args.repeats))
    report.write("model")


if __name__ == "__main__":
    main()
