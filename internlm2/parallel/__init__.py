"""Parallelism for training on many devices: the process grid, tensor/sequence-parallel layers and
collectives, pipeline schedules, the ZeRO-1 distributed optimizer. Knows nothing of InternLM2: models are
built from these layers and handed to these schedules and optimizers.

Start with `state.ParallelState` (the grid; `ParallelState.single()` for one process) and
`tensor_parallel` (the layers, at tp=1 exactly nn.Linear / nn.Embedding).
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
