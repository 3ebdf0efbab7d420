// The CPU backend of internlm2::kv_cache_attention: check (including the values of k_lengths and
// cu_seqlens_q, which are on the host here), allocate, dispatch to the kernel compiled for the best
// instruction set (kv_cache_attention_kernel.cpp).
#include <torch/library.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "ops.h"

namespace internlm2::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> kv_cache_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache, const at::Tensor& k_lengths,
                                                      const std::optional<at::Tensor>& cu_seqlens_q,
                                                      int64_t max_seqlen_q, bool causal, double softmax_scale) {
  check_kv_cache_attention(q, k_cache, v_cache, k_lengths, cu_seqlens_q, max_seqlen_q, softmax_scale);
  check_kv_cache_lengths_values(k_lengths, cu_seqlens_q, k_cache.size(2), q.size(0), max_seqlen_q, causal);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  if (q.numel() > 0) {
    INTERNLM2_CPU_DISPATCH(kv_cache_attention_kernel)(
        q, k_cache, v_cache, k_lengths.const_data_ptr<int32_t>(),
        cu_seqlens_q.has_value() ? cu_seqlens_q->const_data_ptr<int32_t>() : nullptr, causal, softmax_scale, out, lse);
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(internlm2, CPU, m) { m.impl("kv_cache_attention", &kv_cache_attention); }

}  // namespace internlm2::cpu
