"""The trainer's data: the built-in demo data, each stage's packed mixture, and the batch streams.

Batches are a pure function of (seed, stage, consumed samples): `micro_batches` rebuilds the exact stream
of any step from the count saved in the checkpoint, so resuming needs no data-loader state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from internlm2.data import (MixtureDataset, PackedDataset, PreparedDataset, ResumableSampler, Tokenizer,
                            collate_packed, stdlib_files, train_tokenizer)
from internlm2.data.builtin_corpus import stdlib_root
from internlm2.data.packing import pad_pieces
from internlm2.parallel import ParallelState
from internlm2.data.prepare import PrepareOptions, prepare
from internlm2.errors import ConfigError
from internlm2.train.config import BuiltinData, DataConfig, DataSource, StageConfig


@dataclass(frozen=True)
class DataPaths:
    tokenizer: Path
    train: list[DataSource]
    eval: DataSource | None


def resolve_data(cfg: DataConfig, run_dir: Path, rank: int, barrier: Callable[[], None]) -> DataPaths:
    """The tokenizer and datasets to train on; with `builtin`, makes them under `<run_dir>/data` first
    (rank 0 only; the others wait)."""
    if cfg.builtin is None:
        return DataPaths(Path(cfg.tokenizer), list(cfg.train), cfg.eval)
    data_dir = run_dir / "data"
    if rank == 0:
        make_builtin_data(cfg.builtin, data_dir)
    barrier()
    return DataPaths(data_dir / "tokenizer", [DataSource(str(data_dir / "train"))], DataSource(str(data_dir / "eval")))


def _split_stdlib(max_bytes: int, eval_fraction: float) -> tuple[list[Path], list[Path]]:
    """The first `max_bytes` of the standard library's files (in the corpus's fixed order) to train on,
    and the files right after them, `eval_fraction` as many bytes, held out."""
    root = stdlib_root()
    train, held_out, train_bytes, eval_bytes = [], [], 0, 0
    for rel in stdlib_files():
        path = root / rel
        size = path.stat().st_size
        if train_bytes < max_bytes:
            train.append(path)
            train_bytes += size
        elif eval_bytes < max_bytes * eval_fraction or not held_out:
            held_out.append(path)
            eval_bytes += size
        else:
            break
    return train, held_out


def make_builtin_data(cfg: BuiltinData, data_dir: Path) -> None:
    """Tokenizer + prepared train and held-out sets from the stdlib corpus; each step is skipped when its
    output exists (the data tools write atomically and resume)."""
    train_files, eval_files = _split_stdlib(cfg.max_bytes, cfg.eval_fraction)
    tok_dir = data_dir / "tokenizer"
    if not (tok_dir / "tokenizer.model").is_file():
        print(f"data: training a {cfg.vocab_size}-piece tokenizer on {len(train_files)} stdlib files", flush=True)
        docs = (p.read_text(encoding="utf-8", errors="replace") for p in train_files)
        train_tokenizer(docs, tok_dir, cfg.vocab_size)
    tokenizer = Tokenizer.load(tok_dir)
    for name, files in (("train", train_files), ("eval", eval_files)):
        summary = prepare([str(p) for p in files], tokenizer, data_dir / name, PrepareOptions())
        if summary["made_now"]:
            print(f"data: prepared the {name} set: {summary['num_docs']} documents, {summary['num_tokens']} tokens",
                  flush=True)


def stage_dataset(sources: list[DataSource], tokenizer: Tokenizer, seq_len: int,
                  rows_of: Callable[[PreparedDataset, int], Dataset] = PackedDataset) -> Dataset:
    """Rows of `seq_len` tokens from one dataset, or a weighted mixture of several; `rows_of(prepared,
    seq_len)` makes one dataset's rows (pretraining: its document stream cut into rows)."""
    rows = [rows_of(PreparedDataset(s.path, tokenizer.fingerprint), seq_len) for s in sources]
    if len(rows) == 1:
        return rows[0]
    return MixtureDataset(rows, [s.weight for s in sources])


def micro_batches(dataset: Dataset, stage: StageConfig, *, seed: int, dp_rank: int, dp_size: int,
                  consumed_samples: int, num_workers: int, collate: Callable = collate_packed) -> Iterator[dict]:
    """This DP rank's packed micro-batches from `consumed_samples` on, without end; `collate` makes one
    from its rows."""
    sampler = ResumableSampler(len(dataset), stage.micro_batch_size, seed=seed, dp_rank=dp_rank, dp_size=dp_size,
                               consumed_samples=consumed_samples)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                        persistent_workers=False, prefetch_factor=4 if num_workers else None)
    return iter(loader)


def eval_batches(dataset: Dataset, micro_batch_size: int, rows: int, dp_rank: int, dp_size: int,
                 collate: Callable = collate_packed) -> list[dict]:
    """The held-out set's first `rows` rows in order (no shuffling), as micro-batches of `micro_batch_size`
    rows (the last one may be shorter), micro-batch j on DP rank j % dp_size: the same rows whatever the
    layout."""
    rows = min(rows, len(dataset))
    starts = list(range(0, rows, micro_batch_size))[dp_rank::dp_size]
    return [collate([dataset[i] for i in range(start, min(start + micro_batch_size, rows))])
            for start in starts]


def check_eval_rows(available: int, rows: int, stage, dp_size: int, where) -> None:
    """The held-out set must give every DP rank at least one micro-batch (`eval_batches` deals them out)."""
    micro_batches = math.ceil(min(rows, available) / stage.micro_batch_size)
    if micro_batches < dp_size:
        raise ConfigError(f"{where}: the held-out set has {available} rows of stage {stage.name} (eval.rows={rows}), "
                          f"{micro_batches} micro-batches: too few to give each of dp={dp_size} ranks one")


def pad_for_layout(batch: dict, parallel: ParallelState, pad_id: int, fills: dict | None = None) -> dict:
    """A packed micro-batch padded as the layout needs: under context parallelism every piece to a
    multiple of 2*cp tokens (the zigzag split), and under sequence parallelism the total to a multiple
    of the TP shards (of each CP rank's share). Padding is never attended to by real tokens and has no
    target (see `pad_pieces`); a batch that already fits is returned as it is."""
    multiple = 2 * parallel.cp_size if parallel.cp_size > 1 else 1
    total = multiple * (parallel.tp_size if parallel.sequence_parallel else 1)
    if total == 1:
        return batch
    return pad_pieces(batch, multiple, total, pad_id, fills)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def unigram_entropy(path: str | Path, chunk: int = 1 << 22) -> float:
    """Entropy (nats per token) of a prepared dataset's token frequencies: the loss of the best model that
    ignores context, which a trained language model must beat by a wide margin."""
    data = PreparedDataset(path)
    counts = np.zeros(data.vocab_size, dtype=np.int64)
    for start in range(0, data.num_tokens, chunk):
        tokens, _, _ = data.read(start, min(start + chunk, data.num_tokens))
        counts += np.bincount(tokens, minlength=data.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
