"""Communication volume of one training step per collective type, against Megatron's formulas.

Runs one step (forward + backward of every micro-batch, gradient reduction, optimizer step) of an
InternLM2 model on CPU gloo ranks under several layouts, counting every collective through
`internlm2.parallel.comm.CommCounter` (which wraps all collectives and sends of the package), and prints
what rank 0 sends next to what Megatron-LM's analysis predicts for the same layout:

- TP without SP: 4 all-reduces of the activations A = tokens x hidden per layer per micro-batch
  (2 forward after the row-parallel layers, 2 backward at the column-parallel inputs), plus one forward
  (embedding) and one backward (head input) per micro-batch on the first/last stage.
- TP with SP: each of those all-reduces becomes a reduce-scatter + an all-gather of A (same bytes).
- DP (x CP): one all-reduce of the gradients (DDP), or a reduce-scatter of the gradients plus an all-gather of
  the parameters (ZeRO-1); ring wire bytes 2(d-1)/d x the gradient bytes in both cases.
- PP: A (A/tp with SP) forward and A backward per micro-batch across each stage boundary.
- CP (ring attention): each layer passes its local K and V round the ring cp-1 times forward, and in the
  backward K and V again (nothing of theirs is kept from the forward) and their gradients cp-1 times:
  6 (cp-1) x tokens/cp x kv_heads x head_dim per layer per micro-batch (fp32 gradients).

    python -m benchmarks.bench_parallel_comm
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.harness import Report
from internlm2.model import InternLM2ForCausalLM, preset_config
from internlm2.parallel import ParallelConfig, load_full_state_dict
from internlm2.parallel.comm import CommCounter
from internlm2.parallel.optimizer import DistributedOptimizer
from internlm2.parallel.pipeline import local_stages, run_pipeline
from tests.distributed.spawn import run_distributed, shutdown_pool, worker_state

MODEL = dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_layers=4, num_attention_heads=8,
             num_key_value_heads=4, kernels="reference")
TOKENS = 512  # per micro-batch: two packed sequences
MICROBATCHES = 4  # per step, split over DP
LAYOUTS = {  # name: (ParallelConfig, optimizer mode)
    "tp2": (ParallelConfig(tp=2), "ddp"),
    "tp2 sp": (ParallelConfig(tp=2, sequence_parallel=True), "ddp"),
    "dp2 ddp": (ParallelConfig(dp=2), "ddp"),
    "dp2 zero1": (ParallelConfig(dp=2), "zero1"),
    "pp2": (ParallelConfig(pp=2), "ddp"),
    "cp2": (ParallelConfig(cp=2), "ddp"),
    "tp2 pp2 dp2 sp zero1": (ParallelConfig(tp=2, pp=2, dp=2, sequence_parallel=True), "zero1"),
}
MiB = 2 ** 20


def _group_names(parallel) -> dict:
    names = {}
    for name in ("tp", "cp", "dp_cp", "zero", "zero_replica", "pp_bwd", "pp"):  # later names win on shared groups
        group = getattr(parallel, f"{name}_group")
        if group is not None:
            names[group] = {"dp_cp": "dp", "zero": "dp", "zero_replica": "dp replicas", "pp_bwd": "pp"}.get(name, name)
    return names


def _step(config: ParallelConfig, mode: str) -> dict:
    model_config = preset_config("internlm2-tiny", **MODEL)
    parallel = worker_state(config)
    torch.manual_seed(0)
    full = InternLM2ForCausalLM(model_config).state_dict()
    chunks = []
    for spec in local_stages(model_config.num_layers, parallel):
        stage = InternLM2ForCausalLM(model_config, parallel, layer_ids=spec.layer_ids,
                                     with_embedding=spec.with_embedding, with_head=spec.with_head)
        load_full_state_dict(stage, {k: v for k, v in full.items() if k in stage.state_dict()}, parallel)
        chunks.append(stage)
    opt = DistributedOptimizer([(n, p) for c in chunks for n, p in c.named_parameters()], parallel, mode=mode)
    g = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, TOKENS // 2, TOKENS], dtype=torch.int32)
    batches = [(torch.randint(0, MODEL["vocab_size"], (TOKENS,), generator=g), cu)
               for _ in range(MICROBATCHES // parallel.dp_size)]

    def forward_step(chunk_index, stage, hidden, mb):
        ids, cu_seqlens = mb
        inputs = {"input_ids": ids} if hidden is None else {"hidden_states": hidden}
        if stage.with_head:
            return stage(**inputs, cu_seqlens=cu_seqlens, labels=torch.roll(ids, -1)).loss
        return stage(**inputs, cu_seqlens=cu_seqlens).hidden_states

    with CommCounter() as counter:
        run_pipeline(parallel, chunks, batches, forward_step)
        opt.step()
    names = _group_names(parallel)
    out = {}
    for (kind, group), calls in counter.calls.items():
        key = (names.get(group, "?"), kind)
        c, p, w = out.get(key, (0, 0, 0.0))
        out[key] = (c + calls, p + counter.payload[(kind, group)], w + counter.wire[(kind, group)])
    params = sum(p.numel() for c in chunks for p in c.parameters())
    layers = sum(len(s.layer_ids) for s in local_stages(model_config.num_layers, parallel))
    return {"counts": out, "params": params, "layers": layers, "embedding": parallel.is_first_stage,
            "head": parallel.is_last_stage, "rank": parallel.rank}


def megatron(config: ParallelConfig, mode: str, rank0: dict) -> dict:
    """(group, kind) -> (calls, payload bytes) predicted for rank 0 by Megatron-LM's analysis."""
    m = MICROBATCHES // config.dp
    act = TOKENS * MODEL["hidden_size"] * 4
    boundary = rank0["embedding"] + rank0["head"]
    tp_calls = m * (4 * rank0["layers"] + boundary)
    pred = {}
    if config.tp > 1:
        if config.sequence_parallel:
            pred[("tp", "all_gather")] = (tp_calls, tp_calls * act)
            pred[("tp", "reduce_scatter")] = (tp_calls, tp_calls * act)
        else:
            pred[("tp", "all_reduce")] = (tp_calls, tp_calls * act)
    grads = rank0["params"] * 4
    if config.dp * config.cp > 1:  # gradients are averaged over DP x CP
        if mode == "ddp":
            pred[("dp", "all_reduce")] = (None, grads)
        else:
            pred[("dp", "reduce_scatter")] = (None, grads)
            pred[("dp", "all_gather")] = (None, grads)
    if config.cp > 1:
        head_dim = MODEL["hidden_size"] // MODEL["num_attention_heads"]
        kv = TOKENS // config.cp * MODEL["num_key_value_heads"] * head_dim * 4
        pred[("cp", "send")] = (None, m * rank0["layers"] * 6 * (config.cp - 1) * kv)
    if config.pp > 1:
        sent = act // (config.tp if config.sequence_parallel else 1)
        pred[("pp", "send")] = (None, m * sent)  # rank 0 (first stage): forward sends only
    return pred


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    report = Report("parallel_comm", ["layout", "group", "collective", "calls", "payload MiB", "wire MiB",
                                      "Megatron calls", "Megatron payload MiB", "measured / Megatron"])
    report.notes += [
        f"model: InternLM2 {MODEL}, fp32, {TOKENS} tokens per micro-batch, {MICROBATCHES} micro-batches per "
        "step (split over DP); numbers are rank 0's sends for one step",
        "payload: tensor bytes handed to the collective; wire: ring-algorithm bytes one rank sends",
        "DP predictions use this rank's parameter count (padding to the shard count adds a few bytes)",
        "the model's feed-forward enters the TP region once for w1 and w3 (`column_parallel_input`), so TP "
        "activations take exactly Megatron's 4 collectives per layer",
        "small all-reduces (cross-entropy statistics, grad norm, SP norm-weight gradients) are not in the "
        "activation formulas; they show as their own rows where their collective type differs",
    ]
    for name, (config, mode) in LAYOUTS.items():
        results = run_distributed(config.world_size, _step, config, mode, timeout_s=600)
        rank0 = results[0]
        pred = megatron(config, mode, rank0)
        for key in sorted(set(rank0["counts"]) | set(pred)):
            calls, payload, wire = rank0["counts"].get(key, (0, 0, 0.0))
            p_calls, p_bytes = pred.get(key, ("", None))
            ratio = f"{payload / p_bytes:.3f}" if p_bytes else ""
            report.add(name, *key, calls, round(payload / MiB, 3), round(wire / MiB, 3),
                       "" if p_calls is None else p_calls, "" if p_bytes is None else round(p_bytes / MiB, 3), ratio)
    shutdown_pool()
    report.write()


if __name__ == "__main__":
    main()
