"""The CUDA cross-entropy chunk kernel (csrc/cuda/cross_entropy.cu) and linear_cross_entropy on CUDA:
registration everywhere; loss, lse and the in-place logits gradient, and CUDA-graph capture where a GPU is
present."""

import pytest
import torch
import torch.nn.functional as F

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

chunk_kernel = torch.ops.internlm2.cross_entropy_chunk_


def test_registered_for_cuda():
    assert_registered_for_cuda("cross_entropy_chunk_")


def make_chunk(rows, vocab, dtype, ignored_every=4):
    g = torch.Generator().manual_seed(fresh_seed())
    logits = (3 * randn_with_outliers((rows, vocab), torch.float32, generator=g)).to(dtype).cuda()
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::ignored_every] = -100
    return logits, labels.cuda(), g


def chunk_reference(logits, labels, z, grad_scale):
    """float64 loss, lse and grad_scale * d(loss)/d(logits) of loss = lse - x[label] + z lse^2."""
    x = logits.double().requires_grad_()
    lse = torch.logsumexp(x, -1)
    valid = labels != -100
    picked = x.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    loss = torch.where(valid, lse - picked + z * lse * lse, torch.zeros_like(lse))
    loss.backward(grad_scale.double().expand_as(loss))
    return loss.detach(), lse.detach(), x.grad


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("vocab", [1, 33, 1000, 11568, 92544])  # 1 and 33, 1000 tails; 11568 = 92544 / TP 8
@pytest.mark.parametrize("scale_kind", ["scalar", "per-row"])
@pytest.mark.parametrize("z", [0.0, 1e-3])
def test_chunk_matches_fp64(dtype, vocab, scale_kind, z):
    logits, labels, g = make_chunk(37, vocab, dtype)
    grad_scale = torch.tensor(0.7) if scale_kind == "scalar" else torch.rand(37, generator=g)
    grad_scale = grad_scale.cuda()
    loss64, lse64, grad64 = chunk_reference(logits, labels, z, grad_scale)
    poison_cuda_allocator()
    in_place = logits.clone()
    loss, lse = chunk_kernel(in_place, labels, -100, z, grad_scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-5 * max(1.0, lse64.abs().max().item()))
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-5, atol=1e-5)
    # The gradient is written in the logits' dtype: one rounding of the float32 value.
    torch.testing.assert_close(in_place.double(), grad64, rtol=tol, atol=tol * grad_scale.max().item())
    ignored = labels == -100
    assert torch.all(loss[ignored] == 0) and torch.all(in_place[ignored] == 0)


@requires_cuda
def test_chunk_without_gradient_leaves_logits_untouched():
    logits, labels, _ = make_chunk(9, 500, torch.bfloat16)
    copy = logits.clone()
    loss, lse = chunk_kernel(logits, labels, -100, 0.0, None)
    assert torch.equal(logits, copy)
    torch.testing.assert_close(lse.double(), torch.logsumexp(copy.double(), -1), rtol=1e-5, atol=1e-5)


@requires_cuda
def test_out_of_range_label_poisons_only_its_row():
    """Labels are never read on the host (no sync): a bad one makes that row's loss and gradient NaN."""
    logits, labels, _ = make_chunk(4, 50, torch.float32, ignored_every=100)
    labels[2] = 50
    loss, _ = chunk_kernel(logits, labels, -100, 0.0, torch.tensor(1.0, device="cuda"))
    assert torch.isnan(loss[2]) and torch.isnan(logits[2]).all()
    assert torch.isfinite(loss[[0, 1, 3]]).all() and torch.isfinite(logits[[0, 1, 3]]).all()


@requires_cuda
def test_misaligned_logits_take_the_element_path():
    logits, labels, _ = make_chunk(5, 1024, torch.bfloat16)
    base = torch.empty(logits.numel() + 1, dtype=logits.dtype, device="cuda")
    shifted = base[1:].view(logits.shape).copy_(logits)  # 2 bytes off a 16-byte boundary
    grad_scale = torch.tensor(1.0, device="cuda")
    loss64, lse64, grad64 = chunk_reference(logits, labels, 0.0, grad_scale)
    loss, lse = chunk_kernel(shifted, labels, -100, 0.0, grad_scale)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shifted.double(), grad64, rtol=2e-3, atol=2e-3)


def make_linear(tokens, hidden, vocab, dtype):
    g = torch.Generator().manual_seed(fresh_seed())
    h = randn_with_outliers((tokens, hidden), dtype, generator=g).cuda().requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(dtype).cuda().requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::5] = -100
    return h, w, labels.cuda()


def forward_backward(fn, h, w, labels, grad_loss, **kw):
    h.grad = w.grad = None
    loss = fn(h, w, labels, **kw)
    loss.backward(grad_loss)
    return loss.detach(), h.grad, w.grad


@requires_cuda
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_float32_equals_full_logits(reduction):
    h, w, labels = make_linear(96, 64, 3000, torch.float32)
    grad_loss = torch.randn(96, device="cuda") if reduction == "none" else torch.tensor(1.3, device="cuda")
    got = forward_backward(ops.linear_cross_entropy, h, w, labels, grad_loss, reduction=reduction, chunk_size=40)
    want = forward_backward(lambda h, w, l, **kw: F.cross_entropy(h @ w.t(), l, **kw), to_double_leaf(h),
                            to_double_leaf(w), labels, grad_loss.double(), reduction=reduction)
    for name, a, e in zip(("loss", "grad hidden", "grad weight"), got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5, msg=name)  # TF32-free fp32 matmuls


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_low_precision_within_reference_error(dtype, reduction):
    h, w, labels = make_linear(128, 64, 5000, dtype)
    grad_loss = torch.randn(128, device="cuda") if reduction == "none" else torch.tensor(1.0, device="cuda")
    got = forward_backward(ops.linear_cross_entropy, h, w, labels, grad_loss, reduction=reduction, chunk_size=48)
    ref_lowp = forward_backward(ops.linear_cross_entropy_reference, h, w, labels, grad_loss, reduction=reduction)
    ref64 = forward_backward(ops.linear_cross_entropy_reference, to_double_leaf(h), to_double_leaf(w), labels,
                             grad_loss.double(), reduction=reduction)
    for i, name in enumerate(("loss", "grad hidden", "grad weight")):
        assert_within_reference_error(got[i], ref_lowp[i], ref64[i], 2.0 if i == 0 else 3.0, name)


@requires_cuda
def test_chunk_captures_in_a_cuda_graph():
    logits, labels, _ = make_chunk(16, 4096, torch.bfloat16)
    grad_scale = torch.tensor(0.5, device="cuda")

    def step(logits, labels, grad_scale):
        loss, lse = chunk_kernel(logits, labels, -100, 1e-4, grad_scale)
        return loss, lse, logits

    eager = step(logits.clone(), labels, grad_scale)
    for a, b in zip(eager, run_in_cuda_graph(step, logits, labels, grad_scale)):
        assert torch.equal(a, b)


@requires_cuda
def test_opcheck():
    logits, labels, g = make_chunk(5, 300, torch.bfloat16)
    for grad_scale in (None, torch.tensor(0.5, device="cuda"), torch.rand(5, generator=g).cuda()):
        torch.library.opcheck(chunk_kernel.default, (logits.clone(), labels, -100, 0.0, grad_scale))
