"""The tests' NaN-poisoned allocator (tests/numerics.py) poisons blocks of both pools of PyTorch's caching
allocator, so an output element a kernel forgets to write shows up whatever the output's size."""

import pytest
import torch

from tests.numerics import SMALL_POOL_MAX_BYTES, free_block_sizes, poison_cuda_allocator, requires_cuda


@requires_cuda
@pytest.mark.parametrize("nbytes", [512, 4096, SMALL_POOL_MAX_BYTES, 3 << 20], ids=["512B", "4KiB", "1MiB", "3MiB"])
def test_a_freed_block_is_handed_out_again_poisoned(nbytes):
    stale = torch.zeros(nbytes // 4, device="cuda")  # finite data left in a block that goes back to its pool
    del stale
    poison_cuda_allocator()
    again = torch.empty(nbytes // 4, device="cuda")  # best fit: the stale block's bytes, unless poisoned
    assert again.isnan().all(), f"{(~again.isnan()).sum().item()} of {again.numel()} elements are not NaN"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fresh_small_and_large_blocks_read_nan(dtype):
    poison_cuda_allocator()
    for numel in (100, 300_000, 5_000_000):
        assert torch.empty(numel, device="cuda", dtype=dtype).isnan().all(), (dtype, numel)


def test_free_blocks_are_those_of_the_stream_in_the_default_pool():
    """Which blocks the poisoning requests (a snapshot in torch.cuda.memory_snapshot()'s format; no GPU)."""
    def segment(stream, pool, *blocks):
        return {"stream": stream, "segment_pool_id": pool, "blocks": [{"size": n, "state": st} for n, st in blocks]}

    snapshot = [
        segment(0, (0, 0), (512, "active_allocated"), (1536, "inactive")),  # small pool
        segment(0, (0, 0), (4 << 20, "inactive"), (2 << 20, "active_awaiting_free"), (3 << 20, "inactive")),
        segment(7, (0, 0), (8192, "inactive")),  # another stream's
        segment(0, (1, 2), (4096, "inactive")),  # a CUDA graph's private pool
    ]
    assert free_block_sizes(snapshot, 0) == [1536, 3 << 20, 4 << 20]
    assert free_block_sizes(snapshot, 7) == [8192]
