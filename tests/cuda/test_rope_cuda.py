"""The CUDA RoPE kernels (csrc/cuda/rope.cu): registration everywhere; tables, rotation of contiguous and
strided (fused-qkv) inputs, the inverse as the gradient, and CUDA-graph capture where a GPU is present."""

import pytest
import torch

from internlm2 import ops
from tests.cuda.support import assert_registered_for_cuda, run_in_cuda_graph
from tests.numerics import (
    assert_within_reference_error,
    fresh_seed,
    poison_cuda_allocator,
    randn_with_outliers,
    requires_cuda,
    to_double_leaf,
)
from tests.test_rope import forward_backward

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_registered_for_cuda():
    assert_registered_for_cuda("rope_cos_sin", "apply_rope")


def packed_positions(lengths, dtype=torch.int64):
    return torch.cat([torch.arange(n, dtype=dtype) for n in lengths]).cuda()


@requires_cuda
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("head_dim", [2, 64, 128])
def test_cos_sin_matches_reference(pos_dtype, head_dim):
    positions = torch.cat([packed_positions([5, 300], pos_dtype),
                           torch.tensor([32767, 200_000, 1_000_000], dtype=pos_dtype, device="cuda")])
    poison_cuda_allocator()
    cos, sin = ops.rope_cos_sin(positions, head_dim, 1e6)
    ref_cos, ref_sin = ops.rope_cos_sin_reference(positions, head_dim, 1e6)
    assert cos.device.type == "cuda" and cos.shape == (len(positions), head_dim)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-7)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-7)


def tables(positions, head_dim):
    return ops.rope_cos_sin(positions, head_dim, 1e4)


def check_against_fp64(x, cos, sin):
    grad_out = torch.randn(x.shape, device="cuda").to(x.dtype)
    poison_cuda_allocator()
    got = forward_backward(ops.apply_rope, x, cos, sin, grad_out)
    assert got[0].is_contiguous()
    ref64 = forward_backward(ops.apply_rope_reference, to_double_leaf(x), cos, sin, grad_out.double())
    if x.dtype == torch.float32:
        for name, a, e in zip(("out", "grad x"), got, ref64):
            torch.testing.assert_close(a.double(), e, rtol=1e-6, atol=1e-6, msg=name)
        return
    ref_lowp = forward_backward(ops.apply_rope_reference, x, cos, sin, grad_out)
    for i, (name, a, lowp, e) in enumerate(zip(("out", "grad x"), got, ref_lowp, ref64)):
        assert_within_reference_error(a, lowp, e, 2.0 if i == 0 else 3.0, name)


def make_x(shape, dtype):
    g = torch.Generator().manual_seed(fresh_seed())
    return randn_with_outliers(shape, dtype, generator=g).cuda()


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 72, 6], ids=lambda d: f"d{d}")  # 72, 6: the element path
def test_contiguous_matches_fp64_reference(dtype, head_dim):
    lengths = [7, 130, 1]
    positions = packed_positions(lengths)
    x = make_x((sum(lengths), 5, head_dim), dtype).requires_grad_()
    check_against_fp64(x, *tables(positions, head_dim))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_strided_views_of_the_fused_qkv_projection(dtype):
    """InternLM2's wqkv output [T, Hkv, g + 2, D]: q is a 4-D strided view, k and v 3-D ones."""
    tokens, kv_heads, group, head_dim = 97, 2, 4, 128
    qkv = make_x((tokens, kv_heads, group + 2, head_dim), dtype).requires_grad_()
    cos, sin = tables(torch.arange(tokens, device="cuda"), head_dim)
    q, k = qkv[:, :, :group], qkv[:, :, group]
    for view in (q, k):
        assert not view.is_contiguous()
        out = ops.apply_rope(view, cos, sin)
        ref = ops.apply_rope_reference(view.detach().double(), cos, sin)
        assert out.shape == view.shape
        if dtype == torch.float32:
            torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
        else:
            assert_within_reference_error(out, ops.apply_rope_reference(view.detach(), cos, sin), ref, 2.0, "out")
    grad = torch.randn(q.shape, device="cuda").to(dtype)
    ops.apply_rope(q, cos, sin).backward(grad)
    qkv64 = to_double_leaf(qkv)
    ops.apply_rope_reference(qkv64[:, :, :group], cos, sin).backward(grad.double())
    torch.testing.assert_close(qkv.grad.double(), qkv64.grad, rtol=2e-2 if dtype != torch.float32 else 1e-6, atol=2e-2 if dtype != torch.float32 else 1e-6)


@requires_cuda
def test_misaligned_input_and_tables_take_the_element_path():
    def off_by_one_element(t):  # the same values, contiguous, 2 or 4 bytes off a 16-byte boundary
        return torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")[1:].view(t.shape).copy_(t)

    x = off_by_one_element(make_x((40, 4, 128), torch.bfloat16))
    cos, sin = tables(torch.arange(40, device="cuda"), 128)
    check_against_fp64(x.requires_grad_(), cos, sin)
    check_against_fp64(make_x((40, 4, 128), torch.bfloat16).requires_grad_(), off_by_one_element(cos),
                       off_by_one_element(sin))


@requires_cuda
def test_inverse_is_the_transpose():
    """<R x, y> == <x, R^T y>: the inverse rotation is the exact adjoint used by the backward."""
    x, y = make_x((33, 3, 128), torch.float32), make_x((33, 3, 128), torch.float32)
    cos, sin = tables(torch.arange(33, device="cuda") * 1000, 128)
    forward = torch.ops.internlm2.apply_rope(x, cos, sin, False)
    inverse = torch.ops.internlm2.apply_rope(y, cos, sin, True)
    torch.testing.assert_close((forward.double() * y.double()).sum(), (x.double() * inverse.double()).sum(),
                               rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(torch.ops.internlm2.apply_rope(forward, cos, sin, True), x, rtol=1e-5, atol=1e-5)


@requires_cuda
def test_capture_in_a_cuda_graph():
    positions = packed_positions([300, 20])
    x = make_x((320, 8, 128), torch.bfloat16)

    def step(positions, x):
        cos, sin = torch.ops.internlm2.rope_cos_sin(positions, 128, 1e6)
        return cos, sin, torch.ops.internlm2.apply_rope(x, cos, sin, False)

    for a, b in zip(step(positions, x), run_in_cuda_graph(step, positions, x)):
        assert torch.equal(a, b)


@requires_cuda
def test_opcheck():
    positions = packed_positions([10, 20])
    torch.library.opcheck(torch.ops.internlm2.rope_cos_sin.default, (positions, 64, 1e4))
    cos, sin = tables(positions, 64)
    x = make_x((30, 4, 64), torch.bfloat16)
    torch.library.opcheck(torch.ops.internlm2.apply_rope.default, (x, cos, sin, False))
