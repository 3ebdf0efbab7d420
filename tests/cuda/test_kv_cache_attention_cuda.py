"""The CUDA KV-cache attention kernel (csrc/cuda/kv_cache_attention.cu): registration everywhere; where a
GPU is present, the CPU tests' cases (cache slots past each length hold NaN) judged by FlashAttention's
rule against float64, the split-K path, the reference fallback, and CUDA-graph capture."""

import pytest
import torch

from internlm2 import ops
from tests.cuda.support import assert_registered_for_cuda, run_in_cuda_graph
from tests.numerics import assert_within_reference_error, poison_cuda_allocator, requires_cuda
from tests.test_kv_cache_attention import CACHE_CASES, assert_tight, make_case

LOWP = [torch.bfloat16, torch.float16]


def test_registered_for_cuda():
    assert_registered_for_cuda("kv_cache_attention")


def cuda_case(*args, **kw):
    return tuple(None if t is None else t.cuda() for t in make_case(*args, **kw))


def check_against_fp64(q, k_cache, v_cache, k_lengths, cu, **kw):
    poison_cuda_allocator()  # an output element the kernel forgets to write reads NaN
    out, lse = ops.kv_cache_attention(q, k_cache, v_cache, k_lengths, cu, return_lse=True, **kw)
    ref_out, ref_lse = ops.kv_cache_attention_reference(
        *(t.double() for t in (q, k_cache, v_cache)), k_lengths, cu, return_lse=True, **kw)
    lowp = ops.kv_cache_attention_reference(q, k_cache, v_cache, k_lengths, cu, **kw)
    assert_tight(lse, ref_lse, "lse", tol=1e-4)
    assert torch.isfinite(out).all(), "out has non-finite values"
    assert_within_reference_error(out, lowp, ref_out, 2.0, "out")


@requires_cuda
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_decode_one_query_per_sequence(dtype, head_dim, group):
    k_lens = [1, 37, 300, 64, 2000]
    check_against_fp64(*cuda_case([1] * len(k_lens), k_lens, 8, 8 // group, head_dim, dtype, packed=False))


@requires_cuda
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_prefill_with_a_cache(dtype, causal, group):
    q_lens, k_lens = [5, 20, 1, 70], [40, 20, 9, 200]
    check_against_fp64(*cuda_case(q_lens, k_lens, 8, 8 // group, 128, dtype), causal=causal)


@requires_cuda
@pytest.mark.parametrize("lens", CACHE_CASES.values(), ids=CACHE_CASES.keys())
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cache_edge_cases(lens, causal):
    q_lens, k_lens = lens
    check_against_fp64(*cuda_case(q_lens, k_lens, 4, 1, 64, torch.bfloat16), causal=causal)


@requires_cuda
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"d{d}")
def test_long_cache_is_split_over_ctas(head_dim):
    """One sequence and one KV head fill a handful of CTAs: the keys are split and merged by lse."""
    check_against_fp64(*cuda_case([1], [20000], 8, 1, head_dim, torch.bfloat16, packed=False))
    check_against_fp64(*cuda_case([3], [9000], 4, 1, head_dim, torch.float16))


@requires_cuda
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_outliers(dtype):
    check_against_fp64(*cuda_case([1, 4], [90, 180], 8, 2, 128, dtype, outliers=True))


@requires_cuda
@pytest.mark.parametrize("dtype, head_dim", [(torch.float32, 128), (torch.bfloat16, 96)])
def test_inputs_the_kernel_does_not_take_run_the_reference(dtype, head_dim):
    q, k_cache, v_cache, k_lengths, cu = cuda_case([2, 1], [30, 8], 4, 2, head_dim, dtype)
    expected = ops.kv_cache_attention_reference(q, k_cache, v_cache, k_lengths, cu)
    assert torch.equal(ops.kv_cache_attention(q, k_cache, v_cache, k_lengths, cu), expected)
    with pytest.raises(RuntimeError, match="kv_cache_attention on CUDA supports"):
        torch.ops.internlm2.kv_cache_attention(q, k_cache, v_cache, k_lengths, cu, 2, True, 0.1)


@requires_cuda
def test_captures_in_a_cuda_graph():
    q, k_cache, v_cache, k_lengths, _ = cuda_case([1, 1, 1], [100, 3000, 7], 8, 2, 128, torch.bfloat16, packed=False)

    def step(q, k_cache, v_cache, k_lengths):
        return torch.ops.internlm2.kv_cache_attention(q, k_cache, v_cache, k_lengths, None, 1, True, 0.125)

    eager = step(q, k_cache, v_cache, k_lengths)
    replayed = run_in_cuda_graph(step, q, k_cache, v_cache, k_lengths)
    for a, b in zip(eager, replayed):
        assert torch.equal(a, b)


@requires_cuda
def test_opcheck():
    q, k_cache, v_cache, k_lengths, cu = cuda_case([3, 1], [20, 45], 4, 2, 64, torch.bfloat16)
    k_cache, v_cache = (t.nan_to_num() for t in (k_cache, v_cache))
    torch.library.opcheck(torch.ops.internlm2.kv_cache_attention.default,
                          (q, k_cache, v_cache, k_lengths, cu, 3, True, 0.125))
