"""`internlm2 plot RUN_DIR`: a PNG from the run's JSONL, and clear errors for what is not a run."""

import math

import pytest
from matplotlib import image

from internlm2.cli import main as cli_main
from internlm2.train.metrics_log import METRICS_FILE, MetricsLogger
from internlm2.train.plot import series, stage_starts


def _write_run(run_dir, steps=60, switch=45):
    with MetricsLogger(run_dir, tensorboard=False, progress=False) as log:
        for step in range(1, steps + 1):
            loss = 8.0 * math.exp(-step / 20) + 2.0 if step != 30 else float("nan")
            lr = 3e-4 * min(1.0, step / 10) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
            log.log(step, {"loss": loss, "lr": lr, "tokens_per_s": 5000 + 20 * step + 300 * (step % 7 == 0),
                           "mfu": 0.3 + math.sqrt(step) / 100,
                           "stage": "4k" if step <= switch else "32k"})
            if step % 15 == 0:
                log.log(step, {"eval_loss": loss + 0.1 if math.isfinite(loss) else 3.0})


def test_plot_draws_a_png_of_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    _write_run(run)
    assert cli_main(["plot", str(run)]) == 0
    out = run / "metrics.png"
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(out)
    assert pixels.shape[0] > 800 and pixels.shape[1] > 800
    assert pixels[..., :3].std() > 0.05  # drawn on, not a blank canvas
    assert sorted(p.name for p in run.iterdir()) == [METRICS_FILE, "metrics.png"]  # no temp file left

    other = tmp_path / "elsewhere.png"
    assert cli_main(["plot", str(run), "--out", str(other)]) == 0 and other.stat().st_size > 0


def test_series_and_stage_boundaries():
    records = [{"step": 2, "loss": 3.0, "stage": "a"}, {"step": 1, "loss": 4.0, "stage": "a"},
               {"step": 2, "eval_loss": 3.5}, {"step": 2, "loss": 2.5}, {"step": 3, "lr": 1.0, "stage": "b"},
               {"step": 4, "loss": True}]
    assert series(records, "loss") == ([1, 2], [4.0, 2.5])  # step order; a re-logged step keeps its last value
    assert series(records, "eval_loss") == ([2], [3.5])
    assert stage_starts(records) == [(3, "b")]


@pytest.mark.parametrize(
    "setup, argv_tail, message",
    [
        (lambda d: None, [], "is not a directory"),
        (lambda d: d.mkdir(), [], f"has no {METRICS_FILE} (is it a run directory?)"),
        (lambda d: (d.mkdir(), (d / METRICS_FILE).write_text('{"step": 1, "loss": 2.0}\n{oops\n')), [],
         f"{METRICS_FILE}:2: not a JSON line"),
        (lambda d: (d.mkdir(), (d / METRICS_FILE).write_text('{"step": 1, "lr": 0.1}\n')), [],
         "has no finite loss to plot"),
        (_write_run, ["--out", "/nonexistent-dir/x.png"], "the directory of --out /nonexistent-dir/x.png does not exist"),
    ],
)
def test_plot_errors_name_the_problem(tmp_path, setup, argv_tail, message):
    run = tmp_path / "run"
    setup(run)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["plot", str(run), *argv_tail])
    assert message in str(exit_info.value.code)
    assert not list(tmp_path.rglob("*.png"))
