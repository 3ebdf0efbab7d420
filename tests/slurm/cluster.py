"""A real Slurm cluster of N nodes on this host, for tests: its own munged, one slurmctld and one slurmd
per node (`slurmd -N nodeK`, each with its own port, spool directory and log), all under one directory,
started and torn down by the tests themselves. Debian/Ubuntu: `apt-get install slurm-wlm munge` (as
.ci/run does); the daemons run as root.

Node names resolve to 127.0.0.1 only where the jobs run: each slurmd starts in a private mount namespace
whose /etc/hosts is this host's plus the node names, and its jobs inherit it. Nothing on the host changes.
A batch script sees what it would on a real cluster: `scontrol show hostnames` lists node1..N and
`getent` resolves them, here to a loopback address.

    with LocalSlurmCluster(tmp_dir, nodes=2) as cluster:
        job = cluster.submit("scripts/slurm/train.sbatch", ["pretrain", "--config", "c.yaml"], nodes=2)
        result = job.wait(timeout=300)
        assert result.state == "COMPLETED", result.output

Also a command line, to try the scripts by hand:  python -m tests.slurm.cluster DIR [--nodes N]
(prints the environment to use, keeps the cluster up until Ctrl-C).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun", "unshare")
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


def missing_requirements() -> str | None:
    """Why a local cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "the slurm and munge daemons of a local test cluster run as root"
    absent = [tool for tool in TOOLS if shutil.which(tool, path=_sbin_path()) is None]
    if absent:
        return f"not installed: {', '.join(absent)} (apt-get install slurm-wlm munge)"
    return None


def _sbin_path(path: str | None = None) -> str:
    """PATH plus the sbin directories where the daemons live."""
    return os.pathsep.join([os.environ.get("PATH", "") if path is None else path, "/usr/sbin", "/sbin"])


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class JobResult:
    job_id: str
    state: str  # COMPLETED, FAILED, TIMEOUT, ...
    exit_code: str  # "rc:signal", as slurm reports it
    restarts: int  # times the job was requeued
    output: str  # the job's output file (stdout and stderr)
    seconds: float  # from submission to the end


class Job:
    def __init__(self, cluster: LocalSlurmCluster, job_id: str, output: Path):
        self.cluster, self.id, self.output_path = cluster, job_id, output
        self.submitted = time.monotonic()

    def info(self) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        out = self.cluster.run(["scontrol", "show", "job", "--oneliner", self.id]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def output(self) -> str:
        return self.output_path.read_text(errors="replace") if self.output_path.exists() else ""

    def wait_until(self, condition, timeout: float, what: str) -> None:
        """Polls until `condition(self)` holds; the job must not end first."""
        deadline = time.monotonic() + timeout
        while not condition(self):
            state = self.info().get("JobState", "")
            if state in FINISHED_STATES:
                raise AssertionError(f"job {self.id} ended ({state}) before {what}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id}: not {what} after {timeout:.0f}s:\n{self.output()[-4000:]}")
            time.sleep(0.2)

    def wait(self, timeout: float) -> JobResult:
        """Blocks until the job has finished for good (requeued jobs run again first)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.info()
            if info.get("JobState") in FINISHED_STATES:
                return JobResult(self.id, info["JobState"], info.get("ExitCode", ""), int(info.get("Restarts", 0)),
                                 self.output(), time.monotonic() - self.submitted)
            if time.monotonic() > deadline:
                self.cluster.run(["scancel", self.id], check=False)
                raise TimeoutError(f"job {self.id} still {info.get('JobState')} after {timeout:.0f}s; cancelled:\n"
                                   f"{self.output()[-4000:]}")
            time.sleep(0.2)


class LocalSlurmCluster:
    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 2):
        self.root, self.nodes, self.cpus = Path(root), nodes, cpus_per_node
        self.names = [f"node{i}" for i in range(1, nodes + 1)]
        self.conf = self.root / "slurm.conf"
        self.hosts = self.root / "hosts"
        self.jobs_dir = self.root / "jobs"
        self._daemons: list[subprocess.Popen] = []

    # ---- the environment clients and jobs use
    def environment(self, base: dict | None = None) -> dict[str, str]:
        """`base` (default: os.environ) plus what the slurm commands need to find this cluster."""
        env = dict(os.environ if base is None else base)
        env.update(SLURM_CONF=str(self.conf), PATH=_sbin_path(env.get("PATH", "")))
        return env

    def run(self, argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """A slurm client command (sinfo, scontrol, ...) against this cluster."""
        return subprocess.run(argv, env=self.environment(), capture_output=True, text=True, check=check,
                              timeout=60, **kwargs)

    # ---- jobs
    def submit(self, script: str | Path, args: list[str] = (), *, nodes: int = 1, options: list[str] = (),
               env: dict | None = None, cwd: Path | None = None) -> Job:
        """sbatch SCRIPT ARGS on `nodes` nodes; `env` adds to (or, with None values, removes from) the
        submitting environment, which the job inherits."""
        self.jobs_dir.mkdir(exist_ok=True)
        environment = self.environment()
        for key, value in (env or {}).items():
            if value is None:
                environment.pop(key, None)
            else:
                environment[key] = value
        name = f"job-{secrets.token_hex(4)}"
        output = self.jobs_dir / f"{name}.out"
        argv = ["sbatch", "--parsable", f"--job-name={name}", f"--nodes={nodes}", f"--output={output}",
                *options, str(script), *args]
        out = subprocess.run(argv, env=environment, cwd=cwd, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}")
        return Job(self, out.stdout.strip().split(";")[0], output)

    # ---- start and stop
    def __enter__(self) -> LocalSlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        why = missing_requirements()
        if why:
            raise RuntimeError(f"cannot start a local slurm cluster: {why}")
        for sub in ("munge", "state", "log", "run", *(f"spool/{n}" for n in self.names)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        (self.root / "munge").chmod(0o700)
        self.hosts.write_text(Path("/etc/hosts").read_text() + "".join(f"127.0.0.1 {n}\n" for n in self.names))
        try:
            self._start_munge()
            ports = _free_ports(1 + self.nodes)
            self.conf.write_text(self._slurm_conf(ports[0], ports[1:]))
            env = self.environment()
            self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], env, "slurmctld")
            # The node names resolve in the slurmds' own /etc/hosts, which their jobs inherit.
            with_hosts = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          'mount --bind "$0" /etc/hosts && exec "$@"', str(self.hosts)]
            for name in self.names:
                self._spawn([*with_hosts, "slurmd", "-D", "-N", name, "-f", str(self.conf)], env, f"slurmd-{name}")
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def _start_munge(self) -> None:
        d = self.root / "munge"
        key = d / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        self.munge_socket = d / "munge.socket"
        self._spawn(["munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                     f"--log-file={self.root / 'log' / 'munged.log'}", f"--pid-file={d / 'munged.pid'}",
                     f"--seed-file={d / 'munged.seed'}"], self.environment(), "munged")
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if time.monotonic() > deadline or self._daemons[-1].poll() is not None:
                raise RuntimeError(f"munged did not start:\n{self._log('munged')}")
            time.sleep(0.1)

    def _slurm_conf(self, controller_port: int, node_ports: list[int]) -> str:
        host = socket.gethostname().split(".")[0]
        r = self.root
        nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} "
                          "State=UNKNOWN" for n, p in zip(self.names, node_ports))
        return f"""\
# A {self.nodes}-node test cluster on one host, written by tests/slurm/cluster.py.
ClusterName=internlm2-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={controller_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's next start (by its value + 1 s; default 120 s).
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'run'}/slurmctld.pid
SlurmdPidFile={r / 'run'}/slurmd-%n.pid
SlurmctldLogFile={r / 'log'}/slurmctld.log
SlurmdLogFile={r / 'log'}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in containers: processes are tracked by parentage, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
# The nodes are whatever this file says, not what slurmd detects (they all share this host).
SlurmdParameters=config_overrides
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
MinJobAge=600
KillWait=30
InactiveLimit=0
{nodes}
PartitionName=test Nodes={','.join(self.names)} Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, argv: list[str], env: dict, name: str) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self._daemons.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))

    def _log(self, name: str) -> str:
        texts = []
        for path in sorted((self.root / "log").glob(f"{name}*")):
            texts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(texts)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            for p in self._daemons:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited ({p.returncode}):\n{self._log('')}")
            out = self.run(["sinfo", "--noheader", "--Node", "--format=%N %t"], check=False)
            states = out.stdout.strip()
            nodes = dict(line.split() for line in states.splitlines() if len(line.split()) == 2)
            if out.returncode == 0 and len(nodes) == self.nodes and set(nodes.values()) == {"idle"}:
                return
            time.sleep(0.3)
        raise TimeoutError(f"the nodes are not idle after {timeout:.0f}s: {states!r}\n{self._log('')}")

    def stop(self) -> None:
        """Cancels every job (their processes end with them), then stops the daemons."""
        if self._daemons and self.conf.exists():
            self.run(["scancel", "--full", "--partition=test"], check=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                out = self.run(["squeue", "--noheader", "--format=%i"], check=False)
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(0.5)
        for p in reversed(self._daemons):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self._daemons):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self._daemons = []


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.slurm.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` also tears the cluster down
    with LocalSlurmCluster(args.directory, nodes=args.nodes) as cluster:
        env = cluster.environment({})
        print("cluster up; in another shell:\n" + "".join(f"  export {k}={v!r}\n" for k, v in env.items()
                                                           if k != "PATH") + "  sinfo")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
