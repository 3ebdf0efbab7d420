"""Where no CUDA kernel was built for an input, an op runs its reference and says so once per case. The
decision and the warning are checked here on CPU; tests/cuda checks that the CUDA path takes them."""

import warnings

import pytest
import torch

import internlm2
from internlm2 import ops
from internlm2.ops import _fallback
from internlm2.ops.flash_attention import cuda_kernel_gap


@pytest.fixture(autouse=True)
def no_fallbacks_yet(monkeypatch):
    monkeypatch.setattr(_fallback, "_cases_taken", set())


@pytest.mark.parametrize(
    "dtype, head_dim, gap",
    [
        (torch.bfloat16, 64, None),
        (torch.bfloat16, 128, None),
        (torch.float16, 64, None),
        (torch.float16, 128, None),
        (torch.float32, 64, "no CUDA kernel for dtype float32 ("),
        (torch.bfloat16, 32, "no CUDA kernel for head dim 32 ("),
        (torch.float16, 256, "no CUDA kernel for head dim 256 ("),
        (torch.float32, 32, "no CUDA kernel for dtype float32 and head dim 32 ("),
        (torch.float64, 72, "no CUDA kernel for dtype float64 and head dim 72 ("),
    ],
)
def test_flash_attention_cuda_kernel_gap(dtype, head_dim, gap):
    got = cuda_kernel_gap(dtype, head_dim)
    if gap is None:
        assert got is None
    else:
        assert got.startswith(gap) and got.endswith("(they take bfloat16/float16 with head dims 64 and 128)")


def test_warns_once_per_case_and_lists_them():
    with pytest.warns(ops.KernelFallbackWarning, match=r"^internlm2\.ops\.op_a: reason 1; running its plain-PyTorch "
                                                          r"reference instead \(correct, slower\)$"):
        _fallback.note_fallback("op_a", "reason 1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fallback.note_fallback("op_a", "reason 1")  # the same case again: silent
    with pytest.warns(ops.KernelFallbackWarning, match="reason 2"):
        _fallback.note_fallback("op_a", "reason 2")
    with pytest.warns(ops.KernelFallbackWarning, match="op_b: reason 1"):
        _fallback.note_fallback("op_b", "reason 1")
    assert ops.fallbacks_taken() == [("op_a", "reason 1"), ("op_a", "reason 2"), ("op_b", "reason 1")]


def test_cpu_kernels_take_every_dtype_and_head_dim():
    """The CPU kernels are built for everything: fp32 at head dim 32 (no CUDA kernel) runs them, silently."""
    q, k, v = (torch.randn(10, h, 32) for h in (4, 2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ops.flash_attention(q, k, v)
    torch.testing.assert_close(out, ops.flash_attention_reference(q, k, v), rtol=1e-5, atol=1e-5)
    assert ops.fallbacks_taken() == []


def test_the_fallback_checks_arguments_with_the_ops_own_one_line_messages():
    """What the CUDA fallback runs before the reference: the op's C++ contract, raising as the op does."""
    q, k, v = (torch.randn(6, h, 8) for h in (4, 2, 2))
    internlm2._C.check_flash_attention_forward(q, k, v, torch.tensor([0, 2, 6], dtype=torch.int32), 4, 0.125)
    with pytest.raises(RuntimeError) as err:
        internlm2._C.check_flash_attention_forward(q, k, v, None, 6, 0.0)
    assert str(err.value) == "flash_attention: softmax_scale must be finite and > 0, got 0"  # no C++ backtrace
    with pytest.raises(RuntimeError, match="^flash_attention: cu_seqlens must be Int, got Long$"):
        internlm2._C.check_flash_attention_forward(q, k, v, torch.tensor([0, 6]), 6, 0.125)
