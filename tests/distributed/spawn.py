"""Run test code on N spawned ranks of a CPU gloo process group (picotron / nanotron style), reusing the
spawned group across test cases because starting 8 Python+torch processes on 2 cores costs seconds.

Two ways in:

    @distributed(world_size=2)
    def test_something():          # body runs on every rank; asserts there fail the test
        ...

    results = run_distributed(4, case_fn, arg1, arg2)   # case_fn(*args) on each rank; list of returns

`case_fn` must be a module-level function of an importable module (ranks import it by name). Ranks keep
one pool per (world size, timeout); only one pool is alive at a time. Any failure or timeout kills the pool
(a rank may be stuck in a collective), and the next call spawns a fresh one. Inside a case,
`worker_state(config)` gives a cached `ParallelState` so repeated layouts reuse their process groups.
"""

from __future__ import annotations

import datetime
import importlib
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from dataclasses import dataclass

import pytest

_REGISTRY: dict[str, object] = {}  # decorated functions, by "module:qualname" (the name is the wrapper's)
_STATE_CACHE: dict = {}  # inside a rank: ParallelConfig -> ParallelState
_POOL: "_Pool | None" = None
DEFAULT_CASE_TIMEOUT_S = 240.0
DEFAULT_PG_TIMEOUT_S = 60.0


@dataclass
class RankResult:
    rank: int
    ok: bool
    value: object  # the case's return value, or the formatted traceback
    seconds: float


class DistributedCaseError(AssertionError):
    pass


def worker_state(config, **model_shape):
    """A ParallelState for `config` in this rank, built once per pool and reused by later cases."""
    from internlm2.parallel import ParallelState

    key = (config, tuple(sorted(model_shape.items())))
    if key not in _STATE_CACHE:
        _STATE_CACHE[key] = ParallelState(config, **model_shape)
    return _STATE_CACHE[key]


def _resolve(ref: str):
    module, qualname = ref.split(":")
    mod = importlib.import_module(module)
    if ref in _REGISTRY:
        return _REGISTRY[ref]
    obj = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _worker(rank: int, world: int, init_file: str, pg_timeout_s: float, tasks, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=pg_timeout_s))
    while True:
        task = tasks.get()
        if task is None:
            break
        ref, args, kwargs = task
        start = time.perf_counter()
        try:
            value = _resolve(ref)(*args, **kwargs)
            results.put(RankResult(rank, True, value, time.perf_counter() - start))
        except BaseException:  # noqa: BLE001  (report everything, including assertion failures)
            results.put(RankResult(rank, False, traceback.format_exc(), time.perf_counter() - start))
    dist.destroy_process_group()


class _Pool:
    def __init__(self, world_size: int, pg_timeout_s: float):
        self.world_size, self.pg_timeout_s = world_size, pg_timeout_s
        ctx = mp.get_context("spawn")
        fd, self.init_file = tempfile.mkstemp(prefix="internlm2-gloo-")
        os.close(fd)
        os.unlink(self.init_file)  # FileStore creates it; a stale file would confuse the rendezvous
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        old = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            self.procs = [ctx.Process(target=_worker, daemon=True,
                                      args=(r, world_size, self.init_file, pg_timeout_s, self.tasks[r],
                                            self.results))
                          for r in range(world_size)]
            for p in self.procs:
                p.start()
        finally:
            if old is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = old

    def run(self, ref: str, args, kwargs, timeout_s: float) -> list[RankResult]:
        for q in self.tasks:
            q.put((ref, args, kwargs))
        got: dict[int, RankResult] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < self.world_size:
            dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and r not in got]
            if dead:
                raise DistributedCaseError(f"{ref}: rank(s) {dead} died (exit codes "
                                           f"{[self.procs[r].exitcode for r in dead]})")
            try:
                res = self.results.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                got[res.rank] = res
            except queue.Empty:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(self.world_size)) - set(got))
                    raise DistributedCaseError(f"{ref}: ranks {missing} did not finish within {timeout_s}s; "
                                               f"finished: {[(r, got[r].ok) for r in sorted(got)]}") from None
        return [got[r] for r in range(self.world_size)]

    def close(self, graceful: bool) -> None:
        if graceful:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()
        if os.path.exists(self.init_file):
            os.unlink(self.init_file)


def run_distributed_results(world_size: int, fn, *args, timeout_s: float = DEFAULT_CASE_TIMEOUT_S,
                            pg_timeout_s: float = DEFAULT_PG_TIMEOUT_S, **kwargs) -> list[RankResult]:
    """Runs `fn(*args, **kwargs)` on every rank; returns each rank's result or traceback (no raising
    for rank errors). The pool is replaced after any failure."""
    global _POOL
    ref = fn if isinstance(fn, str) else f"{fn.__module__}:{fn.__qualname__}"
    if _POOL is not None and (_POOL.world_size, _POOL.pg_timeout_s) != (world_size, pg_timeout_s):
        _POOL.close(graceful=True)
        _POOL = None
    if _POOL is None:
        _POOL = _Pool(world_size, pg_timeout_s)
    try:
        results = _POOL.run(ref, args, kwargs, timeout_s)
    except BaseException:
        _POOL.close(graceful=False)
        _POOL = None
        raise
    if not all(r.ok for r in results):
        _POOL.close(graceful=False)
        _POOL = None
    return results


def run_distributed(world_size: int, fn, *args, timeout_s: float = DEFAULT_CASE_TIMEOUT_S, **kwargs) -> list:
    """Runs `fn(*args, **kwargs)` on every rank; returns the per-rank return values, or raises an
    AssertionError carrying every failing rank's traceback."""
    results = run_distributed_results(world_size, fn, *args, timeout_s=timeout_s, **kwargs)
    failed = [r for r in results if not r.ok]
    if failed:
        raise DistributedCaseError("\n".join(f"--- rank {r.rank} failed:\n{r.value}" for r in failed))
    return [r.value for r in results]


def distributed(world_size: int, timeout_s: float = DEFAULT_CASE_TIMEOUT_S):
    """Decorator: the test body runs on `world_size` gloo ranks; the test fails if any rank raises."""

    def wrap(fn):
        ref = f"{fn.__module__}:{fn.__qualname__}"
        _REGISTRY[ref] = fn

        def test() -> None:
            run_distributed(world_size, ref, timeout_s=timeout_s)

        test.__name__, test.__qualname__, test.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        test.__module__ = fn.__module__
        return pytest.mark.world_size(world_size)(test)

    return wrap


def shutdown_pool() -> None:
    """Closes the live pool (pytest calls this at session end through conftest)."""
    global _POOL
    if _POOL is not None:
        _POOL.close(graceful=True)
        _POOL = None
