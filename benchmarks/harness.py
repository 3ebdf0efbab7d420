"""Shared measurement helpers for every benchmark in this folder.

Rules the helpers enforce: times are medians of several runs after warm-up; comparisons are ratios
against a baseline measured in the same process; every result file names the machine, the command and
the date. CUDA timings use events on the current stream; CPU timings use perf_counter.

Results go to benchmarks/results/ (INTERNLM2_BENCH_RESULTS_DIR elsewhere). A benchmark whose main() calls
`write_partial_results_on_sigterm` leaves the rows measured so far, marked incomplete, when a deadline
stops it (`timeout` sends SIGTERM): scripts/gpu_check.sh gives each benchmark the time that is left.
"""

import datetime
import gc
import json
import multiprocessing as mp
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import internlm2

RESULTS_DIR = Path(os.environ.get("INTERNLM2_BENCH_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: str = "cpu", warmup: int = 3, repeats: int = 10,
                min_seconds: float = 0.0) -> float:
    """Median seconds per call of `fn` over `repeats` timed calls (more if min_seconds is not reached)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_seconds:
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def alternating_times(fns: dict[str, Callable[[], object]], device: str = "cpu", rounds: int = 5,
                      calls: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, one entry per round: a round times `calls` calls (their median)
    of every function in turn, so that a shared machine's changing load falls on all of them alike. Ratios
    should be taken per round (paired) and then their median."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(median_time(fn, device, warmup=0, repeats=calls))
    return times


def paired_speedup(ours: list[float], baseline: list[float]) -> float:
    """Median over rounds of baseline time / our time (rounds from alternating_times)."""
    return statistics.median(b / o for o, b in zip(ours, baseline))


def measured_copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the ceiling for memory-bound kernels."""
    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, warmup=3, repeats=20)
    return 2 * src.numel() / t


def _rss_child(conn, fn):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    conn.send((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    conn.close()


def cpu_peak_memory(fn: Callable[[], object]) -> int:
    """Bytes by which the peak resident memory grows while `fn` runs, measured in a forked process so
    earlier allocations in this process do not hide it. `fn` must build its own inputs."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_rss_child, args=(child, fn))
    proc.start()
    grown = parent.recv()
    proc.join()
    return grown


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_peak_memory_here(fn: Callable[[], object]) -> int:
    """Bytes by which the peak resident memory grows while `fn` runs, in this process (for where forking
    is not allowed, e.g. in a daemonic worker): the kernel's high-water mark is reset first (Linux
    /proc/self/clear_refs), so earlier peaks do not hide this one. Free what `fn` leaves behind between calls."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) * 1024


def cuda_peak_memory(fn: Callable[[], object]) -> int:
    """Bytes of CUDA memory allocated at the peak while `fn` runs, above what was allocated before."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def cpu_description() -> str:
    """The CPU as benchmarks must name it: model, family/model numbers, its vector extensions, and the
    instruction set internlm2's CPU kernels run with (CPU speedups differ between CPU generations)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    flags = set(fields.get("flags", "").split())
    vector = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16") if f in flags]
    family = f"family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else "family unknown"
    return (f"{name} ({family}; {' '.join(vector) or 'no AVX2/AVX-512'}); internlm2 CPU kernels: "
            f"{internlm2._C.cpu_isa()}")


def machine() -> str:
    """One line naming the machine: GPU and driver when present, else the CPU (cpu_description), core and
    thread counts."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        try:
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            driver = "unknown"
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, driver {driver})"
    return f"{cpu_description()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def load_note() -> str:
    """The machine's load when a CPU benchmark starts: on a shared machine it explains noisy times."""
    return f"1-minute load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def machine_tag() -> str:
    """Short file-name-safe tag for the machine: the GPU name or 'cpu'."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        for card in ("H200", "H100", "A100", "L40S", "4090"):
            if card in name:
                return card.lower()
        return "".join(c if c.isalnum() else "-" for c in name).lower()
    return "cpu"


@dataclass
class Report:
    """A table of results plus what is needed to trust it; written as Markdown and JSON."""

    name: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        global _report_in_progress
        _report_in_progress = self

    def add(self, *values) -> None:
        assert len(values) == len(self.columns), (values, self.columns)
        self.rows.append(list(values))
        print("  " + " | ".join(_fmt(v) for v in values), flush=True)

    def markdown(self) -> str:
        head = [
            f"# {self.name}",
            "",
            f"- machine: {machine()}",
            *([f"- host CPU: {cpu_description()}"] if torch.cuda.is_available() else []),
            f"- torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}",
            f"- command: `{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`",
            f"- date: {datetime.date.today().isoformat()}",
            *[f"- {n}" for n in self.notes],
            "",
            "| " + " | ".join(self.columns) + " |",
            "|" + "---|" * len(self.columns),
        ]
        return "\n".join(head + ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in self.rows]) + "\n"

    def write(self, stem: str | None = None) -> Path:
        """Writes results/<stem>-<machine tag>.md and .json; returns the Markdown path."""
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stem = f"{stem or self.name.lower().replace(' ', '_')}-{machine_tag()}"
        md = RESULTS_DIR / f"{stem}.md"
        md.write_text(self.markdown())
        payload = {
            "name": self.name,
            "machine": machine(),
            "cpu": cpu_description(),
            "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "command": " ".join(sys.argv),
            "notes": self.notes,
            "columns": self.columns,
            "rows": self.rows,
        }
        (RESULTS_DIR / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {md}")
        return md


_report_in_progress: Report | None = None  # the last Report made: what a deadline's SIGTERM writes


def write_partial_results_on_sigterm(stem: str) -> None:
    """On SIGTERM, write the rows of the report in progress (as Report.write(stem) would), with a note that
    the run was stopped, and exit with 124 (timeout's code for a run it stopped)."""

    def stop(signum, frame):
        report = _report_in_progress
        if report is not None:
            report.notes.append(f"incomplete: stopped by a deadline (SIGTERM) after {len(report.rows)} rows")
            report.write(stem)
        raise SystemExit(124)

    signal.signal(signal.SIGTERM, stop)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
