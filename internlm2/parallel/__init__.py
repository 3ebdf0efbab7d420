"""Parallelism for training on many devices. Knows nothing of InternLM2: models are built from these
layers and handed to these schedules and optimizers. Everything runs with NCCL on GPUs and gloo on CPUs.

- `state`: `ParallelConfig` (sizes, validated before any collective) and `ParallelState`, the process
  grid over one device mesh (pp, dp, cp, tp), TP innermost; `ParallelState.single()` for one process.
- `tensor_parallel`: `ColumnParallelLinear`, `RowParallelLinear`, `VocabParallelEmbedding` (exactly
  nn.Linear / nn.Embedding at tp=1), sequence parallel, full tensor <-> shard helpers for checkpoints.
- `mappings`: the autograd-aware collectives between TP regions; `comm`: every collective, counted.
- `cross_entropy`: vocab-parallel cross-entropy, plain and fused with the output matmul.
- `pipeline_schedule` / `pipeline`: stage partitioning, 1F1B and interleaved 1F1B over point-to-point.
- `optimizer`: AdamW as ZeRO-1 (sharded fp32 masters, bucketed reduce-scatter, optional overlap with the
  backward) or plain DDP; `grad_norm`: the global norm counting every parameter once.
- `recompute`: activation recomputation none / selective (attention core) / full.
- `context_parallel`: load-balanced sequence split and ring attention merged on the LSE.
"""

from internlm2.parallel.state import ParallelConfig, ParallelState, init_distributed
from internlm2.parallel.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                                column_parallel_input, full_grads, full_state_dict, gather_tensor,
                                                is_tensor_parallel, load_full_state_dict, shard_tensor)

__all__ = [
    "ColumnParallelLinear", "ParallelConfig", "ParallelState", "RowParallelLinear", "VocabParallelEmbedding",
    "column_parallel_input", "full_grads", "full_state_dict", "gather_tensor", "init_distributed",
    "is_tensor_parallel", "load_full_state_dict", "shard_tensor",
]
