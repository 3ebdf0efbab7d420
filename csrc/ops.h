// The C++ face of the library: for each op, the argument contract that every backend checks before it
// launches anything (so CPU and CUDA reject bad input with the same message), implemented in
// csrc/common/<op>.cpp. Schemas live in torch_bindings.cpp; kernels in cpu/ and cuda/.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace internlm2 {

// ---- rms_norm
// rms_norm_forward(x [..., H], weight [H], eps) -> (y [..., H] in x.dtype, rstd [rows] float32)
// y = x * rstd * weight with rstd = 1 / sqrt(mean(x^2) + eps), all math in float32.
void check_rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps);
// One rstd per row: the product of x's leading dimensions (also when H == 0, where rstd is NaN: the mean
// of an empty row is undefined, as in torch.mean).
int64_t rms_norm_rows(const at::Tensor& x);
// rms_norm_backward(grad_y, x, weight, rstd) -> (grad_x, grad_weight)
void check_rms_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& rstd);

// ---- swiglu: gate and up of one shape and dtype, both contiguous.
void check_swiglu_forward(const at::Tensor& gate, const at::Tensor& up);
void check_swiglu_backward(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& up);

// ---- rope
void check_rope_cos_sin(const at::Tensor& position_ids, int64_t head_dim, double theta);
void check_apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// ---- flash attention (schemas and shapes in torch_bindings.cpp)
void check_flash_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                   double softmax_scale);
void check_flash_attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                    const std::optional<at::Tensor>& grad_lse,
                                    const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                    double softmax_scale);
// The values of a host (CPU) cu_seqlens: starts at 0, non-decreasing (empty sequences are allowed), ends
// at total_tokens, no sequence longer than max_seqlen. The CUDA backend can run it on a host copy.
// Messages name the op and the arguments cu_seqlens<suffix> / max_seqlen<suffix>.
void check_cu_seqlens_values(const at::Tensor& cu_seqlens, int64_t total_tokens, int64_t max_seqlen,
                             const char* op = "flash_attention", const char* suffix = "");

// ---- kv_cache_attention (schema and shapes in torch_bindings.cpp)
void check_kv_cache_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& k_lengths, const std::optional<at::Tensor>& cu_seqlens_q,
                              int64_t max_seqlen_q, double softmax_scale);
// The values of host (CPU) k_lengths and cu_seqlens_q: every length in [0, capacity], cu_seqlens_q valid
// for q's tokens, and with causal no sequence with more new queries than keys.
void check_kv_cache_lengths_values(const at::Tensor& k_lengths, const std::optional<at::Tensor>& cu_seqlens_q,
                                   int64_t capacity, int64_t total_q, int64_t max_seqlen_q, bool causal);

// ---- cross_entropy_chunk_
void check_cross_entropy_chunk(const at::Tensor& logits, const at::Tensor& labels,
                               const std::optional<at::Tensor>& grad_scale);
// Every host (CPU) label is in [0, num_classes) or equals ignore_index.
void check_cross_entropy_labels(const at::Tensor& labels, int64_t num_classes, int64_t ignore_index);

}  // namespace internlm2
