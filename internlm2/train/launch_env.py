"""What the launchers (`scripts/launch_torchrun.sh`, `scripts/slurm/pretrain.sbatch`) hand the trainer
through the environment, read and checked in one place.

INTERNLM2_PG_TIMEOUT_S: seconds a collective may wait before the process group fails it (the timeout given
to `init_process_group` and every subgroup). A rank that dies or hangs then ends the job with an error
instead of leaving the others blocked forever; it must be longer than the slowest legitimate wait, a
checkpoint save on a slow filesystem included. The slurm script sets 1800 unless the user set it.
"""

from __future__ import annotations

import math
import os

PG_TIMEOUT_ENV = "INTERNLM2_PG_TIMEOUT_S"


def pg_timeout_s(default: float) -> float:
    """The process-group timeout in seconds: $INTERNLM2_PG_TIMEOUT_S if set, else `default`."""
    raw = os.environ.get(PG_TIMEOUT_ENV, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{PG_TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{PG_TIMEOUT_ENV} must be a positive, finite number of seconds, got {raw!r}")
    return value
