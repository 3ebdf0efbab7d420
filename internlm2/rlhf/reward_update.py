"""The fast path's reward-model update: the frozen reward model trained further on preference pairs (the
round's patch pairs mixed with its own data), then frozen again.

An engine loop over `RewardModelTask` (focal ranking loss + log barrier, per pair over the global batch),
AdamW with cosine 1e-5 -> 5e-6 as the report's RM recipe; one place, so `internlm2 train-rm`'s loop can
take its place. Every step takes half its pairs from the patches and half from the data, each stream a
(seed, epoch) permutation, cut into contiguous shares per data-parallel rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from internlm2.model import InternLM2ForScore
from internlm2.rlhf.reward_data import ScoredPair, collate_pairs
from internlm2.rlhf.reward_model import RewardModelTask
from internlm2.train.data_setup import to_device
from internlm2.train.engine import Engine
from internlm2.train.schedule import WarmupCosine


def _stream(n: int, seed: int):
    """Indices into n items, epoch after epoch, each epoch a fresh permutation."""
    epoch = 0
    while True:
        yield from np.random.default_rng([seed, epoch]).permutation(n).tolist()
        epoch += 1


def _share(items: list, parallel) -> list:
    per = len(items) // parallel.dp_size
    return items[parallel.dp_rank * per:(parallel.dp_rank + 1) * per]


def train_reward_model(frozen: Engine, patches: Sequence[ScoredPair], data: Sequence[ScoredPair],
                       conditions: Sequence[str], *, steps: int, pairs_per_step: int, lr: float, seed: int,
                       dtype: torch.dtype) -> list[dict]:
    """Trains `frozen`'s weights in place on the pairs; returns each step's metrics."""
    parallel, device = frozen.parallel, frozen.chunks[0].v_head.weight.device
    live = frozen.named_parameters()

    def copy_in(chunks):
        with torch.no_grad():
            for chunk in chunks:
                for name, p in chunk.named_parameters():
                    p.copy_(live[name])

    engine = Engine.build(InternLM2ForScore, frozen.model_config, parallel, dtype=dtype, device=device, seed=seed,
                          optim=dict(lr=lr, weight_decay=0.01, betas=(0.9, 0.95)), weights=copy_in)
    task = RewardModelTask(conditions)
    schedule = WarmupCosine(lr, 0, steps, 0.5)
    half = pairs_per_step // 2 if data else pairs_per_step
    streams = [_stream(len(patches), seed), _stream(len(data), seed + 1) if data else None]
    log = []
    try:
        for step in range(steps):
            picked = [patches[next(streams[0])] for _ in range(half)]
            if data:
                picked += [data[next(streams[1])] for _ in range(pairs_per_step - half)]
            mb = to_device(collate_pairs(_share(picked, parallel), conditions), device)
            engine.set_lr(schedule(step))
            metrics = engine.forward_backward([mb], task.loss, task.normalizer([mb]))
            engine.step(1.0)
            log.append(metrics)
        with torch.no_grad():
            trained = engine.named_parameters()
            for name, p in live.items():
                p.copy_(trained[name])
    finally:
        engine.optimizer.remove_hooks()
    return log


def accuracy(engine: Engine, pairs: Sequence[ScoredPair], conditions: Sequence[str], pairs_per_batch: int = 32) -> float:
    """The share of `pairs` that the reward model ranks right (every rank gets the same number)."""
    parallel = engine.parallel
    device = engine.chunks[0].v_head.weight.device
    mine = list(pairs)[parallel.dp_rank::parallel.dp_size]
    mbs = [to_device(collate_pairs(mine[i:i + pairs_per_batch], conditions), device)
           for i in range(0, len(mine), pairs_per_batch)]
    task = RewardModelTask(conditions)
    return engine.evaluate(mbs, task.loss, task.normalizer(mbs))["accuracy"]
