"""kv_cache_attention on CPU against a float64 oracle and torch SDPA: decoding (one query per sequence),
prefill with a cache (several new queries over a longer cache), q_len == k_len, empty cache rows, GQA
ratios, dtypes, head dims, the split-K path; cache slots past each sequence's length hold NaN, so a kernel
that reads them fails."""

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
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_case(q_lens, k_lens, heads_q, heads_kv, head_dim, dtype, capacity=None, outliers=False, packed=True):
    """q [sum(q_lens), Hq, D], caches [B, Hkv, S, D] with NaN past each k_len, k_lengths, cu_seqlens_q."""
    g = torch.Generator().manual_seed(fresh_seed())
    make = (lambda s: randn_with_outliers(s, dtype, generator=g)) if outliers else (
        lambda s: torch.randn(s, generator=g).to(dtype))
    capacity = capacity or max(k_lens) + 3
    q = make((sum(q_lens), heads_q, head_dim))
    k_cache, v_cache = (make((len(k_lens), heads_kv, capacity, head_dim)) for _ in range(2))
    for b, n in enumerate(k_lens):
        k_cache[b, :, n:] = float("nan")
        v_cache[b, :, n:] = float("nan")
    k_lengths = torch.tensor(k_lens, dtype=torch.int32)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32) if packed else None
    return q, k_cache, v_cache, k_lengths, cu


def assert_tight(actual, expected, what, tol=2e-5):
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{what}: infinities differ from the oracle's"
    scale = max(1.0, expected[finite].abs().max().item()) if finite.any() else 1.0
    err = (actual.double()[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} x {scale:.3g}"


def check_against_fp64(q, k_cache, v_cache, k_lengths, cu, **kw):
    out, lse = ops.kv_cache_attention(q, k_cache, v_cache, k_lengths, cu, return_lse=True, **kw)
    ref_out, ref_lse = ops.kv_cache_attention_reference(
        *(t.double() for t in (q, k_cache, v_cache)), k_lengths, cu, return_lse=True, **kw)
    assert_tight(lse, ref_lse, "lse", tol=2e-5 if q.dtype == torch.float32 else 1e-4)
    if q.dtype == torch.float32:
        assert_tight(out, ref_out, "out")
    else:
        lowp = ops.kv_cache_attention_reference(q, k_cache, v_cache, k_lengths, cu, **kw)
        assert_within_reference_error(out, lowp, ref_out, 2.0, "out")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_decode_one_query_per_sequence(dtype, group):
    k_lens = [1, 37, 300, 64]
    case = make_case([1] * len(k_lens), k_lens, 8, 8 // group, 64, dtype, packed=False)
    check_against_fp64(*case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_prefill_with_a_cache(dtype, causal, group):
    """Several new tokens per sequence over cached ones: q_len < k_len, q_len == k_len, q_len 1."""
    q_lens, k_lens = [5, 20, 1, 70], [40, 20, 9, 200]
    check_against_fp64(*make_case(q_lens, k_lens, 8, 8 // group, 64, dtype), causal=causal)


@pytest.mark.parametrize("head_dim", [128, 72, 33, 8], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_dims(head_dim, dtype):
    check_against_fp64(*make_case([3, 1], [50, 130], 4, 2, head_dim, dtype))


CACHE_CASES = {
    "empty-cache-rows": ([0, 2, 0, 1], [0, 5, 0, 1]),
    "all-rows-empty": ([0, 0], [0, 0]),
    "first-token-of-each-sequence": ([1, 1, 1], [1, 1, 1]),
    "blocks-of-many-queries": ([130, 7], [400, 7]),
    "tile-boundaries": ([1, 2, 1, 3], [63, 64, 65, 129]),
}


@pytest.mark.parametrize("lens", CACHE_CASES.values(), ids=CACHE_CASES.keys())
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cache_edge_cases(lens, causal):
    q_lens, k_lens = lens
    check_against_fp64(*make_case(q_lens, k_lens, 4, 1, 64, torch.float32), causal=causal)


def test_non_causal_queries_with_no_keys_get_zero_and_minus_infinity():
    q, k_cache, v_cache, k_lengths, cu = make_case([2, 3], [0, 4], 4, 2, 16, torch.float32)
    out, lse = ops.kv_cache_attention(q, k_cache, v_cache, k_lengths, cu, causal=False, return_lse=True)
    assert torch.count_nonzero(out[:2]) == 0 and torch.isneginf(lse[:, :2]).all()
    assert torch.isfinite(lse[:, 2:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_long_cache_split_over_threads(dtype, threads):
    """One sequence and one KV head leave threads idle: the keys are split and the parts merged by lse."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_fp64(*make_case([1], [3000], 8, 1, 64, dtype, packed=False))
        check_against_fp64(*make_case([3], [2500], 4, 1, 64, dtype))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_outliers(dtype):
    check_against_fp64(*make_case([1, 4], [90, 180], 8, 2, 64, dtype, outliers=True))


def test_softmax_scale_is_honoured():
    check_against_fp64(*make_case([2, 1], [30, 8], 4, 4, 32, torch.float32), softmax_scale=0.7)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("group", [1, 4])
def test_agrees_with_torch_sdpa(causal, group):
    """Each sequence against SDPA with the end-aligned causal mask written out as a boolean matrix."""
    q_lens, k_lens = [1, 6, 33], [17, 6, 250]
    q, k_cache, v_cache, k_lengths, cu = make_case(q_lens, k_lens, 8, 8 // group, 64, torch.float32)
    out = ops.kv_cache_attention(q, k_cache, v_cache, k_lengths, cu, causal=causal)
    for b, (start, q_len, k_len) in enumerate(zip(cu.tolist(), q_lens, k_lens)):
        keys = torch.arange(k_len)[None, :]
        mask = keys <= k_len - q_len + torch.arange(q_len)[:, None] if causal else None
        ref = F.scaled_dot_product_attention(q[start:start + q_len].transpose(0, 1), k_cache[b, :, :k_len],
                                             v_cache[b, :, :k_len], attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(out[start:start + q_len], ref.transpose(0, 1), rtol=1e-4, atol=1e-5)


def test_full_cache_prefill_equals_flash_attention():
    """q_len == k_len for every sequence is ordinary causal attention over packed sequences."""
    lengths = [12, 1, 40]
    q, k_cache, v_cache, k_lengths, cu = make_case(lengths, lengths, 8, 2, 64, torch.float32, capacity=40)
    packed_k = torch.cat([k_cache[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)])
    packed_v = torch.cat([v_cache[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)])
    expected = ops.flash_attention(q, packed_k.contiguous(), packed_v.contiguous(), cu)
    torch.testing.assert_close(ops.kv_cache_attention(q, k_cache, v_cache, k_lengths, cu), expected,
                               rtol=1e-5, atol=1e-6)


def test_opcheck():
    q, k_cache, v_cache, k_lengths, cu = make_case([3, 1], [20, 45], 4, 2, 16, torch.float32)
    k_cache, v_cache = (t.nan_to_num() for t in (k_cache, v_cache))  # opcheck compares whole outputs
    for args in ((q, k_cache, v_cache, k_lengths, cu, 3, True, 0.25), (q[:2], k_cache, v_cache, k_lengths, None, 1,
                                                                        False, 0.25)):
        torch.library.opcheck(torch.ops.internlm2.kv_cache_attention.default, args)


def test_torch_compile_matches_eager():
    q, k_cache, v_cache, k_lengths, cu = make_case([1, 1], [20, 45], 4, 2, 16, torch.float32, packed=False)
    compiled = torch.compile(ops.kv_cache_attention, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k_cache, v_cache, k_lengths), ops.kv_cache_attention(q, k_cache, v_cache,
                                                                                                k_lengths))


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_every_instruction_set_matches_reference(isa):
    run_with_cpu_isa(
        isa,
        "import torch\n"
        "from internlm2 import ops\n"
        "k_lengths = torch.tensor([1, 70, 1300], dtype=torch.int32)\n"
        "cu = torch.tensor([0, 1, 4, 6], dtype=torch.int32)\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "  q = torch.randn(6, 4, 40).to(dt)\n"
        "  k, v = (torch.randn(3, 2, 1300, 40).to(dt) for _ in range(2))\n"
        "  torch.set_num_threads(1)\n"
        "  for args in ((q, k, v, k_lengths, cu), (q[:3], k, v, k_lengths)):\n"
        "    out = ops.kv_cache_attention(*args)\n"
        "    ref = ops.kv_cache_attention_reference(*(t.double() for t in args[:3]), *args[3:])\n"
        "    tol = 2e-5 if dt == torch.float32 else 3e-2\n"
        "    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)\n",
    )


# ---- bad input: each error names the argument and the problem


def small_case(**kw):
    q, k_cache, v_cache, k_lengths, cu = make_case([2, 1], [5, 3], 4, 2, 8, torch.float32, capacity=6)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, k_lengths=k_lengths, cu_seqlens_q=cu)
    args.update(kw)
    return args


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: dict(q=a["q"][:, :3].contiguous()), "Hq = 3 must be a multiple of the number of KV heads Hkv = 2"),
        (lambda a: dict(k_cache=a["k_cache"][0]), r"k_cache must have 4 dimensions \[B, Hkv, S, D\]"),
        (lambda a: dict(v_cache=a["v_cache"][:, :1].contiguous()), "k_cache and v_cache must have one shape"),
        (lambda a: dict(q=a["q"].to(torch.bfloat16)), "k_cache has dtype Float but q has dtype BFloat16"),
        (lambda a: dict(k_cache=a["k_cache"].transpose(1, 2)), "k_cache must be contiguous"),
        (lambda a: dict(q=a["q"][..., :4].contiguous()), "the head dim D of q"),
        (lambda a: dict(k_lengths=a["k_lengths"].long()), "k_lengths must be Int"),
        (lambda a: dict(k_lengths=a["k_lengths"][:1]), r"k_lengths must have shape \[B\] = \[2\]"),
        (lambda a: dict(k_lengths=torch.tensor([7, 3], dtype=torch.int32)),
         r"k_lengths\[0\] = 7 is outside \[0, S = 6\]"),
        (lambda a: dict(k_lengths=torch.tensor([1, 3], dtype=torch.int32)),
         r"sequence 0 has 2 new queries but k_lengths\[0\] = 1 keys"),
        (lambda a: dict(cu_seqlens_q=torch.tensor([0, 2], dtype=torch.int32)),
         r"cu_seqlens_q must have shape \[B \+ 1\] = \[3\]"),
        (lambda a: dict(cu_seqlens_q=torch.tensor([0, 2, 2], dtype=torch.int32)), "cu_seqlens_q must end at T_q = 3"),
        (lambda a: dict(cu_seqlens_q=torch.tensor([0, 3, 1], dtype=torch.int32), max_seqlen_q=3),
         "cu_seqlens_q must be non-decreasing"),
        (lambda a: dict(cu_seqlens_q=None), "without cu_seqlens_q every sequence has one query, so q must have B = 2"),
        (lambda a: dict(max_seqlen_q=1), "max_seqlen_q = 1 is smaller than sequence 0 of length 2"),
        (lambda a: dict(softmax_scale=float("nan")), "softmax_scale must be finite and >= 0"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    args = small_case()
    args.update(change(args))
    with pytest.raises(RuntimeError, match=message):
        ops.kv_cache_attention(**args)
