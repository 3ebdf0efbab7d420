"""Every parallel layout (TP, SP, PP incl. interleaved and an uneven layout, DP with ZeRO-1, CP) trains the
tiny InternLM2 exactly like one process (fp32, within 1e-5)."""

import functools

import pytest
import torch

from internlm2.parallel import ParallelConfig
from tests.distributed.spawn import run_distributed
from tests.distributed.training_harness import distributed_run, merge_ranks, reference_run

TOL = dict(rtol=1e-5, atol=1e-5)
# AdamW moves every element by about lr whatever its gradient's size, so where a gradient is ~1e-8 a
# reordered fp32 sum (TP) changes that element's update by a visible fraction of lr (1e-2): the weights
# after 3 steps are compared at 1% of one step; losses, norms and gradients at 1e-5.
WEIGHT_TOL = dict(rtol=1e-5, atol=1e-4)


@functools.cache
def reference():
    return reference_run()


def _check(results):
    ref = reference()
    merged = merge_ranks(results)
    torch.testing.assert_close(torch.tensor(merged["losses"]), torch.tensor(ref["losses"]), **TOL)
    torch.testing.assert_close(torch.tensor(merged["eval_losses"]), torch.tensor(ref["eval_losses"]), **WEIGHT_TOL)
    for norms in merged["all_norms"]:
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref["norms"]), **TOL)
    assert set(merged["grads"]) == set(ref["grads"])
    for result in results:
        for name, g in result["grads"].items():
            torch.testing.assert_close(g, ref["grads"][name], **TOL, msg=lambda m, n=name: f"grad {n}: {m}")
        for name, w in result["weights"].items():
            torch.testing.assert_close(w, ref["weights"][name], **WEIGHT_TOL, msg=lambda m, n=name: f"weight {n}: {m}")


LAYOUTS = [  # (tp, pp, dp, cp, sequence_parallel, virtual_stages), grouped by world size (one spawned pool each)
    (2, 1, 1, 1, False, 1), (2, 1, 1, 1, True, 1), (1, 2, 1, 1, False, 1), (1, 2, 1, 1, False, 2),
    (1, 1, 2, 1, False, 1), (1, 1, 1, 2, False, 1),
    (2, 2, 1, 1, False, 1), (2, 2, 1, 1, True, 1), (2, 1, 2, 1, True, 1), (1, 2, 2, 1, False, 1),
    (2, 1, 1, 2, True, 1), (1, 2, 1, 2, False, 1), (1, 1, 2, 2, False, 1),
    (2, 2, 2, 1, False, 1), (2, 2, 2, 1, True, 2), (2, 2, 1, 2, True, 2),
]


def _layout_id(tp, pp, dp, cp, sp, v):
    extras = (f"-cp{cp}" if cp > 1 else "") + ("-sp" if sp else "") + (f"-v{v}" if v > 1 else "")
    return f"tp{tp}-pp{pp}-dp{dp}{extras}"


@pytest.mark.parametrize("tp,pp,dp,cp,sp,v", [
    pytest.param(*layout, marks=pytest.mark.world_size(layout[0] * layout[1] * layout[2] * layout[3]),
                 id=_layout_id(*layout))
    for layout in LAYOUTS])
def test_layout_matches_single_process(tp, pp, dp, cp, sp, v):
    config = ParallelConfig(tp=tp, pp=pp, dp=dp, cp=cp, sequence_parallel=sp, virtual_stages=v)
    # ZeRO-1 with its reductions overlapped with the backward (test_optimizer covers the unoverlapped path)
    _check(run_distributed(config.world_size, distributed_run, config, overlap=True))


@pytest.mark.world_size(2)
def test_explicit_uneven_stage_layout_matches_single_process():
    config = ParallelConfig(pp=2, stage_layout=((0,), (1, 2, 3)))  # embedding + 1 layer | 3 layers + head
    _check(run_distributed(config.world_size, distributed_run, config))
