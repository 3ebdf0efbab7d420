import os
import subprocess
import sys

import pytest
import torch

import internlm2
from internlm2 import ops
from tests.numerics import (
    assert_within_reference_error,
    fresh_seed,
    randn_with_outliers,
    to_double_leaf,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HIDDEN = [1, 7, 127, 4097, 16384]
LEADING = [(), (5,), (3, 4)]  # 1-D, 2-D and 3-D inputs


def make_inputs(leading, hidden, dtype, device="cpu"):
    g = torch.Generator(device=device).manual_seed(fresh_seed())
    x = randn_with_outliers((*leading, hidden), dtype, device, g).requires_grad_()
    w = (1 + 0.1 * torch.randn(hidden, generator=g, device=device)).to(dtype).requires_grad_()
    return x, w


def grads(fn, x, w, grad_y):
    x.grad = w.grad = None
    y = fn(x, w, 1e-5)
    y.backward(grad_y)
    return y.detach(), x.grad.detach(), w.grad.detach()


def check_against_fp64(x, w):
    """The kernel's output and gradients against the float64 reference, by dtype."""
    grad_y = torch.randn_like(x)
    y, dx, dw = grads(ops.rms_norm, x, w, grad_y)
    y64, dx64, dw64 = grads(ops.rms_norm_reference, to_double_leaf(x), to_double_leaf(w), grad_y.double())
    if x.dtype == torch.float32:
        torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx.double(), dx64, rtol=1e-4, atol=1e-4)
        # dw sums over every row: its float32 error grows with the number of rows.
        torch.testing.assert_close(dw.double(), dw64, rtol=1e-4, atol=1e-4 * max(1, x.numel() // x.shape[-1]) ** 0.5)
    else:
        yl, dxl, dwl = grads(ops.rms_norm_reference, x, w, grad_y)
        assert_within_reference_error(y, yl, y64, 2.0, "y")
        assert_within_reference_error(dx, dxl, dx64, 3.0, "grad x")
        assert_within_reference_error(dw, dwl, dw64, 3.0, "grad weight")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("leading", LEADING, ids=lambda s: f"{len(s) + 1}d")
def test_cpu_matches_fp64_reference(dtype, hidden, leading):
    check_against_fp64(*make_inputs(leading, hidden, dtype))


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_every_instruction_set_matches_reference(isa):
    """Each compiled instruction-set variant of the CPU kernel (chosen by ATEN_CPU_CAPABILITY) is correct."""
    code = (
        "import torch, internlm2\n"
        "from internlm2 import ops\n"
        f"assert internlm2._C.cpu_isa() == '{isa}', internlm2._C.cpu_isa()\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "  x = torch.randn(9, 131).to(dt).requires_grad_(); w = torch.randn(131).to(dt).requires_grad_()\n"
        "  y = ops.rms_norm(x, w, 1e-5); y.sum().backward()\n"
        "  x64 = x.detach().double().requires_grad_(); w64 = w.detach().double().requires_grad_()\n"
        "  y64 = ops.rms_norm_reference(x64, w64, 1e-5); y64.sum().backward()\n"
        "  tol = 1e-5 if dt == torch.float32 else 2e-2\n"
        "  torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)\n"
        "  torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)\n"
        "  torch.testing.assert_close(w.grad.double(), w64.grad, rtol=tol, atol=10 * tol)\n"
    )
    if isa == "avx2" and internlm2._C.cpu_isa() == "default":
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_opcheck():
    x, w = make_inputs((3, 5), 64, torch.float32)
    torch.library.opcheck(torch.ops.internlm2.rms_norm_forward.default, (x, w, 1e-5))
    y, rstd = torch.ops.internlm2.rms_norm_forward(x.detach(), w.detach(), 1e-5)
    torch.library.opcheck(torch.ops.internlm2.rms_norm_backward.default, (torch.randn_like(y), x.detach(), w.detach(), rstd))


def test_torch_compile_matches_eager():
    x, w = make_inputs((4,), 96, torch.float32)
    compiled = torch.compile(ops.rms_norm, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, 1e-5), ops.rms_norm(x, w, 1e-5))


def test_zero_rows():
    x = torch.empty(0, 16)
    w = torch.ones(16, requires_grad=True)
    y = ops.rms_norm(x.requires_grad_(), w)
    y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(w.grad, torch.zeros(16))


def check_zero_hidden(device):
    """Hidden size 0: one rstd per row, as the fake (meta) function says, NaN as torch.mean of an empty row
    gives; empty outputs and gradients."""
    x = torch.empty(3, 4, 0, device=device, requires_grad=True)
    w = torch.empty(0, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.internlm2.rms_norm_forward.default, (x.detach(), w.detach(), 1e-5),
                          test_utils=("test_schema", "test_faketensor"))
    y, rstd = torch.ops.internlm2.rms_norm_forward(x.detach(), w.detach(), 1e-5)
    expected = torch.rsqrt(x.detach().pow(2).mean(-1).flatten() + 1e-5)  # torch's own answer: NaN
    assert rstd.shape == (12,) and torch.equal(rstd.isnan(), expected.isnan()) and rstd.isnan().all()
    ops.rms_norm(x, w).sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape and w.grad.shape == (0,)


def test_zero_hidden():
    check_zero_hidden("cpu")


@pytest.mark.parametrize(
    "x, w, eps, message",
    [
        (torch.tensor(1.0), torch.ones(1), 1e-5, "at least 1 dimension"),
        (torch.ones(4, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64), 1e-5, "x must be float32, bfloat16 or float16"),
        (torch.ones(4, 8, dtype=torch.int32), torch.ones(8, dtype=torch.int32), 1e-5, "x must be float32"),
        (torch.ones(4, 8), torch.ones(7), 1e-5, r"weight must have shape \[8\]"),
        (torch.ones(4, 8), torch.ones(2, 8), 1e-5, "weight must have 1 dimensions"),
        (torch.ones(4, 8), torch.ones(8, dtype=torch.bfloat16), 1e-5, "weight has dtype BFloat16 but x has dtype Float"),
        (torch.ones(8, 4).t(), torch.ones(8), 1e-5, "x must be contiguous"),
        (torch.ones(4, 8), torch.ones(16)[::2], 1e-5, "weight must be contiguous"),
        (torch.ones(4, 8), torch.ones(8), -1.0, "eps must be finite and >= 0"),
    ],
)
def test_bad_input_names_the_argument(x, w, eps, message):
    with pytest.raises(RuntimeError, match=message):
        ops.rms_norm(x, w, eps)


def test_backward_rejects_wrong_rstd():
    x, w = torch.ones(4, 8), torch.ones(8)
    with pytest.raises(RuntimeError, match=r"rstd must have shape \[4\]"):
        torch.ops.internlm2.rms_norm_backward(x, x, w, torch.ones(3))
