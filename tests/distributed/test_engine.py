"""A second objective on the shared engine: a per-sequence mean loss (each packed sequence's mean token
NLL, averaged over the sequences of the global batch), written once as a `loss_fn` and run under every
kind of layout. Oracle: one plain-PyTorch model, logits and F.cross_entropy, no internlm2.parallel code."""

import pytest
import torch
import torch.nn.functional as F

from internlm2.model import InternLM2ForCausalLM
from internlm2.parallel import ParallelConfig, ParallelState
from internlm2.train.engine import Ratio
from tests.distributed.spawn import run_distributed, worker_state
from tests.distributed.training_harness import (_full, engine_with_initial_weights, initial_weights, microbatches,
                                                tiny_config)

TOL = dict(rtol=1e-5, atol=1e-6)


def with_sequence_weights(mb) -> dict:
    """The micro-batch as the engine takes it, plus per-token weights 1 / (its sequence's target count)."""
    labels, cu = mb.labels, mb.cu_seqlens.long()
    weights = torch.zeros(labels.shape, dtype=torch.float32)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        targets = labels[a:b] != -100
        weights[a:b] = targets.float() / max(int(targets.sum()), 1)
    return {"input_ids": mb.input_ids, "cu_seqlens": mb.cu_seqlens, "labels": labels, "weights": weights}


def per_sequence_loss(out, mb):
    logp = out.head.token_logprobs(out, mb["labels"])
    weights = out.tokens(mb["weights"], "weights")
    targets = out.tokens(mb["labels"], "labels") != -100
    return -(logp * weights).sum(), {"token_nll": Ratio(-(logp * targets).sum(), targets.sum())}


def sequences(mbs) -> int:
    return sum(len(mb["cu_seqlens"]) - 1 for mb in mbs)


def oracle():
    """One step's loss, token NLL and gradients in plain PyTorch."""
    config = tiny_config()
    model = InternLM2ForCausalLM(config)
    model.load_state_dict(initial_weights(config))
    mbs = [with_sequence_weights(mb) for mb in microbatches(0, config.vocab_size)]
    nll_sum, tokens, per_seq = 0.0, 0, []
    for mb in mbs:
        logits = model(mb["input_ids"], cu_seqlens=mb["cu_seqlens"]).logits
        nll = F.cross_entropy(logits.double(), mb["labels"], reduction="none", ignore_index=-100)
        cu = mb["cu_seqlens"].tolist()
        per_seq += [(nll[a:b].sum() / max(int((mb["labels"][a:b] != -100).sum()), 1)) for a, b in zip(cu, cu[1:])]
        nll_sum, tokens = nll_sum + nll.sum(), tokens + int((mb["labels"] != -100).sum())
    loss = torch.stack(per_seq).mean()
    loss.backward()
    return {"loss": loss.item(), "token_nll": (nll_sum / tokens).item(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def engine_step(parallel: ParallelState):
    """This rank's view of the same step on the engine (its DP share of the micro-batches)."""
    engine = engine_with_initial_weights(parallel)
    mbs = [with_sequence_weights(mb) for mb in microbatches(0, tiny_config().vocab_size)]
    per_rank = len(mbs) // parallel.dp_size
    mine = mbs[parallel.dp_rank * per_rank:(parallel.dp_rank + 1) * per_rank]
    evaluated = engine.evaluate(mine, per_sequence_loss, sequences(mine))
    trained = engine.forward_backward(mine, per_sequence_loss, sequences(mine))
    grads = _full(engine.optimizer.full_grads(), engine.chunks, parallel)
    engine.optimizer.remove_hooks()
    return {"evaluated": evaluated, "trained": trained, "grads": grads}


def _distributed_case(config: ParallelConfig):
    shape = tiny_config()
    return engine_step(worker_state(config, num_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
                                    num_kv_heads=shape.num_key_value_heads, vocab_size=shape.vocab_size))


def _check(results: list[dict]) -> None:
    ref = oracle()
    for r in results:
        for key in ("evaluated", "trained"):  # the same one formula for both, on every rank
            assert set(r[key]) == {"loss", "token_nll"}
            assert abs(r[key]["loss"] - ref["loss"]) < 1e-5, (key, r[key]["loss"], ref["loss"])
            assert abs(r[key]["token_nll"] - ref["token_nll"]) < 1e-5, (key, r[key]["token_nll"], ref["token_nll"])
        for name, g in r["grads"].items():
            torch.testing.assert_close(g, ref["grads"][name], **TOL, msg=lambda m, n=name: f"grad {n}: {m}")
    assert set().union(*(r["grads"] for r in results)) == set(ref["grads"])


def test_per_sequence_objective_on_one_process():
    _check([engine_step(ParallelState.single())])


@pytest.mark.parametrize("layout", [
    pytest.param(dict(tp=2, sequence_parallel=True), marks=pytest.mark.world_size(2), id="tp2-sp"),
    pytest.param(dict(dp=2), marks=pytest.mark.world_size(2), id="dp2"),
    pytest.param(dict(cp=2), marks=pytest.mark.world_size(2), id="cp2"),
    pytest.param(dict(pp=2, virtual_stages=2), marks=pytest.mark.world_size(2), id="pp2-v2"),
])
def test_per_sequence_objective_under_parallel_layouts(layout):
    config = ParallelConfig(**layout)
    _check(run_distributed(config.world_size, _distributed_case, config))



def _accumulated_case(config: ParallelConfig):
    """The same step as two forward_backward calls (the first not final, the second accumulating), each
    normalised by the whole step's sequence count: the gradients equal one call's."""
    shape = tiny_config()
    parallel = (ParallelState.single() if config.world_size == 1 else
                worker_state(config, num_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
                             num_kv_heads=shape.num_key_value_heads, vocab_size=shape.vocab_size))
    engine = engine_with_initial_weights(parallel)
    mbs = [with_sequence_weights(mb) for mb in microbatches(0, shape.vocab_size)]
    per_rank = len(mbs) // parallel.dp_size
    mine = mbs[parallel.dp_rank * per_rank:(parallel.dp_rank + 1) * per_rank]
    first = engine.forward_backward(mine[:1], per_sequence_loss, sequences(mine), final=False)
    second = engine.forward_backward(mine[1:], per_sequence_loss, sequences(mine), accumulate=True)
    grads = _full(engine.optimizer.full_grads(), engine.chunks, parallel)
    engine.optimizer.remove_hooks()
    return {"loss": first["loss"] + second["loss"], "grads": grads}


@pytest.mark.parametrize("world", [pytest.param(1, id="one-process"),
                                   pytest.param(2, marks=pytest.mark.world_size(2), id="dp2")])
def test_accumulating_calls_equal_one_call(world):
    config = ParallelConfig(dp=world)
    results = [_accumulated_case(config)] if world == 1 else run_distributed(2, _accumulated_case, config)
    ref = oracle()
    for r in results:
        assert abs(r["loss"] - ref["loss"]) < 1e-5, (r["loss"], ref["loss"])
        for name, g in r["grads"].items():
            torch.testing.assert_close(g, ref["grads"][name], **TOL, msg=lambda m, n=name: f"grad {n}: {m}")
