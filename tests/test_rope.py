import math

import pytest
import torch
import transformers.modeling_rope_utils as hf_rope
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from internlm2 import ops
from tests.numerics import (
    assert_within_reference_error,
    fresh_seed,
    randn_with_outliers,
    run_with_cpu_isa,
    to_double_leaf,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def packed_positions(lengths, dtype=torch.int64):
    """Position ids of packed sequences: 0..n-1 for each."""
    return torch.cat([torch.arange(n, dtype=dtype) for n in lengths])


# ---- rope_cos_sin


@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("head_dim", [2, 64, 128])
def test_cos_sin_matches_reference(pos_dtype, head_dim):
    positions = torch.cat([packed_positions([5, 300], pos_dtype), torch.tensor([32767, 200_000], dtype=pos_dtype)])
    cos, sin = ops.rope_cos_sin(positions, head_dim, 1e6)
    ref_cos, ref_sin = ops.rope_cos_sin_reference(positions, head_dim, 1e6)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (len(positions), head_dim)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-7)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-7)


def test_cos_sin_uses_hf_layout_and_frequencies():
    """HF's default RoPE: inv_freq = theta^(-2i/d), each frequency in both halves of the table."""
    config = LlamaConfig(hidden_size=128, num_attention_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    inv_freq, _ = hf_rope.ROPE_INIT_FUNCTIONS["default"](config) if "default" in hf_rope.ROPE_INIT_FUNCTIONS else (
        50000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64), None)
    positions = torch.arange(40)
    angles = positions.double()[:, None] * inv_freq.double()[None]
    cos, sin = ops.rope_cos_sin(positions, 64, 50000.0)
    torch.testing.assert_close(cos, torch.cat([angles, angles], -1).cos().float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(sin, torch.cat([angles, angles], -1).sin().float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("seq_len", [100, 4096, 4097, 20000])
def test_dynamic_ntk_matches_transformers(seq_len):
    config = LlamaConfig(
        hidden_size=256, num_attention_heads=2, max_position_embeddings=4096,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6},
    )
    hf_inv_freq, _ = hf_rope._compute_dynamic_ntk_parameters(config, seq_len=seq_len)
    scaling = ops.DynamicNTKScaling(factor=2.0, max_position_embeddings=4096, seq_len=seq_len)
    theta = scaling.effective_theta(1e6, 128, seq_len)
    ours = theta ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    torch.testing.assert_close(ours.float(), hf_inv_freq.float(), rtol=2e-6, atol=0)
    if seq_len <= 4096:
        assert theta == 1e6
    # The tables use the scaled base.
    positions = torch.arange(seq_len - 3, seq_len)
    cos, _ = ops.rope_cos_sin(positions, 128, 1e6, scaling)
    torch.testing.assert_close(cos, ops.rope_cos_sin_reference(positions, 128, theta)[0], rtol=0, atol=1e-7)


def test_dynamic_ntk_seq_len_defaults_to_the_largest_position():
    positions = packed_positions([10, 9000])
    explicit = ops.rope_cos_sin(positions, 64, 1e4, ops.DynamicNTKScaling(2.0, 4096, seq_len=9000))
    derived = ops.rope_cos_sin(positions, 64, 1e4, ops.DynamicNTKScaling(2.0, 4096))
    unscaled = ops.rope_cos_sin(positions, 64, 1e4)
    torch.testing.assert_close(explicit, derived, rtol=0, atol=0)
    assert not torch.allclose(explicit[0], unscaled[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"factor": 0.5, "max_position_embeddings": 10}, "factor must be finite and >= 1"),
        ({"factor": math.nan, "max_position_embeddings": 10}, "factor must be finite and >= 1"),
        ({"factor": 2.0, "max_position_embeddings": 0}, "max_position_embeddings must be positive"),
        ({"factor": 2.0, "max_position_embeddings": 10, "seq_len": -1}, "seq_len must be >= 0"),
    ],
)
def test_dynamic_ntk_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.DynamicNTKScaling(**kwargs)


@pytest.mark.parametrize(
    "positions, head_dim, theta, message",
    [
        (torch.arange(4.0), 8, 1e4, "position_ids must be int32 or int64"),
        (torch.arange(4).view(2, 2), 8, 1e4, r"position_ids must have 1 dimensions \[T\]"),
        (torch.arange(4), 7, 1e4, "head_dim must be a positive even number, got 7"),
        (torch.arange(4), 8, 0.0, "theta must be finite and > 0"),
        (torch.arange(8)[::2], 8, 1e4, "position_ids must be contiguous"),
    ],
)
def test_cos_sin_bad_input(positions, head_dim, theta, message):
    with pytest.raises(RuntimeError, match=message):
        ops.rope_cos_sin(positions, head_dim, theta)


def test_scaling_must_be_the_scaling_type():
    with pytest.raises(TypeError, match="scaling must be a DynamicNTKScaling"):
        ops.rope_cos_sin(torch.arange(4), 8, 1e4, {"type": "dynamic", "factor": 2.0})


# ---- apply_rope


def tables(tokens, head_dim, lengths=None):
    positions = packed_positions(lengths) if lengths else torch.arange(tokens)
    return ops.rope_cos_sin(positions, head_dim, 1e4)


def forward_backward(fn, x, cos, sin, grad_out):
    x.grad = None
    out = fn(x, cos, sin)
    out.backward(grad_out)
    return out.detach(), x.grad


def check_against_fp64(x, cos, sin):
    grad_out = torch.randn(x.shape).to(x.dtype)
    out, grad = forward_backward(ops.apply_rope, x, cos, sin, grad_out)
    out64, grad64 = forward_backward(ops.apply_rope_reference, to_double_leaf(x), cos, sin, grad_out.double())
    assert out.is_contiguous() and out.shape == x.shape and out.dtype == x.dtype
    if x.dtype == torch.float32:
        torch.testing.assert_close(out.double(), out64, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(grad.double(), grad64, rtol=2e-6, atol=2e-6)
        return
    out_lowp, grad_lowp = forward_backward(ops.apply_rope_reference, x, cos, sin, grad_out)
    assert_within_reference_error(out, out_lowp, out64, 2.0, "out")
    assert_within_reference_error(grad, grad_lowp, grad64, 3.0, "grad x")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 40])
def test_apply_matches_fp64_reference(dtype, head_dim):
    g = torch.Generator().manual_seed(fresh_seed())
    lengths = [3, 50, 1]
    x = randn_with_outliers((sum(lengths), 6, head_dim), dtype, generator=g).requires_grad_()
    check_against_fp64(x, *tables(sum(lengths), head_dim, lengths))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_apply_on_views_of_fused_qkv(dtype):
    """q and k sliced out of InternLM2's fused wqkv output ([T, Hkv, group + 2, D]) are rotated in place of
    a copy; 3-D and 4-D views both work, and gradients flow back into the fused tensor."""
    tokens, heads_kv, group, head_dim = 37, 2, 4, 64
    g = torch.Generator().manual_seed(fresh_seed())
    qkv = torch.randn(tokens, heads_kv, group + 2, head_dim, generator=g).to(dtype).requires_grad_()
    cos, sin = tables(tokens, head_dim, [20, 17])
    q = qkv[:, :, :group]  # [T, Hkv, group, D], not contiguous
    k = qkv[:, :, group]  # [T, Hkv, D], token stride (group + 2) * Hkv * D
    assert not q.is_contiguous() and not k.is_contiguous()
    check_against_fp64(q.detach().requires_grad_(), cos, sin)
    check_against_fp64(k.detach().requires_grad_(), cos, sin)
    torch.testing.assert_close(ops.apply_rope(q, cos, sin), ops.apply_rope(q.contiguous(), cos, sin), rtol=0, atol=0)
    (ops.apply_rope(q, cos, sin).sum() + ops.apply_rope(k, cos, sin).sum()).backward()
    ref = qkv.detach().double().requires_grad_()
    (ops.apply_rope_reference(ref[:, :, :group], cos, sin).sum() + ops.apply_rope_reference(ref[:, :, group], cos, sin).sum()).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(qkv.grad.double(), ref.grad, rtol=tol, atol=tol)


def test_apply_matches_transformers_rotary():
    g = torch.Generator().manual_seed(fresh_seed())
    tokens, heads, head_dim = 25, 4, 64
    q = torch.randn(tokens, heads, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(tokens, heads, head_dim, generator=g, dtype=torch.float64)
    cos, sin = tables(tokens, head_dim)
    # HF works on [B, H, T, D] with cos/sin [B, T, D].
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None].double(), sin[None].double())
    torch.testing.assert_close(ops.apply_rope(q.float(), cos, sin).double(), hf_q[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.apply_rope(k.float(), cos, sin).double(), hf_k[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_packed_positions_equal_separate_sequences():
    """Rotating a packed batch with restarting positions equals rotating each sequence on its own."""
    g = torch.Generator().manual_seed(fresh_seed())
    lengths = [7, 1, 12]
    x = torch.randn(sum(lengths), 3, 32, generator=g)
    packed_out = ops.apply_rope(x, *tables(sum(lengths), 32, lengths))
    parts = [ops.apply_rope(part, *tables(n, 32)) for part, n in zip(x.split(lengths), lengths)]
    torch.testing.assert_close(packed_out, torch.cat(parts), rtol=0, atol=0)


def test_inverse_undoes_the_rotation():
    x = torch.randn(9, 2, 16)
    cos, sin = tables(9, 16)
    rotated = ops.apply_rope(x, cos, sin)
    back = torch.ops.internlm2.apply_rope(rotated, cos, sin, True)
    torch.testing.assert_close(back, x, rtol=1e-6, atol=1e-6)


def test_two_dimensional_and_empty_inputs():
    x = torch.randn(5, 8, requires_grad=True)
    cos, sin = tables(5, 8)
    check_against_fp64(x, cos, sin)
    empty = torch.empty(0, 4, 8, requires_grad=True)
    out = ops.apply_rope(empty, *tables(0, 8))
    out.sum().backward()
    assert out.shape == (0, 4, 8) and empty.grad.shape == (0, 4, 8)


def test_opcheck():
    x = torch.randn(6, 3, 16)
    cos, sin = tables(6, 16)
    for inverse in (False, True):
        torch.library.opcheck(torch.ops.internlm2.apply_rope.default, (x, cos, sin, inverse))
    torch.library.opcheck(torch.ops.internlm2.apply_rope.default, (torch.randn(6, 3, 5, 16)[:, :, 1:4], cos, sin, False))
    torch.library.opcheck(torch.ops.internlm2.rope_cos_sin.default, (torch.arange(6), 16, 1e4))


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_every_instruction_set_matches_reference(isa):
    run_with_cpu_isa(
        isa,
        "import torch\n"
        "from internlm2 import ops\n"
        "pos = torch.cat([torch.arange(5), torch.arange(11)])\n"
        "cos, sin = ops.rope_cos_sin(pos, 40, 1e4)\n"
        "ref_cos, ref_sin = ops.rope_cos_sin_reference(pos, 40, 1e4)\n"
        "torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-7)\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "  x = torch.randn(16, 3, 40).to(dt).requires_grad_()\n"
        "  out = ops.apply_rope(x, cos, sin); out.sum().backward()\n"
        "  x64 = x.detach().double().requires_grad_()\n"
        "  ref = ops.apply_rope_reference(x64, cos, sin); ref.sum().backward()\n"
        "  tol = 1e-5 if dt == torch.float32 else 2e-2\n"
        "  torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=tol)\n"
        "  torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)\n",
    )


@pytest.mark.parametrize(
    "x, cos, sin, message",
    [
        (torch.ones(4, 2, 8), torch.ones(4, 6), torch.ones(4, 6), r"cos must have shape \[4, 8\]"),
        (torch.ones(4, 2, 8), torch.ones(4, 8), torch.ones(3, 8), r"sin must have shape \[4, 8\]"),
        (torch.ones(4, 2, 8), torch.ones(4, 8, dtype=torch.float64), torch.ones(4, 8), "cos must be Float"),
        (torch.ones(4, 2, 7), torch.ones(4, 7), torch.ones(4, 7), "head_dim\\) must be even"),
        (torch.ones(4, 8, 2).transpose(1, 2), torch.ones(4, 8), torch.ones(4, 8), "x must be contiguous in its last dimension"),
        (torch.ones(8), torch.ones(8, 8), torch.ones(8, 8), "x must have at least 2 dimensions"),
        (torch.ones(4, 2, 8, dtype=torch.int32), torch.ones(4, 8), torch.ones(4, 8), "x must be float32"),
        (torch.ones(4, 2, 8), torch.ones(8, 4).t(), torch.ones(4, 8), "cos must be contiguous"),
    ],
)
def test_apply_bad_input_names_the_argument(x, cos, sin, message):
    with pytest.raises(RuntimeError, match=message):
        ops.apply_rope(x, cos, sin)
