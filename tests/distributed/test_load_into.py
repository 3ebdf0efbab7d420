"""`load_into` (each rank streams its tensor-parallel shards of an HF checkpoint into its pipeline chunks)
gives bitwise the parameters of the path the trainer took before: the whole model built in fp32 on the
CPU, each chunk's shards then cut from it. On 2 gloo ranks, tp=2 and pp=2 (plain and interleaved), both
checkpoint layouts, casting either way between the stored and the trained dtype."""

import pytest
import torch

from internlm2.model import InternLM2ForCausalLM, load_into, load_pretrained, save_pretrained
from internlm2.model.checkpoint_files import CheckpointError
from internlm2.parallel import ParallelConfig, load_full_state_dict
from internlm2.parallel.pipeline import local_stages
from tests.distributed.spawn import run_distributed, worker_state
from tests.test_model_support import random_model, tiny_config

CONFIG = tiny_config(num_layers=4)  # 4 layers: pp=2 with 2 virtual stages holds one layer per chunk


def whole_model_then_shard(chunks, directory, parallel) -> None:
    """The trainer's former `init_from` (the baseline of benchmarks/bench_init_from.py): every rank builds
    the whole model in fp32 on the CPU, then copies each chunk's shards out of it."""
    full = load_pretrained(directory, dtype=torch.float32, kernels="reference").state_dict()
    for chunk in chunks:
        names = dict(chunk.named_parameters())
        load_full_state_dict(chunk, {k: v for k, v in full.items() if k in names}, parallel)


def build_chunks(config, parallel, dtype, device=None) -> list[InternLM2ForCausalLM]:
    """This rank's pipeline chunks, as the trainer builds them."""
    return [InternLM2ForCausalLM(config, parallel, layer_ids=s.layer_ids, with_embedding=s.with_embedding,
                                 with_head=s.with_head, dtype=dtype, device=device)
            for s in local_stages(config.num_layers, parallel)]


def compare_rank(directory, layout, dtype):
    tp, pp, virtual = layout
    parallel = worker_state(ParallelConfig(tp=tp, pp=pp, virtual_stages=virtual))
    streamed, baseline = build_chunks(CONFIG, parallel, dtype), build_chunks(CONFIG, parallel, dtype)
    assert load_into(streamed, directory, parallel, config=CONFIG) == CONFIG.replace(kernels="fused")
    whole_model_then_shard(baseline, directory, parallel)
    compared = []
    for a, b in zip(streamed, baseline):
        for (name, x), y in zip(a.named_parameters(), b.parameters()):
            assert x.dtype == y.dtype == dtype and torch.equal(x, y), name
            compared.append((name, x.numel(), getattr(x, "tensor_parallel_dim", None) is not None))
    return compared


@pytest.mark.parametrize("layout", [(2, 1, 1), (1, 2, 1), (1, 2, 2)], ids=["tp2", "pp2", "pp2-interleaved"])
@pytest.mark.parametrize("fmt,stored,trained", [("internlm2", torch.bfloat16, torch.float32),
                                                ("llama", torch.float32, torch.bfloat16)],
                         ids=["internlm2-bf16-into-fp32", "llama-fp32-into-bf16"])
def test_streamed_shards_equal_the_whole_model_path(layout, fmt, stored, trained, tmp_path):
    model = random_model(CONFIG, dtype=stored)
    save_pretrained(model, tmp_path / "hf", fmt=fmt)
    results = run_distributed(2, compare_rank, str(tmp_path / "hf"), layout, trained)
    # Between them the ranks hold every parameter: its TP shards add up to it, a replicated one is whole.
    held = {}
    for rank in results:
        for name, numel, sharded in rank:
            held[name] = held.get(name, 0) + numel if sharded else numel
    assert held == {name: p.numel() for name, p in model.named_parameters()}


def test_a_checkpoint_of_another_shape_is_refused_naming_the_fields(tmp_path):
    save_pretrained(random_model(CONFIG), tmp_path / "hf")
    other = CONFIG.replace(vocab_size=384, intermediate_size=192)
    chunks = [InternLM2ForCausalLM(other)]
    before = [p.clone() for p in chunks[0].parameters()]
    with pytest.raises(CheckpointError, match=r"config\.json describes another model shape: vocab_size 320 "
                                              r"\(model: 384\), intermediate_size 160 \(model: 192\)"):
        load_into(chunks, tmp_path / "hf", config=other)
    assert all(torch.equal(a, b) for a, b in zip(before, chunks[0].parameters()))  # nothing was copied
    # Without the config, the first parameter whose shape differs is named.
    with pytest.raises(CheckpointError, match=r"model\.tok_embeddings\.weight of shape \(384, 64\) has shape "
                                              r"\(320, 64\) in the checkpoint"):
        load_into(chunks, tmp_path / "hf")
