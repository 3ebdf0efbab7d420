"""The CUDA flash attention kernels (csrc/cuda/flash_attention*): registration everywhere; numerics, edge
cases and CUDA-graph capture where a GPU is present. Same cases as tests/test_flash_attention.py, judged by
FlashAttention's rule: error vs float64 at most 2x (gradients 3x) the error of the plain PyTorch reference
run in the same precision. Backward cases run under both GQA schedules (INTERNLM2_FLASH_BWD_GQA); inputs
no kernel was built for take the reference (internlm2/ops/flash_attention.py)."""

import re
import warnings

import pytest
import torch

from internlm2 import ops
from internlm2.ops import _fallback
from internlm2.ops.flash_attention import cuda_kernel_gap
from tests.cuda.support import assert_registered_for_cuda, run_in_cuda_graph
from tests.numerics import (
    assert_within_reference_error,
    fresh_seed,
    poison_cuda_allocator,
    randn_with_outliers,
    requires_cuda,
    to_double_leaf,
)
from tests.test_flash_attention import BAD_ARGUMENTS, VARLEN_CASES, run  # the CPU tests' cases and driver

LOWP = [torch.bfloat16, torch.float16]


@pytest.fixture(params=["serial", "split"])
def bwd_schedule(request, monkeypatch):
    """The backward's GQA schedule: the whole query group per CTA, or one query head per CTA."""
    monkeypatch.setenv("INTERNLM2_FLASH_BWD_GQA", request.param)
    return request.param


def test_registered_for_cuda():
    assert_registered_for_cuda("flash_attention_forward", "flash_attention_backward")


def packed(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


def make_qkv(total, heads_q, heads_kv, head_dim, dtype, outliers=False):
    g = torch.Generator().manual_seed(fresh_seed())
    make = (lambda s: randn_with_outliers(s, dtype, generator=g)) if outliers else (
        lambda s: torch.randn(s, generator=g).to(dtype))
    return [make((total, h, head_dim)).cuda().requires_grad_() for h in (heads_q, heads_kv, heads_kv)]


def check_against_fp64(q, k, v, use_grad_lse=False, **kw):
    total, heads_q, _ = q.shape
    grad_out = torch.randn(q.shape, dtype=torch.float64, device="cuda")
    grad_lse = torch.randn(heads_q, total, dtype=torch.float64, device="cuda") if use_grad_lse else None
    poison_cuda_allocator()  # an output element the kernels forget to write reads NaN
    got = run(ops.flash_attention, q, k, v, grad_out.to(q.dtype), grad_lse, **kw)
    ref64 = run(ops.flash_attention_reference, *map(to_double_leaf, (q, k, v)), grad_out, grad_lse, **kw)
    ref_lowp = run(ops.flash_attention_reference, q, k, v, grad_out.to(q.dtype), grad_lse, **kw)
    for i, (name, a, lowp, e) in enumerate(zip(("out", "lse", "grad q", "grad k", "grad v"), got, ref_lowp, ref64)):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        if name == "lse":  # float32 from the same low-precision q and k: only summation order differs
            scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
            err = (a.double() - e).abs().max().item() if e.numel() else 0.0
            assert err <= 1e-4 * scale, f"lse: max error {err:.3e}"
        elif e.numel() and e.abs().max() == 0:
            # Exactly zero (grad q when every sequence has one token: dP == delta): the rule has no scale here;
            # dP (tensor cores) and delta (its own kernel) sum in different orders, so allow float32 noise.
            assert a.abs().max().item() <= 1e-5, f"{name}: {a.abs().max().item():.3e} where the gradient is exactly 0"
        else:
            assert_within_reference_error(a, lowp, e, 2.0 if i == 0 else 3.0, name)


@requires_cuda
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa_ratios_match_fp64_reference(dtype, head_dim, causal, group, bwd_schedule):
    lengths = [70, 1, 150]
    q, k, v = make_qkv(sum(lengths), 8, 8 // group, head_dim, dtype)
    check_against_fp64(q, k, v, cu_seqlens=packed(lengths), causal=causal)


@requires_cuda
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_many_tiles(head_dim, causal, bwd_schedule):
    """Sequences spanning many query and key blocks, partial blocks at both ends."""
    lengths = [1000, 333, 129]
    q, k, v = make_qkv(sum(lengths), 8, 2, head_dim, torch.bfloat16)
    check_against_fp64(q, k, v, cu_seqlens=packed(lengths), causal=causal)


@requires_cuda
@pytest.mark.parametrize("lengths", VARLEN_CASES.values(), ids=VARLEN_CASES.keys())
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_varlen_edge_cases(lengths, head_dim, causal, bwd_schedule):
    q, k, v = make_qkv(sum(lengths), 4, 2, head_dim, torch.bfloat16)
    check_against_fp64(q, k, v, cu_seqlens=packed(lengths), max_seqlen=max(lengths), causal=causal)


@requires_cuda
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_outliers(dtype, bwd_schedule):
    lengths = [100, 180]
    q, k, v = make_qkv(sum(lengths), 8, 2, 128, dtype, outliers=True)
    check_against_fp64(q, k, v, cu_seqlens=packed(lengths), causal=True)


@requires_cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_lse_gradient(causal, bwd_schedule):
    """A loss that uses lse (ring attention's merge does) back-propagates through it: delta - grad_lse."""
    lengths = [90, 140]
    q, k, v = make_qkv(sum(lengths), 4, 1, 128, torch.bfloat16)
    check_against_fp64(q, k, v, use_grad_lse=True, cu_seqlens=packed(lengths), causal=causal)


@requires_cuda
def test_no_cu_seqlens_scale_and_oversized_max_seqlen():
    q, k, v = make_qkv(300, 4, 4, 128, torch.bfloat16)
    check_against_fp64(q, k, v, causal=True, softmax_scale=0.3)
    q2, k2, v2 = (t.detach() for t in (q, k, v))
    one = ops.flash_attention(q2, k2, v2)
    # The forward is deterministic: the same sequence through cu_seqlens, and a grid sized for a longer
    # max_seqlen (whose extra blocks find nothing to do), give identical bits.
    assert torch.equal(one, ops.flash_attention(q2, k2, v2, packed([300]), 300))
    assert torch.equal(one, ops.flash_attention(q2, k2, v2, packed([300]), 1000))


@requires_cuda
def test_key_value_gradients_are_deterministic(monkeypatch):
    """The serial schedule sums dK and dV over the query group in registers (no atomics): bitwise reproducible."""
    monkeypatch.setenv("INTERNLM2_FLASH_BWD_GQA", "serial")
    lengths = [300, 77]
    q, k, v = make_qkv(sum(lengths), 8, 2, 128, torch.bfloat16)
    grad_out = torch.randn_like(q)
    grads = []
    for _ in range(2):
        q.grad = k.grad = v.grad = None
        ops.flash_attention(q, k, v, packed(lengths)).backward(grad_out)
        grads.append((k.grad.clone(), v.grad.clone(), q.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    torch.testing.assert_close(grads[0][2], grads[1][2], rtol=1e-2, atol=1e-2)  # dQ: fp32 atomics, any order


@requires_cuda
def test_misaligned_rows_are_copied_not_misread():
    """A contiguous tensor whose storage starts 2 bytes off a 16-byte boundary takes the copy path."""
    lengths = [50, 70]
    q, k, v = make_qkv(sum(lengths), 4, 2, 64, torch.bfloat16)
    base = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")
    q_off = base[1:].view(q.shape).copy_(q.detach())
    assert q_off.data_ptr() % 16 != 0
    cu = packed(lengths)
    assert torch.equal(ops.flash_attention(q_off, k.detach(), v.detach(), cu), ops.flash_attention(q.detach(), k.detach(), v.detach(), cu))


@requires_cuda
def test_forward_and_backward_capture_in_a_cuda_graph(bwd_schedule):
    lengths = [120, 9, 200]
    q, k, v = (t.detach() for t in make_qkv(sum(lengths), 8, 2, 128, torch.bfloat16))
    cu = packed(lengths)
    grad_out = torch.randn_like(q)

    def step(q, k, v, grad_out):
        out, lse = torch.ops.internlm2.flash_attention_forward(q, k, v, cu, 200, True, 0.125)
        return (out, lse, *torch.ops.internlm2.flash_attention_backward(grad_out, q, k, v, out, lse, None, cu, 200,
                                                                        True, 0.125))

    eager = step(q, k, v, grad_out)
    replayed = run_in_cuda_graph(step, q, k, v, grad_out)
    for name, a, b in zip(("out", "lse", "grad q", "grad k", "grad v"), eager, replayed):
        if name == "grad q":  # fp32 atomics: summation order may differ between runs
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
        else:
            assert torch.equal(a, b), name


@requires_cuda
def test_64_bit_offsets(bwd_schedule):
    """Tokens far enough into the pack that token * Hq * D passes 2^31 elements (q, out, grad q and its fp32
    accumulator): the last sequences must still match the reference."""
    heads_q, heads_kv, head_dim, length = 32, 8, 128, 2048
    total = (2**31 // (heads_q * head_dim)) + 3 * length  # past the int32 limit by three sequences
    total -= total % length
    free, _ = torch.cuda.mem_get_info()
    if free < 48 * 2**30:
        pytest.skip(f"needs ~48 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    g = torch.Generator(device="cuda").manual_seed(fresh_seed())
    q = torch.randn(total, heads_q, head_dim, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k, v = (torch.randn(total, heads_kv, head_dim, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            for _ in range(2))
    cu = torch.arange(0, total + 1, length, dtype=torch.int32, device="cuda")
    out = ops.flash_attention(q, k, v, cu, length, causal=True)
    grad_out = torch.randn(out.shape, device="cuda", dtype=torch.bfloat16, generator=g)
    out.backward(grad_out)
    tail = slice(total - 2 * length, total)
    q_t, k_t, v_t = (t.detach()[tail].double().requires_grad_() for t in (q, k, v))
    ref = ops.flash_attention_reference(q_t, k_t, v_t, packed([length, length]), causal=True)
    ref.backward(grad_out[tail].double())
    for name, a, e in (("out", out[tail], ref), ("grad q", q.grad[tail], q_t.grad), ("grad k", k.grad[tail], k_t.grad),
                       ("grad v", v.grad[tail], v_t.grad)):
        torch.testing.assert_close(a.double(), e.detach(), rtol=0.05, atol=0.05, msg=name)


@requires_cuda
def test_opcheck():
    lengths = [20, 45]
    q, k, v = (t.detach() for t in make_qkv(sum(lengths), 4, 2, 64, torch.bfloat16))
    cu = packed(lengths)
    torch.library.opcheck(torch.ops.internlm2.flash_attention_forward.default, (q, k, v, cu, 45, True, 0.125))
    out, lse = torch.ops.internlm2.flash_attention_forward(q, k, v, cu, 45, True, 0.125)
    torch.library.opcheck(
        torch.ops.internlm2.flash_attention_backward.default,
        (torch.randn_like(out), q, k, v, out, lse, torch.randn_like(lse), cu, 45, True, 0.125),
    )


@requires_cuda
@pytest.mark.parametrize("scale", [0.0, -0.1, float("nan")])
def test_kernels_refuse_a_softmax_scale_that_is_not_positive(scale):
    """Masked scores (-inf) times a zero scale would be NaN in the kernels: the shared check refuses it."""
    q, k, v = make_qkv(16, 4, 2, 64, torch.bfloat16)
    with pytest.raises(RuntimeError, match="softmax_scale must be finite and > 0"):
        ops.flash_attention(q, k, v, softmax_scale=scale)
    out, lse = torch.ops.internlm2.flash_attention_forward(q, k, v, None, 16, True, 0.125)
    with pytest.raises(RuntimeError, match="backward: softmax_scale must be finite and > 0"):
        torch.ops.internlm2.flash_attention_backward(out, q, k, v, out, lse, None, None, 16, True, scale)


@requires_cuda
def test_unknown_backward_schedule_is_named(monkeypatch):
    q, k, v = make_qkv(16, 4, 4, 64, torch.bfloat16)  # a group of one still reads the knob
    monkeypatch.setenv("INTERNLM2_FLASH_BWD_GQA", "fast")
    with pytest.raises(RuntimeError, match="INTERNLM2_FLASH_BWD_GQA must be 'serial' or 'split', got 'fast'"):
        ops.flash_attention(q, k, v).sum().backward()


# ---- inputs no kernel was built for: the reference runs, said once per case


@pytest.fixture
def no_fallbacks_yet(monkeypatch):
    monkeypatch.setattr(_fallback, "_cases_taken", set())


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 72, 128, 256], ids=lambda d: f"d{d}")
def test_fallback_decision_matches_the_kernels(dtype, head_dim):
    """The raw CUDA op refuses exactly the inputs for which internlm2.ops runs the reference."""
    q, k, v = (torch.randn(8, 2, head_dim, device="cuda").to(dtype) for _ in range(3))
    if cuda_kernel_gap(dtype, head_dim) is None:
        torch.ops.internlm2.flash_attention_forward(q, k, v, None, 8, True, 0.1)
    else:
        with pytest.raises(RuntimeError, match="on CUDA supports"):
            torch.ops.internlm2.flash_attention_forward(q, k, v, None, 8, True, 0.1)


@requires_cuda
@pytest.mark.parametrize("dtype, head_dim", [(torch.float32, 32), (torch.float32, 128), (torch.bfloat16, 32),
                                             (torch.float16, 72)], ids=str)
def test_fallback_runs_the_reference_and_warns_once(no_fallbacks_yet, dtype, head_dim):
    lengths = [70, 1, 150]
    q, k, v = make_qkv(sum(lengths), 8, 2, head_dim, dtype)
    cu = packed(lengths)
    gap = cuda_kernel_gap(dtype, head_dim)
    with pytest.warns(ops.KernelFallbackWarning, match=re.escape(f"flash_attention: {gap}")):
        ops.flash_attention(q.detach(), k.detach(), v.detach(), cu)
    grad_out = torch.randn(q.shape, dtype=torch.float64, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same case again: silent
        got = run(ops.flash_attention, q, k, v, grad_out.to(dtype), None, cu_seqlens=cu)
    ref64 = run(ops.flash_attention_reference, *map(to_double_leaf, (q, k, v)), grad_out, None, cu_seqlens=cu)
    # The reference's own error in this precision (METHOD: fp32 far under 1e-3, bf16/fp16 up to 1e-2).
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, e in zip(("out", "lse", "grad q", "grad k", "grad v"), got, ref64):
        assert torch.isfinite(a).all(), name
        rel = ((a.double() - e).norm() / e.norm()).item()
        assert rel <= bound, f"{name}: relative error {rel:.2e} > {bound:.0e}"
    assert ops.fallbacks_taken() == [("flash_attention", gap)]


@requires_cuda
def test_supported_inputs_take_the_kernel(no_fallbacks_yet):
    q, k, v = make_qkv(64, 4, 2, 128, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.flash_attention(q, k, v).sum().backward()
    assert ops.fallbacks_taken() == []


@requires_cuda
@pytest.mark.parametrize("make, message", BAD_ARGUMENTS)
def test_fallback_checks_arguments_as_the_kernels_do(no_fallbacks_yet, make, message):
    """Head dim 8 in float32 takes the reference, after the same argument checks as every backend."""
    q, k, v, kw = make()
    kw = {key: val.cuda() if isinstance(val, torch.Tensor) else val for key, val in kw.items()}
    with pytest.raises(RuntimeError, match=message):
        ops.flash_attention(q.cuda(), k.cuda(), v.cuda(), **kw)
