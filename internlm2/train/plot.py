"""`internlm2 plot RUN_DIR [--out PNG]`: loss, learning rate and throughput curves of a run, to a PNG.

Reads `RUN_DIR/metrics.jsonl` (written by the trainer's MetricsLogger). Panels: training and held-out loss,
learning rate, and tokens/s with utilisation (MFU, or % of the measured CPU peak) on a second axis. Stage
changes are marked with dotted vertical lines. The PNG is written to a temporary name and renamed, so a
failed plot never leaves a half-written image.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from internlm2.train.metrics import MEASURED_KEY, MFU_KEY
from internlm2.train.metrics_log import METRICS_FILE, read_metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=f"a run directory holding {METRICS_FILE}")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN_DIR/metrics.png)")


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, in step order; a step logged twice keeps its last value."""
    by_step = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            by_step[record["step"]] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def stage_starts(records: list[dict]) -> list[tuple[int, object]]:
    """(first step, stage) for every stage after the first."""
    starts, current = [], None
    for record in sorted((r for r in records if "stage" in r), key=lambda r: r["step"]):
        if current is not None and record["stage"] != current:
            starts.append((record["step"], record["stage"]))
        current = record["stage"]
    return starts


def draw(records: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters and CI
    from matplotlib import pyplot as plt

    fig, (loss_ax, lr_ax, speed_ax) = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    try:
        for key, label, style in (("loss", "train", "-"), ("eval_loss", "held-out", "o-")):
            steps, values = series(records, key)
            if steps:
                loss_ax.plot(steps, values, style, label=label, markersize=3)
        loss_ax.set_ylabel("loss")
        loss_ax.legend(loc="upper right")
        loss_ax.set_title(title)

        steps, values = series(records, "lr")
        lr_ax.plot(steps, values, color="tab:green")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

        steps, values = series(records, "tokens_per_s")
        lines = speed_ax.plot(steps, values, color="tab:purple", label="tokens/s")
        speed_ax.set_ylabel("tokens/s")
        for key, label in ((MFU_KEY, "MFU"), (MEASURED_KEY, "of measured peak")):
            steps, values = series(records, key)
            if steps:
                util_ax = speed_ax.twinx()
                lines += util_ax.plot(steps, [100 * v for v in values], "--", color="tab:orange",
                                      label=f"{label} (%)")
                util_ax.set_ylabel(f"{label} (%)", color="tab:orange")
        speed_ax.legend(lines, [line.get_label() for line in lines], loc="lower right")
        speed_ax.set_xlabel("step")

        for step, stage in stage_starts(records):
            for ax in (loss_ax, lr_ax, speed_ax):
                ax.axvline(step, color="grey", linestyle=":", linewidth=1)
            loss_ax.annotate(f"stage {stage}", (step, 1), xycoords=("data", "axes fraction"),
                             xytext=(3, -12), textcoords="offset points", fontsize=8, color="grey")
        for ax in (loss_ax, lr_ax, speed_ax):
            ax.grid(alpha=0.3)
        save_figure(fig, out, dpi=110)
    finally:
        plt.close(fig)


def save_figure(fig, out: Path, dpi: int) -> None:
    """The figure as a PNG at `out`, replaced atomically (a reader never sees half a file)."""
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", dpi=dpi)
    os.replace(tmp, out)


def run(args: argparse.Namespace) -> int:
    path = args.run_dir / METRICS_FILE
    if not args.run_dir.is_dir():
        raise SystemExit(f"internlm2 plot: {args.run_dir} is not a directory")
    if not path.is_file():
        raise SystemExit(f"internlm2 plot: {args.run_dir} has no {METRICS_FILE} (is it a run directory?)")
    try:
        records = read_metrics(path)
    except ValueError as err:
        raise SystemExit(f"internlm2 plot: {err}") from err
    if not any(math.isfinite(v) for v in series(records, "loss")[1] + series(records, "eval_loss")[1]):
        raise SystemExit(f"internlm2 plot: {path} has no finite loss to plot")
    out = args.out if args.out is not None else args.run_dir / "metrics.png"
    if not out.parent.is_dir():
        raise SystemExit(f"internlm2 plot: the directory of --out {out} does not exist")
    draw(records, out, title=str(args.run_dir.resolve().name))
    print(f"wrote {out}")
    return 0
