"""The reward model's objective on the engine under TP+SP, DP, CP (padded pieces) and PP equals one plain
process: scores as hidden states times v_head at each sequence's last token (computed through the causal
LM's backbone, not the scalar head), the loss of losses.py, per-condition accuracy counted by hand."""

import pytest
import torch

from internlm2.model import InternLM2ForCausalLM, InternLM2ForScore
from internlm2.parallel import ParallelConfig, ParallelState, load_full_state_dict
from internlm2.rlhf.losses import reward_model_loss
from internlm2.rlhf.reward_data import ScoredPair, collate_pairs
from internlm2.rlhf.reward_model import RewardModelTask
from internlm2.train.data_setup import pad_for_layout
from internlm2.train.engine import Engine
from tests.distributed.spawn import run_distributed, worker_state
from tests.distributed.training_harness import _full, initial_weights, tiny_config

CONDITIONS = ["short", "long"]
REWARD = 5
TOL = dict(rtol=1e-5, atol=1e-5)  # as the layout tests: fp32 sums in another order


def pairs() -> list[list[ScoredPair]]:
    """Four micro-batches of pairs of odd lengths (context parallelism pads them), conditions mixed."""
    g = torch.Generator().manual_seed(3)
    out = []
    for mb in range(4):
        group = []
        for p in range(2):
            c, r = (int(n) for n in torch.randint(3, 11, (2,), generator=g))
            chosen = tuple(torch.randint(10, 128, (c,), generator=g).tolist()) + (REWARD,)
            rejected = tuple(torch.randint(10, 128, (r,), generator=g).tolist()) + (REWARD,)
            group.append(ScoredPair(chosen, rejected, [None, "short", "long"][(mb + p) % 3]))
        out.append(group)
    return out


def weights():
    """The layout tests' initial backbone and a random scalar head."""
    full = initial_weights(tiny_config())
    full.pop("output.weight")
    full["v_head.weight"] = 0.1 * torch.randn(1, tiny_config().hidden_size, generator=torch.Generator().manual_seed(0))
    return full


def oracle():
    config = tiny_config()
    w = weights()
    lm = InternLM2ForCausalLM(config)
    lm.load_state_dict({**{k: v for k, v in w.items() if k != "v_head.weight"},
                        "output.weight": torch.zeros(config.vocab_size, config.hidden_size)})
    v_head = w["v_head.weight"].clone().requires_grad_(True)
    losses, correct, by_condition = [], [], {}
    for group in pairs():
        for pair in group:
            scores = []
            for seq in (pair.chosen, pair.rejected):
                hidden = lm(torch.tensor(seq), cu_seqlens=torch.tensor([0, len(seq)], dtype=torch.int32),
                            return_logits=False).hidden_states
                scores.append((hidden[-1] @ v_head[0]).reshape(1))
            total, _, _ = reward_model_loss(*scores)
            losses.append(total)
            right = float(scores[0] > scores[1])
            correct.append(right)
            by_condition.setdefault(pair.condition or "none", []).append(right)
    loss = torch.cat(losses).mean()
    loss.backward()
    grads = {n: p.grad for n, p in lm.named_parameters() if n != "output.weight"}
    grads["v_head.weight"] = v_head.grad
    return {"loss": loss.item(), "accuracy": sum(correct) / len(correct), "grads": grads,
            **{f"accuracy/{k}": sum(v) / len(v) for k, v in by_condition.items()}}


def engine_step(parallel: ParallelState):
    config, full = tiny_config(), weights()

    def load(chunks):
        for chunk in chunks:
            names = {n for n, _ in chunk.named_parameters()}
            load_full_state_dict(chunk, {k: v for k, v in full.items() if k in names}, parallel)

    engine = Engine.build(InternLM2ForScore, config, parallel, dtype=torch.float32, device=torch.device("cpu"),
                          seed=0, optim=dict(lr=1e-3), weights=load)
    mbs = [collate_pairs(group, CONDITIONS) for group in pairs()]
    mbs = [pad_for_layout(mb, parallel, 0, fills={"reward_slots": -1}) for mb in mbs]
    per_rank = len(mbs) // parallel.dp_size
    mine = mbs[parallel.dp_rank * per_rank:(parallel.dp_rank + 1) * per_rank]
    task = RewardModelTask(CONDITIONS)
    metrics = engine.forward_backward(mine, task.loss, task.normalizer(mine))
    grads = _full(engine.optimizer.full_grads(), engine.chunks, parallel)
    engine.optimizer.remove_hooks()
    return {"metrics": metrics, "grads": grads}


def _case(config):
    shape = tiny_config()
    return engine_step(worker_state(config, num_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
                                    num_kv_heads=shape.num_key_value_heads, vocab_size=shape.vocab_size))


def _check(results):
    ref = oracle()
    for r in results:
        m = r["metrics"]
        for key in ("loss", "accuracy", "accuracy/short", "accuracy/long", "accuracy/none"):
            assert abs(m[key] - ref[key]) <= 1e-5 * max(1.0, abs(ref[key])), (key, m[key], ref[key])
        for name, g in r["grads"].items():
            torch.testing.assert_close(g, ref["grads"][name], **TOL, msg=lambda s, n=name: f"grad {n}: {s}")
    assert set().union(*(r["grads"] for r in results)) == set(ref["grads"])


def test_reward_objective_on_one_process():
    _check([engine_step(ParallelState.single())])


@pytest.mark.parametrize("layout", [
    pytest.param(dict(tp=2, sequence_parallel=True), marks=pytest.mark.world_size(2), id="tp2-sp"),
    pytest.param(dict(dp=2), marks=pytest.mark.world_size(2), id="dp2"),
    pytest.param(dict(cp=2), marks=pytest.mark.world_size(2), id="cp2"),
    pytest.param(dict(pp=2), marks=pytest.mark.world_size(2), id="pp2"),
])
def test_reward_objective_under_parallel_layouts(layout):
    config = ParallelConfig(**layout)
    _check(run_distributed(config.world_size, _case, config))
