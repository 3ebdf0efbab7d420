"""What the launchers (`scripts/launch_torchrun.sh`, `scripts/slurm/train.sbatch`) hand the trainer
through the environment, read and checked in one place.

INTERNLM2_PG_TIMEOUT_S: seconds a collective may wait before the process group fails it (the timeout given
to `init_process_group` and every subgroup). A rank that dies or hangs then ends the job with an error
instead of leaving the others blocked forever; it must be longer than the slowest legitimate wait, a
checkpoint save on a slow filesystem included. The slurm script sets 1800 unless the user set it.

INTERNLM2_STOP_SIGNALS: the signals on which the trainer saves a checkpoint and stops (see preemption.py),
comma-separated names, default "SIGTERM,SIGUSR1" (slurm's time-limit warning: `sbatch --signal=USR1@120`).

INTERNLM2_STOPPED_FILE: where rank 0 records that the run stopped on a signal before its end, so the slurm
script can requeue the job; unset outside slurm.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

from internlm2.errors import UserError

PG_TIMEOUT_ENV = "INTERNLM2_PG_TIMEOUT_S"
STOP_SIGNALS_ENV = "INTERNLM2_STOP_SIGNALS"
STOPPED_FILE_ENV = "INTERNLM2_STOPPED_FILE"
DEFAULT_STOP_SIGNALS = "SIGTERM,SIGUSR1"


def pg_timeout_s(default: float) -> float:
    """The process-group timeout in seconds: $INTERNLM2_PG_TIMEOUT_S if set, else `default`."""
    raw = os.environ.get(PG_TIMEOUT_ENV, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"{PG_TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{PG_TIMEOUT_ENV} must be a positive, finite number of seconds, got {raw!r}")
    return value


def stop_signals() -> list[signal.Signals]:
    """The signals in $INTERNLM2_STOP_SIGNALS ("SIGTERM,SIGUSR1" when unset); "USR1" means SIGUSR1."""
    raw = os.environ.get(STOP_SIGNALS_ENV, "").strip() or DEFAULT_STOP_SIGNALS
    found = []
    for name in (n.strip().upper() for n in raw.split(",") if n.strip()):
        name = name if name.startswith("SIG") else "SIG" + name
        if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP"):
            raise UserError(f"{STOP_SIGNALS_ENV}={raw!r}: {name} is not a signal a process can catch")
        found.append(signal.Signals[name])
    return found


def stopped_file() -> Path | None:
    """$INTERNLM2_STOPPED_FILE, or None when unset."""
    raw = os.environ.get(STOPPED_FILE_ENV, "").strip()
    return Path(raw) if raw else None
