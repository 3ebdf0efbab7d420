"""Bad layouts fail before any collective with a message naming the sizes; a rank that raises makes its
peers fail within the process-group timeout instead of hanging."""

import time

import pytest
import torch
import torch.distributed as dist

from internlm2.parallel import ParallelConfig, ParallelState
from internlm2.parallel import state as state_module
from internlm2.parallel.pipeline import run_pipeline
from tests.distributed.spawn import run_distributed, run_distributed_results


@pytest.mark.parametrize("config,world,shape,message", [
    (ParallelConfig(tp=2, dp=2), 8, {}, "world size 8 != tp*pp*dp*cp = 2*1*2*1 = 4"),
    (ParallelConfig(tp=4), 4, {"num_kv_heads": 2}, "tp=4 does not divide num_kv_heads=2"),
    (ParallelConfig(tp=4), 4, {"num_attention_heads": 6}, "tp=4 does not divide num_attention_heads=6"),
    (ParallelConfig(tp=8), 8, {"vocab_size": 92550}, "tp=8 does not divide the padded vocab_size=92550"),
    (ParallelConfig(pp=3), 3, {"num_layers": 4}, "pp*virtual_stages = 3*1 = 3 does not divide num_layers=4"),
    (ParallelConfig(pp=2, virtual_stages=2), 2, {"num_layers": 6}, "pp*virtual_stages = 2*2 = 4 does not divide"),
    (ParallelConfig(pp=2, stage_layout=((0, 1),)), 2, {"num_layers": 2}, "stage_layout has 1 stages, expected"),
    (ParallelConfig(pp=2, stage_layout=((0, 2), (1,))), 2, {"num_layers": 3}, "must list layers 0..2 once each"),
    (ParallelConfig(dp=4, zero1_size=3), 4, {}, "zero1_size=3 must divide dp*cp = 4*1 = 4"),
    (ParallelConfig(virtual_stages=2), 1, {}, "virtual_stages=2 needs pp > 1"),
    (ParallelConfig(tp=0), 0, {}, "tp=0 must be a positive integer"),
])
def test_bad_layout_names_the_sizes(config, world, shape, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*").replace(".", r"\.")):
        config.validate(world, **shape)


def test_uneven_layers_are_fine_with_an_explicit_layout():
    ParallelConfig(pp=2, stage_layout=((0, 1, 2), (3, 4))).validate(2, num_layers=5)


def test_single_state_rejects_a_multi_rank_layout():
    with pytest.raises(ValueError, match="world size 1 != tp"):
        ParallelState.single(ParallelConfig(tp=2))


def _bad_state_case():
    """Builds a state whose layout does not fit the world while any group creation would raise."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a process group was created before the layout was validated")

    saved = state_module.init_device_mesh, dist.new_group
    state_module.init_device_mesh, dist.new_group = forbidden, forbidden
    try:
        with pytest.raises(ValueError, match="tp=2 does not divide num_kv_heads=3"):
            ParallelState(ParallelConfig(tp=2), num_kv_heads=3)
        with pytest.raises(ValueError, match="world size 2 != tp"):
            ParallelState(ParallelConfig(tp=4))
    finally:
        state_module.init_device_mesh, dist.new_group = saved


@pytest.mark.world_size(2)
def test_bad_layout_fails_on_every_rank_before_any_collective():
    run_distributed(2, _bad_state_case)


PG_TIMEOUT_S = 3.0


def _raise_on_rank_1_during_all_reduce():
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.all_reduce(torch.ones(4))


def _raise_on_rank_1_during_pipeline():
    from tests.distributed.spawn import worker_state

    parallel = worker_state(ParallelConfig(pp=2))

    def forward_step(chunk, module, x, mb):
        if parallel.pp_rank == 1:
            raise RuntimeError("last stage fails on purpose")
        return module(torch.ones(3, 4))

    run_pipeline(parallel, [torch.nn.Linear(4, 4)], [0, 1], forward_step)


STATE_TIMEOUT_S = 1.0


def _raise_on_rank_1_during_tp_all_reduce_with_state_timeout():
    """The state's own timeout (shorter than the default group's) governs its mesh groups."""
    parallel = ParallelState(ParallelConfig(tp=2), timeout_s=STATE_TIMEOUT_S)
    if parallel.rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4), group=parallel.tp_group)
    finally:
        assert time.monotonic() - start < 2 * STATE_TIMEOUT_S < PG_TIMEOUT_S


@pytest.mark.world_size(2, pool="short-timeout")
@pytest.mark.parametrize("case", [_raise_on_rank_1_during_all_reduce, _raise_on_rank_1_during_pipeline,
                                  _raise_on_rank_1_during_tp_all_reduce_with_state_timeout])
def test_a_raising_rank_makes_the_others_fail_within_the_timeout(case):
    start = time.monotonic()
    results = run_distributed_results(2, case, pg_timeout_s=PG_TIMEOUT_S, timeout_s=60)
    elapsed = time.monotonic() - start
    assert not results[1].ok and "fails on purpose" in results[1].value
    assert not results[0].ok, "rank 0 should fail once its peer is gone"
    assert "fails on purpose" not in results[0].value
    assert results[0].seconds < 10 * PG_TIMEOUT_S, f"rank 0 failed only after {results[0].seconds:.1f}s"
    print(f"rank 0 failed after {results[0].seconds:.1f}s (total {elapsed:.1f}s): {results[0].value.splitlines()[-1]}")
