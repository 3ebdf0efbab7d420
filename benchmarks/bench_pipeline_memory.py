"""Peak host memory per pipeline rank of one 1F1B step, by pipeline size and number of micro-batches.

Each rank's chunk is a linear layer on a [4096, 1024] float32 activation (16 MiB), so what the schedule
keeps alive dominates: the activations of micro-batches in flight, and whatever the sends still hold.
Every case runs in a fresh group of gloo processes with glibc returning large blocks to the system at
once (MALLOC_MMAP_THRESHOLD_), so the resident-set high-water mark above the start is the step's peak.

`--compare-with DIR` also measures the checkout at DIR (e.g. a worktree of an older commit) in the same
run, as the "before" column.

    python -m benchmarks.bench_pipeline_memory [--compare-with /path/to/old/checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

CASES = [(2, 8), (2, 16), (4, 8), (4, 16)]  # (pp, micro-batches)
TOKENS, HIDDEN = 4096, 1024
MIB = 2**20


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rank_peak(pp: int, num_microbatches: int) -> int:
    """Bytes by which this rank's resident set peaked above its start during one pipeline step."""
    import torch

    from internlm2.parallel import ParallelConfig
    from internlm2.parallel.pipeline import run_pipeline
    from tests.distributed.spawn import worker_state

    parallel = worker_state(ParallelConfig(pp=pp))
    torch.manual_seed(0)
    layer = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward_step(chunk, module, x, mb):
        y = module(torch.ones(TOKENS, HIDDEN) if x is None else x)
        return y.square().mean() if parallel.pp_rank == pp - 1 else y

    torch.distributed.barrier()
    start = _rss()
    run_pipeline(parallel, [layer], list(range(num_microbatches)), forward_step)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start


def measure() -> list[list]:
    """[pp, micro-batches, max over ranks, mean over ranks] in MiB for every case, this checkout."""
    from tests.distributed.spawn import run_distributed, shutdown_pool

    rows = []
    for pp, m in CASES:
        peaks = run_distributed(pp, _rank_peak, pp, m, timeout_s=600)
        shutdown_pool()  # the next case starts from fresh processes (the high-water mark never falls)
        rows.append([pp, m, max(peaks) / MIB, sum(peaks) / len(peaks) / MIB])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare-with", help="another checkout to measure as 'before'")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # child mode: print rows
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)  # the spawned ranks inherit it
    if args.json:
        print(json.dumps(measure()))
        return
    from benchmarks.harness import Report, load_note

    before = None
    if args.compare_with:
        # As a script with the other checkout first on the path: its internlm2 and test spawner run.
        env = dict(os.environ, PYTHONPATH=str(Path(args.compare_with).resolve()))
        out = subprocess.run([sys.executable, __file__, "--json"], env=env, cwd=args.compare_with,
                             capture_output=True, text=True, check=True).stdout
        before = {(r[0], r[1]): r for r in json.loads(out.strip().splitlines()[-1])}
    report = Report("pipeline_memory", ["pp", "micro-batches", "peak MiB (max rank)", "peak MiB (mean rank)",
                                        "before: max rank", "before: mean rank"])
    report.notes += [
        f"one 1F1B step; per rank a Linear({HIDDEN}, {HIDDEN}) on [{TOKENS}, {HIDDEN}] fp32 (16 MiB activations);"
        " peak = resident-set high-water mark above the step's start, glibc mmap threshold 64 KiB",
        f"before: {args.compare_with or 'not measured'}",
        load_note(),
    ]
    for row in measure():
        old = before[(row[0], row[1])][2:] if before else ["", ""]
        report.add(*row, *old)
    report.write()


if __name__ == "__main__":
    main()
