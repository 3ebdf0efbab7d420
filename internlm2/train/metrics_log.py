"""Where step metrics go: `RUN_DIR/metrics.jsonl`, TensorBoard and the console, from rank 0 only.

`metrics.jsonl` holds one JSON object per line: `step` (optimizer steps completed) plus whatever the
trainer logs for it, by convention `loss`, `grad_norm`, `lr`, `tokens_per_s`, `tflops_per_device`, `mfu`
(or `mfu_of_measured_peak` on CPU), `peak_memory_gib`, `stage` for training steps and `eval_loss` for
held-out evaluations. Non-finite floats (a skipped step's NaN loss) are written as the strings "nan",
"inf", "-inf", so every line is standard JSON; `read_metrics` turns them back into floats.

Resuming from a checkpoint taken after step k drops the lines for steps after k (they belong to the
interrupted run and will be logged again), so the file never holds two histories. TensorBoard gets the
same steps purged.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _encode(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _decode(value):
    return _NONFINITE.get(value, value) if isinstance(value, str) else value


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics JSONL file. A last line without its newline (the writer was killed while
    writing it) is ignored; any other malformed line is an error naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise FileNotFoundError(f"cannot read metrics file {path}: {err.strerror or err}") from err
    lines = text.split("\n")
    complete = lines[:-1]  # the piece after the last newline is empty or a torn write
    records = []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number}: expected an object with an integer 'step', got {line[:80]!r}")
        records.append({key: _decode(value) for key, value in record.items()})
    return records


def _keep_until(path: Path, last_step: int) -> None:
    """Rewrites `path` with only the records of steps <= last_step (atomically: temp file, then rename)."""
    kept = [r for r in read_metrics(path) if r["step"] <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for record in kept:
            f.write(json.dumps({k: _encode(v) for k, v in record.items()}) + "\n")
    os.replace(tmp, path)


def _summary_writer(log_dir: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        warnings.warn(
            f"TensorBoard logging is off: {err}. Install it with `pip install tensorboard`; metrics still go "
            f"to {METRICS_FILE}.",
            stacklevel=3,
        )
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class MetricsLogger:
    """Step metrics to JSONL, TensorBoard and a console progress display. On ranks other than 0 every
    method does nothing, so the trainer calls it unconditionally.

    The console shows a tqdm bar (step/total, loss, tokens/s, utilisation, ETA) when stderr is a terminal,
    and one plain line per logged step otherwise (batch logs, where a redrawn bar is unreadable)."""

    def __init__(self, run_dir: str | Path, *, rank: int = 0, total_steps: int | None = None,
                 start_step: int = 0, tensorboard: bool = True, progress: bool = True):
        self.enabled = rank == 0
        self._writer = None
        self._bar = None
        self._lines = False
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS_FILE
        if self.path.exists():
            _keep_until(self.path, start_step)
        self._file = open(self.path, "a")
        if tensorboard:
            self._writer = _summary_writer(run_dir / TENSORBOARD_DIR, start_step + 1 if start_step else None)
        if progress:
            if sys.stderr.isatty():
                from tqdm import tqdm

                self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            else:
                self._lines = True
        self._total = total_steps

    def log(self, step: int, values: dict) -> None:
        """Records `values` for `step` (None values are left out)."""
        if not self.enabled:
            return
        if not isinstance(step, int) or isinstance(step, bool):
            raise TypeError(f"step must be an int, got {step!r}")
        values = {k: v for k, v in values.items() if v is not None}
        record = {"step": step, **{k: _encode(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, step)
        self._show(step, values)

    def _show(self, step: int, values: dict) -> None:
        shown = {}
        for key, label, fmt in (("loss", "loss", "{:.4f}"), ("eval_loss", "eval", "{:.4f}"),
                                ("tokens_per_s", "tok/s", "{:,.0f}"), ("mfu", "MFU", "{:.1%}"),
                                ("mfu_of_measured_peak", "of peak", "{:.1%}")):
            if isinstance(values.get(key), (int, float)):
                shown[label] = fmt.format(values[key])
        if self._bar is not None:
            if "loss" in values or "tokens_per_s" in values:  # a training step, not an evaluation
                self._bar.update(step - self._bar.n)
            self._bar.set_postfix(shown, refresh=True)
        elif self._lines:
            total = f"/{self._total}" if self._total else ""
            print(f"step {step}{total} " + " ".join(f"{k} {v}" for k, v in shown.items()), file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
