"""Context parallelism (ring attention): memory per rank for cp = 1, 2, 4 at one total length, and the step
time with each K/V hop overlapped with the attention of the block already held, against waiting for
every hop first (`ParallelConfig.cp_overlap=False`).

One step is the forward and backward of an InternLM2 model over one packed row of TOTAL tokens, split
over the CP ranks (CPU gloo ranks, one thread each). Per rank it records:
- saved activations: the bytes autograd holds between the forward and the backward, parameters left
  out (counted by `saved_tensors_hooks`, storage by storage), which ring attention's leaner backward
  changes;
- peak memory: the growth of the process's peak resident memory during its first step (each layout runs
  in freshly spawned processes);
- step time: the median over REPEATS steps after one warm-up, with and without the overlap.

    python -m benchmarks.bench_ring_attention [--total 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource

import torch

from benchmarks.harness import Report, load_note, median_time
from internlm2.model import InternLM2ForCausalLM, preset_config
from internlm2.parallel import ParallelConfig
from tests.distributed.spawn import run_distributed, shutdown_pool, worker_state

MODEL = dict(vocab_size=2048, hidden_size=256, intermediate_size=768, num_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=1 << 16)
MiB = 2 ** 20


def _saved_bytes(fn, model) -> tuple[torch.Tensor, int]:
    """fn()'s result and the bytes of the storages autograd saved for its backward, the model's
    parameters left out (they are held anyway)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def _step_case(cp: int, overlap: bool, total: int, repeats: int) -> dict:
    parallel = worker_state(ParallelConfig(cp=cp, cp_overlap=overlap))
    torch.manual_seed(0)  # every rank builds the same weights and row
    model = InternLM2ForCausalLM(preset_config("internlm2-tiny", **MODEL, kernels="fused"), parallel)
    ids = torch.randint(0, MODEL["vocab_size"], (total,))
    labels = torch.roll(ids, -1)
    cu = torch.tensor([0, total], dtype=torch.int32)

    def forward():
        return model(ids, cu_seqlens=cu, labels=labels, loss_reduction="sum").loss

    def step():
        model.zero_grad(set_to_none=True)
        forward().backward()

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss, saved = _saved_bytes(forward, model)
    loss.backward()
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) * 1024
    seconds = median_time(step, warmup=1, repeats=repeats)
    return {"saved": saved, "peak": peak, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--total", type=int, default=4096, help="tokens in the packed row (all CP ranks together)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    report = Report("ring_attention", ["cp", "overlap", "saved activations MiB (max rank)",
                                       "peak memory MiB (max rank)", "step s (median, slowest rank)",
                                       "step vs no overlap"])
    report.notes += [
        f"model: InternLM2 {MODEL}, fp32, fused kernels; one packed row of {args.total} tokens split over the CP "
        "ranks (zigzag); a step is forward + backward of the summed loss",
        "gloo ranks with one thread each on one machine, so the cp ranks share its cores; peak memory is the "
        "growth of the peak resident set during the first step",
        load_note(),
    ]
    for cp in (1, 2, 4):
        no_overlap = None
        for overlap in ((True,) if cp == 1 else (False, True)):
            ranks = run_distributed(cp, _step_case, cp, overlap, args.total, args.repeats, timeout_s=1800)
            seconds = max(r["seconds"] for r in ranks)
            no_overlap = seconds if not overlap else no_overlap
            ratio = f"{seconds / no_overlap:.3f}" if overlap and no_overlap else ""
            report.add(cp, "-" if cp == 1 else "on" if overlap else "off",
                       round(max(r["saved"] for r in ranks) / MiB, 2), round(max(r["peak"] for r in ranks) / MiB, 1),
                       round(seconds, 3), ratio)
            shutdown_pool()  # fresh processes for the next layout, so each peak is its own
    report.write()


if __name__ == "__main__":
    main()
