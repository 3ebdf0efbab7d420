"""Peak host memory of `init_from` per rank: streaming this rank's tensor-parallel shards (`load_into`)
against the former path (every rank builds the whole model in fp32 on the CPU, then cuts its shards out
of it), both in the same run on 2 CPU gloo ranks.

The checkpoint is a synthetic InternLM2 of a few hundred MB in bf16 (InternLM2-layout safetensors, as
released); each rank loads it into its pipeline chunks in bf16, as the trainer does. Before every load
the rank's high-water mark of resident memory is reset (`harness.cpu_peak_memory_here`), so the peak is
that load's alone; the chunks are allocated inside it, so the figure includes the rank's own parameters
("params MiB"). Memory-mapped checkpoint pages count once touched, as they do for any reader.

    python -m benchmarks.bench_init_from
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import Report, cpu_peak_memory_here
from internlm2.model import ModelConfig, load_into, save_pretrained
from internlm2.model.model import InternLM2ForCausalLM
from internlm2.parallel import ParallelConfig
from tests.distributed.spawn import run_distributed, shutdown_pool, worker_state
from tests.distributed.test_load_into import build_chunks, whole_model_then_shard

MiB = 2**20
# 118M parameters (236 MB in bf16): the vocabulary and output head dominate, as in the real presets.
CONFIG = ModelConfig(vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_layers=4, num_attention_heads=8,
                     num_key_value_heads=8, kernels="reference")
WARMUP = CONFIG.replace(vocab_size=256, hidden_size=64, intermediate_size=128)
LAYOUTS = {"tp=2": (2, 1), "pp=2": (1, 2)}
METHODS = {"whole model, then shard (before)": whole_model_then_shard, "load_into (streamed shards)": load_into}


def _measure(directory: str, layout: tuple[int, int], method: str) -> dict:
    tp, pp = layout
    parallel = worker_state(ParallelConfig(tp=tp, pp=pp))
    params = sum(p.numel() * 2 for c in build_chunks(CONFIG, parallel, torch.bfloat16, "meta") for p in c.parameters())

    def load(config: ModelConfig, checkpoint: str) -> None:
        METHODS[method](build_chunks(config, parallel, torch.bfloat16), checkpoint, parallel)

    # The first load of a process also pays one-time costs (imports, libraries mapped): a tiny one first.
    load(WARMUP, str(Path(directory).with_name("warmup")))

    start = time.perf_counter()
    peak = cpu_peak_memory_here(lambda: load(CONFIG, directory))
    return {"peak": peak, "params": params, "seconds": time.perf_counter() - start}


def _fresh_ranks(directory: str, layout: tuple[int, int], method: str) -> list[dict]:
    """One load per rank in newly spawned ranks: memory freed by an earlier load would be reused without
    growing the resident set, hiding the next load's peak."""
    try:
        return run_distributed(2, _measure, directory, layout, method, timeout_s=900)
    finally:
        shutdown_pool()


def _write_checkpoint(config: ModelConfig, directory: Path) -> int:
    model = InternLM2ForCausalLM(config, dtype=torch.bfloat16)
    save_pretrained(model, directory)
    return max(p.numel() for p in model.parameters()) * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    report = Report("init_from_memory", ["layout", "rank", "method", "peak RSS growth MiB", "params MiB",
                                         "peak - params MiB", "peak vs before", "seconds"])
    with tempfile.TemporaryDirectory() as tmp:
        largest = _write_checkpoint(CONFIG, Path(tmp) / "hf")
        _write_checkpoint(WARMUP, Path(tmp) / "warmup")
        total = sum(f.stat().st_size for f in (Path(tmp) / "hf").glob("*.safetensors"))
        report.notes += [
            f"checkpoint: {total / MiB:.0f} MiB of bf16 safetensors ({CONFIG.num_layers} layers, hidden "
            f"{CONFIG.hidden_size}, vocabulary {CONFIG.vocab_size}); its largest tensor {largest / MiB:.0f} MiB; "
            f"the whole model in fp32 is {2 * total / MiB:.0f} MiB",
            "medians of --repeats loads per rank, each in newly spawned ranks after one load of a tiny checkpoint "
            "(one-time costs); a load allocates the rank's chunks (bf16, 'params MiB') and fills them, so "
            "'peak - params' is what the loading itself holds",
        ]
        for name, layout in LAYOUTS.items():
            before = None
            for method in METHODS:
                runs = [_fresh_ranks(str(Path(tmp) / "hf"), layout, method) for _ in range(args.repeats)]
                peaks = [statistics.median(run[rank]["peak"] for run in runs) for rank in range(2)]
                before = before or peaks
                for rank, peak in enumerate(peaks):
                    params = runs[0][rank]["params"]
                    seconds = statistics.median(run[rank]["seconds"] for run in runs)
                    report.add(name, rank, method, round(peak / MiB, 1), round(params / MiB, 1),
                               round((peak - params) / MiB, 1), f"{peak / before[rank]:.2f}", round(seconds, 2))
    report.write()


if __name__ == "__main__":
    main()
