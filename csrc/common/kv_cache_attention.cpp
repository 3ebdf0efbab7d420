#include <cmath>

#include "common/checks.h"
#include "ops.h"

namespace internlm2 {

void check_kv_cache_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& k_lengths, const std::optional<at::Tensor>& cu_seqlens_q,
                              int64_t max_seqlen_q, double softmax_scale) {
  constexpr const char* op = "kv_cache_attention";
  check_dim(q, "kv_cache_attention: q", 3, "[Tq, Hq, D]");
  check_dim(k_cache, "kv_cache_attention: k_cache", 4, "[B, Hkv, S, D]");
  check_dim(v_cache, "kv_cache_attention: v_cache", 4, "[B, Hkv, S, D]");
  check_float_dtype(q, "kv_cache_attention: q");
  check_same_dtype(k_cache, "kv_cache_attention: k_cache", q, "q");
  check_same_dtype(v_cache, "kv_cache_attention: v_cache", q, "q");
  check_same_device(k_cache, "kv_cache_attention: k_cache", q, "q");
  check_same_device(v_cache, "kv_cache_attention: v_cache", q, "q");
  check_contiguous(q, "kv_cache_attention: q");
  check_contiguous(k_cache, "kv_cache_attention: k_cache");
  check_contiguous(v_cache, "kv_cache_attention: v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), op, ": k_cache and v_cache must have one shape [B, Hkv, S, D], got ",
              shape_str(k_cache), " and ", shape_str(v_cache));
  TORCH_CHECK(q.size(2) > 0 && k_cache.size(3) == q.size(2), op, ": the head dim D of q ", shape_str(q),
              " must be positive and equal k_cache's ", shape_str(k_cache));
  TORCH_CHECK(k_cache.size(1) > 0 && q.size(1) % k_cache.size(1) == 0, op, ": the number of query heads Hq = ",
              q.size(1), " must be a multiple of the number of KV heads Hkv = ", k_cache.size(1), " (k_cache ",
              shape_str(k_cache), ")");
  const int64_t batch = k_cache.size(0);
  TORCH_CHECK(k_lengths.dim() == 1 && k_lengths.size(0) == batch, op, ": k_lengths must have shape [B] = [", batch,
              "] (one length per cache row), got ", shape_str(k_lengths));
  check_dtype(k_lengths, "kv_cache_attention: k_lengths", at::kInt);
  check_same_device(k_lengths, "kv_cache_attention: k_lengths", q, "q");
  check_contiguous(k_lengths, "kv_cache_attention: k_lengths");
  TORCH_CHECK(max_seqlen_q >= 0, op, ": max_seqlen_q must be >= 0, got ", max_seqlen_q);
  if (cu_seqlens_q.has_value()) {
    TORCH_CHECK(cu_seqlens_q->dim() == 1 && cu_seqlens_q->size(0) == batch + 1, op,
                ": cu_seqlens_q must have shape [B + 1] = [", batch + 1, "], got ", shape_str(*cu_seqlens_q));
    check_dtype(*cu_seqlens_q, "kv_cache_attention: cu_seqlens_q", at::kInt);
    check_same_device(*cu_seqlens_q, "kv_cache_attention: cu_seqlens_q", q, "q");
    check_contiguous(*cu_seqlens_q, "kv_cache_attention: cu_seqlens_q");
  } else {
    TORCH_CHECK(q.size(0) == batch, op, ": without cu_seqlens_q every sequence has one query, so q must have B = ",
                batch, " tokens, got q ", shape_str(q));
    TORCH_CHECK(max_seqlen_q >= (batch > 0 ? 1 : 0), op, ": max_seqlen_q = ", max_seqlen_q,
                " is smaller than the one query per sequence (no cu_seqlens_q given)");
  }
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale >= 0, op, ": softmax_scale must be finite and >= 0, got ",
              softmax_scale);
}

void check_kv_cache_lengths_values(const at::Tensor& k_lengths, const std::optional<at::Tensor>& cu_seqlens_q,
                                   int64_t capacity, int64_t total_q, int64_t max_seqlen_q, bool causal) {
  TORCH_CHECK(k_lengths.device().is_cpu(), "check_kv_cache_lengths_values reads k_lengths on the host; got a tensor on ",
              k_lengths.device());
  if (cu_seqlens_q.has_value()) check_cu_seqlens_values(*cu_seqlens_q, total_q, max_seqlen_q, "kv_cache_attention", "_q");
  const int32_t* lengths = k_lengths.const_data_ptr<int32_t>();
  const int32_t* cu = cu_seqlens_q.has_value() ? cu_seqlens_q->const_data_ptr<int32_t>() : nullptr;
  for (int64_t b = 0; b < k_lengths.numel(); ++b) {
    TORCH_CHECK(lengths[b] >= 0 && lengths[b] <= capacity, "kv_cache_attention: k_lengths[", b, "] = ", lengths[b],
                " is outside [0, S = ", capacity, "] (the cache's slots per sequence)");
    const int64_t queries = cu ? cu[b + 1] - cu[b] : 1;
    TORCH_CHECK(!causal || queries <= lengths[b], "kv_cache_attention: sequence ", b, " has ", queries,
                " new queries but k_lengths[", b, "] = ", lengths[b],
                " keys; with causal=True the cache must already hold the new tokens' keys");
  }
}

}  // namespace internlm2
