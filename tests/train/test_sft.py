"""`internlm2 sft` end to end on a tiny pretrained model: through the CLI it learns the demo tasks, reports
its packing, exports with the chat template and scores the tasks before and after; on the tasks mixed with
pretraining text it resumes after SIGKILL bit for bit, and runs from one process's pretraining checkpoint
(weights only) on tp/dp/cp/pp layouts exactly as on one process; bad inputs stop it before training with
one line."""

import json
import re
import subprocess
import sys

import pytest
import torch

from internlm2.config import from_dict
from internlm2.data import Tokenizer
from internlm2.data.chat_template import CHAT_TEMPLATE
from internlm2.train import checkpoint as ckpt
from internlm2.train.sft import SFTConfig, SFTTask
from internlm2.train.trainer import Trainer
from tests.train.test_run_cli import metric
from tests.train.test_trainer import _kill_when
from tests.train.tiny_run import (CLI_ENV, ROOT, losses, make_data, run_cli, run_pretrain, tiny_config, with_overrides,
                                  write_config)



@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    """A tiny pretraining run (one process): its HF export and its final checkpoint."""
    run_dir = tmp_path_factory.mktemp("pretrained") / "run"
    cfg = tiny_config(data_dir, run_dir, **{"stages.0.steps": 4, "stages.1.steps": 2, "checkpoint.export_hf": True})
    run_pretrain(write_config(cfg, run_dir.parent / "c.yaml"))
    return run_dir


def sft_config(data_dir, run_dir, init_from, **overrides) -> dict:
    cfg = {
        "run_dir": str(run_dir), "init_from": str(init_from), "seed": 7, "dtype": "float32", "deterministic": True,
        "data": {"tasks": {"train_per_task": 16, "eval_per_task": 3, "tasks": ["reverse_list", "sort_list",
                                                                             "calculator"]},
                 "train": [{"path": str(data_dir / "train"), "weight": 0.25}], "num_workers": 0},
        "stages": [{"name": "sft", "steps": 12, "seq_len": 256, "global_batch_size": 4, "micro_batch_size": 2}],
        "optim": {"lr": 3.0e-3, "warmup_steps": 1},
        "checkpoint": {"every": 4, "keep": 10, "export_hf": False},
        "eval": {"every": 6, "rows": 2},
        "logging": {"tensorboard": False, "progress": False},
    }
    return with_overrides(cfg, overrides)


def sft_cli(config, timeout=600, nproc=1):
    return run_cli("sft", "--config", config, nproc=nproc, timeout=timeout)


def test_sft_cli_learns_reports_exports_and_scores(data_dir, pretrained, tmp_path):
    run_dir = tmp_path / "sft"
    cfg = sft_config(data_dir, run_dir, pretrained / "hf", **{
        "data.train": [], "stages.0.steps": 40, "optim.lr": 5.0e-3, "eval.every": 20, "checkpoint.every": 20,
        "checkpoint.export_hf": True, "task_eval": {"max_new_tokens": 12}})
    result = sft_cli(write_config(cfg, tmp_path / "sft.yaml"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert re.search(r"sft data \S+tasks_train at seq_len 256: 48 conversations in \d+ rows \(best_fit", result.stdout)
    run, held_out = losses(run_dir), metric(run_dir, "eval_loss")
    assert sorted(run) == list(range(1, 41)) and sorted(held_out) == [20, 40]
    assert run[1] > 6.0 and held_out[40] < run[1] / 2, (run[1], held_out)  # ~ln(1024) before: the model knew no tasks
    config = json.loads((run_dir / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    scores = json.loads((run_dir / "task_eval.json").read_text())
    assert set(scores) == {"before", "after"} and "held-out tasks (9 prompts)" in result.stdout
    for when in scores.values():
        assert set(when) == {"reverse_list", "sort_list", "calculator", "all"}
        assert when["all"]["examples"] == 9 and all(0 <= when["all"][k] <= 1 for k in ("exact_match", "format"))


def test_a_stage_mixes_conversations_with_pretraining_rows(data_dir, pretrained, tmp_path):
    cfg = from_dict(SFTConfig, sft_config(data_dir, tmp_path / "run", pretrained / "hf",
                                          **{"data.train.0.weight": 1.0}))
    trainer = Trainer(cfg, SFTTask(cfg.sft))
    mixture = trainer.task.stage_dataset(trainer.data.train, trainer.tokenizer, 256)
    kinds = [mixture.locate(i)[0] for i in range(len(mixture))]
    assert 0.45 < kinds.count(0) / len(kinds) < 0.55  # equal weights
    for i in range(8):
        row, (kind, _) = mixture[i], mixture.locate(i)
        starts_with_bos = row["input_ids"][row["cu_seqlens"][:-1].long()] == trainer.tokenizer.bos_id
        # conversations: every piece a whole conversation (BOS first) but the padding; text: a cut stream
        assert kind == 1 or starts_with_bos[:-1].all() or starts_with_bos.all()


def test_sft_sigkill_then_resume_is_bitwise_identical(data_dir, pretrained, tmp_path):
    reference = tmp_path / "reference"
    config = write_config(sft_config(data_dir, reference, pretrained / "hf"), tmp_path / "r.yaml")
    assert sft_cli(config).returncode == 0
    interrupted = tmp_path / "interrupted"
    config = write_config(sft_config(data_dir, interrupted, pretrained / "hf"), tmp_path / "i.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "internlm2.cli", "sft", "--config", str(config)], cwd=ROOT,
                            env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_when(proc, interrupted, 6)
    resumed = sft_cli(config)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout
    assert losses(interrupted) == losses(reference)


def test_init_from_a_checkpoint_takes_its_weights_only(data_dir, pretrained, tmp_path):
    checkpoint = sorted((pretrained / "checkpoints").glob("step_*"))[-1]
    cfg = from_dict(SFTConfig, sft_config(data_dir, tmp_path / "sft", checkpoint))
    trainer = Trainer(cfg, SFTTask(cfg.sft))
    saved = json.loads((checkpoint / ckpt.STATE_FILE).read_text())["units"]["model"]
    assert trainer.engine.model_config.rope_theta == saved["model_config"]["rope_theta"] == 100000.0
    for name, param in trainer.engine.named_parameters().items():
        assert torch.equal(param, ckpt.read_unit_tensor(checkpoint, "model", name, param.shape)), name
    assert trainer.engine.optimizer.step_count == 0 and trainer.state.step == 0
    # the pretraining run's tokenizer, found through the run config saved in the checkpoint
    assert trainer.tokenizer.fingerprint == Tokenizer.load(data_dir / "tokenizer").fingerprint


LAYOUT_RUN = {"stages.0.steps": 3, "eval.every": 3, "eval.rows": 4}


@pytest.fixture(scope="module")
def single_from_checkpoint(data_dir, pretrained, tmp_path_factory):
    """SFT on one process from the pretraining run's checkpoint: the reference for the layouts."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    checkpoint = sorted((pretrained / "checkpoints").glob("step_*"))[-1]
    result = sft_cli(write_config(sft_config(data_dir, run_dir, checkpoint, **LAYOUT_RUN), run_dir.parent / "c.yaml"))
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


@pytest.mark.parametrize("layout", [
    {"tp": 2, "sequence_parallel": True}, {"dp": 2}, {"cp": 2}, {"pp": 2, "virtual_stages": 2},
], ids=["tp2-sp", "dp2-zero1", "cp2", "pp2-v2"])
def test_two_rank_runs_from_a_one_process_checkpoint_match_one_process(data_dir, pretrained, single_from_checkpoint,
                                                                       tmp_path, layout):
    """The one-process checkpoint resharded into each layout on load; training and held-out losses (the
    mixture of conversations and pretraining rows) equal one process's."""
    checkpoint = sorted((pretrained / "checkpoints").glob("step_*"))[-1]
    cfg = sft_config(data_dir, tmp_path / "run", checkpoint, parallel=layout, **LAYOUT_RUN)
    result = sft_cli(write_config(cfg, tmp_path / "c.yaml"), nproc=2)
    assert result.returncode == 0, result.stderr[-4000:]
    for key in ("loss", "eval_loss"):
        expected, got = metric(single_from_checkpoint, key), metric(tmp_path / "run", key)
        assert sorted(got) == sorted(expected) and expected, (key, got, expected)
        assert all(abs(got[s] - expected[s]) < 1e-5 for s in expected), (key, got, expected)


@pytest.mark.parametrize("change,message", [
    ({"init_from": "/nonexistent"}, "init_from: /nonexistent is neither an HF checkpoint directory"),
    ({"stages.0.seq_len": 16, "sft.overlong": "drop"},
     "no conversation to train on in rows of 16 tokens: all 48 are longer"),
    ({"stages.0.seq_len": 60},
     r"tasks_train\.jsonl:\d+: a conversation of \d+ tokens truncated to seq_len=60 keeps no"),
    ({"sft.train_on": "first"}, "sft.train_on: 'first' is not one of"),
    ({"data.tasks": None, "data.train": []}, "data.train: give at least one prepared dataset"),
])
def test_bad_sft_inputs_stop_before_training_with_one_line(data_dir, pretrained, tmp_path, change, message):
    change = dict(change)
    cfg = sft_config(data_dir, tmp_path / "run", change.pop("init_from", pretrained / "hf"), **change)
    result = sft_cli(write_config(cfg, tmp_path / "c.yaml"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1 and re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not losses(tmp_path / "run")
