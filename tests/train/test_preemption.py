"""A stop signal (SIGTERM from a scheduler or a user, SIGUSR1 from slurm's time-limit warning) makes the
trainer save a checkpoint and exit cleanly on every rank at the same step; running again resumes, with
losses equal to an uninterrupted run bit for bit. One process, and 2 ranks under plain torchrun (the
signal to torchrun, or to one rank only). Through real slurm: tests/slurm/test_slurm_jobs.py."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from internlm2.train import launch_env
from internlm2.train.preemption import StopSignals
from tests.train.tiny_run import ROOT, losses, make_data, pretrain_command, run_pretrain, tiny_config, write_config

# Long enough for a signal sent at step 3 to arrive well before the end.
STEPS = {"stages.0.steps": 16, "stages.1.steps": 4, "checkpoint.every": 100, "checkpoint.export_hf": True}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="module")
def reference_losses(data_dir, tmp_path_factory):
    """nproc -> the losses of the uninterrupted run (computed once per layout)."""
    cache = {}

    def get(nproc: int) -> dict[int, float]:
        if nproc not in cache:
            run_dir = tmp_path_factory.mktemp(f"reference{nproc}") / "run"
            config = write_config(tiny_config(data_dir, run_dir, **_layout(nproc), **STEPS), run_dir.parent / "c.yaml")
            run_pretrain(config, nproc=nproc)
            cache[nproc] = losses(run_dir)
        return cache[nproc]

    return get


def _layout(nproc: int) -> dict:
    return {"parallel": {"dp": 2}} if nproc == 2 else {}


def _logged_step(run_dir: Path, step: int) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.exists() and f'"step": {step},' in metrics.read_text()


def _rank_pids(torchrun_pid: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes."""
    children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        if "RANK" in env:
            ranks[int(env["RANK"])] = pid
    return ranks


def _run_and_signal(config: Path, run_dir: Path, nproc: int, target, sig, stopped_file: Path):
    """Starts pretrain, sends `sig` to target(proc) once step 3 is logged; returns the finished process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", INTERNLM2_PG_TIMEOUT_S="120",
               **{launch_env.STOPPED_FILE_ENV: str(stopped_file)})
    proc = subprocess.Popen(pretrain_command(config, nproc), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not _logged_step(run_dir, 3):
        assert proc.poll() is None, f"the run ended before step 3: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "step 3 not reached"
        time.sleep(0.02)
    os.kill(target(proc), sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.mark.parametrize(
    "nproc, target, sig",
    [
        (1, lambda proc: proc.pid, signal.SIGUSR1),
        (2, lambda proc: proc.pid, signal.SIGTERM),  # torchrun passes it to every rank
        (2, lambda proc: _rank_pids(proc.pid)[1], signal.SIGUSR1),  # one rank only: the other follows
    ],
    ids=["1-process-usr1", "torchrun-term", "torchrun-usr1-to-rank-1"],
)
def test_stop_signal_saves_exits_and_resume_is_bitwise_identical(data_dir, reference_losses, tmp_path, nproc, target,
                                                                   sig):
    run_dir = tmp_path / "stopped"
    config = write_config(tiny_config(data_dir, run_dir, **_layout(nproc), **STEPS), tmp_path / "s.yaml")
    stopped_file = tmp_path / "stopped-marker"
    code, out, err = _run_and_signal(config, run_dir, nproc, target, sig, stopped_file)

    signal_name, step = stopped_file.read_text().split()
    assert signal_name == sig.name
    step = int(step)
    assert 3 <= step < 20, step
    assert f"stopped on {sig.name} at step {step}, after saving its checkpoint" in out
    if nproc == 1 or sig != signal.SIGTERM:
        assert code == 0, err[-3000:]  # torchrun itself ends with an error after a SIGTERM of its own
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert checkpoints[-1] == f"step_{step:08d}"
    assert not (run_dir / "hf").exists() and not (run_dir / "metrics.png").exists()  # the end waits
    assert max(losses(run_dir)) == step  # both ranks stopped after the same step: nothing logged beyond it

    resumed = run_pretrain(config, nproc=nproc)
    assert f"resumed from {run_dir / 'checkpoints' / checkpoints[-1]} at step {step}" in resumed.stdout
    assert losses(run_dir) == reference_losses(nproc)  # every step, exactly
    assert (run_dir / "hf" / "config.json").is_file() and (run_dir / "metrics.png").is_file()


def test_no_signal_no_stop_and_handlers_are_restored():
    stop = StopSignals([signal.SIGUSR1], torch.device("cpu"))
    before = signal.getsignal(signal.SIGUSR1)
    with stop.catching():
        assert not stop.stop_requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.stop_requested()
        assert str(stop.stopped(7)).startswith("stopped on SIGUSR1 at step 7")
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.parametrize("raw, expected", [("", ["SIGTERM", "SIGUSR1"]), ("usr2", ["SIGUSR2"]),
                                           ("SIGTERM, SIGUSR2", ["SIGTERM", "SIGUSR2"])])
def test_stop_signals_from_the_environment(monkeypatch, raw, expected):
    monkeypatch.setenv(launch_env.STOP_SIGNALS_ENV, raw)
    assert [s.name for s in launch_env.stop_signals()] == expected


@pytest.mark.parametrize("raw", ["SIGKILL", "USR3", "TERM,nope"])
def test_bad_stop_signals_name_the_variable(monkeypatch, raw):
    monkeypatch.setenv(launch_env.STOP_SIGNALS_ENV, raw)
    with pytest.raises(ValueError, match=f"{launch_env.STOP_SIGNALS_ENV}=.*is not a signal a process can catch"):
        launch_env.stop_signals()
