"""Our InternLM2 against an independent implementation: transformers' LlamaForCausalLM.

The model is saved in the Llama layout (which de-interleaves wqkv into q/k/v) and loaded by transformers
from that directory, so the oracle checks the modules, the checkpoint writer and the wqkv layout at once.
"""

import pytest
import torch
from transformers import LlamaForCausalLM

from internlm2.model import load_pretrained, save_pretrained
from tests.test_model_support import KERNEL_CHOICES, random_ids, random_model, tiny_config

ATOL = 1e-4  # fp32


def hf_oracle(model, tmp_path) -> LlamaForCausalLM:
    save_pretrained(model, tmp_path / "llama", fmt="llama")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32, attn_implementation="eager")
    return hf.eval()


def max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("kernels", KERNEL_CHOICES)
def test_padded_batch_matches_transformers(kernels, tmp_path):
    model = random_model(tiny_config(kernels=kernels))
    hf = hf_oracle(model, tmp_path)
    ids = random_ids((3, 24), model.config.vocab_size)
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[1, 17:] = 0  # right padding
    mask[2, :9] = 0  # left padding
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # HF needs them for left padding; ours derive them
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
    keep = mask.bool()
    assert max_diff(ours[keep], theirs[keep]) <= ATOL
    assert torch.count_nonzero(ours[~keep]) == 0  # padding positions come back as zeros


@pytest.mark.parametrize("kernels", KERNEL_CHOICES)
def test_packed_rows_match_sequences_run_one_by_one(kernels, tmp_path):
    model = random_model(tiny_config(kernels=kernels))
    hf = hf_oracle(model, tmp_path)
    lengths = [5, 1, 19, 8]
    ids = random_ids((sum(lengths),), model.config.vocab_size)
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu_seqlens).logits
        for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            alone = hf(ids[None, start:end]).logits[0]
            assert max_diff(packed[start:end], alone) <= ATOL, f"sequence [{start}, {end})"


def test_dynamic_ntk_beyond_max_position_embeddings_matches_transformers(tmp_path):
    # 40 tokens against max_position_embeddings 16: the RoPE base grows (HF "dynamic" rope scaling).
    model = random_model(tiny_config(max_position_embeddings=16, rope_scaling_factor=2.0))
    hf = hf_oracle(model, tmp_path)
    ids = random_ids((2, 40), model.config.vocab_size)
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf(ids).logits
        plain = random_model_copy_without_scaling(model)(ids).logits
    assert max_diff(ours, theirs) <= ATOL
    assert max_diff(ours, plain) > 1e-2, "the scaled base must change positions beyond the limit"


@pytest.mark.parametrize("kernels", KERNEL_CHOICES)
def test_cached_greedy_generation_beyond_the_limit_matches_transformers(kernels, tmp_path):
    """With dynamic NTK the base changes as decoding passes max_position_embeddings while the cached keys
    keep the base they were rotated with; HF's generate does the same, token for token."""
    from internlm2.model.generation import SamplingParams, generate

    model = random_model(tiny_config(max_position_embeddings=16, kernels=kernels))
    hf = hf_oracle(model, tmp_path)
    prompt = random_ids((10,), model.config.vocab_size)
    ours = generate(model, [prompt.tolist()], SamplingParams(max_new_tokens=20, stop_token_ids=())).tokens[0]
    theirs = hf.generate(prompt[None], attention_mask=torch.ones(1, 10, dtype=torch.long), max_new_tokens=20,
                         do_sample=False, eos_token_id=None, pad_token_id=0)[0, 10:].tolist()
    assert ours == theirs


@pytest.mark.parametrize("kernels", KERNEL_CHOICES)
def test_batched_greedy_generation_matches_transformers_per_prompt(kernels, tmp_path):
    """A batch of prompts of different lengths decodes against cache rows of different lengths (the
    KV-cache attention path); each prompt's tokens equal transformers' generate run on it alone."""
    from internlm2.model.generation import SamplingParams, generate

    model = random_model(tiny_config(kernels=kernels))
    hf = hf_oracle(model, tmp_path)
    prompts = [random_ids((n,), model.config.vocab_size) for n in (1, 23, 70, 9)]
    ours = generate(model, [p.tolist() for p in prompts], SamplingParams(max_new_tokens=24, stop_token_ids=())).tokens
    for prompt, tokens in zip(prompts, ours):
        theirs = hf.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokens == theirs[0, len(prompt):].tolist()


def random_model_copy_without_scaling(model):
    from internlm2.model import InternLM2ForCausalLM

    copy = InternLM2ForCausalLM(model.config.replace(rope_scaling_factor=None)).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def test_llama_checkpoint_from_transformers_loads_into_ours(tmp_path):
    """The other direction: a checkpoint transformers wrote (its own names and config.json) loads, and
    both models agree."""
    from transformers import LlamaConfig

    hf_config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                            rope_theta=10_000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf", kernels="reference").eval()
    ids = random_ids((2, 12), 320)
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) <= ATOL
