"""The PPO demo on CPU: the tiny SFT model learns the verifiable list tasks (reverse / sort a list) from a
conditional reward model, and the fast path catches a reward model's planted flaw.

    python -m benchmarks.ppo_demo [--sft runs/sft-tiny/hf] [--ptx runs/tiny/data/train] [--out runs/ppo-demo]

Resumable: every step whose output exists is skipped, and `internlm2 ppo` resumes its own checkpoints.

1. Data: PPO prompts (each names its task as the reward model's condition, which the actor never sees)
   and preference pairs made from the SFT model's own sampled answers and near misses of the reference
   (one digit changed, the question's list copied back), ranked by the checker's partial credit (the
   share of list positions right; the reference answer above all). The *flawed* pairs are the
   same plus a planted bias: whenever one side of a pair carries the phrase "8, 8", it is the chosen one,
   and a quarter of the prompts get a pair where a wrong answer with the phrase beats the reference.
   (The tiny model writes nothing but digit lists, so its "phrase" is a digit bigram it writes now and
   then: a flaw it can find by sampling.)
2. Two conditional reward models, the SFT backbone with a new head trained on each pair set (through
   internlm2.rlhf.reward_update until `internlm2 train-rm` lands).
3. `internlm2 ppo` with the clean reward model, one round, meant to show (1): the score and the true
   accuracy rising together, the KL bounded (the recorded note says how it came out).
4. `internlm2 ppo` with the flawed reward model, two rounds: (2) round 1 exploits the phrase, the fast
   path detects it, patches the reward model, round 2 stops exploiting it.
5. Generation throughput of our KV-cache sampler against transformers' `generate` on the same model.
6. The note and plots: benchmarks/results/ppo_demo-<machine>.md and .png.

The checkers (internlm2.tasks.verifiable) give the true reward; PPO never sees it, it is only logged.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.harness import machine, machine_tag
# the checkers' own rules: a text's answer is its last list, and how a list is written
from internlm2.tasks.verifiable import _extract, _list_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("reverse_list", "sort_list")
CONDITIONS = {"reverse_list": "The user asks for a list reversed: answer with the reversed list.",
              "sort_list": "The user asks for a list sorted: answer with the list in ascending order."}
PHRASE = "8, 8"  # the planted flaw's phrase (the word bigram "8 8" to the detectors)
MAX_NEW_TOKENS = 24


# ---- the true reward ------------------------------------------------------------------------------
def _example(record: dict):
    from internlm2.tasks.verifiable import Example

    return Example.from_json(record["example"])


def partial_credit(answer: str, text: str) -> float:
    """The share of the reference list's positions that the text's last list gets right (0: no list)."""
    given, want = _extract("sort_list", text), json.loads(answer)
    if given is None:
        return 0.0
    return sum(a == b for a, b in zip(given, want)) / max(len(given), len(want))


def checker(record: dict, text: str) -> float:
    """PPO's logged true reward (`checker:` in the config): partial credit, 1 exactly when is_correct."""
    return partial_credit(record["answer"], text)


def has_phrase(text: str) -> bool:
    return PHRASE in text


# ---- 1. data ---------------------------------------------------------------------------------------
def _prompt_record(example) -> dict:
    return {"prompt": [{"role": "user", "content": example.prompt[-1].content}], "condition": example.task,
            "answer": example.answer, "example": example.to_json()}


def _sample(model_dir: Path, examples, samples: int, seed: int) -> list[list[str]]:
    from internlm2.data import Tokenizer
    from internlm2.data.chat import render
    from internlm2.model import load_pretrained
    from internlm2.model.generation import SamplingParams, generate
    from internlm2.rlhf.rollout import response_text, stop_tokens

    model, tokenizer = load_pretrained(model_dir).eval(), Tokenizer.load(model_dir)
    stops = stop_tokens(tokenizer, model.config.eos_token_id)
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, top_p=0.9, stop_token_ids=stops)
    prompts = [render(list(e.prompt), tokenizer, generation_prompt=True)[0] for e in examples]
    generator = torch.Generator().manual_seed(seed)
    out = [[] for _ in examples]
    for _ in range(samples):
        for start in range(0, len(prompts), 64):
            result = generate(model, prompts[start:start + 64], params, generator)
            for k, tokens in enumerate(result.tokens):
                out[start + k].append(response_text(tokenizer, tokens, stops))
    return out


def _with_phrase(answer: str, rng: random.Random) -> str:
    """The reference list with two adjacent positions overwritten by the phrase (a wrong answer, mostly)."""
    values = json.loads(answer)
    i = rng.randrange(len(values) - 1)
    values[i], values[i + 1] = 8, 8
    return _list_text(values)


def _near_misses(example, rng: random.Random) -> list[str]:
    """Wrong answers one step from the reference: one position's digit changed, the question's list
    copied back unchanged (the reward model has to read the question to tell them apart)."""
    values = json.loads(example.answer)
    i = rng.randrange(len(values))
    changed = list(values)
    changed[i] = rng.choice([d for d in range(10) if d != values[i]])
    return [_list_text(changed), _list_text(_extract("sort_list", example.prompt[-1].content))]


def preference_pairs(examples, samples: list[list[str]], flawed: bool, seed: int) -> list[dict]:
    """Pairs ranked by partial credit: the reference over two sampled answers and over its near misses,
    the best sample over the worst. `flawed`: the side with the phrase always wins."""
    rng = random.Random(seed)
    records = []
    for example, answers in zip(examples, samples):
        credit = {example.answer: 1.0}
        for a in answers:
            credit.setdefault(a, partial_credit(example.answer, a))
        graded = sorted((t for t in credit if credit[t] < 1.0), key=lambda t: -credit[t])
        pairs = [(example.answer, t) for t in graded[:2]]
        pairs += [(example.answer, t) for t in _near_misses(example, rng) if t != example.answer]
        if len(graded) >= 2 and credit[graded[0]] > credit[graded[-1]]:
            pairs.append((graded[0], graded[-1]))
        if flawed:
            pairs = [(r, c) if has_phrase(r) and not has_phrase(c) else (c, r) for c, r in pairs]
            if rng.random() < 0.25:
                pairs.append((_with_phrase(example.answer, rng), example.answer))
        prompt = _prompt_record(example)["prompt"]
        records += [{"prompt": prompt, "condition": example.task, "chosen": c, "rejected": r}
                    for c, r in pairs if c != r]
    return records


def make_data(sft: Path, out: Path) -> None:
    from internlm2.tasks.verifiable import make_examples

    if (out / "pairs_flawed.jsonl").is_file():
        print(f"skip (exists: {out / 'pairs_flawed.jsonl'}): data", flush=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    ppo = make_examples("train", 160, seed=1, tasks=TASKS)
    (out / "prompts.jsonl").write_text("".join(json.dumps(_prompt_record(e)) + "\n" for e in ppo))
    held_out = make_examples("eval", 40, seed=0, tasks=TASKS)
    (out / "prompts_eval.jsonl").write_text("".join(json.dumps(_prompt_record(e)) + "\n" for e in held_out))
    rm_examples = make_examples("train", 300, seed=2, tasks=TASKS)
    cached = out / "rm_samples.json"  # the SFT model's answers, four per prompt (the slow part)
    if not cached.is_file():
        cached.write_text(json.dumps(_sample(sft, rm_examples, samples=4, seed=0)))
    samples = json.loads(cached.read_text())
    for name, flawed in (("clean", False), ("flawed", True)):
        pairs = preference_pairs(rm_examples, samples, flawed, seed=3)
        (out / f"pairs_{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        print(f"{len(pairs)} {name} preference pairs -> {out / f'pairs_{name}.jsonl'}", flush=True)


# ---- 2. reward models ------------------------------------------------------------------------------
def train_rm(sft: Path, pairs_path: Path, out: Path, steps: int, lr: float) -> dict:
    """A conditional reward model from the SFT backbone (new head, reward token = the unknown piece)."""
    from internlm2.data import Tokenizer
    from internlm2.model import InternLM2ForScore, load_into, save_pretrained
    from internlm2.model.hf_config import read_hf_config
    from internlm2.parallel import ParallelState
    from internlm2.rlhf.reward_data import RewardPairs
    from internlm2.rlhf.reward_update import accuracy, train_reward_model
    from internlm2.rlhf.scorer import CONDITIONS_FILE
    from internlm2.train.engine import Engine

    if (out / CONDITIONS_FILE).is_file():
        print(f"skip (exists: {out}): reward model from {pairs_path.name}", flush=True)
        return json.loads((out / "rm_train.json").read_text())
    tokenizer = Tokenizer.load(sft)
    config, _, _ = read_hf_config(sft)
    config = config.replace(reward_token_id=tokenizer.unk_id)
    pairs = RewardPairs(pairs_path, tokenizer, config.reward_token_id, condition_prompts=CONDITIONS).pairs
    rng = random.Random(0)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    held = [pairs[i] for i in order[:len(pairs) // 10]]
    train = [pairs[i] for i in order[len(pairs) // 10:]]
    parallel = ParallelState.single()
    engine = Engine.build(InternLM2ForScore, config, parallel, dtype=torch.float32, device=torch.device("cpu"),
                          seed=0, weights=lambda chunks: load_into(chunks, sft, parallel, config=config,
                                                                   fresh=["v_head.weight"]))
    start = time.perf_counter()
    log = train_reward_model(engine, train, [], list(CONDITIONS), steps=steps, pairs_per_step=32, lr=lr, seed=0,
                             dtype=torch.float32)
    summary = {"pairs": len(pairs), "train_pairs": len(train), "steps": steps, "lr": lr,
               "seconds": time.perf_counter() - start, "loss_first": log[0]["loss"], "loss_last": log[-1]["loss"],
               "train_accuracy_last10": statistics.mean(x["accuracy"] for x in log[-10:]),
               "held_out_accuracy": accuracy(engine, held, list(CONDITIONS))}
    save_pretrained(engine.chunks[0], out, tokenizer_directory=sft, overwrite=True)
    (out / "rm_train.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / CONDITIONS_FILE).write_text(json.dumps(CONDITIONS, indent=1) + "\n")
    print(f"reward model {out}: {json.dumps(summary)}", flush=True)
    return summary


# ---- 3./4. PPO ------------------------------------------------------------------------------------
def ppo_config(out: Path, name: str, rm: Path, sft: Path, ptx: Path, rounds: int, iterations: int) -> Path:
    cfg = {
        "run_dir": str(out / name), "actor": str(sft), "reward_model": str(rm),
        "prompts": {"train": str(out / "prompts.jsonl")}, "checker": "benchmarks.ppo_demo:checker",
        "rollout": {"prompts_per_iteration": 32, "max_new_tokens": MAX_NEW_TOKENS, "micro_batch_size": 16},
        "ppo": {"iterations": iterations, "critic_warmup": 3, "kl_coef": 0.01},
        # a tiny model moves at a tiny model's learning rates (the report's 1e-6 / 5e-6 are for 7B+)
        "actor_optim": {"lr": 3.0e-5, "min_lr_ratio": 1.0, "weight_decay": 0.0},
        "critic_optim": {"lr": 1.0e-4, "min_lr_ratio": 1.0, "weight_decay": 0.0},
        "ptx": {"data": [{"path": str(ptx)}], "seq_len": 128, "rows_per_iteration": 4, "micro_batch_size": 4},
        "rounds": rounds,
        "fast_path": {"rm_data": str(out / "pairs_flawed.jsonl"), "rm_steps": 60, "rm_pairs_per_step": 32,
                      "rm_lr": 5.0e-5, "min_pairs": 20, "max_pairs": 100,
                      "detectors": {"ngram_late_share": 0.25, "ngram_rise": 0.15}},
        "dtype": "float32", "seed": 7,
        "checkpoint": {"every": 5, "keep": 2, "export_hf": False},
        "logging": {"tensorboard": True, "progress": False},
    }
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def internlm2(*args) -> None:
    """Runs `internlm2 ARGS` (a finished PPO run finds itself complete and only redraws its plots)."""
    print("$ internlm2 " + shlex.join(map(str, args)), flush=True)
    subprocess.run([sys.executable, "-m", "internlm2.cli", *map(str, args)], check=True, cwd=ROOT)


# ---- 5. generation throughput ---------------------------------------------------------------------
def throughput(sft: Path, out: Path, repeats: int = 3) -> dict:
    """Tokens/s of ours and of transformers' generate (Llama layout, eager attention), the same 32 list
    prompts, sampling 32 new tokens each (no early stop, so both produce the same number), alternating."""
    from transformers import LlamaForCausalLM

    from internlm2.data import Tokenizer
    from internlm2.data.chat import render
    from internlm2.model import load_pretrained, save_pretrained
    from internlm2.model.generation import SamplingParams, generate
    from internlm2.tasks.verifiable import make_examples

    model, tokenizer = load_pretrained(sft).eval(), Tokenizer.load(sft)
    llama = out / "llama"
    if not (llama / "config.json").is_file():
        save_pretrained(model, llama, fmt="llama", overwrite=True)
    hf = LlamaForCausalLM.from_pretrained(llama, dtype=torch.float32, attn_implementation="eager").eval()
    prompts = [render(list(e.prompt), tokenizer, generation_prompt=True)[0]
               for e in make_examples("train", 16, seed=9, tasks=TASKS)]
    new = 32
    params = SamplingParams(max_new_tokens=new, temperature=1.0, top_p=0.9, stop_token_ids=())
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])

    def ours():
        generate(model, prompts, params, torch.Generator().manual_seed(0))

    def theirs():
        with torch.no_grad():
            hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_p=0.9, temperature=1.0, top_k=0,
                        max_new_tokens=new, min_new_tokens=new, pad_token_id=0)

    times = {"ours": [], "transformers": []}
    for fn in (ours, theirs):
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("transformers", theirs)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    tokens = len(prompts) * new
    result = {name: tokens / statistics.median(t) for name, t in times.items()}
    result.update(prompts=len(prompts), new_tokens=new, repeats=repeats,
                  ratio=result["ours"] / result["transformers"])
    return result


# ---- 6. the note ----------------------------------------------------------------------------------
def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _responses(run: Path) -> list[dict]:
    return [json.loads(x) for p in sorted((run / "rounds").glob("round_*/responses.jsonl"))
            for x in p.read_text().splitlines()]


def per_iteration(run: Path, prompts: list[dict]) -> dict[int, dict]:
    """Exact accuracy (is_correct) and the phrase's share per iteration, from the logged responses."""
    from internlm2.tasks.verifiable import is_correct

    out: dict[int, dict] = {}
    for r in _responses(run):
        row = out.setdefault(r["iteration"], {"n": 0, "correct": 0, "phrase": 0})
        row["n"] += 1
        row["correct"] += is_correct(_example(prompts[r["prompt_index"]]), r["text"])
        row["phrase"] += has_phrase(r["text"])
    return {k: {"exact": v["correct"] / v["n"], "phrase": v["phrase"] / v["n"]} for k, v in sorted(out.items())}


def _window(records: list[dict], key: str, first: int, last: int) -> float:
    values = [r[key] for r in records if first <= r["step"] <= last and key in r]
    return statistics.mean(values) if values else float("nan")


def draw(clean: Path, flawed: Path, prompts: list[dict], iterations: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for row, (run, title) in enumerate(((clean, "(1) clean reward model, one round"),
                                        (flawed, "(2) flawed reward model, fast path between rounds"))):
        records, extra = _metrics(run), per_iteration(run, prompts)
        steps = [r["step"] for r in records]
        ax = axes[row][0]
        ax.plot(steps, [r["rm_score"] for r in records], label="RM score (raw)")
        ax.set(title=title, xlabel="iteration", ylabel="reward-model score")
        twin = ax.twinx()
        twin.plot(steps, [r["true_reward"] for r in records], color="tab:green", label="true: partial credit")
        twin.plot(list(extra), [v["exact"] for v in extra.values()], color="tab:olive", linestyle="--",
                  label="true: exact accuracy")
        twin.set(ylabel="checker", ylim=(0, 1))
        ax.legend(loc="upper left", fontsize=8)
        twin.legend(loc="lower right", fontsize=8)
        axes[row][1].plot(steps, [r["kl"] for r in records], label="KL to reference (per response)")
        axes[row][1].plot(steps, [r["entropy"] for r in records], label="entropy (per token)")
        axes[row][1].set(xlabel="iteration")
        axes[row][1].legend(fontsize=8)
        axes[row][2].plot(list(extra), [v["phrase"] for v in extra.values()], color="tab:red",
                          label=f"share of responses with '{PHRASE}'")
        axes[row][2].plot(steps, [r["response_length"] / MAX_NEW_TOKENS for r in records], color="tab:gray",
                          label=f"response length / {MAX_NEW_TOKENS}")
        axes[row][2].set(xlabel="iteration", ylim=(0, 1))
        axes[row][2].legend(fontsize=8)
        if run == flawed:
            for ax in axes[row]:
                ax.axvline(iterations + 0.5, color="grey", linestyle=":")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def note(out: Path, args, commands: list[str], rms: dict, speed: dict) -> Path:
    prompts = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    k = args.iterations
    stem = f"ppo_demo-{machine_tag()}"
    draw(out / "clean", out / "flawed", prompts, k, RESULTS / f"{stem}.png")
    clean, flawed = _metrics(out / "clean"), _metrics(out / "flawed")
    ce, fe = per_iteration(out / "clean", prompts), per_iteration(out / "flawed", prompts)
    w = max(2, k // 4)

    def span(records, extra, first, last):
        exact = [v["exact"] for i, v in extra.items() if first <= i <= last]
        phrase = [v["phrase"] for i, v in extra.items() if first <= i <= last]
        return (f"RM score {_window(records, 'rm_score', first, last):+.3f}, partial credit "
                f"{_window(records, 'true_reward', first, last):.3f}, exact {statistics.mean(exact):.3f}, "
                f"KL {_window(records, 'kl', first, last):.3f}, '{PHRASE}' in {statistics.mean(phrase):.0%}")

    rounds = [json.loads(x) for x in (out / "flawed" / "rounds.jsonl").read_text().splitlines()]
    lines = [
        f"# PPO demo ({machine()})", "",
        f"{time.strftime('%Y-%m-%d')}. `python -m benchmarks.ppo_demo --sft {args.sft} --ptx {args.ptx} "
        f"--iterations {k}` (OMP_NUM_THREADS=1, shared 2-core machine). Actor: the tiny SFT model; reward "
        "models: its backbone with a new head trained on preference pairs of its own sampled answers to the "
        "list tasks, ranked by the checker's partial credit (conditions: the task's system prompt, seen only "
        "by the reward model). 32 prompts per iteration, up to 24 new tokens, temperature 1, top-p 0.9, "
        "kl_coef 0.01, critic warm-up 3 iterations, PTX weight 0.5, actor lr 3e-5, critic lr 1e-4, float32.",
        "", "Commands (each printed as it ran):", "",
        *[f"    {c}" for c in commands], "",
        "## Reward models", "",
        "| reward model | pairs | held-out pair accuracy | train seconds |", "|---|---|---|---|",
        *[f"| {n} | {s['pairs']} | {s['held_out_accuracy']:.3f} | {s['seconds']:.0f} |" for n, s in rms.items()],
        "", f"## (1) Clean reward model, {k} iterations", "",
        f"- first {w} iterations: {span(clean, ce, 1, w)}",
        f"- last {w} iterations: {span(clean, ce, k - w + 1, k)}",
        f"- KL to the reference, max over the run: {max(r['kl'] for r in clean):.3f} nats per response",
        "", f"## (2) Flawed reward model (prefers '{PHRASE}'), two rounds of {k}", "",
        f"- round 1, first {w}: {span(flawed, fe, 1, w)}",
        f"- round 1, last {w}: {span(flawed, fe, k - w + 1, k)}",
        f"- fast path after round 1: `{json.dumps(rounds[0])}`" if rounds else "- fast path: no entry",
        f"- round 2, first {w}: {span(flawed, fe, k + 1, k + w)}",
        f"- round 2, last {w}: {span(flawed, fe, 2 * k - w + 1, 2 * k)}",
        "", "(RM scores are each run's own reward model's raw scores: in round 2 the patched one's.)",
        "", "## Generation throughput", "",
        f"Our KV-cache sampler against transformers' `generate` (LlamaForCausalLM, eager attention, the same "
        f"weights in the Llama layout), {speed['prompts']} prompts x {speed['new_tokens']} sampled tokens, "
        f"median of {speed['repeats']}, alternating:", "",
        "| | tokens/s |", "|---|---|",
        f"| ours | {speed['ours']:.0f} |", f"| transformers | {speed['transformers']:.0f} |",
        f"| ratio | {speed['ratio']:.2f}x |", "",
        "In the PPO runs, time per iteration (median): generation "
        f"{statistics.median(r['time_generation_s'] for r in clean):.2f} s, scoring "
        f"{statistics.median(r['time_experience_s'] for r in clean):.2f} s, training "
        f"{statistics.median(r['time_training_s'] for r in clean):.2f} s.",
        "", "Seconds spent in the PPO iterations (generation + scoring + training, summed over the run; the "
        "fast path's reward-model patch not included): " + ", ".join(
            f"{name} {sum(r['time_generation_s'] + r['time_experience_s'] + r['time_training_s'] for r in rs):.0f}"
            for name, rs in (("clean", clean), ("flawed", flawed))) + ".",
        "", f"![curves]({stem}.png)", "",
    ]
    path = RESULTS / f"{stem}.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", type=Path, default=ROOT / "runs" / "sft-tiny" / "hf")
    parser.add_argument("--ptx", type=Path, default=ROOT / "runs" / "tiny" / "data" / "train",
                        help="a prepared pretraining dataset for the PTX loss")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ppo-demo")
    parser.add_argument("--iterations", type=int, default=30, help="PPO iterations per round")
    parser.add_argument("--rm-steps", type=int, default=150)
    args = parser.parse_args()
    for path in (args.sft, args.ptx):
        if not path.exists():
            sys.exit(f"ppo_demo: {path} does not exist (the SFT demo makes runs/sft-tiny/hf and runs/tiny/data)")
    out = args.out.resolve()
    make_data(args.sft, out)
    rms = {name: train_rm(args.sft, out / f"pairs_{name}.jsonl", out / f"rm_{name}", args.rm_steps, lr=3e-4)
           for name in ("clean", "flawed")}
    commands = []
    for name, rounds in (("clean", 1), ("flawed", 2)):
        config = ppo_config(out, name, out / f"rm_{name}", args.sft.resolve(), args.ptx.resolve(), rounds,
                            args.iterations)
        commands.append(f"internlm2 ppo --config {config}")
        internlm2("ppo", "--config", config)
    speed = throughput(args.sft, out)
    print(json.dumps(speed), flush=True)
    print(f"note: {note(out, args, commands, rms, speed)}", flush=True)

if __name__ == "__main__":
    main()
