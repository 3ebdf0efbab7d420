"""Tensor- and sequence-parallel layers on 2 gloo ranks against plain nn.Linear / nn.Embedding."""

import torch
import torch.nn.functional as F

from internlm2.parallel import (ColumnParallelLinear, ParallelConfig, ParallelState, RowParallelLinear,
                                VocabParallelEmbedding, column_parallel_input, full_grads, load_full_state_dict)
from internlm2.parallel.comm import CommCounter
from internlm2.parallel.mappings import scatter_to_sequence
from tests.distributed.spawn import distributed, worker_state

TOKENS, HIDDEN, FFN, VOCAB = 6, 8, 12, 10


def _full_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "emb": torch.randn(VOCAB, HIDDEN, generator=g),
        "w1": torch.randn(FFN, HIDDEN, generator=g), "b1": torch.randn(FFN, generator=g),
        "w2": torch.randn(HIDDEN, FFN, generator=g), "b2": torch.randn(HIDDEN, generator=g),
        "ids": torch.randint(0, VOCAB, (TOKENS,), generator=g),
        "dy": torch.randn(TOKENS, HIDDEN, generator=g),
    }


def _reference(w):
    emb = w["emb"].clone().requires_grad_()
    w1, b1 = w["w1"].clone().requires_grad_(), w["b1"].clone().requires_grad_()
    w2, b2 = w["w2"].clone().requires_grad_(), w["b2"].clone().requires_grad_()
    y = F.linear(torch.tanh(F.linear(F.embedding(w["ids"], emb), w1, b1)), w2, b2)
    y.backward(w["dy"])
    return y.detach(), {"emb.weight": emb.grad, "fc1.weight": w1.grad, "fc1.bias": b1.grad,
                        "fc2.weight": w2.grad, "fc2.bias": b2.grad}


def _mlp_case(sequence_parallel: bool):
    parallel = worker_state(ParallelConfig(tp=2, sequence_parallel=sequence_parallel))
    w = _full_weights()
    ref_y, ref_grads = _reference(w)
    mods = torch.nn.ModuleDict({
        "emb": VocabParallelEmbedding(VOCAB, HIDDEN, parallel=parallel),
        "fc1": ColumnParallelLinear(HIDDEN, FFN, parallel=parallel, bias=True),
        "fc2": RowParallelLinear(FFN, HIDDEN, parallel=parallel, bias=True),
    })
    load_full_state_dict(mods, {"emb.weight": w["emb"], "fc1.weight": w["w1"], "fc1.bias": w["b1"],
                                "fc2.weight": w["w2"], "fc2.bias": w["b2"]}, parallel)
    y = mods["fc2"](torch.tanh(mods["fc1"](mods["emb"](w["ids"]))))
    dy = scatter_to_sequence(w["dy"], parallel.tp_group) if sequence_parallel else w["dy"]
    expected_y = scatter_to_sequence(ref_y, parallel.tp_group) if sequence_parallel else ref_y
    torch.testing.assert_close(y, expected_y, rtol=1e-5, atol=1e-5)
    y.backward(dy)
    if sequence_parallel:  # replicated params see a token shard: their grads are partial sums over TP
        torch.distributed.all_reduce(mods["fc2"].bias.grad, group=parallel.tp_group)
    grads = full_grads(mods, parallel)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-5, msg=name)


@distributed(world_size=2)
def test_tp_mlp_matches_plain_layers():
    _mlp_case(sequence_parallel=False)


@distributed(world_size=2)
def test_sequence_parallel_mlp_matches_plain_layers():
    _mlp_case(sequence_parallel=True)


def test_single_state_layers_are_plain_torch_layers():
    parallel = ParallelState.single()
    col = ColumnParallelLinear(4, 6, parallel=parallel, bias=True)
    ref = torch.nn.Linear(4, 6)
    ref.load_state_dict(col.state_dict())
    x = torch.randn(3, 4)
    torch.testing.assert_close(col(x), ref(x))


def _shared_input_case(sequence_parallel: bool):
    """Two column-parallel layers on one input: entering the TP region once gives the same results with
    half the collectives."""
    parallel = worker_state(ParallelConfig(tp=2, sequence_parallel=sequence_parallel))
    torch.manual_seed(0)
    w1 = ColumnParallelLinear(HIDDEN, FFN, parallel=parallel)
    w3 = ColumnParallelLinear(HIDDEN, FFN, parallel=parallel)
    x_full = torch.randn(TOKENS, HIDDEN)
    x_local = scatter_to_sequence(x_full, parallel.tp_group) if sequence_parallel else x_full
    runs = []
    for shared in (False, True):
        x = x_local.clone().requires_grad_()
        with CommCounter() as counter:
            if shared:
                xs = column_parallel_input(x, parallel)
                y = w1(xs, input_prepared=True) * w3(xs, input_prepared=True)
            else:
                y = w1(x) * w3(x)
            y.sum().backward()
        runs.append((y.detach(), x.grad, sum(counter.calls.values())))
    (y0, g0, calls0), (y1, g1, calls1) = runs
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-7)
    per_entry = 2 if sequence_parallel else 1  # all-gather + its backward reduce-scatter, or the backward all-reduce
    assert (calls0, calls1) == (2 * per_entry, per_entry)


@distributed(world_size=2)
def test_shared_column_input_needs_one_collective():
    _shared_input_case(sequence_parallel=False)


@distributed(world_size=2)
def test_shared_column_input_needs_one_gather_under_sequence_parallel():
    _shared_input_case(sequence_parallel=True)
