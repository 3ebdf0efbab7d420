"""A weighted mixture of packed datasets: one index space over several prepared corpora.

Positions come in blocks of `BLOCK` samples; in each block dataset k gets its share n_k of the
positions (weights rounded by largest remainder, so the shares are exact to 1/BLOCK), spread evenly
through the block. Position i maps to dataset k's sample (block * n_k + j) mod len_k, so a dataset with
more weight than samples is repeated (upsampled) and every lookup is O(1) with no per-sample index.
Shuffling is the sampler's job; the mixture only decides which dataset each position draws from.
"""

from typing import Sequence

import numpy as np
from torch.utils.data import Dataset

from internlm2.data.errors import DataError

BLOCK = 10_000


def block_shares(weights: Sequence[float], block: int = BLOCK) -> np.ndarray:
    """Integer shares of a block proportional to `weights` (largest remainder), each at least one."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise DataError(f"mixture weights {list(weights)} must be positive finite numbers")
    exact = w / w.sum() * block
    shares = np.floor(exact).astype(np.int64)
    shares[np.argsort(-(exact - shares), kind="stable")[: block - shares.sum()]] += 1
    if np.any(shares == 0):
        raise DataError(f"mixture weights {list(weights)}: a weight below 1/{block} of the total rounds to nothing")
    return shares


class MixtureDataset(Dataset):
    """`num_samples` positions (default: the datasets' total length) drawn from `datasets` by `weights`.

    The datasets must be rows of one sequence length made with one tokenizer (`PackedDataset`s)."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], num_samples: int | None = None):
        if len(datasets) != len(weights):
            raise DataError(f"{len(datasets)} datasets but {len(weights)} weights")
        for attr in ("seq_len", "tokenizer_fingerprint"):
            values = {getattr(d, attr) for d in datasets}
            if len(values) > 1:
                raise DataError(f"mixture datasets differ in {attr}: {sorted(map(str, values))}")
        self.datasets = list(datasets)
        self.seq_len = datasets[0].seq_len
        self.tokenizer_fingerprint = datasets[0].tokenizer_fingerprint
        self.shares = block_shares(weights)
        self.num_samples = sum(map(len, datasets)) if num_samples is None else num_samples
        if self.num_samples < 1:
            raise DataError(f"mixture num_samples {self.num_samples} must be positive")
        # Within a block, dataset k's j-th position sits at time (j + 0.5) / n_k; sorted by time, the
        # datasets interleave evenly.
        which = np.repeat(np.arange(len(self.shares)), self.shares)
        rank = np.concatenate([np.arange(n) for n in self.shares])
        order = np.lexsort((which, (rank + 0.5) / self.shares[which]))
        self._slot_dataset, self._slot_rank = which[order], rank[order]

    def __len__(self) -> int:
        return self.num_samples

    def locate(self, i: int) -> tuple[int, int]:
        """(dataset, sample within it) of position `i`."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"position {i} of {self.num_samples}")
        block, slot = divmod(i, BLOCK)
        k = int(self._slot_dataset[slot])
        return k, (block * int(self.shares[k]) + int(self._slot_rank[slot])) % len(self.datasets[k])

    def __getitem__(self, i: int):
        k, j = self.locate(i)
        return self.datasets[k][j]
