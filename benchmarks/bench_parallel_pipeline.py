"""Pipeline schedules: per-rank timelines and bubble fractions of 1F1B and interleaved 1F1B.

Two views:
- simulated: every rank's action list from `pipeline_schedule` replayed against the data dependencies
  with a forward costing 1 and a backward 2 time units and free communication; its bubble is compared
  with the textbook (p-1)/(m+p-1) for 1F1B and (p-1)/(v*m+p-1) for v virtual stages.
- measured: `run_pipeline` on 2 CPU gloo ranks (one per core) training an InternLM2 stage per chunk; each
  action's compute span is recorded (waiting for a neighbour excluded), and the bubble is
  1 - busy / (ranks x span).

    python -m benchmarks.bench_parallel_pipeline
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from benchmarks.harness import RESULTS_DIR, Report, machine_tag
from internlm2.model import InternLM2ForCausalLM, preset_config
from internlm2.parallel import ParallelConfig
from internlm2.parallel.pipeline import TimedAction, local_stages, run_pipeline
from internlm2.parallel.pipeline_schedule import Slot, bubble_fraction, render_timeline, simulate
from tests.distributed.spawn import run_distributed, shutdown_pool, worker_state

MODEL = dict(vocab_size=256, hidden_size=256, intermediate_size=768, num_layers=4, num_attention_heads=8,
             num_key_value_heads=4, kernels="reference")
TOKENS = 512
SIMULATED = [(4, 1, 8), (4, 2, 8), (4, 1, 16), (4, 2, 16), (8, 1, 16), (8, 2, 16), (8, 4, 16)]
MEASURED = [(1, 4), (2, 4), (1, 8), (2, 8)]  # (virtual stages, micro-batches) on pp=2
REPEATS = 3


def textbook(pp: int, v: int, m: int) -> float:
    return (pp - 1) / (v * m + pp - 1)


def _measure(virtual_stages: int, num_microbatches: int) -> list[list[tuple]]:
    parallel = worker_state(ParallelConfig(pp=2, virtual_stages=virtual_stages))
    config = preset_config("internlm2-tiny", **MODEL)
    torch.manual_seed(0)
    chunks = [InternLM2ForCausalLM(config, parallel, layer_ids=s.layer_ids, with_embedding=s.with_embedding,
                                   with_head=s.with_head) for s in local_stages(config.num_layers, parallel)]
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, MODEL["vocab_size"], (TOKENS,), generator=g) for _ in range(num_microbatches)]

    def forward_step(chunk_index, stage, hidden, ids):
        if hidden is None:
            out = stage(ids) if not stage.with_head else stage(ids, labels=torch.roll(ids, -1))
        else:
            out = stage(hidden_states=hidden, labels=torch.roll(ids, -1) if stage.with_head else None)
        return out.loss if stage.with_head else out.hidden_states

    runs = []
    for _ in range(REPEATS + 1):  # the first run warms up
        timeline: list[TimedAction] = []
        torch.distributed.barrier()
        run_pipeline(parallel, chunks, batches, forward_step, timeline)
        runs.append([(t.action, t.start, t.end) for t in timeline])
    return runs[1:]


def _slots(per_rank: list[list[tuple]]) -> list[Slot]:
    origin = min(start for rank in per_rank for _, start, _ in rank)
    return [Slot(r, a, start - origin, end - origin) for r, rank in enumerate(per_rank) for a, start, end in rank]


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    report = Report("parallel_pipeline", ["view", "schedule", "pp", "virtual stages", "micro-batches",
                                          "bubble", "textbook (p-1)/(v*m+p-1)", "step ms"])
    report.notes += [
        "simulated: forward 1, backward 2 time units, free communication",
        f"measured: 2 gloo ranks (one per core), InternLM2 {MODEL}, {TOKENS} tokens per micro-batch, "
        f"fp32; median bubble of {REPEATS} steps after one warm-up",
        f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (the machine is "
        "shared, so measured spans include other processes' time)",
    ]
    timelines = []
    for pp, v, m in SIMULATED:
        slots = simulate(pp, v, m)
        name = "1F1B" if v == 1 else "interleaved 1F1B"
        report.add("simulated", name, pp, v, m, round(bubble_fraction(slots, pp), 4), round(textbook(pp, v, m), 4), "")
        if m == 8:
            timelines.append(f"simulated {name}, pp={pp}, v={v}, m={m} (F = 1 unit, B = 2 units):\n"
                             + render_timeline(slots, pp))
    for v, m in MEASURED:
        per_rank = run_distributed(2, _measure, v, m, timeout_s=600)
        steps = [_slots([per_rank[r][i] for r in range(2)]) for i in range(REPEATS)]
        bubbles = [bubble_fraction(s, 2) for s in steps]
        i = bubbles.index(statistics.median(bubbles))
        span = max(s.end for s in steps[i])
        name = "1F1B" if v == 1 else "interleaved 1F1B"
        report.add("measured", name, 2, v, m, round(bubbles[i], 4), round(textbook(2, v, m), 4), round(span * 1e3, 1))
        unit = statistics.median(s.end - s.start for s in steps[i] if s.action.kind == "F") / 2
        timelines.append(f"measured {name}, pp=2, v={v}, m={m} (one column = half a median forward, "
                         f"{unit * 1e3:.1f} ms):\n" + render_timeline(steps[i], 2, unit=unit))
    shutdown_pool()
    report.write()
    path = RESULTS_DIR / f"parallel_pipeline_timelines-{machine_tag()}.txt"
    path.write_text("\n\n".join(timelines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
