"""Train the tiny InternLM2 for a few steps under a parallel layout, and the same on one process.

The single-process reference is independent of `internlm2.parallel`'s training code: one full model,
`torch.optim.AdamW`, `torch.nn.utils.clip_grad_norm_`, gradient accumulation over the same micro-batches.
The distributed run builds this rank's pipeline chunks with `local_stages`, loads their shards of the same
initial weights, runs `run_pipeline` and steps `DistributedOptimizer`, with the engine's contract: each
rank differentiates its loss share divided by the step's global normalizer (here the number of
micro-batches of the whole step), and the optimizer sums gradients over DP x CP. Both report per-step
losses (mean over micro-batches), the gradient norm of each step, the gradients of step 1 and the final
weights (full tensors, by HF name).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from internlm2.model import InternLM2ForCausalLM, preset_config
from internlm2.parallel import ParallelConfig, ParallelState, comm, full_state_dict, load_full_state_dict
from internlm2.parallel.optimizer import DistributedOptimizer, default_no_decay
from internlm2.parallel.pipeline import forward_only, local_stages, run_pipeline
from internlm2.parallel.tensor_parallel import gather_tensor
from internlm2.train.engine import Engine

STEPS = 3
LR, BETAS, EPS, WEIGHT_DECAY = 1e-2, (0.9, 0.95), 1e-8, 0.1
MAX_GRAD_NORM = 0.5  # below the tiny model's first norms (~1-3), so clipping is exercised
# Packed rows of varying length (cu_seqlens); every sequence a multiple of 4 tokens, so sequence parallel
# over 2 ranks and context parallel's zigzag split over 2 ranks (2 * cp chunks per sequence) both apply.
ROWS = [(0, 4, 16), (0, 12), (0, 8), (0, 8, 12, 16)]


def tiny_config():
    """The issue's tiny InternLM2: 4 layers, hidden 64, 8 heads, 4 KV heads; reference (plain torch) ops."""
    return preset_config("internlm2-tiny", num_layers=4, hidden_size=64, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=128, kernels="reference")


@dataclass
class Microbatch:
    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    labels: torch.Tensor


def microbatches(step: int, vocab: int) -> list[Microbatch]:
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for bounds in ROWS:
        cu = torch.tensor(bounds, dtype=torch.int32)
        ids = torch.randint(0, vocab, (bounds[-1],), generator=g)
        labels = torch.roll(ids, -1)
        labels[cu[1:].long() - 1] = -100  # no target after the last token of each packed sequence
        out.append(Microbatch(ids, cu, labels))
    return out


def initial_weights(config) -> dict[str, torch.Tensor]:
    model = InternLM2ForCausalLM(config)
    model.reset_parameters(torch.Generator().manual_seed(0))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def stage_loss(stage: InternLM2ForCausalLM, hidden: torch.Tensor | None, mb: Microbatch,
               normalizer: int = 1) -> torch.Tensor:
    """One model chunk on one micro-batch: on the chunk with the head, this rank's part of the row's mean
    token loss divided by `normalizer`, else its hidden states.

    Under context parallelism each CP rank holds a share of the row's tokens (ignored positions unevenly
    spread), so its part is (its loss sum) / (the row's target count): the parts add up over CP ranks."""
    inputs = {"input_ids": mb.input_ids} if hidden is None else {"hidden_states": hidden}
    if not stage.with_head:
        return stage(**inputs, cu_seqlens=mb.cu_seqlens).hidden_states
    loss_sum = stage(**inputs, cu_seqlens=mb.cu_seqlens, labels=mb.labels, loss_reduction="sum").loss
    return loss_sum / (mb.labels != -100).sum() / normalizer


def reference_run(steps: int = STEPS) -> dict:
    """One process: full model, torch.optim.AdamW, torch's clip_grad_norm_."""
    torch.manual_seed(0)
    config = tiny_config()
    model = InternLM2ForCausalLM(config)
    model.load_state_dict(initial_weights(config))
    named = list(model.named_parameters())
    decay = [p for n, p in named if not default_no_decay(n, p)]
    no_decay = [p for n, p in named if default_no_decay(n, p)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=EPS, foreach=False)
    result = {"losses": [], "norms": []}
    for step in range(steps):
        opt.zero_grad()
        mbs = microbatches(step, config.vocab_size)
        losses = []
        for mb in mbs:
            loss = stage_loss(model, None, mb)
            (loss / len(mbs)).backward()
            losses.append(loss.detach())
        if step == 0:
            result["grads"] = {n: p.grad.clone() for n, p in named}
        result["norms"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM).item())
        opt.step()
        result["losses"].append(torch.stack(losses).mean().item())
    result["weights"] = {n: p.detach().clone() for n, p in named}
    with torch.no_grad():
        result["eval_losses"] = [stage_loss(model, None, mb).item() for mb in microbatches(steps, config.vocab_size)]
    return result


def engine_with_initial_weights(parallel: ParallelState) -> Engine:
    """An engine (AdamW, ZeRO-1) of the tiny model on this rank's chunks, from `initial_weights`."""
    config = tiny_config()
    full = initial_weights(config)

    def load(chunks):
        for chunk in chunks:
            names = {n for n, _ in chunk.named_parameters()}
            load_full_state_dict(chunk, {k: v for k, v in full.items() if k in names}, parallel)

    return Engine.build(InternLM2ForCausalLM, config, parallel, dtype=torch.float32, device=torch.device("cpu"),
                        seed=0, optim=dict(lr=1e-3, mode="zero1"), weights=load)


def _full(name_to_shard: dict[str, torch.Tensor], modules, parallel: ParallelState) -> dict[str, torch.Tensor]:
    params = {n: p for m in modules for n, p in m.named_parameters()}
    out = {}
    for name, t in name_to_shard.items():
        dim = getattr(params[name], "tensor_parallel_dim", None)
        out[name] = t if dim is None else gather_tensor(t, parallel, dim)
    return out


def distributed_run(config: ParallelConfig, mode: str = "zero1", steps: int = STEPS, bucket_elements: int = 4096,
                    reload_as: str | None = None, overlap: bool = False) -> dict:
    """This rank's part of the same training under `config`: per-step losses (last-stage ranks), norms,
    step-1 gradients, final weights (full tensors of this rank's stages) and the evaluation losses of the
    trained model through `forward_only` (last-stage ranks). With `reload_as`, the optimizer state is
    taken out after step 1 (`per_param_state`) and loaded into a new optimizer of that mode. With
    `overlap`, gradient reduction starts during each chunk's last backward (`grad_sync`)."""
    from tests.distributed.spawn import worker_state

    model_config = tiny_config()
    parallel = worker_state(config, num_layers=model_config.num_layers,
                            num_attention_heads=model_config.num_attention_heads,
                            num_kv_heads=model_config.num_key_value_heads, vocab_size=model_config.vocab_size)
    torch.manual_seed(0)
    full = initial_weights(model_config)
    chunks = []
    for spec in local_stages(model_config.num_layers, parallel):
        stage = InternLM2ForCausalLM(model_config, parallel, layer_ids=spec.layer_ids,
                                     with_embedding=spec.with_embedding, with_head=spec.with_head)
        names = {n for n, _ in stage.named_parameters()}
        load_full_state_dict(stage, {k: v for k, v in full.items() if k in names}, parallel)
        chunks.append(stage)
    named = [(n, p) for c in chunks for n, p in c.named_parameters()]
    opt = DistributedOptimizer(named, parallel, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, mode=mode,
                               bucket_elements=bucket_elements)
    result = {"losses": [], "norms": []}
    for step in range(steps):
        opt.zero_grad()
        mbs = microbatches(step, model_config.vocab_size)
        per_rank = len(mbs) // parallel.dp_size
        mine = mbs[parallel.dp_rank * per_rank:(parallel.dp_rank + 1) * per_rank]
        losses = run_pipeline(parallel, chunks, mine, lambda c, m, x, mb: stage_loss(m, x, mb, len(mbs)),
                              grad_sync=opt.grad_sync if overlap else None)
        if overlap and comm.group_size(parallel.dp_cp_group) > 1:  # every bucket started inside backward
            assert opt.launched_in_backward == len(opt.buckets), (opt.launched_in_backward, len(opt.buckets))
        if losses:  # this rank's part of the step's mean loss
            result["losses"].append(torch.stack(losses).sum().item())
        if step == 0:
            result["grads"] = _full(opt.full_grads(), chunks, parallel)
        result["norms"].append(opt.step(MAX_GRAD_NORM).item())
        if step == 0 and reload_as is not None:
            state = opt.per_param_state()
            opt.remove_hooks()
            opt = DistributedOptimizer(named, parallel, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                       mode=reload_as, bucket_elements=bucket_elements // 3 + 1)
            opt.load_per_param_state(state, opt_steps := 1)
            assert opt.step_count == opt_steps
    opt.remove_hooks()
    per_rank = len(microbatches(steps, model_config.vocab_size)) // parallel.dp_size
    evaluation = microbatches(steps, model_config.vocab_size)[parallel.dp_rank * per_rank:][:per_rank]
    result["eval_losses"] = [x.item() for x in forward_only(parallel, chunks, evaluation,
                                                            lambda c, m, x, mb: stage_loss(m, x, mb))]
    result["weights"] = {k: v for c in chunks for k, v in full_state_dict(c, parallel).items()}
    result["coordinate"] = parallel.coordinate
    return result


def merge_ranks(results: list[dict]) -> dict:
    """Per-step losses summed over the last-stage ranks' parts (DP and CP; TP ranks hold copies: TP rank
    0's), norms (identical on all ranks: take rank 0's after checking), gradients and weights merged
    over pipeline stages."""
    parts = [r for r in results if r["losses"] and r["coordinate"][3] == 0]
    steps = len(results[0]["norms"])
    by_dp: dict[int, list] = {}  # DP rank -> eval losses of its last-stage ranks (CP shares)
    for r in parts:
        by_dp.setdefault(r["coordinate"][1], []).append(torch.tensor(r["eval_losses"]))
    eval_ranks = {d: torch.stack(v).sum(0).tolist() for d, v in by_dp.items()}
    merged = {
        "losses": [sum(r["losses"][s] for r in parts) for s in range(steps)],
        "eval_losses": [x for d in sorted(eval_ranks) for x in eval_ranks[d]],
        "norms": results[0]["norms"],
        "all_norms": [r["norms"] for r in results],
        "grads": {}, "weights": {},
    }
    for r in results:
        merged["grads"].update(r["grads"])
        merged["weights"].update(r["weights"])
    return merged
