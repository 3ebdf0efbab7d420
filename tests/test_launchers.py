"""The launchers without slurm or GPUs: fake `srun`, `scontrol`, `getent`, `torchrun` (and a GPU-counting
`python`) on PATH record what the scripts run; torchrun's own argument parser checks the torchrun lines.
Only what a real cluster cannot show is here (a failing scontrol, hosts that do not match the allocation,
GPU counts); the jobs themselves run through a real slurm in tests/slurm/."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"
LAUNCH = ROOT / "scripts" / "launch_torchrun.sh"
PRETRAIN_ARGS = ["--config", "configs/tiny.yaml", "--set", "optim.lr=1e-4", "--set", "run.name=two words"]

# Each fake appends {"tool", "argv", "env"} to $FAKE_LOG, then behaves as described per tool.
_FAKE = '''\
import json, os, subprocess, sys
tool = os.path.basename(sys.argv[0])
args = sys.argv[1:]
keep = ("INTERNLM2_PG_TIMEOUT_S", "SLURM_NODEID", "SRUN_CPUS_PER_TASK", "PYTHONFAULTHANDLER")
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"tool": tool, "argv": args, "env": {k: os.environ.get(k) for k in keep}}) + "\\n")
if tool == "scontrol":
    assert args[:2] == ["show", "hostnames"], args
    rc = int(os.environ.get("FAKE_SCONTROL_RC", "0"))
    if rc == 0:
        print("\\n".join(os.environ["FAKE_HOSTS"].split()))
    sys.exit(rc)
if tool == "getent":
    table = dict(pair.split("=") for pair in os.environ.get("FAKE_RESOLVE", "").split(",") if pair)
    if args[1] not in table:
        sys.exit(2)
    print(f"{table[args[1]]}       STREAM {args[1]}")
    sys.exit(0)
if tool == "srun":  # run the command once per task, as one task per node would
    first = next(i for i, a in enumerate(args) if not a.startswith("--"))
    opts, command = dict(a[2:].split("=", 1) for a in args[:first]), args[first:]
    rcs = [subprocess.call(command, env={**os.environ, "SLURM_NODEID": str(node)})
           for node in range(int(opts["ntasks"]))]
    sys.exit(max(rcs))
if tool == "python":
    print(os.environ["FAKE_GPUS"])
'''


@pytest.fixture
def fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "scontrol", "getent", "torchrun", "python"):
        path = bin_dir / tool
        path.write_text(f"#!{sys.executable}\n{_FAKE}")
        path.chmod(0o755)
    return bin_dir


def _run(script, args, fakes, tmp_path, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "INTERNLM2_", "SRUN_"))}
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    base.update(PATH=f"{fakes}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log), **env)
    proc = subprocess.run(["bash", str(script), *args], env=base, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def _slurm_env(nodes, **extra):
    hosts = [f"gpu-node{i}" for i in range(1, nodes + 1)]
    env = dict(
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="pretrain",
        SLURM_JOB_NODELIST=f"gpu-node[1-{nodes}]",
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_GPUS_ON_NODE="8",
        SLURM_CPUS_PER_TASK="96",
        FAKE_HOSTS=" ".join(hosts),
        FAKE_RESOLVE=",".join(f"{h}=10.0.0.{i}" for i, h in enumerate(hosts, 1)),
    )
    return {**env, **extra}


def _torchrun_args(call):
    return get_args_parser().parse_args(call["argv"])


def test_sbatch_keeps_the_users_timeout_port_and_process_count(fakes, tmp_path):
    env = _slurm_env(2, INTERNLM2_PG_TIMEOUT_S="42", INTERNLM2_MASTER_PORT="31000")
    del env["SLURM_GPUS_ON_NODE"]
    env["SLURM_GPUS_PER_NODE"] = "h100:4"
    proc, calls = _run(SBATCH, ["pretrain", *PRETRAIN_ARGS], fakes, tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    call = next(c for c in calls if c["tool"] == "torchrun")
    args = _torchrun_args(call)
    assert args.nproc_per_node == "4" and args.rdzv_endpoint == "10.0.0.1:31000"
    assert args.training_script_args == ["pretrain", *PRETRAIN_ARGS]
    assert call["env"]["INTERNLM2_PG_TIMEOUT_S"] == "42" and call["env"]["PYTHONFAULTHANDLER"] == "1"
    assert next(c for c in calls if c["tool"] == "srun")["env"]["SRUN_CPUS_PER_TASK"] == "96"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(FAKE_SCONTROL_RC="1"), "'scontrol show hostnames gpu-node[1-2]' failed"),
        (dict(FAKE_HOSTS="gpu-node1"), "scontrol listed 1 host(s) (gpu-node1) for a job of 2 node(s)"),
        (dict(FAKE_RESOLVE="gpu-node2=10.0.0.2"), "'gpu-node1' does not resolve to an address"),
        (dict(SLURM_JOB_NODELIST=""), "submit this script with sbatch"),
    ],
)
def test_sbatch_stops_before_launching_on_a_bad_allocation(fakes, tmp_path, change, message):
    proc, calls = _run(SBATCH, ["pretrain", *PRETRAIN_ARGS], fakes, tmp_path, **{**_slurm_env(2), **change})
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not [c for c in calls if c["tool"] in ("srun", "torchrun")]


@pytest.mark.parametrize("args, got", [([], ""), (["export", "--config", "c.yaml"], "export"),
                                       (["--config", "c.yaml"], "--config")], ids=["none", "not-a-stage", "no-command"])
def test_sbatch_needs_a_training_command_first(fakes, tmp_path, args, got):
    proc, calls = _run(SBATCH, args, fakes, tmp_path, **_slurm_env(2))
    assert proc.returncode != 0 and not [c for c in calls if c["tool"] in ("srun", "torchrun")]
    assert f"the first argument must be the training command (pretrain sft train-rm ppo), got '{got}'" in proc.stderr


def test_sbatch_without_scontrol_fails_instead_of_guessing(tmp_path):
    bin_dir = tmp_path / "only-bash"
    bin_dir.mkdir()
    (bin_dir / "bash").symlink_to("/bin/bash")
    env = {"PATH": str(bin_dir), **_slurm_env(2)}
    proc = subprocess.run(["/bin/bash", str(SBATCH), "pretrain"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "scontrol not found" in proc.stderr


def test_launch_torchrun_passes_the_process_count_and_everything_else_to_pretrain(fakes, tmp_path):
    proc, calls = _run(LAUNCH, ["--nproc", "3", *PRETRAIN_ARGS], fakes, tmp_path)
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    args = _torchrun_args(call)
    assert args.standalone and (args.nnodes, args.nproc_per_node) == ("1", "3")
    assert args.module and args.training_script == "internlm2.cli"
    assert args.training_script_args == ["pretrain", *PRETRAIN_ARGS]


def test_launch_torchrun_defaults_to_every_visible_gpu(fakes, tmp_path):
    proc, calls = _run(LAUNCH, ["--", "--config", "c.yaml", "--help"], fakes, tmp_path,
                       PYTHON=str(fakes / "python"), FAKE_GPUS="4")
    assert proc.returncode == 0, proc.stderr
    args = _torchrun_args(next(c for c in calls if c["tool"] == "torchrun"))
    assert args.nproc_per_node == "4"
    assert args.training_script_args == ["pretrain", "--config", "c.yaml", "--help"]  # after `--`: pretrain's


@pytest.mark.parametrize(
    "argv, gpus, message",
    [
        ([], "0", "no GPU visible: give the number of processes with --nproc N"),
        (["--nproc", "0"], "0", "--nproc must be a positive integer, got '0'"),
        (["--nproc=two"], "0", "--nproc must be a positive integer, got 'two'"),
        (["--nproc"], "0", "--nproc needs a number"),
    ],
)
def test_launch_torchrun_rejects_a_missing_or_bad_process_count(fakes, tmp_path, argv, gpus, message):
    proc, calls = _run(LAUNCH, argv, fakes, tmp_path, PYTHON=str(fakes / "python"), FAKE_GPUS=gpus)
    assert proc.returncode != 0 and message in proc.stderr
    assert not [c for c in calls if c["tool"] == "torchrun"]


def test_pg_timeout_from_the_environment(monkeypatch):
    from internlm2.train.launch_env import PG_TIMEOUT_ENV, pg_timeout_s

    monkeypatch.delenv(PG_TIMEOUT_ENV, raising=False)
    assert pg_timeout_s(600.0) == 600.0
    monkeypatch.setenv(PG_TIMEOUT_ENV, "1800")
    assert pg_timeout_s(600.0) == 1800.0
    for bad in ("soon", "0", "-5", "inf", "nan"):
        monkeypatch.setenv(PG_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=PG_TIMEOUT_ENV):
            pg_timeout_s(600.0)
