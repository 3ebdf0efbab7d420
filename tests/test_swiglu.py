import pytest
import torch

from internlm2 import ops
from tests.numerics import (
    assert_within_reference_error,
    fresh_seed,
    randn_with_outliers,
    run_with_cpu_isa,
    to_double_leaf,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (7,), (3, 127), (2, 5, 4097)]  # one vector, a tail, several rows, a large 3-D input


def make_inputs(shape, dtype):
    g = torch.Generator().manual_seed(fresh_seed())
    return [randn_with_outliers(shape, dtype, generator=g).requires_grad_() for _ in range(2)]


def forward_backward(fn, gate, up, grad_out):
    gate.grad = up.grad = None
    out = fn(gate, up)
    out.backward(grad_out)
    return out.detach(), gate.grad, up.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64_reference(dtype, shape):
    gate, up = make_inputs(shape, dtype)
    grad_out = torch.randn(shape).to(dtype)
    got = forward_backward(ops.swiglu, gate, up, grad_out)
    ref64 = forward_backward(ops.swiglu_reference, to_double_leaf(gate), to_double_leaf(up), grad_out.double())
    names = ("out", "grad gate", "grad up")
    if dtype == torch.float32:
        for name, a, e in zip(names, got, ref64):
            torch.testing.assert_close(a.double(), e, rtol=2e-6, atol=1e-6, msg=name)
        return
    ref_lowp = forward_backward(ops.swiglu_reference, gate, up, grad_out)
    for i, (name, a, lowp, e) in enumerate(zip(names, got, ref_lowp, ref64)):
        assert_within_reference_error(a, lowp, e, 2.0 if i == 0 else 3.0, name)


def test_extreme_gates_stay_finite():
    gate = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4], requires_grad=True)
    up = torch.ones_like(gate, requires_grad=True)
    out = ops.swiglu(gate, up)
    out.sum().backward()
    gate64, up64 = to_double_leaf(gate), to_double_leaf(up)
    ref = ops.swiglu_reference(gate64, up64)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gate.grad.double(), gate64.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(up.grad.double(), up64.grad, rtol=1e-6, atol=1e-6)


def test_empty_input():
    gate = torch.empty(0, 8, requires_grad=True)
    up = torch.empty(0, 8, requires_grad=True)
    out = ops.swiglu(gate, up)
    out.sum().backward()
    assert out.shape == (0, 8) and gate.grad.shape == (0, 8)


def test_opcheck():
    gate, up = (t.detach() for t in make_inputs((3, 70), torch.float32))
    torch.library.opcheck(torch.ops.internlm2.swiglu_forward.default, (gate, up))
    torch.library.opcheck(torch.ops.internlm2.swiglu_backward.default, (torch.randn_like(gate), gate, up))


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_every_instruction_set_matches_reference(isa):
    run_with_cpu_isa(
        isa,
        "import torch\n"
        "from internlm2 import ops\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "  g, u = (torch.randn(9, 131).to(dt).requires_grad_() for _ in range(2))\n"
        "  ops.swiglu(g, u).sum().backward()\n"
        "  g64, u64 = (t.detach().double().requires_grad_() for t in (g, u))\n"
        "  ref = ops.swiglu_reference(g64, u64); ref.sum().backward()\n"
        "  tol = 1e-5 if dt == torch.float32 else 2e-2\n"
        "  torch.testing.assert_close(ops.swiglu(g, u).double(), ref.detach(), rtol=tol, atol=tol)\n"
        "  torch.testing.assert_close(g.grad.double(), g64.grad, rtol=tol, atol=tol)\n"
        "  torch.testing.assert_close(u.grad.double(), u64.grad, rtol=tol, atol=tol)\n",
    )


@pytest.mark.parametrize(
    "gate, up, message",
    [
        (torch.ones(4, 8), torch.ones(4, 7), r"up must have the shape of gate \[4, 8\]"),
        (torch.ones(4, 8), torch.ones(4, 8, dtype=torch.bfloat16), "up has dtype BFloat16 but gate has dtype Float"),
        (torch.ones(4, 8, dtype=torch.float64), torch.ones(4, 8, dtype=torch.float64), "gate must be float32"),
        (torch.ones(8, 4).t(), torch.ones(4, 8), "gate must be contiguous"),
        (torch.ones(4, 8), torch.ones(8, 4).t(), "up must be contiguous"),
    ],
)
def test_bad_input_names_the_argument(gate, up, message):
    with pytest.raises(RuntimeError, match=message):
        ops.swiglu(gate, up)


def test_backward_rejects_wrong_grad_shape():
    gate = torch.ones(4, 8)
    with pytest.raises(RuntimeError, match="grad_out must have the shape of gate"):
        torch.ops.internlm2.swiglu_backward(torch.ones(4, 7), gate, gate)
