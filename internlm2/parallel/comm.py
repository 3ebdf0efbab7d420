"""Every collective and point-to-point message this package sends goes through these functions.

They skip groups of size 1 (and `None`, the single-process state), move the tensor dimension being
gathered or scattered to the front so the flat `*_single` collectives apply, and report each call to the
active `CommCounter`s, which is how the communication-volume benchmark counts bytes per collective type.
"""

from __future__ import annotations

import datetime
import queue
import threading
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


@dataclass
class CommCounter:
    """Counts calls and bytes per (kind, group) while active (`with CommCounter() as c:`).

    `payload` is the size of the tensor handed to the call (the input for all-reduce, reduce-scatter and
    send; the output for all-gather). `wire` is what one rank sends with ring algorithms:
    all-reduce 2(n-1)/n * payload, all-gather and reduce-scatter (n-1)/n * payload, send = payload.
    """

    calls: dict = field(default_factory=lambda: defaultdict(int))
    payload: dict = field(default_factory=lambda: defaultdict(int))
    wire: dict = field(default_factory=lambda: defaultdict(float))

    def record(self, kind: str, group, nbytes: int) -> None:
        n = group_size(group)
        factor = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n,
                  "reduce_scatter": (n - 1) / n}.get(kind, 1.0)
        key = (kind, group)
        self.calls[key] += 1
        self.payload[key] += nbytes
        self.wire[key] += factor * nbytes

    def __enter__(self) -> "CommCounter":
        _COUNTERS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _COUNTERS.remove(self)


_COUNTERS: list[CommCounter] = []


def _record(kind: str, group, tensor: torch.Tensor) -> None:
    for counter in _COUNTERS:
        counter.record(kind, group, tensor.numel() * tensor.element_size())


def all_reduce(tensor: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of a contiguous tensor; returns it."""
    if group_size(group) == 1:
        return tensor
    _record("all_reduce", group, tensor)
    dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=group)
    return tensor


def all_reduce_async(tensor: torch.Tensor, group):
    """Starts an in-place sum all-reduce; returns its work (None for a size-1 group)."""
    if group_size(group) == 1:
        return None
    _record("all_reduce", group, tensor)
    return dist.all_reduce(tensor, group=group, async_op=True)


def all_gather(tensor: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Concatenation along `dim` of every rank's `tensor` (same shape on every rank), in rank order."""
    n = group_size(group)
    if n == 1:
        return tensor
    src = tensor.movedim(dim, 0).contiguous()
    out = src.new_empty((n * src.shape[0], *src.shape[1:]))
    _record("all_gather", group, out)
    dist.all_gather_single(out, src, group=group)
    return out.movedim(0, dim)


def reduce_scatter(tensor: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Sum over ranks of `tensor`, of which this rank keeps chunk `rank` along `dim`."""
    n = group_size(group)
    if n == 1:
        return tensor
    if tensor.shape[dim] % n:
        raise ValueError(f"reduce_scatter: size {tensor.shape[dim]} of dim {dim} is not divisible by the "
                         f"group size {n}")
    src = tensor.movedim(dim, 0).contiguous()
    out = src.new_empty((src.shape[0] // n, *src.shape[1:]))
    _record("reduce_scatter", group, src)
    dist.reduce_scatter_single(out, src, group=group)
    return out.movedim(0, dim)


def reduce_scatter_flat(out: torch.Tensor, flat: torch.Tensor, group, async_op: bool = False):
    """Flat reduce-scatter into a preallocated `out` (len(flat) == n * len(out)); the optimizer's buckets."""
    _record("reduce_scatter", group, flat)
    return dist.reduce_scatter_single(out, flat, group=group, async_op=async_op)


def all_gather_flat(out: torch.Tensor, shard: torch.Tensor, group, async_op: bool = False):
    """Flat all-gather of `shard` into a preallocated `out` (len(out) == n * len(shard))."""
    _record("all_gather", group, out)
    return dist.all_gather_single(out, shard, group=group, async_op=async_op)


def isend(tensor: torch.Tensor, dst: int, group):
    """Non-blocking send to global rank `dst`; keep `tensor` alive until the returned work is waited."""
    _record("send", group, tensor)
    return dist.isend(tensor, dst=dst, group=group)


def recv(tensor: torch.Tensor, src: int, group, timeout: datetime.timedelta) -> torch.Tensor:
    """Blocking receive from global rank `src` into `tensor`; raises after `timeout`."""
    dist.irecv(tensor, src=src, group=group).wait(timeout)
    return tensor


class InFlightSends:
    """Asynchronous sends and the tensors they read, each tensor released as soon as its send completes.

    NCCL reports completion (`Work.is_completed`, a CUDA event query): `release_completed()` drops the
    finished ones. Gloo's send work only learns it completed inside `wait()`, and a timed-out wait closes
    the connection, so it cannot be polled: one waiter thread per group waits each send in the order they
    were posted (sends on one channel complete in that order) and then drops the tensor. `wait_all()`
    waits for everything; a failed send raises there, or at the next `release_completed()`."""

    def __init__(self, timeout: datetime.timedelta):
        self.timeout = timeout
        self._polled: list = []  # (work, tensor) whose backend reports completion
        self._waiters: dict = {}  # group -> (queue of (work, tensor), thread)
        self._error: BaseException | None = None

    def add(self, work, tensor: torch.Tensor, group) -> None:
        if dist.get_backend(group) != "gloo":
            self._polled.append((work, tensor))
            return
        if group not in self._waiters:
            q: queue.Queue = queue.Queue()
            thread = threading.Thread(target=self._wait_in_order, args=(q,), daemon=True)
            thread.start()
            self._waiters[group] = (q, thread)
        self._waiters[group][0].put((work, tensor))

    def _wait_in_order(self, q: queue.Queue) -> None:
        while True:
            item = q.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    item[0].wait(self.timeout)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                self._error = err
            finally:
                item = None  # the tensor's last reference goes with the completed send
                q.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def release_completed(self) -> None:
        self._polled = [(work, tensor) for work, tensor in self._polled if not work.is_completed()]
        self._raise()

    def wait_all(self) -> None:
        for work, _ in self._polled:
            work.wait(self.timeout)
        self._polled.clear()
        for q, thread in self._waiters.values():
            q.put(None)
            thread.join()
        self._waiters.clear()
        self._raise()


def exchange(send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, group) -> list:
    """Starts sending `send` to global rank `dst` while receiving into `recv` from global rank `src`;
    returns the works to wait (keep both tensors alive until then). One batched call, so NCCL cannot
    deadlock when every rank sends and receives at once, even when dst == src."""
    _record("send", group, send)
    return dist.batch_isend_irecv([dist.P2POp(dist.isend, send, dst, group), dist.P2POp(dist.irecv, recv, src, group)])
