"""The CUDA RMSNorm kernels (csrc/cuda/rms_norm.cu): registration everywhere; numerics, the scalar path for
unaligned rows, hidden size 0 and argument checks where a GPU is present. Same rule as tests/test_rms_norm.py."""

import pytest
import torch

from internlm2 import ops
from tests.cuda.support import assert_registered_for_cuda
from tests.numerics import poison_cuda_allocator, requires_cuda
from tests.test_rms_norm import DTYPES, check_against_fp64, check_zero_hidden, make_inputs


def test_registered_for_cuda():
    assert_registered_for_cuda("rms_norm_forward", "rms_norm_backward")


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [1, 7, 127, 512, 1024, 4096, 4097, 8192, 16384])
@pytest.mark.parametrize("rows", [1, 5, 3000])
def test_matches_fp64_reference(dtype, hidden, rows):
    poison_cuda_allocator()
    check_against_fp64(*make_inputs((rows,), hidden, dtype, "cuda"))


@requires_cuda
def test_unaligned_input_takes_scalar_path():
    base = torch.randn(1 + 4 * 4096, device="cuda", dtype=torch.bfloat16)
    x = base[1:].view(4, 4096).requires_grad_()  # 2-byte offset: no 16-byte vector loads
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16).requires_grad_()
    check_against_fp64(x, w)


@requires_cuda
def test_zero_hidden():
    check_zero_hidden("cuda")


@requires_cuda
def test_opcheck():
    x, w = make_inputs((3, 5), 256, torch.bfloat16, "cuda")
    torch.library.opcheck(torch.ops.internlm2.rms_norm_forward.default, (x, w, 1e-5))


@requires_cuda
def test_rejects_device_mismatch():
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        ops.rms_norm(torch.ones(4, 8, device="cuda"), torch.ones(8))
