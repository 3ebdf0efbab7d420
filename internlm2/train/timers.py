"""Named wall-clock timers for where step time goes (data, forward, backward, optimizer, communication).

    timers = Timers(cuda_sync=False)
    with timers("data"):
        batch = next(loader)
    ...
    timers.elapsed()  # {"data": 0.012, "forward": ...} seconds since the last reset; then resets

GPU work is asynchronous: without synchronisation a phase's time is when its kernels were queued, and the
wait shows up in whichever later phase blocks. `cuda_sync=True` synchronises the current CUDA device at each
start and stop so each phase gets its own kernels' time, at the cost of stalling the pipeline of launches;
use it when profiling, not for production throughput. Phases with different names may nest (communication
inside backward); each name accumulates its own total, so nested totals overlap rather than add up.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch


class Timers:
    def __init__(self, cuda_sync: bool = False):
        self.cuda_sync = cuda_sync
        self._totals: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._running: dict[str, float] = {}

    def _now(self) -> float:
        if self.cuda_sync and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self, name: str) -> None:
        if name in self._running:
            raise RuntimeError(f"timer {name!r} is already running")
        self._running[name] = self._now()

    def stop(self, name: str) -> float:
        """Stops `name` and returns the seconds this interval took."""
        if name not in self._running:
            raise RuntimeError(f"timer {name!r} is not running (running: {sorted(self._running) or 'none'})")
        took = self._now() - self._running.pop(name)
        self._totals[name] = self._totals.get(name, 0.0) + took
        self._counts[name] = self._counts.get(name, 0) + 1
        return took

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def counts(self) -> dict[str, int]:
        """How many intervals each name has timed since the last reset."""
        return dict(self._counts)

    def elapsed(self, reset: bool = True) -> dict[str, float]:
        """Seconds per name since the last reset (finished intervals only). Running timers keep running."""
        totals = dict(self._totals)
        if reset:
            self._totals.clear()
            self._counts.clear()
        return totals
