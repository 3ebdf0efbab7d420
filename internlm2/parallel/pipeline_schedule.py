"""Pipeline schedules as plain lists of actions, and a simulator that turns them into a timeline.

A schedule is, for each pipeline rank, the ordered list of `Action`s it performs: forward or backward of
one micro-batch through one of its model chunks. Rank r's chunk c is global stage `c * pp + r`, so with
virtual stages the model goes round the ranks several times (Megatron's interleaved layout). The executor
(`pipeline.py`) runs a rank's list in order; activations and gradients move between neighbouring stages by
asynchronous sends and blocking receives, so any list that the simulator completes cannot deadlock.

- `one_f_one_b`: PipeDream-flush 1F1B: rank r runs pp-r-1 warm-up forwards, then alternates one forward
  and one backward, then drains the remaining backwards. At most pp - r micro-batches are in flight.
- `interleaved_one_f_one_b`: the same with v chunks per rank (Megatron's interleaved schedule): forwards
  go through micro-batches in groups of pp, one chunk after the other; warm-up is
  (pp - r - 1) * 2 + (v - 1) * pp forwards. Needs micro-batches divisible by pp.

The bubble of 1F1B is (p-1)/(m+p-1) of the step when a backward costs a fixed multiple of a forward;
interleaving with v chunks divides it by v.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    kind: str  # "F" or "B"
    chunk: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


def one_f_one_b(pp_rank: int, pp: int, num_microbatches: int) -> list[Action]:
    m = num_microbatches
    warmup = min(pp - pp_rank - 1, m)
    actions = [Action("F", 0, i) for i in range(warmup)]
    for i in range(m - warmup):
        actions += [Action("F", 0, warmup + i), Action("B", 0, i)]
    actions += [Action("B", 0, i) for i in range(m - warmup, m)]
    return actions


def _interleaved_index(k: int, pp: int, v: int, backward: bool) -> tuple[int, int]:
    """(chunk, micro-batch) of the k-th forward (or backward) on a rank in the interleaved order."""
    group, within = divmod(k, pp * v)
    chunk = within // pp
    return (v - 1 - chunk if backward else chunk), group * pp + within % pp


def interleaved_one_f_one_b(pp_rank: int, pp: int, virtual_stages: int, num_microbatches: int) -> list[Action]:
    v, m = virtual_stages, num_microbatches
    if m % pp:
        raise ValueError(f"interleaved pipeline schedule: num_microbatches={m} must be a multiple of pp={pp}")
    total = m * v
    warmup = min((pp - pp_rank - 1) * 2 + (v - 1) * pp, total)
    fwd = [Action("F", *_interleaved_index(k, pp, v, False)) for k in range(total)]
    bwd = [Action("B", *_interleaved_index(k, pp, v, True)) for k in range(total)]
    actions = fwd[:warmup]
    for k in range(total - warmup):
        actions += [fwd[warmup + k], bwd[k]]
    return actions + bwd[total - warmup:]


def forward_schedule(pp_rank: int, pp: int, virtual_stages: int, num_microbatches: int) -> list[Action]:
    """This rank's forwards without backwards (evaluation, inference): every micro-batch through chunk 0,
    then chunk 1, ... Nothing waits for a backward, so any number of micro-batches works with any number
    of virtual stages, and the order is the training schedule's forward order at virtual_stages=1."""
    if num_microbatches < 1:
        raise ValueError(f"pipeline schedule: num_microbatches={num_microbatches} must be >= 1")
    return [Action("F", chunk, i) for chunk in range(virtual_stages) for i in range(num_microbatches)]


def build_schedule(pp_rank: int, pp: int, virtual_stages: int, num_microbatches: int) -> list[Action]:
    """This rank's actions: plain gradient accumulation (F0 B0 F1 B1 ...) at pp=1, 1F1B, or interleaved."""
    if num_microbatches < 1:
        raise ValueError(f"pipeline schedule: num_microbatches={num_microbatches} must be >= 1")
    if virtual_stages > 1:
        return interleaved_one_f_one_b(pp_rank, pp, virtual_stages, num_microbatches)
    return one_f_one_b(pp_rank, pp, num_microbatches)


@dataclass
class Slot:
    rank: int
    action: Action
    start: float
    end: float


def simulate(pp: int, virtual_stages: int, num_microbatches: int, forward_time: float = 1.0,
             backward_time: float = 2.0, forward_only: bool = False) -> list[Slot]:
    """Runs every rank's action list against the data dependencies (a forward needs the previous stage's
    forward of that micro-batch, a backward the next stage's backward) with zero-cost communication.

    `forward_only` runs `forward_schedule` (evaluation). Raises RuntimeError if the lists deadlock.
    Returns every action's time slot."""
    v = virtual_stages
    last_stage = pp * v - 1
    schedule = forward_schedule if forward_only else build_schedule
    lists = [schedule(r, pp, v, num_microbatches) for r in range(pp)]
    done: dict[tuple[str, int, int], float] = {}  # (kind, stage, microbatch) -> finish time
    clock = [0.0] * pp
    position = [0] * pp
    slots: list[Slot] = []
    while any(position[r] < len(lists[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            if position[r] == len(lists[r]):
                continue
            a = lists[r][position[r]]
            stage = a.chunk * pp + r
            if a.kind == "F":
                dep = None if stage == 0 else ("F", stage - 1, a.microbatch)
            else:
                dep = ("F", stage, a.microbatch) if stage == last_stage else ("B", stage + 1, a.microbatch)
            if dep is not None and dep not in done:
                continue
            start = max(clock[r], done.get(dep, 0.0))
            end = start + (forward_time if a.kind == "F" else backward_time)
            done[(a.kind, stage, a.microbatch)] = end
            clock[r] = end
            position[r] += 1
            slots.append(Slot(r, a, start, end))
            progressed = True
        if not progressed:
            stuck = {r: str(lists[r][position[r]]) for r in range(pp) if position[r] < len(lists[r])}
            raise RuntimeError(f"pipeline schedule deadlocks: ranks wait at {stuck}")
    return slots


def bubble_fraction(slots: list[Slot], pp: int) -> float:
    """Idle share of the ranks' time between the step's start and its end."""
    span = max(s.end for s in slots)
    busy = sum(s.end - s.start for s in slots)
    return 1.0 - busy / (span * pp)


def render_timeline(slots: list[Slot], pp: int, unit: float = 1.0) -> str:
    """One text line per rank: the action in each time unit ('.' when idle)."""
    span = int(round(max(s.end for s in slots) / unit))
    width = max(len(str(s.action)) for s in slots) + 1
    rows = [["." * width] * span for _ in range(pp)]
    for s in slots:
        for t in range(int(round(s.start / unit)), int(round(s.end / unit))):
            rows[s.rank][t] = f"{str(s.action):<{width}}"
    return "\n".join(f"rank {r}: " + "".join(row) for r, row in enumerate(rows))
