"""HF checkpoints under tensor parallelism (2 gloo ranks on CPU): each rank loads its shards, the sharded
model computes what one process computes (logits, loss, greedy generation), and saving gathers the
shards back into the same files."""

import pytest
import torch

from internlm2.model import InternLM2ForCausalLM
from internlm2.model.generation import SamplingParams, generate
from internlm2.parallel import ParallelConfig
from tests.distributed.spawn import run_distributed, worker_state
from tests.test_model_checkpoint import assert_bitwise_equal, read_all
from tests.test_model_support import random_ids, random_model, tiny_config

LENGTHS = (5, 8, 3)  # 16 tokens: divisible by tp=2, as sequence parallelism needs
PROMPTS = [[5, 6, 7], [9] * 11]


def batch():
    ids = random_ids((sum(LENGTHS),), 320, seed=11)
    cu = torch.tensor([0, *LENGTHS]).cumsum(0).to(torch.int32)
    labels = torch.roll(ids, -1)
    labels[cu[1:].long() - 1] = -100
    return ids, cu, labels


def run_rank(directory, out_directory, sequence_parallel):
    parallel = worker_state(ParallelConfig(tp=2, sequence_parallel=sequence_parallel))
    model = InternLM2ForCausalLM.from_pretrained(directory, parallel=parallel, kernels="reference").eval()
    wqkv = model.model.layers["0"].attention.wqkv.weight
    assert wqkv.shape[0] == model.config.qkv_size // 2  # this rank's KV groups only
    ids, cu, labels = batch()
    with torch.no_grad():
        out = model(ids, cu_seqlens=cu, labels=labels, return_logits=True)
    result = {"logits": out.logits, "loss": out.loss}
    if not sequence_parallel:
        result["tokens"] = generate(model, PROMPTS, SamplingParams(max_new_tokens=12, stop_token_ids=())).tokens
        model.save_pretrained(out_directory, format="llama")
    return result


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_tensor_parallel_model_matches_one_process(sequence_parallel, tmp_path):
    single = random_model(tiny_config())
    single.save_pretrained(tmp_path / "ckpt")
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
        single.save_pretrained(tmp_path / "single", format="llama")
        assert_bitwise_equal(read_all(tmp_path / "saved"), read_all(tmp_path / "single"))
