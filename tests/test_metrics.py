"""FLOPs per token against an independent count (torch's FlopCounterMode on a `transformers` Llama) and the
published anchors (PaLM/nanoGPT 6N + 12 L H Q T, Megatron's formula, torchtitan's and Megatron's reported
MFU); the peak table, MFU's ceiling, and the step timers."""

import math
import os
import random
import time

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from internlm2.train.flops import (
    DecoderShape, attention_flops, document_lengths, forward_flops, training_flops, training_flops_per_token,
)
from internlm2.train.metrics import (
    MEASURED_KEY, MFU_KEY, MFUError, Peak, device_peak, gpu_peak, measure_matmul_flops, mfu, peak_memory_bytes,
    throughput,
)
from internlm2.train.timers import Timers

# --------------------------------------------------------------------------- an independent FLOP count


def _random_shape(rng: random.Random) -> DecoderShape:
    kv = rng.choice([1, 2, 3])
    heads = kv * rng.choice([1, 2, 4])  # GQA ratios 1/2/4
    return DecoderShape(
        num_layers=rng.randint(1, 3),
        hidden_size=heads * rng.choice([4, 6, 8]),  # transformers wants a multiple of the heads
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=rng.choice([4, 6, 8]),  # and heads x head_dim need not equal the hidden size
        intermediate_size=rng.choice([40, 56, 72]),
        vocab_size=rng.randint(50, 120),
    )


def _hf_llama(shape: DecoderShape) -> LlamaForCausalLM:
    """InternLM2 is Llama with a fused wqkv (same FLOPs as separate q, k, v); eager attention makes Q K^T and
    P V visible to the counter as bmm, over the full s x s (the causal mask is added, not skipped)."""
    config = LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _counted(model: LlamaForCausalLM, length: int, backward: bool = True) -> dict[str, int]:
    """FLOPs torch counts for one document of `length` tokens: {"mm": linear layers, "bmm": attention}."""
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids).logits
        if backward:
            logits.float().pow(2).mean().backward()
    counts = counter.get_flop_counts()["Global"]
    ops = {str(op): n for op, n in counts.items()}
    assert set(ops) <= {"aten.mm", "aten.bmm"}, ops  # nothing else a FLOP counter knows of runs
    return {"mm": ops.get("aten.mm", 0), "bmm": ops.get("aten.bmm", 0)}


def test_forward_flops_match_torchs_count_of_a_real_model():
    rng = random.Random()
    for _ in range(2):
        shape = _random_shape(rng)
        model = _hf_llama(shape)
        s = rng.randint(3, 17)
        counted = _counted(model, s, backward=False)
        linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        assert shape.matmul_params == linear_weights  # N: every matmul weight, no embedding
        assert counted["mm"] == 2 * shape.matmul_params * s, shape
        assert counted["bmm"] == attention_flops(shape, [s], causal=False), shape
        assert forward_flops(shape, [s], causal=False) == counted["mm"] + counted["bmm"]
        # causal: the kernel computes only the lower triangle, half of the s^2 term (FlashAttention's count)
        assert forward_flops(shape, [s]) == counted["mm"] + counted["bmm"] // 2


def test_training_flops_are_forward_plus_backward_as_torch_counts_them():
    rng = random.Random()
    shape = _random_shape(rng)
    model = _hf_llama(shape)
    s = rng.randint(3, 17)
    counted = _counted(model, s)
    assert training_flops(shape, [s], causal=False) == counted["mm"] + counted["bmm"]
    assert training_flops(shape, [s]) == counted["mm"] + counted["bmm"] // 2
    assert training_flops(shape, [s]) == 3 * forward_flops(shape, [s])


def test_full_recomputation_runs_every_layer_forward_again_but_not_the_output_head():
    rng = random.Random()
    shape = _random_shape(rng)
    model = _hf_llama(shape)
    # recompute each decoder layer in the backward (the new name in transformers 5, the old one before)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.config.use_cache = False
    model.train()
    s = rng.randint(3, 17)
    # torch's checkpoint would skip recomputing ops after the last saved tensor it needs; Megatron-style full
    # recomputation, which the count describes, reruns the whole layer
    with set_checkpoint_early_stop(False):
        counted = _counted(model, s)
    assert training_flops(shape, [s], causal=False, recompute=True) == counted["mm"] + counted["bmm"]
    head = 2 * shape.head_matmul_params * s
    assert training_flops(shape, [s], recompute=True) == 4 * (forward_flops(shape, [s]) - head) + 3 * head


def test_packed_rows_count_each_documents_own_attention():
    """A packed row costs what its documents cost one by one (attention never crosses a boundary)."""
    rng = random.Random()
    shape = _random_shape(rng)
    model = _hf_llama(shape)
    lengths = [rng.randint(1, 9) for _ in range(3)] + [1]  # length-1 documents too
    separately = [_counted(model, s) for s in lengths]
    assert training_flops(shape, lengths, causal=False) == sum(c["mm"] + c["bmm"] for c in separately)
    assert training_flops(shape, lengths) == sum(c["mm"] + c["bmm"] // 2 for c in separately)
    row = sum(lengths)
    saved = 3 * 2 * shape.num_layers * shape.num_attention_heads * shape.head_dim * (
        row**2 - sum(s * s for s in lengths))
    assert training_flops(shape, [row]) - training_flops(shape, lengths) == saved > 0


def test_document_lengths_from_cu_seqlens():
    cu = torch.tensor([0, 5, 6, 6, 13], dtype=torch.int32)
    assert document_lengths(cu) == [5, 1, 0, 7]
    assert document_lengths([0, 4]) == [4]
    shape = DecoderShape(2, 16, 4, 2, 4, 32, 50)
    assert training_flops(shape, document_lengths(cu)) == training_flops(shape, [5, 1, 7])
    for bad, message in (([3, 5], "start at 0"), ([0], "at least 2"), ([0, 5, 4], "never decrease"),
                         (torch.zeros(2, 3, dtype=torch.int32), "1-D")):
        with pytest.raises(ValueError, match=message):
            document_lengths(bad)
    with pytest.raises(ValueError, match="document lengths must be >= 0"):
        training_flops(shape, [4, -1])


def test_shape_from_a_config_object_and_bad_shapes():
    class Config:  # the fields of internlm2.model.ModelConfig, head_size a derived property
        num_layers, hidden_size, num_attention_heads, num_key_value_heads = 4, 64, 8, 2
        head_dim, intermediate_size, vocab_size = None, 160, 1000
        head_size = 8

    assert DecoderShape.of(Config()) == DecoderShape(4, 64, 8, 2, 8, 160, 1000)
    Config.head_size = None
    assert DecoderShape.of(Config()).head_dim == 8  # hidden / heads
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        DecoderShape(2, 64, 6, 4, 8, 128, 100)
    with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
        DecoderShape(2, 64, 8, 2, 8, 128, 0)
    with pytest.raises(ValueError, match="seq_len must be positive"):
        training_flops_per_token(DecoderShape(2, 64, 8, 2, 8, 128, 100), 0)


def test_internlm2_model_config_gives_its_shape():
    from internlm2.model.config import ModelConfig, preset_config

    config = preset_config("internlm2-7b")
    assert isinstance(config, ModelConfig)
    shape = DecoderShape.of(config)
    assert (shape.num_layers, shape.hidden_size, shape.head_dim, shape.num_key_value_heads) == (32, 4096, 128, 8)
    assert shape.matmul_params == 32 * (4096 * 48 * 128 + 4096 * 4096 + 3 * 4096 * 14336) + 4096 * 92544


# --------------------------------------------------------------------------- published anchors


def test_palm_and_nanogpt_rule_is_the_non_causal_count():
    """6 N + 12 L H Q T per token (PaLM appendix B, nanoGPT's estimate_mfu, torchtitan) for rows of length
    T: our count with causal=False; causal attention removes half of the attention term."""
    rng = random.Random()
    shape = _random_shape(rng)
    n = sum(m.weight.numel() for m in _hf_llama(shape).modules() if isinstance(m, nn.Linear))
    t = rng.randint(16, 4096)
    layers, heads, q = shape.num_layers, shape.num_attention_heads, shape.head_dim
    assert training_flops_per_token(shape, t, causal=False) == 6 * n + 12 * layers * heads * q * t
    assert training_flops_per_token(shape, t) == 6 * n + 6 * layers * heads * q * t


def test_megatron_formula_with_full_recomputation():
    """Narayanan et al. 2021 (Megatron-LM), for a GPT with 4h FFN, MHA and full recomputation:
    96 B s l h^2 (1 + s / 6h + V / 16 l h). SwiGLU with f = 8h/3 has the same FFN weights as 4h."""
    h, heads, layers, vocab, s, batch = 768, 12, 4, 50304, 2048, 3
    shape = DecoderShape(layers, h, heads, heads, h // heads, 8 * h // 3, vocab)
    flops = training_flops(shape, [s] * batch, causal=False, recompute=True)
    # the formula's terms, multiplied out so they stay exact integers
    assert flops == 96 * batch * s * layers * h * h + 16 * batch * s * s * layers * h + 6 * batch * s * h * vocab


def test_torchtitan_llama3_8b_h100_mfu_is_reproduced():
    """torchtitan's benchmarks/llama3_h100_202412_torchtitan.md: Llama 3.1 8B, seq 8192, 8 H100, 5,762 and
    6,667 tokens/s per GPU, "33% to 39% MFU" by its non-causal 6N + 12 L H Q T count and the SXM peak."""
    llama3_8b = DecoderShape(32, 4096, 32, 8, 128, 14336, 128256)
    peak = gpu_peak("NVIDIA H100 80GB HBM3")
    per_token = training_flops_per_token(llama3_8b, 8192, causal=False)
    published = {5762: 33, 6667: 39}
    for tps, percent in published.items():
        assert math.floor(100 * mfu(tps * per_token, peak)) == percent
    # counting causal attention as computed, the same runs used less of the GPU
    causal = training_flops_per_token(llama3_8b, 8192)
    assert 0.29 < mfu(5762 * causal, peak) < 0.30


def test_megatron_h100_table_mfu_matches_its_tflops_over_our_h100_peak():
    """Megatron-LM README, H100: TFLOP/s per GPU and MFU (rounded to a percent) per model size."""
    table = [(408.8, 41), (465.9, 47), (489.1, 49), (459.6, 46), (419.7, 42), (420.5, 43), (432.8, 44),
             (474.4, 48), (459.9, 47)]
    peak = gpu_peak("NVIDIA H100 80GB HBM3")
    for tflops, percent in table:
        assert abs(100 * mfu(tflops * 1e12, peak) - percent) < 0.6  # their peak rounds to 989


# --------------------------------------------------------------------------- peaks and MFU


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5), ("NVIDIA H800", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA A800-SXM4-80GB", 312.0),
    ],
)
def test_known_gpus_have_their_dense_bf16_peak(name, tflops):
    peak = gpu_peak(name)
    assert peak.basis == "datasheet" and peak.key == MFU_KEY
    assert peak.flops_per_s == pytest.approx(tflops * 1e12, rel=1e-12)


@pytest.mark.parametrize("name", ["NVIDIA GH200 480GB", "NVIDIA A10", "NVIDIA A40", "NVIDIA L40S",
                                  "Tesla V100-SXM2-32GB", "NVIDIA GeForce RTX 4090", "NVIDIA B200"])
def test_other_gpus_have_an_unknown_peak_and_no_mfu(name):
    peak = gpu_peak(name)
    assert peak.flops_per_s is None and peak.basis == "unknown" and peak.key is None
    assert name in peak.description
    assert mfu(1e12, peak) is None
    assert MFU_KEY not in throughput(tokens=100, flops=10**12, seconds=1.0, num_devices=1, peak=peak)


def test_mfu_is_never_above_100_percent():
    peak = gpu_peak("NVIDIA A100-SXM4-80GB")
    assert mfu(312e12, peak) == 1.0
    with pytest.raises(MFUError, match="above 100%"):
        mfu(313e12, peak)
    measured = Peak(1e9, "measured", "measured float32 matmul peak on CPU")
    with pytest.raises(MFUError, match="measured peak can be too low"):
        throughput(tokens=10, flops=4 * 10**9, seconds=2.0, num_devices=1, peak=measured)


def test_throughput_divides_job_flops_over_devices():
    peak = device_peak("cuda", given_flops_per_s=100e12)  # a given peak is used as is, on any device
    assert peak.basis == "given" and peak.key == MFU_KEY
    out = throughput(tokens=8192, flops=400 * 10**12, seconds=2.0, num_devices=4, peak=peak)
    assert out == pytest.approx({"tokens_per_s": 4096.0, "tokens_per_s_per_device": 1024.0,
                                 "tflops_per_device": 50.0, MFU_KEY: 0.5})
    with pytest.raises(ValueError, match="positive FLOP/s"):
        device_peak("cpu", given_flops_per_s=0)
    with pytest.raises(ValueError, match="seconds and num_devices must be positive"):
        throughput(tokens=1, flops=1, seconds=0.0, num_devices=1, peak=peak)


def test_cpu_peak_is_measured_and_reported_under_its_own_key():
    assert measure_matmul_flops("cpu", torch.float32, size=64, min_time_s=0.0) > 0
    peak = device_peak("cpu", dtype=torch.float32)
    assert peak.basis == "measured" and peak.key == MEASURED_KEY and peak.flops_per_s > 0
    out = throughput(tokens=10, flops=int(peak.flops_per_s / 4), seconds=1.0, num_devices=1, peak=peak)
    assert out[MEASURED_KEY] == pytest.approx(0.25) and MFU_KEY not in out


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set size from /proc")
def test_cpu_peak_memory_is_the_processes_high_water_mark_in_bytes():
    with open("/proc/self/statm") as f:
        resident_now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    # about what is resident now or more (the kernel syncs its per-CPU RSS counters lazily), so taking KiB for
    # bytes (x1024) would show; less than any machine's memory
    assert 0.9 * resident_now <= peak_memory_bytes("cpu") < 2**40


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_this_gpus_peak_and_memory():
    peak = device_peak("cuda")
    assert peak.basis in ("datasheet", "unknown")
    x = torch.empty(2**20, device="cuda")
    assert peak_memory_bytes("cuda") >= x.numel() * 4


# --------------------------------------------------------------------------- timers


def test_timers_accumulate_per_name_and_nest():
    timers = Timers()
    for _ in range(2):
        with timers("forward"):
            time.sleep(0.01)
    with timers("backward"):
        with timers("communication"):
            time.sleep(0.02)
    assert timers.counts() == {"forward": 2, "communication": 1, "backward": 1}
    elapsed = timers.elapsed()
    assert set(elapsed) == {"forward", "backward", "communication"}
    assert elapsed["forward"] >= 0.02 and elapsed["communication"] >= 0.02  # sleeps never return early
    assert elapsed["backward"] >= elapsed["communication"]
    assert timers.elapsed() == {} and timers.counts() == {}  # reset


def test_timers_reject_misuse_and_keep_time_when_the_body_raises():
    timers = Timers()
    timers.start("data")
    with pytest.raises(RuntimeError, match="'data' is already running"):
        timers.start("data")
    assert timers.stop("data") >= 0
    with pytest.raises(RuntimeError, match="'optimizer' is not running"):
        timers.stop("optimizer")
    with pytest.raises(KeyError):
        with timers("optimizer"):
            raise KeyError("boom")
    assert timers.counts() == {"data": 1, "optimizer": 1}


def test_timers_can_synchronise_cuda_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    with Timers()("forward"):
        pass
    assert calls == []
    with Timers(cuda_sync=True)("forward"):
        pass
    assert calls == ["sync", "sync"]
