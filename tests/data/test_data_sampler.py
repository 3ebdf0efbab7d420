"""The sampler: every sample index is a pure function of (seed, epoch, consumed samples, DP rank, DP size);
resume and DP-size changes keep the global order."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from internlm2.data.sampler import ResumableSampler, micro_batch_indices, permute, sample_indices

FAST = settings(max_examples=60, deadline=None)


def take(sampler, steps):
    return list(itertools.islice(iter(sampler), steps))


@FAST
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**32), epoch=st.integers(0, 50))
def test_each_epoch_is_a_permutation(n, seed, epoch):
    order = permute(np.arange(n), n, seed, epoch)
    assert np.array_equal(np.sort(order), np.arange(n))


@FAST
@given(n=st.integers(1, 500), mb=st.integers(1, 8), dp=st.integers(1, 8), seed=st.integers(0, 1000),
       steps=st.integers(1, 40), data=st.data())
def test_resume_at_any_step_reproduces_the_sequence(n, mb, dp, seed, steps, data):
    rank = data.draw(st.integers(0, dp - 1))
    resume = data.draw(st.integers(0, steps))
    full = take(ResumableSampler(n, mb, seed=seed, dp_rank=rank, dp_size=dp), steps)
    resumed = take(ResumableSampler(n, mb, seed=seed, dp_rank=rank, dp_size=dp,
                                    consumed_samples=resume * mb * dp), steps - resume)
    assert full[resume:] == resumed


@FAST
@given(n=st.integers(1, 400), seed=st.integers(0, 1000), data=st.data())
def test_global_order_is_independent_of_dp_size_even_across_a_resume(n, seed, data):
    """Train some steps on dp1 ranks, resume on dp2 ranks from the consumed count: the samples, read rank
    by rank and step by step, are the single-rank stream."""
    mb1, dp1, mb2, dp2 = (data.draw(st.integers(1, 6)) for _ in range(4))
    steps1, steps2 = data.draw(st.integers(0, 12)), data.draw(st.integers(1, 12))
    seen = []
    for step in range(steps1):
        for rank in range(dp1):
            seen += micro_batch_indices(step * mb1 * dp1, n, mb1, seed, rank, dp1)
    consumed = steps1 * mb1 * dp1
    samplers = [ResumableSampler(n, mb2, seed=seed, dp_rank=r, dp_size=dp2, consumed_samples=consumed)
                for r in range(dp2)]
    for batches in zip(*(take(s, steps2) for s in samplers)):
        for batch in batches:
            seen += batch
    single = sample_indices(np.arange(len(seen)), n, seed).tolist()
    assert seen == single


@FAST
@given(n=st.integers(2, 300), seed=st.integers(0, 1000), epochs=st.integers(1, 4))
def test_every_sample_once_per_epoch_and_epochs_differ(n, seed, epochs):
    stream = sample_indices(np.arange(n * epochs), n, seed).reshape(epochs, n)
    for order in stream:
        assert sorted(order.tolist()) == list(range(n))


def test_orders_depend_on_seed_and_epoch_and_look_shuffled():
    n = 10_000
    a = sample_indices(np.arange(2 * n), n, seed=0)
    b = sample_indices(np.arange(n), n, seed=1)
    assert not np.array_equal(a[:n], a[n:]), "epochs must be reshuffled"
    assert not np.array_equal(a[:n], b)
    # A shuffle, not a near-identity: consecutive positions land far apart and the order is uncorrelated.
    assert np.corrcoef(np.arange(n), a[:n])[0, 1] ** 2 < 1e-3
    assert np.median(np.abs(np.diff(a[:n]))) > n / 10


def test_pure_function_of_arguments_and_no_shuffle_is_sequential():
    assert micro_batch_indices(37, 100, 4, seed=5, dp_rank=1, dp_size=3) == micro_batch_indices(
        37, 100, 4, seed=5, dp_rank=1, dp_size=3)
    assert micro_batch_indices(98, 100, 4, seed=5, dp_rank=0, dp_size=1, shuffle=False) == [98, 99, 0, 1]


def test_large_dataset_needs_no_index_array():
    n = 10**12  # 10^12 samples: an index permutation would not fit in memory
    idx = sample_indices(np.arange(5 * n - 3, 5 * n + 3), n, seed=3)
    assert idx.min() >= 0 and idx.max() < n and len(set(idx.tolist())) == 6


def test_works_as_a_dataloader_batch_sampler():
    data = torch.arange(50) * 10
    sampler = ResumableSampler(50, 4, seed=2, dp_rank=1, dp_size=2, consumed_samples=16)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    batches = [b.tolist() for b in itertools.islice(loader, 3)]
    assert batches == [[10 * i for i in micro_batch_indices(16 + 8 * s, 50, 4, 2, 1, 2)] for s in range(3)]


@pytest.mark.parametrize("kwargs", [dict(num_samples=0, micro_batch_size=1), dict(num_samples=5, micro_batch_size=0),
                                    dict(num_samples=5, micro_batch_size=1, dp_rank=2, dp_size=2),
                                    dict(num_samples=5, micro_batch_size=1, consumed_samples=-1)])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        ResumableSampler(**kwargs)
