"""MetricsLogger: JSONL lines read back, rank 0 only, resume without duplicate history, TensorBoard read back
with TensorBoard's own reader (or a clear warning without it), and the console display."""

import json
import math
import sys

import pytest

from internlm2.train.metrics_log import METRICS_FILE, TENSORBOARD_DIR, MetricsLogger, read_metrics


def _step(step, loss):
    return {"loss": loss, "grad_norm": 1.5, "lr": 1e-3 * step, "tokens_per_s": 1234.5, "mfu": 0.125,
            "peak_memory_gib": 0.5, "stage": "4k", "unknown_yet": None}


def test_rank0_writes_one_json_line_per_step(tmp_path):
    with MetricsLogger(tmp_path, rank=0, total_steps=3, tensorboard=False, progress=False) as log:
        log.log(1, _step(1, 2.5))
        log.log(2, _step(2, float("nan")))  # a skipped step's loss
        log.log(2, {"eval_loss": 2.25})
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 2]  # standard JSON: no NaN literal
    assert json.loads(lines[1])["loss"] == "nan"
    records = read_metrics(tmp_path / METRICS_FILE)
    assert records[0] == {"step": 1, **{k: v for k, v in _step(1, 2.5).items() if v is not None}}
    assert math.isnan(records[1]["loss"]) and records[2] == {"step": 2, "eval_loss": 2.25}


def test_other_ranks_write_nothing(tmp_path):
    with MetricsLogger(tmp_path / "run", rank=1, total_steps=3) as log:
        log.log(1, _step(1, 2.5))
    assert not (tmp_path / "run").exists()


def test_resume_drops_the_interrupted_runs_later_steps(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, progress=False) as log:
        for step in range(1, 6):
            log.log(step, _step(step, 10.0 - step))
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 6, "lo')  # killed while writing
    with MetricsLogger(tmp_path, start_step=3, tensorboard=False, progress=False) as log:
        log.log(4, _step(4, 0.5))
    records = read_metrics(tmp_path / METRICS_FILE)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 0.5)]
    assert not list(tmp_path.glob("*.tmp"))


def test_read_metrics_names_a_bad_line(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{METRICS_FILE}:2: not a JSON line"):
        read_metrics(path)
    path.write_text('{"loss": 2.0}\n')
    with pytest.raises(ValueError, match=f"{METRICS_FILE}:1: expected an object with an integer 'step'"):
        read_metrics(path)
    with pytest.raises(FileNotFoundError, match="cannot read metrics file"):
        read_metrics(tmp_path / "missing.jsonl")


def test_tensorboard_gets_the_scalars_and_a_resume_purges_later_steps(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with MetricsLogger(tmp_path, progress=False) as log:
        for step in range(1, 6):
            log.log(step, _step(step, 10.0 - step))
    with MetricsLogger(tmp_path, start_step=3, progress=False) as log:
        log.log(4, _step(4, 0.5))
    events = event_accumulator.EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "mfu", "peak_memory_gib"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 0.5)]


def test_without_tensorboard_one_clear_warning_and_jsonl_still_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.warns(UserWarning, match="TensorBoard logging is off.*pip install tensorboard") as caught:
        log = MetricsLogger(tmp_path, progress=False)
    with log:
        log.log(1, _step(1, 2.5))
        log.log(2, _step(2, 2.0))
    assert len(caught) == 1
    assert len(read_metrics(tmp_path / METRICS_FILE)) == 2
    assert not (tmp_path / TENSORBOARD_DIR).exists()


def test_console_lines_when_not_a_terminal(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=10, tensorboard=False) as log:
        log.log(3, _step(3, 2.5))
        log.log(3, {"eval_loss": 2.25})
    err = capsys.readouterr().err.splitlines()
    assert err == ["step 3/10 loss 2.5000 tok/s 1,234 MFU 12.5%", "step 3/10 eval 2.2500"]


def test_progress_bar_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with MetricsLogger(tmp_path, total_steps=10, start_step=2, tensorboard=False) as log:
        log.log(3, _step(3, 2.5))
        log.log(4, _step(4, 2.0))
    err = capsys.readouterr().err
    assert "4/10" in err and "loss=2.0000" in err and "MFU=12.5%" in err
    assert "<" in err  # tqdm's elapsed<remaining: the ETA


def test_step_must_be_an_integer(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, progress=False) as log:
        with pytest.raises(TypeError, match="step must be an int"):
            log.log(1.0, {"loss": 1.0})
