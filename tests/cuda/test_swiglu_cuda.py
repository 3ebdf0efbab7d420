"""The CUDA SwiGLU kernels (csrc/cuda/swiglu.cu): registration everywhere; numerics, misaligned views and
CUDA-graph capture where a GPU is present."""

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
from tests.test_swiglu import forward_backward

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One vector, a partial vector, several rows, a tail after many vectors, an MLP-sized activation.
SHAPES = [(1,), (7,), (3, 127), (2, 5, 4097), (4096, 2816)]


def test_registered_for_cuda():
    assert_registered_for_cuda("swiglu_forward", "swiglu_backward")


def make_inputs(shape, dtype):
    g = torch.Generator().manual_seed(fresh_seed())
    return [randn_with_outliers(shape, dtype, generator=g).cuda().requires_grad_() for _ in range(2)]


def check_against_fp64(gate, up):
    grad_out = torch.randn(gate.shape, device="cuda").to(gate.dtype)
    poison_cuda_allocator()
    got = forward_backward(ops.swiglu, gate, up, grad_out)
    ref64 = forward_backward(ops.swiglu_reference, to_double_leaf(gate), to_double_leaf(up), grad_out.double())
    names = ("out", "grad gate", "grad up")
    if gate.dtype == torch.float32:
        for name, a, e in zip(names, got, ref64):
            torch.testing.assert_close(a.double(), e, rtol=2e-6, atol=1e-6, msg=name)
        return
    ref_lowp = forward_backward(ops.swiglu_reference, gate, up, grad_out)
    for i, (name, a, lowp, e) in enumerate(zip(names, got, ref_lowp, ref64)):
        assert_within_reference_error(a, lowp, e, 2.0 if i == 0 else 3.0, name)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64_reference(dtype, shape):
    check_against_fp64(*make_inputs(shape, dtype))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_views_take_the_element_path(dtype):
    gate, up = make_inputs((3, 1001), dtype)
    base = torch.randn(gate.numel() + 1, device="cuda").to(dtype)
    shifted = base[1:].view(gate.shape).copy_(gate.detach()).requires_grad_()  # not 16-byte aligned
    check_against_fp64(shifted, up)


@requires_cuda
def test_extreme_gates_stay_finite():
    gate = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4], device="cuda", requires_grad=True)
    up = torch.ones_like(gate, requires_grad=True)
    out = ops.swiglu(gate, up)
    out.sum().backward()
    gate64, up64 = to_double_leaf(gate), to_double_leaf(up)
    ops.swiglu_reference(gate64, up64).sum().backward()
    torch.testing.assert_close(out.double(), ops.swiglu_reference(gate64, up64).detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gate.grad.double(), gate64.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(up.grad.double(), up64.grad, rtol=1e-6, atol=1e-6)


@requires_cuda
def test_empty_input():
    gate, up = (torch.empty(0, 8, device="cuda", requires_grad=True) for _ in range(2))
    out = ops.swiglu(gate, up)
    out.sum().backward()
    assert out.shape == (0, 8) and gate.grad.shape == (0, 8)


@requires_cuda
def test_capture_in_a_cuda_graph():
    gate, up = (t.detach() for t in make_inputs((64, 1000), torch.bfloat16))
    grad_out = torch.randn_like(gate)

    def step(gate, up, grad_out):
        return (torch.ops.internlm2.swiglu_forward(gate, up), *torch.ops.internlm2.swiglu_backward(grad_out, gate, up))

    for a, b in zip(step(gate, up, grad_out), run_in_cuda_graph(step, gate, up, grad_out)):
        assert torch.equal(a, b)


@requires_cuda
def test_opcheck():
    gate, up = (t.detach() for t in make_inputs((3, 70), torch.bfloat16))
    torch.library.opcheck(torch.ops.internlm2.swiglu_forward.default, (gate, up))
    torch.library.opcheck(torch.ops.internlm2.swiglu_backward.default, (torch.randn_like(gate), gate, up))
