"""Records a finished SFT demo run (`internlm2 sft --config configs/sft-tiny.yaml`) in benchmarks/results/:
the held-out task scores before and after fine-tuning, the loss curves, the machine and the wall time.

    python -m benchmarks.sft_demo_report --run runs/sft-tiny --wall-time-s 612 [--note "..."]

Writes `results/sft_tiny_demo-<machine>.md` and `.png` (loss curves; per-task exact match and format
before and after).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from benchmarks.harness import load_note, machine, machine_tag

RESULTS = Path(__file__).resolve().parent / "results"


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def draw(run: Path, scores: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = _records(run)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held_out = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    tasks = [t for t in scores["after"] if t != "all"]
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.2))
    curves.plot(*zip(*train), label="train (tasks + pretraining text)", alpha=0.7)
    curves.plot(*zip(*held_out), "o-", label="held-out task conversations")
    curves.set(xlabel="step", ylabel="loss (nats / trained token)", title="SFT of the tiny model")
    curves.legend()
    width = 0.2
    for k, (when, metric, hatch) in enumerate([("before", "exact_match", ""), ("after", "exact_match", ""),
                                               ("before", "format", "//"), ("after", "format", "//")]):
        values = [scores[when][t][metric] for t in tasks]
        bars.bar([i + (k - 1.5) * width for i in range(len(tasks))], values, width, hatch=hatch,
                 color="tab:gray" if when == "before" else "tab:green", label=f"{metric} {when}")
    bars.set_xticks(range(len(tasks)), tasks)
    bars.set(ylim=(0, 1.05), ylabel="fraction of held-out prompts", title="held-out tasks, greedy answers")
    bars.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def report(run: Path, wall_time_s: float, note: str) -> Path:
    scores = json.loads((run / "task_eval.json").read_text())
    records = _records(run)
    stem = f"sft_tiny_demo-{machine_tag()}"
    draw(run, scores, RESULTS / f"{stem}.png")
    rates = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
    lines = [
        "# SFT demo (`internlm2 sft --config configs/sft-tiny.yaml`)", "",
        f"- machine: {machine()}; {load_note()}", f"- date: {datetime.date.today().isoformat()}",
        f"- wall time: {wall_time_s / 60:.1f} min (training, HF export, the before/after task evaluation)",
        f"- median throughput: {rates[len(rates) // 2]:,.0f} tokens/s", f"- curves and scores: {stem}.png",
        *([f"- note: {note}"] if note else []), "",
        f"Held-out prompts ({scores['after']['all']['examples']}), greedy, before -> after fine-tuning:", "",
        "| task | exact match | correct (verifier) | format |", "|---|---|---|---|",
    ]
    for task, after in scores["after"].items():
        before = scores["before"][task]
        lines.append(f"| {task} | " + " | ".join(f"{before[m]:.0%} -> {after[m]:.0%}"
                                                for m in ("exact_match", "correct", "format")) + " |")
    lines += ["", "| step | train loss | held-out loss |", "|---|---|---|"]
    for r in records:
        if "eval_loss" in r:
            train = next((x["loss"] for x in records if x["step"] == r["step"] and "loss" in x), float("nan"))
            lines.append(f"| {r['step']} | {train:.3f} | {r['eval_loss']:.3f} |")
    out = RESULTS / f"{stem}.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/sft-tiny")
    parser.add_argument("--wall-time-s", type=float, required=True)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    print(report(Path(args.run), args.wall_time_s, args.note))


if __name__ == "__main__":
    main()
