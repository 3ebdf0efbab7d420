"""Deterministic, resumable sampling: every sample index is a pure function of its position.

The global sample stream is position p = 0, 1, 2, ...: epoch p // N visits every one of the N samples
once, in an order that is a pseudo-random permutation keyed by (seed, epoch). A step's global batch
takes the next `dp_size * micro_batch_size` positions after the `consumed_samples` already trained on,
and DP rank r takes its contiguous `micro_batch_size` of them. So:

- resuming needs only `consumed_samples` (no data-loader state), and reproduces the same samples;
- the global order does not depend on the DP size: resuming on another DP size continues it exactly.

The permutation is a Feistel network over the next power of four above N, with cycle walking back into
[0, N): constant memory for any N (no index array of the whole dataset), cheap for a batch at a time.
"""

import hashlib
from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

_ROUNDS = 6


def _round_keys(seed: int, epoch: int) -> list[np.uint64]:
    digest = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8 * _ROUNDS).digest()
    return [np.uint64(int.from_bytes(digest[8 * i:8 * i + 8], "little")) for i in range(_ROUNDS)]


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """SplitMix64's finaliser of x ^ key: every output bit depends on every input bit."""
    x = x ^ key
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(offsets, n: int, seed: int, epoch: int) -> np.ndarray:
    """Element `offsets` of the (seed, epoch) permutation of range(n), vectorised (int64 in, int64 out)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if n <= 1:
        return np.zeros_like(offsets)
    half = max(1, (int(n - 1).bit_length() + 1) // 2)  # domain 4**half >= n
    low = np.uint64((1 << half) - 1)
    keys = _round_keys(seed, epoch)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & low
        for key in keys:
            left, right = right, left ^ (_mix(right, key) & low)
        return (left << np.uint64(half)) | right

    with np.errstate(over="ignore"):  # the mixing multiplies wrap around by design
        x = feistel(offsets.astype(np.uint64))
        outside = x >= np.uint64(n)
        while outside.any():  # cycle walking: a bijection on the domain is one on [0, n) too
            x[outside] = feistel(x[outside])
            outside = x >= np.uint64(n)
    return x.astype(np.int64)


def sample_indices(positions, num_samples: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """The sample index at each global stream position (epoch = position // num_samples)."""
    positions = np.asarray(positions, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_samples)
    if not shuffle:
        return offsets
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        out[here] = permute(offsets[here], num_samples, seed, int(epoch))
    return out


def micro_batch_indices(consumed_samples: int, num_samples: int, micro_batch_size: int, seed: int,
                        dp_rank: int = 0, dp_size: int = 1, shuffle: bool = True) -> list[int]:
    """DP rank `dp_rank`'s micro-batch of the step that starts after `consumed_samples` global samples."""
    first = consumed_samples + dp_rank * micro_batch_size
    return sample_indices(np.arange(first, first + micro_batch_size), num_samples, seed, shuffle).tolist()


class ResumableSampler(Sampler[list[int]]):
    """A batch sampler for `torch.utils.data.DataLoader(dataset, batch_sampler=...)` that yields this
    rank's micro-batches from `consumed_samples` on, without end (the trainer decides when to stop).
    After each micro-batch step the global consumed count grows by `dp_size * micro_batch_size`;
    save that count and pass it back here to resume."""

    def __init__(self, num_samples: int, micro_batch_size: int, *, seed: int = 0, dp_rank: int = 0,
                 dp_size: int = 1, consumed_samples: int = 0, shuffle: bool = True):
        if num_samples < 1 or micro_batch_size < 1 or consumed_samples < 0:
            raise ValueError(f"num_samples {num_samples} and micro_batch_size {micro_batch_size} must be positive "
                             f"and consumed_samples {consumed_samples} not negative")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside dp_size {dp_size}")
        self.num_samples, self.micro_batch_size = num_samples, micro_batch_size
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.consumed_samples, self.shuffle = consumed_samples, shuffle

    @property
    def global_batch_size(self) -> int:
        """Samples consumed by one micro-batch step over all DP ranks."""
        return self.dp_size * self.micro_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        consumed = self.consumed_samples
        while True:
            yield micro_batch_indices(consumed, self.num_samples, self.micro_batch_size, self.seed,
                                      self.dp_rank, self.dp_size, self.shuffle)
            consumed += self.global_batch_size
