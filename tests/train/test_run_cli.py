"""The defects a new user hit, each through the CLI the way users launch it: layouts through
scripts/launch_torchrun.sh end to end (export, sample, plots) with the one-process eval loss; layout
errors before any work; corrupted checkpoints; exports that carry the trained stage's RoPE base."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.train.tiny_run import ROOT, losses, make_data, run_pretrain, tiny_config, write_config

LAUNCH = ROOT / "scripts" / "launch_torchrun.sh"
ENV = dict(os.environ, OMP_NUM_THREADS="1", INTERNLM2_PG_TIMEOUT_S="120")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("tiny_data"))


def metric(run_dir, key) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            out[record["step"]] = record[key]
    return out


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "internlm2.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


END_OF_RUN = {"checkpoint.export_hf": True, "sample": {"max_new_tokens": 8}, "eval.every": 2}


@pytest.fixture(scope="module")
def single_run(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    cfg = tiny_config(data_dir, run_dir, **END_OF_RUN, **{"stages.0.steps": 4, "stages.1.steps": 2})
    run_pretrain(write_config(cfg, run_dir.parent / "c.yaml"))
    return run_dir


@pytest.mark.parametrize("layout", [
    {"dp": 2}, {"tp": 2, "sequence_parallel": True}, {"cp": 2}, {"pp": 2}, {"pp": 2, "virtual_stages": 2},
], ids=["dp2", "tp2-sp", "cp2", "pp2", "pp2-v2"])
def test_two_rank_runs_finish_and_match_one_process(data_dir, single_run, tmp_path, layout):
    """Through launch_torchrun.sh: training and held-out losses equal one process (the held-out set is the
    same rows whatever dp is), interleaved pipelining evaluates, and the end of the run (HF export from
    the final checkpoint, a sample, plots) works on every layout: exit code 0."""
    run_dir = tmp_path / "run"
    cfg = tiny_config(data_dir, run_dir, parallel=layout, **END_OF_RUN, **{"stages.0.steps": 4, "stages.1.steps": 2})
    config = write_config(cfg, tmp_path / "c.yaml")
    result = subprocess.run([str(LAUNCH), "--nproc", "2", "--config", str(config)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for key in ("loss", "eval_loss"):
        expected, got = metric(single_run, key), metric(run_dir, key)
        assert sorted(got) == sorted(expected) and expected, (key, sorted(got), sorted(expected))
        for step in expected:
            assert abs(got[step] - expected[step]) <= 1e-5, (key, step, got[step], expected[step])
    hf = json.loads((run_dir / "hf" / "config.json").read_text())
    assert hf["rope_theta"] == 100000.0  # the last stage's base
    assert (run_dir / "sample.txt").read_text().strip() and (run_dir / "metrics.png").is_file()


def test_layout_errors_come_first_as_one_line(tmp_path):
    """tp=3 on one process: the cause, in one line, exit 2, before the demo data is made."""
    start = time.monotonic()
    result = cli("pretrain", "--config", "configs/tiny.yaml", "--set", f"run_dir={tmp_path / 'run'}",
                 "--set", "parallel.tp=3", timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("internlm2 pretrain: error: parallel layout: tp*pp*cp = 3*1*1 = 3 does not divide "
                               "the world size 1"), lines[0]
    assert "tp=3 does not divide num_kv_heads=2" in lines[0]
    assert not (tmp_path / "run").exists()  # no tokenizer trained, no data prepared
    assert time.monotonic() - start < 60
    debug = cli("pretrain", "--config", "configs/tiny.yaml", "--set", "parallel.tp=3", "--debug", timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.parametrize("overrides,message", [
    (["optim.lrr=1"], "optim.lrr: unknown key (did you mean lr?)"),
    (["data={tokenizer: /nonexistent, train: [{path: /nonexistent}]}"], "/nonexistent: tokenizer model not found"),
    (["data.tokenizer=/somewhere"], "builtin: the demo data makes its own tokenizer"),
    (["stages.0.micro_batch_size=3"], "global_batch_size=16 is not divisible by micro_batch_size * dp = 3 * 1"),
])
def test_bad_configs_are_one_line_errors(tmp_path, overrides, message):
    sets = [arg for item in overrides for arg in ("--set", item)]
    result = cli("pretrain", "--config", "configs/tiny.yaml", "--set", f"run_dir={tmp_path / 'run'}", *sets,
                 timeout=120)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


def _flip(path, size=4096):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + size] = bytes(b ^ 0xFF for b in data[middle:middle + size])
    path.write_bytes(bytes(data))


def test_corrupted_checkpoint_is_skipped_for_the_previous_one(data_dir, tmp_path):
    """4 KB flipped in the newest checkpoint's weights: the next run says which file failed, resumes from
    the checkpoint before it and trains exactly as an uninterrupted run; exporting the broken one is
    refused; naming it in checkpoint.load stops the run with that message."""
    constant_lr = {"optim.min_lr_ratio": 1.0}  # so that two more steps leave the first ten's schedule alone
    reference = tmp_path / "reference"
    run_pretrain(write_config(tiny_config(data_dir, reference, **constant_lr, **{"stages.1.steps": 6}),
                              tmp_path / "r.yaml"))
    run_dir = tmp_path / "run"
    run_pretrain(write_config(tiny_config(data_dir, run_dir, **constant_lr), tmp_path / "a.yaml"))  # 10 steps
    broken = run_dir / "checkpoints" / "step_00000010"
    _flip(broken / "dcp" / "__0_0.distcp")

    export = cli("export", "--checkpoint", str(broken), "--out", str(tmp_path / "hf"))
    assert export.returncode == 2 and "__0_0.distcp does not match its SHA-256" in export.stderr, export.stderr
    assert not (tmp_path / "hf").exists()

    explicit = tiny_config(data_dir, tmp_path / "seeded", **{"checkpoint.load": str(broken)})
    result = cli("pretrain", "--config", str(write_config(explicit, tmp_path / "e.yaml")))
    assert result.returncode == 2 and "checkpoint.load" in result.stderr and "__0_0.distcp" in result.stderr

    longer = tiny_config(data_dir, run_dir, **constant_lr, **{"stages.1.steps": 6, "checkpoint.export_hf": True})
    resumed = run_pretrain(write_config(longer, tmp_path / "b.yaml"))
    assert f"checkpoint {broken} is skipped: {broken / 'dcp' / '__0_0.distcp'} does not match" in resumed.stdout
    assert "resumed from" in resumed.stdout and "step_00000008" in resumed.stdout
    assert losses(run_dir) == losses(reference)  # steps 9 and 10 retrained exactly, then 11 and 12
    assert json.loads((run_dir / "hf" / "config.json").read_text())["rope_theta"] == 100000.0


def test_export_of_a_checkpoint_carries_its_stage_rope_base(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_pretrain(write_config(tiny_config(data_dir, run_dir), tmp_path / "c.yaml"))
    for step, theta in (("step_00000004", 10000.0), ("step_00000010", 100000.0)):
        out = tmp_path / step
        result = cli("export", "--checkpoint", str(run_dir / "checkpoints" / step), "--out", str(out))
        assert result.returncode == 0, result.stderr
        assert json.loads((out / "config.json").read_text())["rope_theta"] == theta
