"""The model under tensor and context parallelism (2 gloo ranks on CPU) against one process.

TP: each rank loads its shards of an HF checkpoint, the sharded model computes what one process computes
(logits, loss, greedy generation), and saving gathers the shards back into the same files.
CP: each rank computes its zigzag share of the packed row; logits, loss and gradients add up to one
process's, with dynamic NTK active (sequences longer than max_position_embeddings)."""

import pytest
import torch

from internlm2.model import load_pretrained, save_pretrained
from internlm2.model.generation import SamplingParams, generate
from internlm2.parallel import ParallelConfig
from internlm2.parallel.context_parallel import zigzag_split
from tests.distributed.spawn import run_distributed, worker_state
from tests.test_model_checkpoint import assert_bitwise_equal, read_all
from tests.test_model_support import random_ids, random_model, tiny_config

LENGTHS = (5, 8, 3)  # 16 tokens: divisible by tp=2, as sequence parallelism needs
PROMPTS = [[5, 6, 7], [9] * 11]


def packed_row(lengths, seed):
    """A packed row: ids, cu_seqlens and next-token labels that stop at every sequence's end."""
    ids = random_ids((sum(lengths),), 320, seed=seed)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    labels = torch.roll(ids, -1)
    labels[cu[1:].long() - 1] = -100
    return ids, cu, labels


def batch():
    return packed_row(LENGTHS, seed=11)


def run_rank(directory, out_directory, sequence_parallel):
    parallel = worker_state(ParallelConfig(tp=2, sequence_parallel=sequence_parallel))
    model = load_pretrained(directory, parallel=parallel, kernels="reference").eval()
    wqkv = model.model.layers["0"].attention.wqkv.weight
    assert wqkv.shape[0] == model.config.qkv_size // 2  # this rank's KV groups only
    ids, cu, labels = batch()
    with torch.no_grad():
        out = model(ids, cu_seqlens=cu, labels=labels, return_logits=True)
    result = {"logits": out.logits, "loss": out.loss}
    if not sequence_parallel:
        result["tokens"] = generate(model, PROMPTS, SamplingParams(max_new_tokens=12, stop_token_ids=())).tokens
        save_pretrained(model, out_directory, fmt="llama")
    return result


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_tensor_parallel_model_matches_one_process(sequence_parallel, tmp_path):
    single = random_model(tiny_config())
    save_pretrained(single, tmp_path / "ckpt")
    ids, cu, labels = batch()
    with torch.no_grad():
        expected = single(ids, cu_seqlens=cu, labels=labels, return_logits=True)
    results = run_distributed(2, run_rank, str(tmp_path / "ckpt"), str(tmp_path / "saved"), sequence_parallel)
    for rank in results:
        torch.testing.assert_close(rank["logits"], expected.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(rank["loss"], expected.loss, rtol=0, atol=1e-5)
    if not sequence_parallel:
        tokens = generate(single, PROMPTS, SamplingParams(max_new_tokens=12, stop_token_ids=())).tokens
        assert all(rank["tokens"] == tokens for rank in results)
        save_pretrained(single, tmp_path / "single", fmt="llama")
        assert_bitwise_equal(read_all(tmp_path / "saved"), read_all(tmp_path / "single"))


CP_LENGTHS = (8, 4, 12)  # multiples of 2 * cp


def cp_batch():
    return packed_row(CP_LENGTHS, seed=12)


def run_cp_rank(directory):
    parallel = worker_state(ParallelConfig(cp=2))
    model = load_pretrained(directory, parallel=parallel, kernels="reference")
    ids, cu, labels = cp_batch()
    out = model(ids, cu_seqlens=cu, labels=labels, loss_reduction="sum", return_logits=True)
    out.loss.backward()
    return {"logits": out.logits.detach(), "loss": out.loss.detach(),
            "index": zigzag_split(cu, 2, parallel.cp_rank).index,
            "grads": {n: p.grad for n, p in model.named_parameters()}}


def test_context_parallel_model_matches_one_process(tmp_path):
    single = random_model(tiny_config(max_position_embeddings=8), std=0.05)  # 12 > 8: NTK scaling active
    save_pretrained(single, tmp_path / "ckpt")
    ids, cu, labels = cp_batch()
    single.train()
    expected = single(ids, cu_seqlens=cu, labels=labels, loss_reduction="sum", return_logits=True)
    expected.loss.backward()
    results = run_distributed(2, run_cp_rank, str(tmp_path / "ckpt"))
    assert sorted(torch.cat([r["index"] for r in results]).tolist()) == list(range(len(ids)))
    for rank in results:
        torch.testing.assert_close(rank["logits"], expected.logits.detach()[rank["index"]], rtol=0, atol=1e-5)
    torch.testing.assert_close(sum(r["loss"] for r in results), expected.loss.detach(), rtol=1e-5, atol=1e-5)
    for name, param in single.named_parameters():
        torch.testing.assert_close(sum(r["grads"][name] for r in results), param.grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"grad {n}: {m}")
