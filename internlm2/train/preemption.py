"""Stopping a run cleanly when a scheduler or a user asks: a checkpoint, then an orderly exit.

Slurm sends SIGTERM when it ends a job (scancel, preemption, the time limit itself) and, with `sbatch
--signal=USR1@120`, SIGUSR1 two minutes before the time limit; torchrun passes a SIGTERM it receives to
its ranks. The handler only notes the signal. At every step boundary the trainer asks `stop_requested()`,
a collective in which all ranks agree (a signal reaches the ranks at different moments, or only some of
them), and when it is true saves a checkpoint and raises `stopped(step)` on every rank together. Running
the same command again resumes from that checkpoint.

Which signals: INTERNLM2_STOP_SIGNALS (default SIGTERM,SIGUSR1). Where INTERNLM2_STOPPED_FILE is set (the
slurm script sets it), rank 0 writes "<signal> <step>" there, from which the script decides whether to
requeue the job (see scripts/slurm/train.sbatch).

The trainer's hook, in its step loop after the optimizer step (a few lines; see Trainer._run_stage):

    stop = self.stop_signals.stop_requested()          # collective: the same answer on every rank
    if stop or <a checkpoint is due>:
        self.save_checkpoint()
    if stop:
        raise self.stop_signals.stopped(state.step)

with `with self.stop_signals.catching():` around the loop. Signals that arrive before
the loop starts take their previous action (SIGTERM ends the process; there is nothing to save yet).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from internlm2.train import launch_env


class StoppedEarly(Exception):
    """The run stopped on a signal after saving its checkpoint at `step`; running it again resumes."""

    def __init__(self, signal_name: str, step: int):
        super().__init__(f"stopped on {signal_name} at step {step}, after saving its checkpoint; run the same "
                         "command again to resume")
        self.signal_name, self.step = signal_name, step


class StopSignals:
    def __init__(self, signals: Sequence[signal.Signals], device: torch.device, stopped_file: Path | None = None,
                 rank: int = 0):
        self.signals, self.device, self.stopped_file, self.rank = tuple(signals), device, stopped_file, rank
        self._received = 0  # the last stop signal this process got (0: none)
        self._agreed = 0

    @classmethod
    def from_environment(cls, device: torch.device, rank: int = 0) -> StopSignals:
        """The signals and stopped file the launcher asked for (INTERNLM2_STOP_SIGNALS, _STOPPED_FILE)."""
        return cls(launch_env.stop_signals(), device, launch_env.stopped_file(), rank)

    @contextmanager
    def catching(self) -> Iterator[StopSignals]:
        """Catches the stop signals inside the block (the main thread only: Python delivers signals there),
        restoring the previous handlers after it."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._note) for s in self.signals}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _note(self, signum, frame) -> None:
        self._received = signum

    def stop_requested(self) -> bool:
        """Whether any rank got a stop signal: a collective over the default process group when there is
        one, so call it on every rank at the same point."""
        flag = torch.tensor([self._received], dtype=torch.int64, device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # SIGTERM (15) outranks SIGUSR1 (10): the job ends
        self._agreed = int(flag.item())
        return self._agreed != 0

    def stopped(self, step: int) -> StoppedEarly:
        """Records the stop (rank 0, where the launcher asked for it) and returns the exception to raise."""
        name = signal.Signals(self._agreed).name
        if self.rank == 0 and self.stopped_file is not None:
            tmp = self.stopped_file.with_name(self.stopped_file.name + f".tmp-{os.getpid()}")
            tmp.write_text(f"{name} {step}\n")
            os.replace(tmp, self.stopped_file)
        return StoppedEarly(name, step)
