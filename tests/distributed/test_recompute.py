"""Activation recomputation: same loss and gradients in every mode; selective recomputes only the
attention core, full recomputes the whole layer, none recomputes nothing; works under TP + SP."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from internlm2.model import InternLM2ForCausalLM
from internlm2.parallel import ParallelConfig, ParallelState, load_full_state_dict
from internlm2.parallel.recompute import apply_activation_recompute
from internlm2.parallel.tensor_parallel import full_grads
from tests.distributed.spawn import run_distributed, worker_state
from tests.distributed.training_harness import initial_weights, microbatches, tiny_config


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def _loss_and_grads(mode: str, parallel: ParallelState):
    config = tiny_config()
    model = InternLM2ForCausalLM(config, parallel)
    load_full_state_dict(model, initial_weights(config), parallel)
    apply_activation_recompute(model.model.layers.values(), mode)
    mb = microbatches(0, config.vocab_size)[0]
    loss = model(mb.input_ids, cu_seqlens=mb.cu_seqlens, labels=mb.labels).loss
    with _OpCounter() as counter:
        loss.backward()
    return loss.detach(), full_grads(model, parallel), counter.counts


def test_modes_give_the_same_gradients_and_recompute_what_they_say():
    parallel = ParallelState.single()
    base_loss, base_grads, base_ops = _loss_and_grads("none", parallel)
    attention, norm = torch.ops.aten.logsumexp.default, torch.ops.aten.rsqrt.default  # forward-only ops
    assert base_ops[attention] == 0 and base_ops[norm] == 0
    recomputed = {}
    for mode in ("selective", "full"):
        loss, grads, ops = _loss_and_grads(mode, parallel)
        torch.testing.assert_close(loss, base_loss, rtol=0, atol=0)
        for name, g in grads.items():
            torch.testing.assert_close(g, base_grads[name], rtol=1e-6, atol=1e-7, msg=f"{mode} {name}")
        recomputed[mode] = (ops[attention], ops[norm])
    layers, sequences = tiny_config().num_layers, 2
    assert recomputed["selective"] == (layers * sequences, 0)  # attention core only, every layer
    assert recomputed["full"][0] == layers * sequences and recomputed["full"][1] > 0


def _collectives(ops) -> int:
    return sum(n for op, n in ops.items() if str(op).startswith("c10d."))


def _tp_case():
    parallel = worker_state(ParallelConfig(tp=2, sequence_parallel=True))
    results = {mode: _loss_and_grads(mode, parallel) for mode in ("none", "selective", "full")}
    base_loss, base_grads, base_ops = results["none"]
    for mode in ("selective", "full"):
        loss, grads, _ = results[mode]
        torch.testing.assert_close(loss, base_loss, rtol=0, atol=0)
        for name, g in grads.items():
            torch.testing.assert_close(g, base_grads[name], rtol=1e-6, atol=1e-7, msg=f"{mode} {name}")
    # Collectives issued during backward: selective reuses the forward's, full runs them again.
    backward_collectives = {mode: _collectives(r[2]) for mode, r in results.items()}
    assert backward_collectives["none"] > 0
    assert backward_collectives["selective"] == backward_collectives["none"] < backward_collectives["full"]


@pytest.mark.world_size(2)
def test_recompute_under_tensor_and_sequence_parallel():
    run_distributed(2, _tp_case)


def test_unknown_mode_and_double_application_are_rejected():
    layer = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="must be one of"):
        apply_activation_recompute([layer], "some")
    apply_activation_recompute([layer], "full")
    with pytest.raises(ValueError, match="already applied"):
        apply_activation_recompute([layer], "selective")
