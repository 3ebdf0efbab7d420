"""The memory estimate against counts made by hand and by the model itself, and the refusal that names
what does not fit."""

import pytest
import torch

from internlm2.eval import EvalError
from internlm2.eval.memory import check_fits, estimate
from internlm2.model import InternLM2ForCausalLM
from tests.test_model_support import tiny_config


def test_weights_and_kv_cache_are_counted_exactly():
    config = tiny_config()
    need = estimate(config, length=1000, batch=3, new_tokens=24, dtype=torch.bfloat16)
    params = sum(p.numel() for p in InternLM2ForCausalLM(config, device="meta").parameters())
    assert need.weights == params * 2
    # keys and values, per layer, per sequence, per cached token: kv heads x head dim bf16 numbers
    assert need.kv_cache == 2 * config.num_layers * 3 * (1000 + 24) * config.num_key_value_heads * config.head_size * 2
    assert estimate(config, length=1000, batch=3, new_tokens=24, dtype=torch.bfloat16, kv_cache=False).kv_cache == 0


def test_activations_grow_with_the_tokens_and_the_reference_attention_with_the_square():
    fused = tiny_config(kernels="fused")
    small = estimate(fused, length=1000, batch=1, new_tokens=0, dtype=torch.float32).activations
    large = estimate(fused, length=4000, batch=1, new_tokens=0, dtype=torch.float32).activations
    assert 3.9 < large / small < 4.0  # linear in tokens (the last position's logits do not grow)
    reference = estimate(tiny_config(), length=4000, batch=1, new_tokens=0, dtype=torch.float32).activations
    assert reference - large == 2 * fused.num_attention_heads * 4000 * 4000 * 4


def test_what_does_not_fit_is_refused_with_the_estimate():
    need = estimate(tiny_config(), length=1 << 20, batch=2, new_tokens=8, dtype=torch.float32)
    with pytest.raises(EvalError, match=r"length 1048576 with batch size 2 needs about .* GiB \(weights .*, KV cache "
                                        r".*\), more than the 1.0 MiB free on cpu"):
        check_fits(need, torch.device("cpu"), "length 1048576 with batch size 2", available=1 << 20)
    check_fits(need, torch.device("cpu"), "fits", available=need.total)
