"""A checkpoint written under (tp=2, pp=2) continues under other layouts: one process, and dp=2.

Runs torchrun with CPU gloo processes; the continued losses must match the original run's own next steps."""

import os
import subprocess

import pytest

from tests.train.tiny_run import ROOT, losses, make_data, pretrain_command, run_pretrain, tiny_config, write_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("tiny_data"))


def test_tp2_pp2_checkpoint_resumes_on_one_process_and_on_dp2(data_dir, tmp_path):
    source_run = tmp_path / "tp2pp2"
    cfg = tiny_config(data_dir, source_run, parallel={"tp": 2, "pp": 2, "sequence_parallel": True},
                      **{"checkpoint.every": 3})
    run_pretrain(write_config(cfg, tmp_path / "a.yaml"), nproc=4)
    original = losses(source_run)
    assert sorted(original) == list(range(1, 11))
    checkpoint = source_run / "checkpoints" / "step_00000006"  # the end of the first stage
    for name, layout, nproc in [("single", {}, 1), ("dp2", {"dp": 2}, 2)]:
        run_dir = tmp_path / name
        cfg = tiny_config(data_dir, run_dir, parallel=layout, **{"checkpoint.load": str(checkpoint)})
        run_pretrain(write_config(cfg, tmp_path / f"{name}.yaml"), nproc=nproc)
        continued = losses(run_dir)
        assert sorted(continued) == list(range(7, 11)), name
        for step in range(7, 11):
            assert abs(continued[step] - original[step]) <= 1e-5, (name, step, continued[step], original[step])


def test_context_parallel_run_equals_one_process(data_dir, tmp_path):
    """cp=2: every packed document is padded to split into 4 chunks; the loss over real tokens (and so the
    training) must equal the unpadded single-process run."""
    single, cp2 = tmp_path / "single", tmp_path / "cp2"
    overrides = {"stages.0.steps": 3, "stages.1.steps": 2}
    run_pretrain(write_config(tiny_config(data_dir, single, **overrides), tmp_path / "s.yaml"))
    run_pretrain(write_config(tiny_config(data_dir, cp2, parallel={"cp": 2}, **overrides), tmp_path / "c.yaml"), nproc=2)
    expected, got = losses(single), losses(cp2)
    assert sorted(got) == sorted(expected) == list(range(1, 6))
    for step in expected:
        assert abs(got[step] - expected[step]) <= 1e-5, (step, got[step], expected[step])


def test_unwritable_run_directory_stops_every_rank_at_once(data_dir, tmp_path):
    """Rank 0 finds the problem; the others must stop too instead of waiting in a collective."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    config = write_config(tiny_config(data_dir, blocker / "run", parallel={"dp": 2}), tmp_path / "c.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1", INTERNLM2_PG_TIMEOUT_S="300")
    result = subprocess.run(pretrain_command(config, nproc=2), cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=150)  # far below the process-group timeout: nobody waited for it
    assert result.returncode != 0
    assert "is not writable" in result.stderr
