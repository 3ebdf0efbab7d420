"""Pipeline schedules and stage partitioning, checked without processes: every action once, no deadlock,
messages matched in order on every channel, the textbook bubble, bounded in-flight micro-batches."""

import itertools

import pytest
import torch

from internlm2.parallel import ParallelConfig, ParallelState
from internlm2.parallel.pipeline import local_stages, stage_layer_ids
from internlm2.parallel.pipeline_schedule import build_schedule, bubble_fraction, render_timeline, simulate
from tests.distributed.spawn import run_distributed

GRID = [(pp, v, m) for pp, v, m in itertools.product([1, 2, 3, 4], [1, 2, 3], [1, 2, 4, 8, 12])
        if (v == 1 or (pp > 1 and m % pp == 0))]


@pytest.mark.parametrize("pp,v,m", GRID)
def test_every_action_once_and_backward_after_forward(pp, v, m):
    for r in range(pp):
        actions = build_schedule(r, pp, v, m)
        assert sorted((a.kind, a.chunk, a.microbatch) for a in actions) == sorted(
            (k, c, i) for k in "BF" for c in range(v) for i in range(m))
        seen = set()
        for a in actions:
            if a.kind == "B":
                assert ("F", a.chunk, a.microbatch) in seen
            seen.add((a.kind, a.chunk, a.microbatch))


def _sent_and_received(pp, v, m):
    """Per channel (src, dst, kind): the (stage, micro-batch) sequence the sender sends and the sequence
    the receiver expects, as run_pipeline orders them."""
    last = pp * v - 1
    sent, received = {}, {}
    for r in range(pp):
        for a in build_schedule(r, pp, v, m):
            stage = a.chunk * pp + r
            if a.kind == "F":
                if stage != last:
                    sent.setdefault((r, (r + 1) % pp, "F"), []).append((stage + 1, a.microbatch))
                if stage != 0:
                    received.setdefault(((r - 1) % pp, r, "F"), []).append((stage, a.microbatch))
            else:
                if stage != 0:
                    sent.setdefault((r, (r - 1) % pp, "B"), []).append((stage - 1, a.microbatch))
                if stage != last:
                    received.setdefault(((r + 1) % pp, r, "B"), []).append((stage, a.microbatch))
    return sent, received


@pytest.mark.parametrize("pp,v,m", GRID)
def test_messages_arrive_in_the_order_they_are_expected(pp, v, m):
    sent, received = _sent_and_received(pp, v, m)
    assert sent == received


@pytest.mark.parametrize("pp,v,m", GRID)
def test_no_deadlock_and_textbook_bubble(pp, v, m):
    slots = simulate(pp, v, m, forward_time=1.0, backward_time=2.0)
    assert len(slots) == 2 * pp * v * m
    assert bubble_fraction(slots, pp) == pytest.approx((pp - 1) / (v * m + pp - 1))


@pytest.mark.parametrize("pp,m", [(2, 8), (4, 8), (4, 3)])
def test_one_f_one_b_keeps_at_most_pp_minus_rank_microbatches_in_flight(pp, m):
    for r in range(pp):
        in_flight, peak = 0, 0
        for a in build_schedule(r, pp, 1, m):
            in_flight += 1 if a.kind == "F" else -1
            peak = max(peak, in_flight)
        assert peak == min(pp - r, m)


def test_interleaved_needs_microbatches_divisible_by_pp():
    with pytest.raises(ValueError, match="num_microbatches=3 must be a multiple of pp=2"):
        build_schedule(0, 2, 2, 3)


def test_timeline_shows_warmup_steady_state_and_drain():
    text = render_timeline(simulate(2, 1, 3), 2)
    assert text.splitlines()[0].startswith("rank 0: F0 F1 ")
    assert text.splitlines()[1].startswith("rank 1: ...F0 B0 B0 F1 ")


def test_even_partition_and_explicit_layout():
    assert stage_layer_ids(8, ParallelConfig(pp=2, virtual_stages=2)) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    layout = ((0, 1, 2), (3, 4))
    assert stage_layer_ids(5, ParallelConfig(pp=2, stage_layout=layout)) == list(layout)
    with pytest.raises(ValueError, match="does not divide num_layers=5"):
        stage_layer_ids(5, ParallelConfig(pp=2))


def test_local_stages_put_embedding_first_and_head_last():
    state = ParallelState.single()
    (spec,) = local_stages(4, state)
    assert spec.layer_ids == (0, 1, 2, 3) and spec.with_embedding and spec.with_head


@pytest.mark.parametrize("pp,v,m", GRID)
def test_forward_only_order_does_not_deadlock(pp, v, m):
    assert len(simulate(pp, v, m, forward_only=True)) == pp * v * m


def _live_sends_during_pipeline(num_microbatches: int) -> int:
    """The most tensors that run_pipeline's sends kept alive at any forward, over a 1F1B step of
    `num_microbatches` on pp=2."""
    import weakref

    from internlm2.parallel import comm
    from internlm2.parallel.pipeline import run_pipeline
    from tests.distributed.spawn import worker_state

    parallel = worker_state(ParallelConfig(pp=2))
    sent, real_isend = [], comm.isend
    comm.isend = lambda tensor, dst, group: (sent.append(weakref.ref(tensor)), real_isend(tensor, dst, group))[1]
    most = 0
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64)

    def forward_step(chunk, module, x, mb):
        nonlocal most
        most = max(most, sum(ref() is not None for ref in sent))
        y = module(torch.ones(32, 64) if x is None else x)
        return y if parallel.pp_rank == 0 else y.square().mean()

    try:
        run_pipeline(parallel, [layer], list(range(num_microbatches)), forward_step)
    finally:
        comm.isend = real_isend
    return most


@pytest.mark.world_size(2)
def test_pipeline_frees_each_send_when_it_completes():
    """Sent activations and input gradients are released as their sends complete: what stays alive is
    bounded by the schedule's in-flight micro-batches, not their number (before, it grew with it)."""
    for m in (4, 16):
        most = max(run_distributed(2, _live_sends_during_pipeline, m))
        assert most <= 6, (m, most)  # 1F1B on pp=2: a header and an activation or gradient or two in flight
