import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from internlm2 import ops
from tests.numerics import (
    CPU_ISAS,
    assert_within_reference_error,
    fresh_seed,
    randn_with_outliers,
    run_with_cpu_isa,
    to_double_leaf,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def packed(lengths):
    """cu_seqlens int32 for sequences of these lengths."""
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def make_qkv(total, heads_q, heads_kv, head_dim, dtype, seed=None, outliers=False):
    g = torch.Generator().manual_seed(fresh_seed() if seed is None else seed)
    make = (lambda s: randn_with_outliers(s, dtype, generator=g)) if outliers else (
        lambda s: torch.randn(s, generator=g).to(dtype))
    return [make((total, h, head_dim)).requires_grad_() for h in (heads_q, heads_kv, heads_kv)]


def run(fn, q, k, v, grad_out, grad_lse, **kw):
    """Output, lse and the gradients of sum(out * grad_out) + sum(lse * grad_lse)."""
    for t in (q, k, v):
        t.grad = None
    out, lse = fn(q, k, v, return_lse=True, **kw)
    loss = (out.double() * grad_out.double()).sum()
    if grad_lse is not None:
        loss = loss + (lse.double() * grad_lse.double()).sum()
    loss.backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def assert_tight(actual, expected, what, tol=2e-5):
    """float32 kernel vs float64 oracle: relative to the oracle's magnitude."""
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double() - expected).abs().max().item() if actual.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} x {scale:.3g}"


def check_against_fp64(q, k, v, use_grad_lse=False, **kw):
    total, heads_q, head_dim = q.shape
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    grad_lse = torch.randn(heads_q, total, dtype=torch.float64) if use_grad_lse else None
    got = run(ops.flash_attention, q, k, v, grad_out, grad_lse, **kw)
    ref64 = run(ops.flash_attention_reference, *map(to_double_leaf, (q, k, v)), grad_out, grad_lse, **kw)
    names = ("out", "lse", "grad q", "grad k", "grad v")
    if q.dtype == torch.float32:
        for name, a, e in zip(names, got, ref64):
            assert_tight(a, e, name)
        return
    ref_lowp = run(ops.flash_attention_reference, q, k, v, grad_out.to(q.dtype), grad_lse, **kw)
    for i, (name, a, lowp, e) in enumerate(zip(names, got, ref_lowp, ref64)):
        if name == "lse":  # float32 in both: held tight
            assert_tight(a, e, name, tol=1e-4)
        else:
            assert_within_reference_error(a, lowp, e, 2.0 if i == 0 else 3.0, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa_ratios_match_fp64_reference(dtype, causal, group):
    lengths = [70, 1, 150]
    q, k, v = make_qkv(sum(lengths), 8, 8 // group, 64, dtype)
    check_against_fp64(q, k, v, cu_seqlens=packed(lengths), causal=causal)


@pytest.mark.parametrize("head_dim", [128, 72, 33], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_dims(head_dim, dtype):
    lengths = [130, 64]
    q, k, v = make_qkv(sum(lengths), 4, 2, head_dim, dtype)
    check_against_fp64(q, k, v, cu_seqlens=packed(lengths), causal=True)


VARLEN_CASES = {
    "single-token-sequences": [1, 1, 1, 1],
    "one-sequence": [600],
    "many-short": [3, 5, 2, 7, 1, 4, 6, 2, 3, 5, 1, 8],
    "unequal-across-tiles": [1, 63, 64, 65, 129, 255, 256, 257, 300],
    "empty-sequences": [0, 5, 0, 0, 9, 0],
    "fewer-tokens-than-sequences": [0, 1, 0, 2, 0, 0, 1, 0],
}


@pytest.mark.parametrize("lengths", VARLEN_CASES.values(), ids=VARLEN_CASES.keys())
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_varlen_edge_cases(lengths, causal, dtype):
    """bf16 too: with bf16 dot products, sequences starting at odd packed tokens and blocks with an odd
    number of rows take the padded pair layouts."""
    q, k, v = make_qkv(sum(lengths), 4, 2, 64, dtype)
    check_against_fp64(q, k, v, cu_seqlens=packed(lengths), max_seqlen=max(lengths), causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_outliers(dtype):
    lengths = [100, 180]
    q, k, v = make_qkv(sum(lengths), 8, 2, 64, dtype, outliers=True)
    check_against_fp64(q, k, v, cu_seqlens=packed(lengths), causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_lse_gradient(dtype, causal):
    """A loss that uses lse (as ring attention's merge does) back-propagates through it."""
    lengths = [90, 140]
    q, k, v = make_qkv(sum(lengths), 4, 1, 64, dtype)
    check_against_fp64(q, k, v, use_grad_lse=True, cu_seqlens=packed(lengths), causal=causal)


def test_no_cu_seqlens_is_one_sequence_and_scale_is_honoured():
    q, k, v = make_qkv(150, 4, 4, 64, torch.float32)
    check_against_fp64(q, k, v, causal=True, softmax_scale=0.3)
    q2, k2, v2 = (t.detach() for t in (q, k, v))
    torch.testing.assert_close(
        ops.flash_attention(q2, k2, v2), ops.flash_attention(q2, k2, v2, packed([150]), 150), rtol=0, atol=0
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("group", [1, 4])
def test_agrees_with_torch_sdpa_per_sequence(causal, group):
    lengths = [33, 1, 200, 64]
    q, k, v = make_qkv(sum(lengths), 8, 8 // group, 64, torch.float32)
    grad_out = torch.randn(q.shape)
    out = ops.flash_attention(q, k, v, packed(lengths), causal=causal)
    out.backward(grad_out)
    start = 0
    for n in lengths:
        qs, ks, vs = (t.detach()[start : start + n].transpose(0, 1).requires_grad_() for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=True)
        ref.backward(grad_out[start : start + n].transpose(0, 1))
        torch.testing.assert_close(out[start : start + n], ref.transpose(0, 1).detach(), rtol=1e-4, atol=1e-5)
        for mine, theirs in ((q, qs), (k, ks), (v, vs)):
            torch.testing.assert_close(mine.grad[start : start + n], theirs.grad.transpose(0, 1), rtol=1e-4, atol=1e-4)
        start += n


def test_gqa_does_not_change_with_repeated_kv():
    """GQA equals plain multi-head attention on K/V repeated per group, gradients summed back per group."""
    lengths = [50, 77]
    q, k, v = make_qkv(sum(lengths), 8, 2, 64, torch.float32)
    grad_out = torch.randn(q.shape)
    ops.flash_attention(q, k, v, packed(lengths)).backward(grad_out)
    kr, vr = (t.detach().repeat_interleave(4, dim=1).requires_grad_() for t in (k, v))
    q2 = q.detach().requires_grad_()
    ops.flash_attention(q2, kr, vr, packed(lengths)).backward(grad_out)
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k.grad, kr.grad.view(-1, 2, 4, 64).sum(2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v.grad, vr.grad.view(-1, 2, 4, 64).sum(2), rtol=1e-5, atol=1e-5)


def test_empty_input():
    q, k, v = (torch.empty(0, 4, 64, requires_grad=True) for _ in range(3))
    out, lse = ops.flash_attention(q, k, v, return_lse=True)
    out.sum().backward()
    assert out.shape == (0, 4, 64) and lse.shape == (4, 0) and q.grad.shape == (0, 4, 64)


def test_opcheck():
    lengths = [20, 45]
    q, k, v = (t.detach() for t in make_qkv(sum(lengths), 4, 2, 64, torch.float32))
    cu = packed(lengths)
    for args in ((q, k, v, cu, 45, True, 0.125), (q, k, v, None, 65, False, 0.125)):
        torch.library.opcheck(torch.ops.internlm2.flash_attention_forward.default, args)
    out, lse = torch.ops.internlm2.flash_attention_forward(q, k, v, cu, 45, True, 0.125)
    torch.library.opcheck(
        torch.ops.internlm2.flash_attention_backward.default,
        (torch.randn_like(out), q, k, v, out, lse, torch.randn_like(lse), cu, 45, True, 0.125),
    )


def test_torch_compile_matches_eager():
    lengths = [20, 45]
    q, k, v = (t.detach() for t in make_qkv(sum(lengths), 4, 2, 64, torch.float32))
    cu = packed(lengths)
    compiled = torch.compile(ops.flash_attention, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, cu, 45), ops.flash_attention(q, k, v, cu, 45))


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_every_instruction_set_matches_reference(isa):
    run_with_cpu_isa(
        isa,
        "import torch\n"
        "from internlm2 import ops\n"
        "cu = torch.tensor([0, 1, 70, 200], dtype=torch.int32)\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "  q = torch.randn(200, 4, 40).to(dt).requires_grad_()\n"
        "  k, v = (torch.randn(200, 2, 40).to(dt).requires_grad_() for _ in range(2))\n"
        "  out = ops.flash_attention(q, k, v, cu); out.sum().backward()\n"
        "  q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))\n"
        "  ref = ops.flash_attention_reference(q64, k64, v64, cu); ref.sum().backward()\n"
        "  tol = 2e-5 if dt == torch.float32 else 3e-2\n"
        "  for a, b in ((out, ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):\n"
        "    torch.testing.assert_close(a.double(), b.detach(), rtol=tol, atol=tol)\n",
    )


def test_bf16_dot_products_run_where_the_cpu_has_them():
    """The AVX512_BF16 build is picked on a CPU with AVX512-BF16 when nothing pins a level."""
    import internlm2

    if "ATEN_CPU_CAPABILITY" in os.environ:
        pytest.skip("ATEN_CPU_CAPABILITY pins an instruction set")
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    flags = set(cpuinfo.read_text().split())
    expected = torch.backends.cpu.get_cpu_capability() == "AVX512" and "avx512_bf16" in flags
    assert (internlm2._C.cpu_isa() == "avx512_bf16") == expected, internlm2._C.cpu_isa()


# ---- bad input: each error names the argument and the problem


def qkv(total=6, heads_q=4, heads_kv=2, head_dim=8, dtype=torch.float32):
    return torch.randn(total, heads_q, head_dim, dtype=dtype), *(
        torch.randn(total, heads_kv, head_dim, dtype=dtype) for _ in range(2))


# What every backend checks (the CUDA fallback to the reference too: tests/cuda).
BAD_ARGUMENTS = [
    (lambda: (*qkv(heads_q=6, heads_kv=4), {}), r"Hq = 6 must be a multiple of the number of KV heads Hkv = 4"),
    (lambda: (*qkv(), {"cu_seqlens": torch.tensor([0, 6])}), "cu_seqlens must be Int"),
    (lambda: (*qkv(), {"max_seqlen": 5}), "max_seqlen = 5 is smaller than the one sequence of T = 6"),
    (lambda: (*qkv(), {"cu_seqlens": torch.tensor([[0, 6]], dtype=torch.int32)}), "cu_seqlens must have 1 dimensions"),
    (lambda: (qkv()[0].to(torch.bfloat16), *qkv()[1:], {}), "k has dtype Float but q has dtype BFloat16"),
    (lambda: (*qkv(dtype=torch.float64), {}), "q must be float32, bfloat16 or float16"),
    (lambda: (qkv()[0][:, :, :4], *(t[:, :, :4] for t in qkv()[1:]), {}), "q must be contiguous"),
    (lambda: (qkv()[0].flatten(1), *qkv()[1:], {}), r"q must have 3 dimensions \[T, Hq, D\]"),
    (lambda: (qkv()[0], qkv(total=5)[1], qkv(total=5)[2], {}), "k must have the tokens and head dim of q"),
    (lambda: (*qkv()[:2], qkv(heads_kv=1)[2], {}), "k and v must have one shape"),
    (lambda: (*qkv(), {"softmax_scale": -0.5}), "softmax_scale must be finite and > 0, got -0.5"),
    (lambda: (*qkv(), {"softmax_scale": 0.0}), "softmax_scale must be finite and > 0, got 0"),
    (lambda: (*qkv(), {"softmax_scale": float("inf")}), "softmax_scale must be finite and > 0"),
]
# The values of a host cu_seqlens, which the CPU backend reads (the CUDA kernels never sync to read them).
BAD_CU_SEQLENS_VALUES = [
    (lambda: (*qkv(), {"cu_seqlens": torch.tensor([1, 6], dtype=torch.int32)}), "cu_seqlens must start at 0"),
    (lambda: (*qkv(), {"cu_seqlens": torch.tensor([0, 4, 2, 6], dtype=torch.int32)}),
     r"cu_seqlens must be non-decreasing, got cu_seqlens\[2\] = 2 < cu_seqlens\[1\] = 4"),
    (lambda: (*qkv(), {"cu_seqlens": torch.tensor([0, 5], dtype=torch.int32)}), "cu_seqlens must end at T = 6"),
    (lambda: (*qkv(), {"cu_seqlens": torch.tensor([0, 2, 6], dtype=torch.int32), "max_seqlen": 3}),
     "max_seqlen = 3 is smaller than sequence 1 of length 4"),
]


@pytest.mark.parametrize("make, message", BAD_ARGUMENTS + BAD_CU_SEQLENS_VALUES)
def test_bad_input_names_the_argument(make, message):
    q, k, v, kw = make()
    with pytest.raises(RuntimeError, match=message):
        ops.flash_attention(q, k, v, **kw)


def test_backward_rejects_bad_lse_and_grad_out():
    q, k, v = qkv()
    out, lse = torch.ops.internlm2.flash_attention_forward(q, k, v, None, 6, True, 0.3)
    bwd = torch.ops.internlm2.flash_attention_backward
    with pytest.raises(RuntimeError, match=r"lse must have shape \[Hq, T\] = \[4, 6\]"):
        bwd(out, q, k, v, out, lse.t().contiguous(), None, None, 6, True, 0.3)
    with pytest.raises(RuntimeError, match="grad_lse must be Float"):
        bwd(out, q, k, v, out, lse, lse.double(), None, 6, True, 0.3)
    with pytest.raises(RuntimeError, match="grad_out must have the shape of q"):
        bwd(out[:5], q, k, v, out, lse, None, None, 6, True, 0.3)
