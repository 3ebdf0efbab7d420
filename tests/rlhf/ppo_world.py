"""A tiny PPO world for the tests: a tokenizer, a random causal LM (actor and reference), a random
conditional reward model (with conditions.json), prompts with conditions, pretraining data for PTX, and
configs for `internlm2 ppo` on one process or under torchrun."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

from internlm2.data import Tokenizer, train_tokenizer
from internlm2.data.prepare import PrepareOptions, prepare
from internlm2.model import InternLM2ForCausalLM, InternLM2ForScore, preset_config, save_pretrained
from internlm2.rlhf.scorer import CONDITIONS_FILE
from tests.train.tiny_run import CLI_ENV, cli_command, with_overrides

ROOT = Path(__file__).resolve().parents[2]
CONDITIONS = {"brief": "Answer in as few words as you can.", "detailed": "Explain your answer step by step."}
WORDS = ["list", "sort", "reverse", "numbers", "the", "answer", "is", "hope", "this", "helps", "function"]


def _texts(n: int):
    for i in range(n):
        yield f"user asks {WORDS[i % len(WORDS)]} {i} and the assistant answers {i * 7} {WORDS[(i * 3) % len(WORDS)]}"


def model_config(tokenizer: Tokenizer, **overrides):
    return preset_config("internlm2-tiny", num_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320, max_position_embeddings=256,
                         eos_token_id=tokenizer.special_id("<|im_end|>"), **overrides)


def make_world(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tok_dir = directory / "tokenizer"
    train_tokenizer(_texts(600), tok_dir, 320)
    tokenizer = Tokenizer.load(tok_dir)
    torch.manual_seed(0)
    save_pretrained(InternLM2ForCausalLM(model_config(tokenizer)), directory / "actor", tokenizer_directory=tok_dir)
    rm = InternLM2ForScore(model_config(tokenizer, reward_token_id=tokenizer.unk_id))
    with torch.no_grad():
        rm.v_head.weight.normal_(0, 0.2)  # scores spread enough to matter, inside the barrier's bounds
    save_pretrained(rm, directory / "rm", tokenizer_directory=tok_dir)
    (directory / "rm" / CONDITIONS_FILE).write_text(json.dumps(CONDITIONS))
    prompts = [{"prompt": f"Please {WORDS[i % len(WORDS)]} {i}", "answer": str(i),
                **({"condition": list(CONDITIONS)[i % 3]} if i % 3 < 2 else {})} for i in range(24)]
    (directory / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(_texts(400)))
    prepare([str(corpus)], tokenizer, directory / "ptx", PrepareOptions())
    return directory


def answer_checker(record: dict, text: str) -> float:
    """The tests' true reward: the prompt's number appears in the response."""
    return float(record["answer"] in text.split())


def ppo_config(world: Path, run_dir: Path, **overrides) -> dict:
    cfg = {
        "run_dir": str(run_dir),
        "actor": str(world / "actor"),
        "reward_model": str(world / "rm"),
        "prompts": {"train": str(world / "prompts.jsonl")},
        "checker": "tests.rlhf.ppo_world:answer_checker",
        "rollout": {"prompts_per_iteration": 8, "max_new_tokens": 6, "micro_batch_size": 2,
                    "generation_batch_size": 4},
        "ppo": {"iterations": 4, "critic_warmup": 1},
        "actor_optim": {"lr": 1.0e-3, "min_lr_ratio": 1.0, "weight_decay": 0.0},
        "critic_optim": {"lr": 1.0e-3, "min_lr_ratio": 1.0, "weight_decay": 0.0},
        "ptx": {"data": [{"path": str(world / "ptx")}], "seq_len": 32, "rows_per_iteration": 4,
                "micro_batch_size": 2},
        "dtype": "float32",
        "deterministic": True,
        "seed": 3,
        "checkpoint": {"every": 1, "keep": 10, "export_hf": False},
        "logging": {"tensorboard": False, "progress": False},
    }
    return with_overrides(cfg, overrides)


def ppo_command(config: Path, nproc: int = 1) -> list[str]:
    return cli_command("ppo", "--config", config, nproc=nproc)


def run_ppo(config: Path, nproc: int = 1, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(ppo_command(config, nproc), cwd=ROOT, env={**CLI_ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=timeout)
    if check:
        assert result.returncode == 0, f"ppo failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def metrics(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def responses(run_dir: Path) -> list[dict]:
    return [json.loads(x) for p in sorted((run_dir / "rounds").glob("round_*/responses.jsonl"))
            for x in p.read_text().splitlines()]


def parity_detector(early, late):
    """A custom detector for the tests: 'the characters' codes sum to an even number', which splits any
    set of random responses about in half, so every round has pairs to patch."""
    from internlm2.rlhf.fast_path import Pattern

    return [Pattern("even text", lambda text, length: sum(map(ord, text)) % 2 == 0, {"responses": len(late)})]
