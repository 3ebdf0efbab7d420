"""The ZeRO-1 distributed optimizer equals plain DDP (and one process); float32 masters under bf16."""

import pytest
import torch

from internlm2.parallel import ColumnParallelLinear, ParallelConfig, ParallelState, RowParallelLinear
from internlm2.parallel.grad_norm import clip_grad_norm_
from internlm2.parallel.optimizer import DistributedOptimizer
from tests.distributed.spawn import run_distributed, worker_state
from tests.distributed.test_layouts import TOL, WEIGHT_TOL, reference
from tests.distributed.training_harness import merge_ranks, distributed_run


def _dp4_runs():
    """Three optimizers over dp=4 in one spawned group: DDP, ZeRO over all 4, ZeRO within pairs."""
    return {
        "ddp": distributed_run(ParallelConfig(dp=4), mode="ddp"),
        "zero1": distributed_run(ParallelConfig(dp=4), mode="zero1", bucket_elements=1 << 20),
        "zero1-pairs": distributed_run(ParallelConfig(dp=4, zero1_size=2), mode="zero1", bucket_elements=1000),
        # optimizer state taken out of ZeRO pairs after step 1 and loaded into DDP with other buckets
        "zero1-pairs, reloaded as ddp": distributed_run(ParallelConfig(dp=4, zero1_size=2), mode="zero1",
                                                       bucket_elements=1000, reload_as="ddp"),
    }


@pytest.mark.world_size(4)
def test_zero1_equals_ddp_over_all_dp_ranks_and_within_subgroups():
    per_rank = run_distributed(4, _dp4_runs)
    runs = {mode: merge_ranks([r[mode] for r in per_rank]) for mode in per_rank[0]}
    ddp = runs.pop("ddp")
    for mode, run in runs.items():
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ddp["losses"]), rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.tensor(run["norms"]), torch.tensor(ddp["norms"]), **TOL)
        for name, g in run["grads"].items():  # reduce-scatter (+ replica all-reduce) == all-reduce
            torch.testing.assert_close(g, ddp["grads"][name], rtol=1e-6, atol=1e-7, msg=f"{mode} grad {name}")
        for name, w in run["weights"].items():
            torch.testing.assert_close(w, ddp["weights"][name], **WEIGHT_TOL, msg=f"{mode} weight {name}")
    ref = reference()
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(ref["losses"]), **TOL)
    for name, w in ddp["weights"].items():
        torch.testing.assert_close(w, ref["weights"][name], **WEIGHT_TOL)


def _ddp_222():
    return distributed_run(ParallelConfig(tp=2, pp=2, dp=2, sequence_parallel=True), mode="ddp")


@pytest.mark.world_size(8)
def test_ddp_mode_matches_single_process_in_3d():
    merged = merge_ranks(run_distributed(8, _ddp_222))
    ref = reference()
    torch.testing.assert_close(torch.tensor(merged["losses"]), torch.tensor(ref["losses"]), **TOL)
    torch.testing.assert_close(torch.tensor(merged["norms"]), torch.tensor(ref["norms"]), **TOL)
    for name, g in merged["grads"].items():
        torch.testing.assert_close(g, ref["grads"][name], **TOL)


def test_bf16_parameters_keep_float32_master_weights():
    """With bf16 parameters and the same gradients, the masters follow float32 AdamW exactly and the
    parameters are the masters rounded to bf16 (updates below bf16's resolution are not lost)."""
    torch.manual_seed(0)
    ref = torch.nn.Parameter(torch.randn(64, 32))
    param = torch.nn.Parameter(ref.detach().to(torch.bfloat16))
    ref.data = param.detach().float()  # start from the same (bf16-representable) values
    opt = DistributedOptimizer([("w", param)], ParallelState.single(), lr=1e-4, weight_decay=0.1)
    torch_opt = torch.optim.AdamW([ref], lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for _ in range(5):
        grad = torch.randn(64, 32).to(torch.bfloat16)
        opt.zero_grad()
        (param * grad).sum().backward()  # d/dparam = grad, accumulated into the float32 bucket
        ref.grad = grad.float()
        opt.step()
        torch_opt.step()
    master = opt.buckets[0].master[:param.numel()].view_as(param)
    torch.testing.assert_close(master, ref.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(param.detach(), ref.detach().to(torch.bfloat16))
    assert not torch.equal(master, param.detach().float()), "updates smaller than bf16's step must accumulate"


def _clip_case():
    """A TP-sharded layer and a TP-replicated vector on 2 ranks: the norm counts each element once."""
    parallel = worker_state(ParallelConfig(tp=2))
    g = torch.Generator().manual_seed(3)
    full_col, full_row = torch.randn(6, 4, generator=g), torch.randn(4, 6, generator=g)
    vec = torch.randn(4, generator=g)
    col = ColumnParallelLinear(4, 6, parallel=parallel)
    row = RowParallelLinear(6, 4, parallel=parallel)
    replicated = torch.nn.Parameter(torch.zeros(4))
    col.weight.grad = full_col.chunk(2, 0)[parallel.tp_rank].clone()
    row.weight.grad = full_row.chunk(2, 1)[parallel.tp_rank].clone()
    replicated.grad = vec.clone()
    params = [col.weight, row.weight, replicated]
    norm = clip_grad_norm_(params, 1.0, parallel)
    expected = torch.cat([full_col.flatten(), full_row.flatten(), vec]).norm()
    torch.testing.assert_close(norm.float(), expected, rtol=1e-6, atol=0)
    clipped = torch.cat([full_col.flatten(), full_row.flatten(), vec]) / (expected + 1e-6)
    got = torch.cat([p.grad.flatten() for p in params])
    mine = torch.cat([clipped[:24].view(6, 4).chunk(2, 0)[parallel.tp_rank].flatten(),
                      clipped[24:48].view(4, 6).chunk(2, 1)[parallel.tp_rank].flatten(), clipped[48:]])
    torch.testing.assert_close(got, mine, rtol=1e-6, atol=1e-7)


@pytest.mark.world_size(2)
def test_clip_grad_norm_counts_replicated_parameters_once():
    run_distributed(2, _clip_case)


def test_a_parameter_belongs_to_one_optimizer_at_a_time():
    param = torch.nn.Parameter(torch.zeros(3))
    first = DistributedOptimizer([("w", param)], ParallelState.single())
    with pytest.raises(ValueError, match="parameter w already belongs to another DistributedOptimizer"):
        DistributedOptimizer([("w", param)], ParallelState.single())
    first.remove_hooks()
    second = DistributedOptimizer([("w", param)], ParallelState.single())
    (param * torch.arange(3.0)).sum().backward()
    assert param.grad is None and torch.equal(second.full_grads()["w"], torch.arange(3.0))
