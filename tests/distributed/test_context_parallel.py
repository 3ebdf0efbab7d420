"""Ring attention over CP ranks equals full causal attention over the packed row, values and gradients,
with and without overlapping its hops, and keeps only this rank's tensors for the backward."""

import pytest
import torch

from internlm2 import ops
from internlm2.parallel import ParallelConfig
from internlm2.parallel.context_parallel import ring_attention, zigzag_split
from tests.distributed.spawn import run_distributed, worker_state

HQ, HKV, D = 4, 2, 8


def _row(cp: int, dtype):
    g = torch.Generator().manual_seed(5)
    lengths = [4 * cp, 2 * cp, 6 * cp]  # multiples of 2 * cp, unequal
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, D, generator=g, dtype=dtype) for h in (HQ, HKV, HKV))
    grad = torch.randn(total, HQ, D, generator=g, dtype=dtype)
    return cu, q, k, v, grad


def _ring_case(cp: int, attention_name: str, dtype):
    parallel = worker_state(ParallelConfig(cp=cp))
    attention = getattr(ops, attention_name)
    cu, q, k, v, grad = _row(cp, dtype)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ops.flash_attention_reference(*full, cu, causal=True)
    ref.backward(grad)
    split = zigzag_split(cu, cp, parallel.cp_rank)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for overlap in (True, False):
        local = [t[split.index].clone().requires_grad_() for t in (q, k, v)]
        out = ring_attention(*local, split, parallel, attention=attention, overlap=overlap)
        out.backward(grad[split.index])
        torch.testing.assert_close(out, ref.detach()[split.index], **tol)
        for name, mine, theirs in zip("qkv", local, full):
            torch.testing.assert_close(mine.grad, theirs.grad[split.index], **tol,
                                       msg=lambda m, n=name, o=overlap: f"d{n} (overlap={o}): {m}")


def _saved_bytes_case(cp: int) -> tuple[int, int]:
    """Bytes autograd keeps for ring attention's backward, and the bytes of this rank's q, k, v, output
    and lse computed from their shapes."""
    parallel = worker_state(ParallelConfig(cp=cp))
    cu, q, k, v, _ = _row(cp, torch.float32)
    split = zigzag_split(cu, cp, parallel.cp_rank)
    local = [t[split.index].clone().requires_grad_() for t in (q, k, v)]
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ring_attention(*local, split, parallel, attention=ops.flash_attention_reference)
    tokens = split.index.numel()
    expected = 4 * (tokens * HQ * D + 2 * tokens * HKV * D + tokens * HQ * D + HQ * tokens)  # fp32 q, k, v, out, lse
    return sum(saved.values()), expected


@pytest.mark.world_size(2)
def test_ring_attention_two_ranks_fp64_reference():
    run_distributed(2, _ring_case, 2, "flash_attention_reference", torch.float64)


@pytest.mark.world_size(2)
def test_ring_attention_two_ranks_fused_kernel():
    run_distributed(2, _ring_case, 2, "flash_attention", torch.float32)


@pytest.mark.world_size(4)
def test_ring_attention_four_ranks():
    run_distributed(4, _ring_case, 4, "flash_attention_reference", torch.float64)


@pytest.mark.world_size(4)
def test_ring_attention_keeps_only_local_tensors_for_backward():
    # Keeping every step's K/V would add (cp - 1) blocks of 2 x tokens x HKV x D, plus the partial outputs.
    for saved, expected in run_distributed(4, _saved_bytes_case, 4):
        assert saved == expected


def test_zigzag_split_covers_every_token_once_with_balanced_causal_work():
    cu = torch.tensor([0, 8, 24], dtype=torch.int32)  # lengths 8 and 16: chunks of 2 and 4 tokens
    splits = [zigzag_split(cu, 2, r) for r in range(2)]
    assert splits[0].index.tolist() == [0, 1, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23]
    assert splits[1].index.tolist() == [2, 3, 4, 5, 12, 13, 14, 15, 16, 17, 18, 19]
    assert splits[1].position_ids.tolist() == [2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10, 11]
    assert splits[0].cu_seqlens.tolist() == [0, 4, 12] and splits[0].half_cu_seqlens.tolist() == [0, 2, 6]
    assert splits[0].first.tolist() == [0, 1, 4, 5, 6, 7] and splits[0].second.tolist() == [2, 3, 8, 9, 10, 11]
    work = [int((s.position_ids + 1).sum()) for s in splits]  # causal keys per query, summed
    assert work[0] == work[1]


def test_zigzag_split_rejects_indivisible_sequences():
    with pytest.raises(ValueError, match="multiple of 2\\*cp = 4; \\(sequence, length\\) \\[\\(1, 6\\)\\]"):
        zigzag_split(torch.tensor([0, 8, 14], dtype=torch.int32), 2, 0)
