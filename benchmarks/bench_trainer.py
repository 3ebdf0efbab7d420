"""Training throughput on this machine, and where the step time goes, from the trainer's own timers.

Runs `internlm2 pretrain` for a few steps on the built-in data for the tiny default model and the
`internlm2-small` preset, each with `kernels: fused` (internlm2's kernels) and `kernels: reference` (plain
PyTorch), and reports median tokens/s and the per-step time of data, forward, backward (with the pipeline's
communication and overlapped gradient reduction), optimizer (gradient norm, clipping, AdamW, parameter
all-gather). Steps 1-2 (warm-up) are left out.

    python -m benchmarks.bench_trainer [--steps 10]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.harness import Report
from internlm2.train.config import BuiltinData
from internlm2.train.data_setup import make_builtin_data

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "tiny (configs/tiny.yaml)": {"preset": "internlm2-tiny", "hidden_size": 256, "intermediate_size": 768, "num_layers": 4,
                                 "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 1024},
    "internlm2-small": {"preset": "internlm2-small"},
}
PHASES = ("data", "forward", "backward", "optimizer")


def run(model: dict, kernels: str, data: Path, steps: int, workdir: Path) -> list[dict]:
    run_dir = workdir / f"run-{abs(hash((json.dumps(model), kernels)))}"
    cfg = {
        "run_dir": str(run_dir), "dtype": "float32",
        "model": {**model, "vocab_size": 4096, "kernels": kernels},
        "data": {"tokenizer": str(data / "tokenizer"), "train": [{"path": str(data / "train")}], "num_workers": 1},
        "stages": [{"name": "bench", "steps": steps, "seq_len": 1024, "global_batch_size": 4, "micro_batch_size": 2}],
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "checkpoint": {"every": 10**6, "export_hf": False},
        "eval": {"every": 0},
        "logging": {"tensorboard": False, "progress": False},
    }
    config = workdir / "bench.yaml"
    config.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "internlm2.cli", "pretrain", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"pretrain failed ({model}, {kernels}):\n{done.stderr[-3000:]}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    report = Report("Trainer throughput and step-time breakdown (CPU)",
                    ["model", "kernels", "tokens/s", "speedup vs reference"] + [f"{p} s/step" for p in PHASES])
    report.notes.append("4096 tokens per step (global batch 4 x 1024, micro-batch 2, 2 accumulation steps), float32, "
                        "one process; medians over steps 3..N")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        make_builtin_data(BuiltinData(vocab_size=4096, max_bytes=3_000_000), data)
        for name, model in MODELS.items():
            speed = {}
            for kernels in ("reference", "fused"):
                records = run(model, kernels, data, args.steps, work)[2:]
                speed[kernels] = statistics.median(r["tokens_per_s"] for r in records)
                phases = [statistics.median(r.get(f"time_{p}_s", 0.0) for r in records) for p in PHASES]
                report.add(name, kernels, speed[kernels], speed[kernels] / speed["reference"], *phases)
    report.write("trainer")


if __name__ == "__main__":
    main()
