"""The trainer on one CPU process: learning, exact resume after SIGKILL (also across a stage boundary),
a crash in the middle of a checkpoint save, bad run directories."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from internlm2.train.checkpoint_dir import CheckpointError
from internlm2.train.config import TrainConfig
from internlm2.config import from_dict
from internlm2.train import checkpoint as ckpt
from internlm2.train.trainer import Trainer, TrainingStopped
from tests.train.tiny_run import ROOT, losses, make_data, pretrain_command, run_pretrain, tiny_config, write_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("tiny_data"))


def test_tiny_run_learns_and_logs_every_step(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path / "run", **{"stages.0.steps": 24, "eval.every": 8,
                                                     "checkpoint.export_hf": True})
    run_pretrain(write_config(cfg, tmp_path / "c.yaml"))
    run = losses(tmp_path / "run")
    assert sorted(run) == list(range(1, 29))
    first, last = sum(run[s] for s in (1, 2)) / 2, sum(run[s] for s in (23, 24)) / 2
    assert first > 6.5  # ~ln(1024) at initialisation
    assert last < first - 0.6, f"training loss fell only from {first:.3f} to {last:.3f}"
    hf_config = json.loads((tmp_path / "run" / "hf" / "config.json").read_text())
    assert hf_config["rope_theta"] == 100000.0  # the last stage's base, not the preset's
    assert (tmp_path / "run" / "metrics.png").is_file()


def _kill_when(proc: subprocess.Popen, run_dir, step: int, timeout: float = 300) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and any(f'"step": {step},' in line for line in metrics.read_text().splitlines()):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        assert proc.poll() is None, f"the run ended before step {step}: {proc.stderr.read()[-3000:]}"
        time.sleep(0.02)
    proc.kill()
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.parametrize("kill_after", [5, 8], ids=["before-stage-boundary", "after-stage-boundary"])
def test_sigkill_then_resume_is_bitwise_identical(data_dir, tmp_path, kill_after):
    reference = tmp_path / "reference"
    run_pretrain(write_config(tiny_config(data_dir, reference), tmp_path / "ref.yaml"))
    interrupted = tmp_path / "interrupted"
    config = write_config(tiny_config(data_dir, interrupted), tmp_path / "int.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(pretrain_command(config), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _kill_when(proc, interrupted, kill_after)
    assert not list((interrupted / "checkpoints").glob("step_*0010"))  # it really stopped mid-run
    resumed = run_pretrain(config)
    assert "resumed from" in resumed.stdout
    assert losses(interrupted) == losses(reference)  # every step, exactly


def test_crash_during_save_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    cfg = from_dict(TrainConfig, tiny_config(data_dir, tmp_path / "run", **{"stages.0.steps": 8, "stages.1.steps": 1}))
    real_save = ckpt.save

    def crash_at_step_8(directory, units, loop, run_config, parallel):
        real_save(directory, units, loop, run_config, parallel)  # everything written...
        if loop["trainer"]["step"] == 8:
            (directory / "state.json").write_text("{half")  # ...then a torn write and a crash
            raise OSError("injected: disk went away")

    monkeypatch.setattr(ckpt, "save", crash_at_step_8)
    with pytest.raises(OSError, match="injected"):
        Trainer(cfg).run()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000004"]
    monkeypatch.setattr(ckpt, "save", real_save)
    trainer = Trainer(cfg)
    state = trainer.run()
    assert state.step == 9
    assert (checkpoints / "step_00000009").is_dir() and not list(checkpoints.glob(".tmp-*"))


def test_unwritable_run_directory_fails_before_training(data_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cfg = from_dict(TrainConfig, tiny_config(data_dir, blocker / "run"))
    trainer = Trainer(cfg)
    with pytest.raises(CheckpointError, match="is not writable"):
        trainer.run()
    assert trainer.state.step == 0


def test_resume_refuses_a_checkpoint_from_a_different_curriculum(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path / "run", **{"stages.0.steps": 4, "stages.1.steps": 1})
    Trainer(from_dict(TrainConfig, cfg)).run()
    cfg["stages"][0]["name"] = "renamed"
    with pytest.raises(CheckpointError, match="saved with stages"):
        Trainer(from_dict(TrainConfig, cfg)).run()


def test_layout_independent_initialisation(data_dir, tmp_path):
    """The same seed gives the same weights whatever the chunking (checked here on one process)."""
    cfg = from_dict(TrainConfig, tiny_config(data_dir, tmp_path / "run"))
    a = Trainer(cfg)
    b = Trainer(cfg)
    for (na, pa), (nb, pb) in zip(a.engine.named_parameters().items(), b.engine.named_parameters().items()):
        assert na == nb and torch.equal(pa, pb)
    wqkv = a.engine.named_parameters()["model.layers.0.attention.wqkv.weight"]
    assert abs(wqkv.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_recompute_trains_identically(data_dir, tmp_path, mode):
    overrides = {"stages.0.steps": 3, "stages.1.steps": 1, "checkpoint.every": 100}
    plain = Trainer(from_dict(TrainConfig, tiny_config(data_dir, tmp_path / "plain", **overrides)))
    plain.run()
    recomputed = Trainer(from_dict(TrainConfig, tiny_config(data_dir, tmp_path / mode, recompute=mode, **overrides)))
    recomputed.run()
    a, b = plain.engine.chunks[0].state_dict(), recomputed.engine.chunks[0].state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=name)


def test_nonfinite_steps_are_skipped_then_stop_the_run(data_dir, tmp_path, monkeypatch):
    cfg = from_dict(TrainConfig, tiny_config(data_dir, tmp_path / "run", **{"guards.max_nonfinite_in_a_row": 2}))
    trainer = Trainer(cfg)
    real_loss = trainer.task.loss
    poisoned = {2, 4, 5}  # step 2 alone is skipped; 4 and 5 in a row stop the run

    def loss(out, mb):
        value, metrics = real_loss(out, mb)
        return (value * float("nan") if trainer.state.step + 1 in poisoned else value), metrics

    monkeypatch.setattr(trainer.task, "loss", loss)
    before = {n: p.detach().clone() for n, p in trainer.engine.named_parameters().items()}
    with pytest.raises(TrainingStopped, match=r"step 5 \(stage short\): 2 steps in a row had a non-finite loss"):
        trainer.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r.get("skipped")]
    assert skipped == [2, 4, 5] and trainer.state.skipped_steps == 3
    assert any(not torch.equal(p, before[n]) for n, p in trainer.engine.named_parameters().items())  # steps 1, 3
