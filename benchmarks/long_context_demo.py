"""What the long-context curriculum buys, on the tiny model on CPU: passkey retrieval out to 4x the longest
trained length for (a) the short stage only, (b) the long stage without raising the RoPE base, (c) the
long stage with the raised base (the tiny default's curriculum), (d) (c) plus dynamic NTK at inference;
the held-out loss by position out to 2x the longest trained length for (a)-(d); and `eval needle` and
`eval perplexity` on the tiny default's export. Every step is an `internlm2` command (printed as it runs)
and is skipped when its output exists, so an interrupted demo resumes.

    python -m benchmarks.long_context_demo [--repeats 2]

Writes benchmarks/results/long_context_demo-<machine>.md (+ .json) with accuracy per length, and the
heatmaps next to it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import RESULTS_DIR, Report, load_note, machine_tag

RUNS = Path("runs")
FIRST_RUN = RUNS / "tiny-passkey"  # configs/tiny-passkey.yaml as written: 240 retrieval steps
RUN = RUNS / "tiny-passkey-560"  # its retrieval stage continued to 560 steps (constant lr: the same as one run)
LONGER = ["--set", "stages.1.steps=560"]
RETRIEVAL_END = RUN / "checkpoints" / "step_00000880"  # the end of the 256-token stages (320 + 560 steps)
LENGTHS = "256,512,1024,2048,4096"  # 4 x the long stage's 1024
DEPTHS = "0,25,50,75,100"
TRAINED = 1024  # the longest trained length
PERPLEXITY = ["--data", RUNS / "tiny/data/eval", "--seq-len", 2 * TRAINED, "--buckets", 8]
PERPLEXITY_VARIANTS = ("a", "b", "c", "d")
VARIANTS = {  # name: (HF checkpoint, --ntk, what it is)
    "a": (RUN / "hf-short", "off", "256-token stages only (base 10k)"),
    "b": (RUNS / "tiny-passkey-560-base10k" / "hf", "off", "+ long stage (1024 tokens), base kept at 10k"),
    "c": (RUN / "hf", "off", "+ long stage, base raised to 100k (the tiny default's curriculum)"),
    "d": (RUN / "hf", "2", "(c) + dynamic NTK (factor 2) at inference"),
    "c240": (FIRST_RUN / "hf", "off", "(c) after 240 retrieval steps instead of 560"),
}


def _internlm2(*args, output: Path | None = None) -> float:
    """Runs `internlm2 ARGS` unless `output` exists; returns the seconds it took (0 when skipped)."""
    if output is not None and output.exists():
        print(f"skip (exists: {output}): internlm2 {' '.join(map(str, args))}", flush=True)
        return 0.0
    command = [sys.executable, "-m", "internlm2.cli", *map(str, args)]
    print("$ internlm2 " + shlex.join(map(str, args)), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    seconds = {}
    seconds["tiny default"] = _internlm2("pretrain", "--config", "configs/tiny.yaml", output=RUNS / "tiny" / "hf")
    for length, rows, seed in ((256, 5000, 0), (1024, 200, 1)):
        _internlm2("eval", "passkey-data", "--tokenizer", RUNS / "tiny/data/tokenizer", "--out",
                   RUNS / f"passkey-data/{length}", "--seq-len", length, "--rows", rows, "--seed", seed,
                   output=RUNS / f"passkey-data/{length}")
    seconds["first run"] = _internlm2("pretrain", "--config", "configs/tiny-passkey.yaml", output=FIRST_RUN / "hf")
    seconds["(c) longer retrieval + long stage"] = _internlm2(
        "pretrain", "--config", "configs/tiny-passkey.yaml", "--set", f"run_dir={RUN}", *LONGER, "--set",
        f"checkpoint.load={FIRST_RUN}/checkpoints/step_00000560", output=RUN / "hf")
    seconds["(b) long stage"] = _internlm2(
        "pretrain", "--config", "configs/tiny-passkey.yaml", "--set", f"run_dir={VARIANTS['b'][0].parent}", *LONGER,
        "--set", "stages.2.rope_theta=10000", "--set", f"checkpoint.load={RETRIEVAL_END}", output=VARIANTS["b"][0])
    _internlm2("export", "--checkpoint", RETRIEVAL_END, "--out", VARIANTS["a"][0], "--dtype", "float32",
               "--tokenizer", RUNS / "tiny/data/tokenizer", output=VARIANTS["a"][0])
    grid = ["--lengths", LENGTHS, "--depths", DEPTHS, "--repeats", args.repeats, "--no-progress"]
    out = RUNS / "long-context-eval"
    for name, (model, ntk, _) in VARIANTS.items():
        seconds[f"({name}) passkey grid"] = _internlm2("eval", "passkey", "--model", model, "--ntk", ntk, *grid,
                                                       "--out", out / name, output=out / name / "passkey.json")
    for name in PERPLEXITY_VARIANTS:
        model, ntk, _ = VARIANTS[name]
        seconds[f"({name}) perplexity"] = _internlm2(
            "eval", "perplexity", "--model", model, "--ntk", ntk, *PERPLEXITY, "--out", out / f"ppl-{name}",
            output=out / f"ppl-{name}" / "perplexity.json")
    seconds["needle grid"] = _internlm2("eval", "needle", "--model", RUNS / "tiny" / "hf", *grid, "--out",
                                        out / "needle", output=out / "needle" / "needle.json")
    seconds["perplexity"] = _internlm2("eval", "perplexity", "--model", RUNS / "tiny" / "hf", *PERPLEXITY, "--out",
                                       out / "perplexity", output=out / "perplexity" / "perplexity.json")
    _write(out, seconds, args.repeats)


def _losses_before_and_after(path: Path, trained: int) -> tuple:
    """Mean held-out loss of the position buckets inside and past the trained length ("" if not measured)."""
    if not path.is_file():
        return "", ""
    buckets = json.loads(path.read_text())["buckets"]
    inside = [b["mean_loss"] for b in buckets if b["end"] <= trained]
    past = [b["mean_loss"] for b in buckets if b["start"] >= trained]
    return round(sum(inside) / len(inside), 3), round(sum(past) / len(past), 3)


def _write(out: Path, seconds: dict, repeats: int) -> None:
    lengths = [int(n) for n in LENGTHS.split(",")]
    report = Report("long_context_demo", ["variant", *[f"{n} tokens" for n in lengths], "mean exact",
                                          "mean partial", f"held-out loss, positions < {TRAINED}",
                                          f"held-out loss, positions {TRAINED}-{2 * TRAINED - 1}"])
    report.notes += [
        f"passkey grid: lengths {LENGTHS}, depths {DEPTHS} %, {repeats} prompts per cell; greedy decoding; "
        "cells scored by exact match of the 5-digit key (partial: digits right in place)",
        "training: configs/tiny-passkey.yaml with its retrieval stage continued to 560 steps (passkey documents "
        "of each stage's length, `internlm2 eval passkey-data`, mixed by weight: 25% of the short stage, 90% of "
        "the retrieval stage, 50% of the long stage); longest trained length 1024",
        load_note(),
        "wall seconds per step (0: reused from an earlier run): "
        + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()),
    ]
    tag = machine_tag()
    for name, (model, ntk, what) in VARIANTS.items():
        summary = json.loads((out / name / "passkey.json").read_text())["summary"]
        losses = _losses_before_and_after(out / f"ppl-{name}" / "perplexity.json", TRAINED)
        report.add(f"({name}) {what}", *[round(summary["exact_by_length"][str(n)], 2) for n in lengths],
                   round(summary["exact_mean"], 3), round(summary["partial_mean"], 3), *losses)
        shutil.copy(out / name / "passkey.png", RESULTS_DIR / f"long_context_demo_{name}-{tag}.png")
    needle = json.loads((out / "needle" / "needle.json").read_text())["summary"]
    report.notes.append(
        "eval needle on the tiny default's export (runs/tiny/hf, trained on code only, dynamic NTK from its "
        "config): exact by length " + ", ".join(f"{n}: {needle['exact_by_length'][str(n)]:.2f}" for n in lengths)
        + f"; partial mean {needle['partial_mean']:.3f}; heatmap long_context_demo_needle-{tag}.png")
    shutil.copy(out / "needle" / "needle.png", RESULTS_DIR / f"long_context_demo_needle-{tag}.png")
    ppl = json.loads((out / "perplexity" / "perplexity.json").read_text())
    report.notes.append(
        f"eval perplexity on the tiny default's export, {ppl['settings']['docs']} held-out documents of 2048 tokens "
        "(2x the longest trained), mean loss by position: "
        + ", ".join(f"{b['start']}-{b['end'] - 1}: {b['mean_loss']:.2f}" for b in ppl["buckets"])
        + f"; plot long_context_demo_perplexity-{tag}.png")
    shutil.copy(out / "perplexity" / "perplexity.png", RESULTS_DIR / f"long_context_demo_perplexity-{tag}.png")
    report.write()


if __name__ == "__main__":
    main()
