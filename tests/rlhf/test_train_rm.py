"""`internlm2 train-rm` end to end on a tiny pretrained model, through the CLI: it trains on preference pairs in
conflicting domains, evaluates on held-out pairs and exports a reward model that `internlm2 score` scores
exactly as training did (its held-out scores, accuracy and per-condition accuracy recomputed from the
scores); it starts from an HF directory or a checkpoint with a fresh head; it resumes after SIGKILL bit for
bit; dp=2, cp=2, tp=2 with sequence parallelism and pp=2 equal one process; bad input stops it before training with one line naming the file
and line (or is counted with on_error: skip)."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from internlm2.config import from_dict
from internlm2.model import load_pretrained
from internlm2.rlhf.rm_training import RMConfig, RMTask
from internlm2.tasks.preferences import DOMAINS, make_preferences
from internlm2.train.trainer import Trainer
from tests.train.test_run_cli import metric
from tests.train.test_trainer import _kill_when
from tests.train.tiny_run import (CLI_ENV, ROOT, losses, make_data, run_cli, run_pretrain, tiny_config, with_overrides,
                                  write_config)

CONDITIONS = {d: f"Judge the answers as the {d} domain does." for d in DOMAINS}
TASKS = ("reverse_list", "sort_list")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny pretraining run (one process) standing in for the SFT model: its HF export and checkpoints."""
    root = tmp_path_factory.mktemp("pretrained")
    data_dir = make_data(root / "data")
    run_dir = root / "run"
    cfg = tiny_config(data_dir, run_dir, **{"stages.0.steps": 2, "stages.1.steps": 1, "checkpoint.export_hf": True})
    run_pretrain(write_config(cfg, root / "c.yaml"))
    return run_dir


def _write(records, path):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Preference files: 48 training pairs and 18 held-out ones, the three domains on the same prompts."""
    root = tmp_path_factory.mktemp("pairs")
    files = {}
    for split, n in (("train", 8), ("eval", 3)):
        by_domain = make_preferences(split, n, TASKS)
        files[split] = _write([r for d in DOMAINS for r in by_domain[d]], root / f"{split}.jsonl")
    return files


def rm_config(run_dir, init_from, pairs, **overrides) -> dict:
    cfg = {
        "run_dir": str(run_dir), "init_from": str(init_from), "seed": 7, "dtype": "float32", "deterministic": True,
        "data": {"train": [{"path": str(pairs["train"])}], "eval": {"path": str(pairs["eval"])}},
        "rm": {"conditions": CONDITIONS, "reward_token": "<unk>", "max_length": 256},
        "stages": [{"name": "rm", "steps": 6, "seq_len": 1024, "global_batch_size": 2, "micro_batch_size": 1}],
        "optim": {"lr": 2.0e-3, "warmup_steps": 1},
        "checkpoint": {"every": 2, "keep": 10, "export_hf": False},
        "eval": {"every": 3, "rows": 100},
        "logging": {"tensorboard": False, "progress": False},
    }
    return with_overrides(cfg, overrides)


@pytest.fixture(scope="module")
def single_run(pretrained, pairs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    cfg = rm_config(run_dir, pretrained / "hf", pairs, **{"checkpoint.export_hf": True})
    result = run_cli("train-rm", "--config", write_config(cfg, run_dir.parent / "c.yaml"))
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir, result


def _held_out_conversations(path, out):
    """The held-out pairs as `internlm2 score` input: chosen then rejected of each pair, with its condition."""
    lines = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        for side in ("chosen", "rejected"):
            lines.append({"messages": [*r["prompt"], {"role": "assistant", "content": r[side]}],
                          "condition": r["condition"]})
    return _write(lines, out)


def test_train_rm_exports_a_reward_model_that_scores_as_training_did(single_run, pairs, tmp_path):
    run_dir, result = single_run
    assert "rm data" in result.stdout and "48 pairs" in result.stdout and "18 pairs" in result.stdout
    assert sorted(losses(run_dir)) == list(range(1, 7)) and sorted(metric(run_dir, "eval_loss")) == [3, 6]
    hf = json.loads((run_dir / "hf" / "config.json").read_text())
    assert hf["architectures"] == ["InternLM2ForRewardModel"] and hf["reward_token_id"] == 0  # <unk>
    assert json.loads((run_dir / "hf" / "conditions.json").read_text()) == CONDITIONS

    scored = run_cli("score", "--model", run_dir / "hf", "--input",
                 _held_out_conversations(pairs["eval"], tmp_path / "held_out.jsonl"))
    assert scored.returncode == 0, scored.stderr[-3000:]
    scores = torch.tensor([json.loads(line)["score"] for line in scored.stdout.splitlines()], dtype=torch.float64)
    chosen, rejected = scores[0::2], scores[1::2]
    conditions = [json.loads(line)["condition"] for line in pairs["eval"].read_text().splitlines()]
    final = {k: metric(run_dir, k)[6] for k in ("eval_chosen_score", "eval_rejected_score", "eval_margin",
                                                 "eval_accuracy", *(f"eval_accuracy/{d}" for d in DOMAINS))}
    assert abs(chosen.mean() - final["eval_chosen_score"]) < 1e-5
    assert abs(rejected.mean() - final["eval_rejected_score"]) < 1e-5
    assert abs((chosen - rejected).mean() - final["eval_margin"]) < 1e-5
    right = (chosen > rejected).double()
    assert abs(right.mean() - final["eval_accuracy"]) < 1e-9
    for d in DOMAINS:
        mine = torch.tensor([c == d for c in conditions])
        assert abs(right[mine].mean() - final[f"eval_accuracy/{d}"]) < 1e-9, d
    assert scores.abs().max() < 5  # inside the barrier's bounds


def test_a_reward_model_learns_a_domain(pretrained, pairs, tmp_path):
    """The concise domain alone (its preference shows in the length): the ranking loss starts at ln 2 (a
    fresh head scores chosen and rejected alike) and falls well below it."""
    concise = [line for line in pairs["train"].read_text().splitlines() if '"condition": "concise"' in line]
    train = tmp_path / "concise.jsonl"
    train.write_text("\n".join(concise) + "\n")
    cfg = rm_config(tmp_path / "run", pretrained / "hf", {**pairs, "train": train},
                    **{"stages.0.steps": 12, "optim.lr": 3.0e-3, "eval.every": 0, "checkpoint.every": 12})
    result = run_cli("train-rm", "--config", write_config(cfg, tmp_path / "c.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    ranking = metric(tmp_path / "run", "ranking_loss")
    assert abs(ranking[1] - math.log(2)) < 0.05 and (ranking[11] + ranking[12]) / 2 < 0.3, ranking


def test_init_from_an_hf_directory_or_a_checkpoint_takes_the_backbone_and_a_fresh_head(pretrained, pairs, tmp_path):
    lm = dict(load_pretrained(pretrained / "hf").named_parameters())
    checkpoint = sorted((pretrained / "checkpoints").glob("step_*"))[-1]
    heads = []
    for source in (pretrained / "hf", checkpoint):
        cfg = from_dict(RMConfig, rm_config(tmp_path / source.name, source, pairs))
        trainer = Trainer(cfg, RMTask(cfg))
        params = trainer.engine.named_parameters()
        assert "output.weight" not in params and params["v_head.weight"].shape == (1, 64)
        for name, param in params.items():
            if name != "v_head.weight":
                assert torch.equal(param, lm[name]), (source, name)
        assert trainer.engine.model_config.reward_token_id == 0 and trainer.state.step == 0
        heads.append(params["v_head.weight"].detach().clone())
        trainer.runtime.close()
    assert torch.equal(heads[0], heads[1])  # the new head: the same initialisation from either source
    assert 0.01 < heads[0].std() < 0.03  # a new model's head: N(0, initializer_range=0.02)


def test_sigkill_then_resume_is_bitwise_identical(single_run, pretrained, pairs, tmp_path):
    reference, _ = single_run
    interrupted = tmp_path / "interrupted"
    config = write_config(rm_config(interrupted, pretrained / "hf", pairs), tmp_path / "i.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "internlm2.cli", "train-rm", "--config", str(config)], cwd=ROOT,
                            env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_when(proc, interrupted, 3)
    resumed = run_cli("train-rm", "--config", config)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    assert losses(interrupted) == losses(reference)
    assert metric(interrupted, "eval_accuracy") == metric(reference, "eval_accuracy")


@pytest.mark.parametrize("layout", [{"dp": 2}, {"cp": 2}, {"tp": 2, "sequence_parallel": True}, {"pp": 2}],
                         ids=["dp2", "cp2", "tp2-sp", "pp2"])
def test_two_rank_runs_match_one_process(single_run, pretrained, pairs, tmp_path, layout):
    reference, _ = single_run
    cfg = rm_config(tmp_path / "run", pretrained / "hf", pairs, parallel=layout)
    result = run_cli("train-rm", "--config", write_config(cfg, tmp_path / "c.yaml"), nproc=2)
    assert result.returncode == 0, result.stderr[-4000:]
    for key in ("loss", "accuracy", "eval_loss", "eval_accuracy/concise", "eval_chosen_score"):
        expected, got = metric(reference, key), metric(tmp_path / "run", key)
        assert sorted(got) == sorted(expected) and expected, (key, got, expected)
        assert all(abs(got[s] - expected[s]) < 1e-5 for s in expected), (key, got, expected)


def _bad_pairs(path, kind):
    record = {"prompt": "Reverse the list [1, 2].", "chosen": "[2, 1]", "rejected": "[1, 2]", "condition": "concise"}
    bad = {"identical": {**record, "rejected": "[2, 1]"}, "condition": {**record, "condition": "poetry"},
           "long": {**record, "chosen": "[2, 1] " * 200}}[kind]
    return _write([record, record, bad, record], path)


@pytest.mark.parametrize("kind,message", [
    ("identical", r"train\.jsonl:3: chosen and rejected are the same conversation"),
    ("condition", r"train\.jsonl:3: condition 'poetry' has no system prompt \(known: \['concise', 'correct'"),
    ("long", r"train\.jsonl:3: \d+ tokens with the reward token, more than max_length=256"),
])
def test_bad_pairs_stop_before_training_naming_file_and_line(pretrained, pairs, tmp_path, kind, message):
    train = _bad_pairs(tmp_path / "train.jsonl", kind)
    cfg = rm_config(tmp_path / "run", pretrained / "hf", {**pairs, "train": train})
    result = run_cli("train-rm", "--config", write_config(cfg, tmp_path / "c.yaml"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1 and re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_bad_pairs_are_counted_with_on_error_skip(pretrained, pairs, tmp_path):
    train = _bad_pairs(tmp_path / "train.jsonl", "identical")
    cfg = rm_config(tmp_path / "run", pretrained / "hf", {**pairs, "train": train},
                    **{"rm.on_error": "skip", "stages.0.steps": 1, "eval.every": 0})
    result = run_cli("train-rm", "--config", write_config(cfg, tmp_path / "c.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train.jsonl: 3 pairs" in result.stdout and "1 skipped" in result.stdout
    assert re.search(r"skipped 1 \(identical\), first: \S+train\.jsonl:3: chosen and rejected", result.stdout)
    assert sorted(losses(tmp_path / "run")) == [1]


def test_a_held_out_set_too_small_for_the_dp_ranks_stops_before_training(pretrained, pairs, tmp_path):
    one_pair = _write([json.loads(pairs["eval"].read_text().splitlines()[0])], tmp_path / "eval.jsonl")
    cfg = rm_config(tmp_path / "run", pretrained / "hf", {**pairs, "eval": one_pair}, parallel={"dp": 2})
    result = run_cli("train-rm", "--config", write_config(cfg, tmp_path / "c.yaml"), nproc=2)
    assert result.returncode != 0
    message = (f"internlm2 train-rm: error: {one_pair}: the held-out set has 1 rows of stage rm (eval.rows=100), "
               "1 micro-batches: too few to give each of dp=2 ranks one")
    assert message in result.stderr, result.stderr[-3000:]
    assert "internlm2/train/" not in result.stderr  # each rank's one line, no traceback of ours (torchrun has its own)
    assert metric(tmp_path / "run", "loss") == {}  # before the first step


@pytest.mark.parametrize("change,message", [
    ({"rm.reward_token": "[UNUSED_TOKEN_130]"}, "the tokenizer has no piece '\\[UNUSED_TOKEN_130\\]' for the reward token"),
    ({"rm.reward_token": 5000}, "reward token id 5000 is outside the vocabulary"),
    ({"stages.0.micro_batch_size": 2}, "stages.rm.micro_batch_size: must be 1"),
    ({"stages.0.seq_len": 300}, "stages.rm.seq_len: the micro-batch budget 300 cannot hold a pair"),
])
def test_bad_settings_are_one_line_errors(pretrained, pairs, tmp_path, change, message):
    cfg = rm_config(tmp_path / "run", pretrained / "hf", pairs, **change)
    result = run_cli("train-rm", "--config", write_config(cfg, tmp_path / "c.yaml"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1 and re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "run").exists()
