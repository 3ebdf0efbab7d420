"""The conditional reward model's claim (InternLM2 report §4.2.1) in miniature, on the tiny SFT model on CPU.

Preference pairs from the verifiable tasks (internlm2/tasks/preferences.py) in three domains on the same
prompts: `concise` prefers the bare answer, `explained` the same answer in a sentence (they conflict),
`correct` a checker-verified right answer over a wrong one. Trained from the SFT model:

  (a) one conditional reward model on all domains (the domain's system prompt first);
  (b) one reward model on the same pairs without conditions;
  (c) one reward model per domain (without conditions, like separate helpful/harmless RMs).

Each is scored on the held-out pairs by `internlm2 score` (with its domain's condition for (a)); the table
is held-out accuracy (chosen scored above rejected) per domain, and the range of the scores (the barrier
keeps them inside (-5, 5)). Every step is an `internlm2` command, printed as it runs and skipped when its
output exists, so an interrupted demo resumes (and `train-rm` itself resumes from its checkpoints).

    OMP_NUM_THREADS=1 python -m benchmarks.rm_demo [--sft runs/sft-tiny/hf] [--epochs 3]

Writes benchmarks/results/rm_demo-<machine>.md (+ .json) and rm_demo-<machine>.png.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from benchmarks.harness import RESULTS_DIR, Report, internlm2_step, load_note, machine_tag
from internlm2.config import load_config
from internlm2.data import Tokenizer
from internlm2.rlhf.reward_data import RewardPairs, resolve_reward_token
from internlm2.rlhf.rm_training import PairBatches, RMConfig
from internlm2.tasks.preferences import DOMAINS, make_preferences
from internlm2.tasks.verifiable import make_examples

CONFIG = Path("configs/rm-tiny.yaml")
TASKS = ("function_name", "reverse_list", "sort_list")
MODELS = {"a": "conditional, all domains", "b": "unconditional, all domains", "c": "one per domain"}


def write_jsonl(records: list[dict], path: Path) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
    return path


def make_data(data: Path, per_task: int, eval_per_task: int, epochs: float) -> None:
    """Training and held-out pair files for every model, and the held-out conversations `internlm2 score`
    reads (chosen then rejected of each pair, with and without the domain's condition). A demo directory
    holds one setting: resuming it with another would mix models trained on other data."""
    setting = {"tasks": list(TASKS), "per_task": per_task, "eval_per_task": eval_per_task, "epochs": epochs}
    done = data / "done"
    if done.is_file():
        if json.loads(done.read_text()) != setting:
            raise SystemExit(f"{data.parent} was made with {done.read_text().strip()}, not {json.dumps(setting)}: "
                             "give another --out")
        return
    data.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", per_task), ("eval", eval_per_task)):
        by_domain = make_preferences(split, n, TASKS)
        plain = {d: [{k: v for k, v in r.items() if k != "condition"} for r in rs] for d, rs in by_domain.items()}
        write_jsonl([r for d in DOMAINS for r in by_domain[d]], data / f"{split}_conditional.jsonl")
        write_jsonl([r for d in DOMAINS for r in plain[d]], data / f"{split}_plain.jsonl")
        for d in DOMAINS:
            write_jsonl(plain[d], data / f"{split}_{d}.jsonl")
    for d, records in make_preferences("eval", eval_per_task, TASKS).items():
        for conditional in (True, False):
            lines = [{"messages": [*r["prompt"], {"role": "assistant", "content": r[side]}],
                      **({"condition": d} if conditional else {})} for r in records for side in ("chosen", "rejected")]
            write_jsonl(lines, data / f"score_{d}_{'conditional' if conditional else 'plain'}.jsonl")
    done.write_text(json.dumps(setting) + "\n")
    print(f"data: {per_task * len(TASKS)} training and {eval_per_task * len(TASKS)} held-out prompts per domain, "
          f"domains {', '.join(DOMAINS)}, in {data}", flush=True)


def epoch_steps(train: Path, sft: Path, epochs: float) -> int:
    """Optimizer steps of `epochs` passes over `train` with configs/rm-tiny.yaml's batches."""
    cfg = load_config(RMConfig, CONFIG, [f"init_from={sft}"])
    tokenizer = Tokenizer.load(sft)
    pairs = RewardPairs(train, tokenizer, resolve_reward_token(tokenizer, cfg.rm.reward_token),
                        condition_prompts=cfg.rm.conditions, max_length=cfg.rm.max_length)
    stage = cfg.stages[0]
    return math.ceil(epochs * len(PairBatches(pairs.pairs, stage.seq_len, cfg.seed, [])) / stage.global_batch_size)


def train(name: str, run_dir: Path, train_file: Path, eval_file: Path, sft: Path, epochs: float,
          conditional: bool) -> float:
    steps = epoch_steps(train_file, sft, epochs)
    sets = {"run_dir": run_dir, "init_from": sft, "data.train": f"[{{path: {train_file}}}]", "data.eval.path": eval_file,
            "stages.0.steps": steps, "eval.every": steps, "checkpoint.every": max(1, steps // 2),
            "logging.progress": "false"}
    if not conditional:
        sets["rm.conditions"] = "{}"
    print(f"({name}) {steps} steps = {epochs} epochs of {train_file.name}", flush=True)
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    return internlm2_step("train-rm", "--config", CONFIG, *args, output=run_dir / "hf" / "config.json")


def held_out_scores(model: Path, data: Path, domain: str, conditional: bool, out: Path) -> list[float]:
    suffix = "conditional" if conditional else "plain"
    output = out / f"scores_{domain}_{suffix}.jsonl"
    internlm2_step("score", "--model", model, "--input", data / f"score_{domain}_{suffix}.jsonl", "--output", output,
                   output=output)
    return [json.loads(line)["score"] for line in output.read_text().splitlines()]


def accuracy(scores: list[float], keep: list[bool] | None = None) -> float:
    """Of the pairs (chosen, rejected score in turn) that `keep` says, those scored in the right order."""
    right = [c > r for c, r in zip(scores[0::2], scores[1::2])]
    kept = [ok for ok, k in zip(right, keep or [True] * len(right)) if k]
    return sum(kept) / len(kept)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    width = 0.8 / len(results)
    for i, (name, by_domain) in enumerate(results.items()):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(DOMAINS))]
        bars = ax.bar(xs, [100 * by_domain[d]["accuracy"] for d in DOMAINS], width, label=f"({name}) {MODELS[name]}")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.axhline(50, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(DOMAINS)), DOMAINS)
    ax.set_ylim(0, 105)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Reward models on the tiny SFT model: held-out pairs per domain")
    fig.legend(fontsize=8, loc="outside lower center", ncols=len(results))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", type=Path, default=Path("runs/sft-tiny/hf"), help="the SFT model (an HF directory)")
    parser.add_argument("--out", type=Path, default=Path("runs/rm-demo"))
    parser.add_argument("--per-task", type=int, default=150, help="training prompts per task and domain")
    parser.add_argument("--eval-per-task", type=int, default=25, help="held-out prompts per task and domain")
    parser.add_argument("--epochs", type=float, default=3.0)
    args = parser.parse_args()
    note = load_note()
    data = args.out / "data"
    make_data(data, args.per_task, args.eval_per_task, args.epochs)
    seconds = {}
    runs = {"a": (args.out / "conditional", "conditional", True), "b": (args.out / "unconditional", "plain", False)}
    for name, (run_dir, files, conditional) in runs.items():
        seconds[name] = train(name, run_dir, data / f"train_{files}.jsonl", data / f"eval_{files}.jsonl", args.sft,
                              args.epochs, conditional)
    for d in DOMAINS:
        seconds[f"c/{d}"] = train(f"c, {d}", args.out / f"domain-{d}", data / f"train_{d}.jsonl", data / f"eval_{d}.jsonl",
                                  args.sft, args.epochs, False)
    tasks = [e.task for e in make_examples("eval", args.eval_per_task, 0, TASKS)]  # of each held-out pair
    results = {name: {} for name in MODELS}
    for d in DOMAINS:
        for name, model, conditional in (("a", runs["a"][0], True), ("b", runs["b"][0], False),
                                         ("c", args.out / f"domain-{d}", False)):
            scores = held_out_scores(model / "hf", data, d, conditional, model)
            results[name][d] = {"accuracy": accuracy(scores), "min": min(scores), "max": max(scores),
                                **{t: accuracy(scores, [task == t for task in tasks]) for t in TASKS}}
    _write(results, seconds, args, note)


def _write(results: dict, seconds: dict, args, note: str) -> None:
    tag = machine_tag()
    report = Report("rm_demo", ["model", *[f"{d} accuracy" for d in DOMAINS], "score min", "score max"])
    report.notes += [
        note,
        f"SFT model {args.sft}; tasks {', '.join(TASKS)}; {args.per_task * len(TASKS)} training and "
        f"{args.eval_per_task * len(TASKS)} held-out prompts per domain (held-out prompts never seen in training); "
        f"{args.epochs} epochs each with configs/rm-tiny.yaml (focal ranking loss + 0.02 x log barrier)",
        "domains on the same prompts: concise prefers the bare answer, explained the answer in a sentence (they "
        "conflict), correct a checker-verified right answer over a wrong one in the same form",
        "accuracy: held-out pairs whose chosen response `internlm2 score` scores above the rejected one; (a) scored "
        "with the domain's condition (system prompt), (b) and (c) without",
        "training seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + " (0: skipped, existed)",
        "correct accuracy per task: " + "; ".join(
            f"({name}) " + ", ".join(f"{t} {by_domain['correct'][t]:.2f}" for t in TASKS)
            for name, by_domain in results.items()),
        f"plot: rm_demo-{tag}.png",
    ]
    for name, by_domain in results.items():
        report.add(f"({name}) {MODELS[name]}", *[by_domain[d]["accuracy"] for d in DOMAINS],
                   min(v["min"] for v in by_domain.values()), max(v["max"] for v in by_domain.values()))
    report.write()
    plot(results, RESULTS_DIR / f"rm_demo-{tag}.png")


if __name__ == "__main__":
    main()
