// The CPU backend of internlm2::flash_attention_forward / flash_attention_backward: check (including the
// values of cu_seqlens, which are on the host here), allocate, dispatch to the kernel compiled for the best
// instruction set (flash_attention_kernel.cpp).
#include <torch/library.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "ops.h"

namespace internlm2::cpu {
namespace {

// The host pointer to the sequence offsets (nullptr: one sequence) and the number of sequences.
std::pair<const int32_t*, int64_t> sequences(const std::optional<at::Tensor>& cu_seqlens, int64_t total,
                                             int64_t max_seqlen) {
  if (!cu_seqlens.has_value()) return {nullptr, 1};
  check_cu_seqlens_values(*cu_seqlens, total, max_seqlen);
  return {cu_seqlens->const_data_ptr<int32_t>(), cu_seqlens->numel() - 1};
}

std::tuple<at::Tensor, at::Tensor> flash_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v,
                                                           const std::optional<at::Tensor>& cu_seqlens,
                                                           int64_t max_seqlen, bool causal, double softmax_scale) {
  check_flash_attention_forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale);
  const auto [cu, num_seqs] = sequences(cu_seqlens, q.size(0), max_seqlen);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  if (q.numel() > 0) {
    INTERNLM2_CPU_DISPATCH_BF16(flash_attention_forward_kernel)(q, k, v, cu, num_seqs, causal, softmax_scale, out, lse);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& cu_seqlens,
    int64_t max_seqlen, bool causal, double softmax_scale) {
  check_flash_attention_backward(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens, max_seqlen, softmax_scale);
  const auto [cu, num_seqs] = sequences(cu_seqlens, q.size(0), max_seqlen);
  at::Tensor grad_q = at::empty_like(q);
  at::Tensor grad_k = at::empty_like(k);
  at::Tensor grad_v = at::empty_like(v);
  if (q.numel() > 0) {
    INTERNLM2_CPU_DISPATCH_BF16(flash_attention_backward_kernel)(
        grad_out, q, k, v, out, lse, grad_lse.has_value() ? grad_lse->const_data_ptr<float>() : nullptr, cu, num_seqs,
        causal, softmax_scale, grad_q, grad_k, grad_v);
  }
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(internlm2, CPU, m) {
  m.impl("flash_attention_forward", &flash_attention_forward);
  m.impl("flash_attention_backward", &flash_attention_backward);
}

}  // namespace internlm2::cpu
