"""`scripts/slurm/train.sbatch` through a real slurm (sbatch -> srun -> torchrun -> gloo) on a local
2-node cluster: 2-node pretraining, SFT, reward-model and PPO jobs train like one process; a job near its
time limit saves, requeues itself and resumes bit for bit; a node whose process dies ends the job with the
cause in its output; the script's checks stop a bad allocation before anything starts.
"""

import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from internlm2.tasks.preferences import DOMAINS, make_preferences
from tests.slurm.cluster import Job, LocalSlurmCluster
from tests.rlhf.ppo_world import make_world, ppo_config, run_ppo
from tests.rlhf.ppo_world import metrics as ppo_metrics
from tests.rlhf.test_train_rm import rm_config
from tests.train.test_run_cli import metric
from tests.train.test_sft import sft_cli, sft_config
from tests.train.tiny_run import ROOT, losses, make_data, run_cli, run_pretrain, tiny_config, write_config

SCRIPT = ROOT / "scripts" / "slurm" / "train.sbatch"
# Every training job here: one CPU (gloo) process per node, the documented opt-in to a loopback rendezvous
# (all nodes are this host), and a process-group timeout that ends a broken job within a minute.
PG_TIMEOUT_S = 60
JOB_ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "INTERNLM2_NPROC_PER_NODE": "1",
           "INTERNLM2_SINGLE_HOST_CLUSTER": "1", "INTERNLM2_PG_TIMEOUT_S": str(PG_TIMEOUT_S)}
TWO_RANKS = {"parallel": {"dp": 2}, "checkpoint.every": 1000}
JOB_TIMEOUT_S = 600


def submit(cluster: LocalSlurmCluster, command: str, config: Path, nodes: int, *, options=(), env=None) -> Job:
    """sbatch train.sbatch COMMAND --config CONFIG on `nodes` nodes, submitted from the config's directory."""
    return cluster.submit(SCRIPT, [command, "--config", str(config)], nodes=nodes,
                          options=["--gpus-per-node=0", *options], env={**JOB_ENV, **(env or {})},
                          cwd=config.parent)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("tiny_data"))


def _config(data_dir: Path, directory: Path, **overrides) -> Path:
    directory.mkdir(parents=True)
    return write_config(tiny_config(data_dir, directory / "run", **overrides), directory / "config.yaml")


def test_two_node_job_trains_like_one_process(slurm_cluster, data_dir, tmp_path):
    # A space in the path: the arguments reach every node's pretrain intact.
    config = _config(data_dir, tmp_path / "two nodes", **TWO_RANKS)
    job = submit(slurm_cluster, "pretrain", config, nodes=2)
    single = _config(data_dir, tmp_path / "single")
    run_pretrain(single)  # meanwhile, the same config on one process
    result = job.wait(JOB_TIMEOUT_S)
    assert result.state == "COMPLETED", result.output[-5000:]
    assert "nodes          2: node1 node2" in result.output
    assert "per node       1 processes; world size 2" in result.output
    assert re.search(r"master         node1 -> 127\.0\.0\.1, port \d+ \(c10d rendezvous", result.output)
    expected, got = losses(single.parent / "run"), losses(config.parent / "run")
    assert sorted(got) == sorted(expected) == list(range(1, 11))
    for step in expected:  # the bound of the layout tests
        assert abs(got[step] - expected[step]) <= 1e-5, (step, got[step], expected[step])


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    """A tiny pretrained model (HF export) that the SFT and reward-model jobs start from."""
    directory = tmp_path_factory.mktemp("pretrained") / "pretrain"
    run_pretrain(_config(data_dir, directory, **{"stages.0.steps": 2, "stages.1.steps": 1, "checkpoint.export_hf": True}))
    return directory / "run" / "hf"


def _two_node_job_and_one_process(cluster, command: str, config_of, run_one_process, tmp_path) -> tuple[Path, Path]:
    """`command` as a 2-node job (dp=2) and, meanwhile, the same config on one process; the two run dirs."""
    configs = {}
    for name, layout in (("two nodes", TWO_RANKS), ("single", {})):
        (tmp_path / name).mkdir()
        configs[name] = write_config(config_of(tmp_path / name / "run", layout), tmp_path / name / "config.yaml")
    job = submit(cluster, command, configs["two nodes"], nodes=2)
    run_one_process(configs["single"])
    result = job.wait(JOB_TIMEOUT_S)
    assert result.state == "COMPLETED", result.output[-5000:]
    assert f"==== internlm2 {command}: launch environment ====" in result.output
    return tmp_path / "two nodes" / "run", tmp_path / "single" / "run"


def _close(got: dict, expected: dict, steps: list[int]) -> None:
    assert sorted(got) == sorted(expected) == steps, (got, expected)
    for step in expected:  # the bound of the layout tests
        assert abs(got[step] - expected[step]) <= 1e-5, (step, got[step], expected[step])


def test_two_node_sft_job_trains_like_one_process(slurm_cluster, data_dir, pretrained, tmp_path):
    def config(run_dir, layout):
        return sft_config(data_dir, run_dir, pretrained, **{"stages.0.steps": 4, "eval.rows": 4}, **layout)

    def one_process(path):
        assert sft_cli(path).returncode == 0

    two, one = _two_node_job_and_one_process(slurm_cluster, "sft", config, one_process, tmp_path)
    _close(losses(two), losses(one), [1, 2, 3, 4])


def test_two_node_reward_model_job_trains_like_one_process(slurm_cluster, pretrained, tmp_path):
    pairs = {}
    for split, n in (("train", 4), ("eval", 2)):
        by_domain = make_preferences(split, n, ("reverse_list", "sort_list"))
        pairs[split] = tmp_path / f"{split}.jsonl"
        pairs[split].write_text("".join(json.dumps(r) + "\n" for d in DOMAINS for r in by_domain[d]))

    def config(run_dir, layout):
        return rm_config(run_dir, pretrained, pairs, **{"stages.0.steps": 3}, **layout)

    def one_process(path):
        result = run_cli("train-rm", "--config", path)
        assert result.returncode == 0, result.stderr[-3000:]

    two, one = _two_node_job_and_one_process(slurm_cluster, "train-rm", config, one_process, tmp_path)
    for key in ("loss", "accuracy", "eval_loss"):
        _close(metric(two, key), metric(one, key), [1, 2, 3] if key != "eval_loss" else [3])


def test_two_node_ppo_job_trains_like_one_process(slurm_cluster, tmp_path):
    world = make_world(tmp_path / "world")

    def config(run_dir, layout):
        return ppo_config(world, run_dir, **{"ppo.iterations": 2}, **layout)  # a critic warm-up, then both

    two, one = _two_node_job_and_one_process(slurm_cluster, "ppo", config, run_ppo, tmp_path)
    got, expected = ppo_metrics(two), ppo_metrics(one)
    assert sorted(got) == sorted(expected) == [1, 2]
    assert "policy_loss" not in expected[1] and "policy_loss" in expected[2]
    for step in expected:  # the bound of PPO's own layout tests (sampling, then two trained models)
        for key in ("rm_score", "kl", "value_loss", "policy_loss"):
            if key not in expected[step]:
                assert key not in got[step], (step, key)
                continue
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-4, abs=1e-5), (step, key)


# Long enough to outlast the wait for slurm's time-limit check (every 30 s) after the test shortens the
# limit: 700 heavier steps, ~45 s of training on 2 quiet cores (110 CPU-seconds).
LONG = {"stages.0.steps": 700, "stages.0.seq_len": 128, "stages.0.global_batch_size": 16,
        "stages.0.micro_batch_size": 4, "eval.every": 100, "eval.rows": 8}


def _logged_step(run_dir: Path, step: int) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.exists() and f'"step": {step},' in metrics.read_text()


def _seconds(slurm_time: str) -> int:
    """Seconds of a slurm duration: [D-]HH:MM:SS or MM:SS."""
    days, _, clock = slurm_time.rpartition("-")
    seconds = 0
    for part in clock.split(":"):
        seconds = 60 * seconds + int(part)
    return seconds + 86400 * int(days or 0)


def _shorten_the_time_limit_then_let_it_run(cluster: LocalSlurmCluster, job: Job, run_dir: Path) -> None:
    """Once the job trains, cuts its limit to under 300 s from now, so slurm's next time-limit check (every
    30 s) sends --signal's SIGUSR1; once it is requeued, gives it 30 minutes again."""
    job.wait_until(lambda j: _logged_step(run_dir, 1), JOB_TIMEOUT_S, "at step 1")  # the ranks catch signals
    minutes = (_seconds(job.info()["RunTime"]) + 300) // 60  # now at most 300 s are left: the warning is due
    cluster.run(["scontrol", "update", f"JobId={job.id}", f"TimeLimit={minutes}"])
    job.wait_until(lambda j: int(j.info().get("Restarts", 0)) >= 1, 120, "requeued")
    cluster.run(["scontrol", "update", f"JobId={job.id}", "TimeLimit=30"])  # the rest runs to its end


def test_job_near_its_time_limit_saves_requeues_and_resumes_bit_for_bit(slurm_cluster, data_dir, tmp_path):
    reference = _config(data_dir, tmp_path / "reference", **TWO_RANKS, **LONG)
    config = _config(data_dir, tmp_path / "requeued", **TWO_RANKS, **LONG)
    run_dir = config.parent / "run"
    # SIGUSR1 when 5 minutes are left: not before the test shortens the limit, once training is under way.
    job = submit(slurm_cluster, "pretrain", config, nodes=2, options=["--time=30", "--signal=USR1@300"])
    with ThreadPoolExecutor(1) as pool:  # meanwhile, the same run on this host, uninterrupted
        uninterrupted = pool.submit(run_pretrain, reference, nproc=2)
        _shorten_the_time_limit_then_let_it_run(slurm_cluster, job, run_dir)
        result = job.wait(JOB_TIMEOUT_S)
        uninterrupted.result()

    assert result.state == "COMPLETED" and result.restarts == 1, result.output[-5000:]
    stop = re.search(r"internlm2 pretrain: stopped on SIGUSR1 at step (\d+), after saving its checkpoint",
                     result.output)
    assert stop, result.output[-5000:]
    step = int(stop.group(1))
    assert f"the trainer saved step {step} and stopped on SIGUSR1: requeueing job {job.id}" in result.output
    assert "requeued 1 time(s) so far" in result.output
    assert f"at step {step} (stage short)" in result.output  # the requeued job resumed from that checkpoint
    assert 1 <= step < 700
    assert losses(run_dir) == losses(reference.parent / "run")  # every step, exactly


def _job_process(job_id: str, rank: int) -> tuple[int, dict]:
    """(pid, environment) of the training process of global rank `rank` in slurm job `job_id`."""
    for proc in Path("/proc").iterdir():
        try:
            raw = (proc / "environ").read_bytes()
        except (OSError, ValueError):
            continue
        env = dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)
        if env.get("SLURM_JOB_ID") == job_id and env.get("RANK") == str(rank) and "LOCAL_RANK" in env:
            return int(proc.name), env
    raise LookupError(f"no process of rank {rank} in job {job_id}")


def test_a_node_whose_process_dies_ends_the_job_with_the_cause(slurm_cluster, data_dir, tmp_path):
    config = _config(data_dir, tmp_path / "dies", **TWO_RANKS, **LONG)
    job = submit(slurm_cluster, "pretrain", config, nodes=2)
    job.wait_until(lambda j: _logged_step(config.parent / "run", 3), JOB_TIMEOUT_S, "at step 3")
    pid, env = _job_process(job.id, rank=1)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    result = job.wait(JOB_TIMEOUT_S)
    assert result.state == "FAILED", result.output[-5000:]
    assert time.monotonic() - killed < PG_TIMEOUT_S, "the job outlived the process-group timeout"
    assert f"Signal 9 (SIGKILL) received by PID {pid}" in result.output  # torchrun on that node says why
    assert f"srun: error: {env['SLURMD_NODENAME']}: task {env['SLURM_PROCID']}" in result.output


@pytest.mark.parametrize(
    "nodes, env, message",
    [
        (2, {"INTERNLM2_SINGLE_HOST_CLUSTER": None}, "'node1' resolves to 127.0.0.1, a loopback address, on a 2-node job"),
        (2, {"INTERNLM2_NPROC_PER_NODE": None}, "cannot tell how many processes to start per node"),
        (2, {"INTERNLM2_MASTER_PORT": "70000"}, "the rendezvous port must be 1-65535, got '70000'"),
    ],
    ids=["loopback-master-on-2-nodes", "no-process-count", "bad-port"],
)
def test_the_script_stops_a_bad_launch_before_anything_starts(slurm_cluster, data_dir, tmp_path, nodes, env, message):
    config = _config(data_dir, tmp_path / "bad", **TWO_RANKS)
    result = submit(slurm_cluster, "pretrain", config, nodes=nodes, env=env).wait(120)
    assert result.state == "FAILED" and "train.sbatch: error: " in result.output and message in result.output, \
        result.output
    assert "launch environment" not in result.output and not (config.parent / "run").exists()


def test_a_one_node_job_may_meet_on_loopback_without_the_opt_in(slurm_cluster, data_dir, tmp_path):
    config = _config(data_dir, tmp_path / "one node", **{"stages.0.steps": 2, "stages.1.steps": 1})
    result = submit(slurm_cluster, "pretrain", config, nodes=1,
                    env={"INTERNLM2_SINGLE_HOST_CLUSTER": None, "INTERNLM2_PG_TIMEOUT_S": None}).wait(JOB_TIMEOUT_S)
    assert result.state == "COMPLETED", result.output[-5000:]
    assert "master         node1 -> 127.0.0.1" in result.output and sorted(losses(config.parent / "run")) == [1, 2, 3]
    assert "INTERNLM2_PG_TIMEOUT_S=1800" in result.output  # the script's default


def test_a_cancelled_job_saves_a_checkpoint_and_is_not_requeued(slurm_cluster, data_dir, tmp_path):
    """scancel (as preemption and the time limit itself) sends SIGTERM to every process of the job and
    SIGKILL after KillWait: the ranks save in between, and the script leaves requeueing to the scheduler."""
    config = _config(data_dir, tmp_path / "cancelled", **TWO_RANKS, **LONG)
    run_dir = config.parent / "run"
    job = submit(slurm_cluster, "pretrain", config, nodes=2)
    job.wait_until(lambda j: _logged_step(run_dir, 3), JOB_TIMEOUT_S, "at step 3")
    slurm_cluster.run(["scancel", job.id])
    result = job.wait(JOB_TIMEOUT_S)
    assert result.state == "CANCELLED" and result.restarts == 0, result.output[-5000:]
    stop = re.search(r"stopped on SIGTERM at step (\d+), after saving its checkpoint", result.output)
    assert stop, result.output[-5000:]
    step = int(stop.group(1))
    assert f"the trainer saved step {step} and stopped on SIGTERM" in result.output and "not requeued" in result.output
    assert (run_dir / "checkpoints" / f"step_{step:08d}").is_dir() and max(losses(run_dir)) == step


def test_a_signal_for_the_batch_shell_reaches_the_ranks(slurm_cluster, data_dir, tmp_path):
    """`--signal=B:USR1@120` signals only the batch shell (as `scancel --batch` does): it passes it on."""
    config = _config(data_dir, tmp_path / "batch signal", **TWO_RANKS, **LONG)
    run_dir = config.parent / "run"
    job = submit(slurm_cluster, "pretrain", config, nodes=2)
    job.wait_until(lambda j: _logged_step(run_dir, 3), JOB_TIMEOUT_S, "at step 3")
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job.id])
    job.wait_until(lambda j: int(j.info().get("Restarts", 0)) >= 1, 120, "requeued")
    slurm_cluster.run(["scancel", job.id])  # the requeued job's run is the other test's subject
    output = job.output()
    stop = re.search(r"stopped on SIGUSR1 at step (\d+), after saving its checkpoint", output)
    assert stop, output[-5000:]
    assert f"the trainer saved step {stop.group(1)} and stopped on SIGUSR1: requeueing job {job.id}" in output
