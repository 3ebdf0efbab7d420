// Declarations of the CPU kernels, once per instruction-set namespace (see isa.h). Kernels receive
// checked, contiguous tensors with outputs already allocated; the op files in this folder do the
// checking and allocation and pick the kernel with INTERNLM2_CPU_DISPATCH (INTERNLM2_CPU_DISPATCH_BF16
// for the kernels that have an AVX512_BF16 build).
#pragma once

#include <ATen/core/Tensor.h>

// The kernels that also have an AVX512_BF16 build (CMakeLists.txt: INTERNLM2_CPU_BF16_KERNEL_SOURCES).
#define INTERNLM2_DECLARE_CPU_BF16_KERNELS(ISA)                                                       \
  namespace ISA {                                                                                    \
  void flash_attention_forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,  \
                                      const int32_t* cu_seqlens, int64_t num_seqs, bool causal,       \
                                      double softmax_scale, at::Tensor& out, at::Tensor& lse);        \
  void flash_attention_backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, \
                                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, \
                                       const float* grad_lse, const int32_t* cu_seqlens, int64_t num_seqs, \
                                       bool causal, double softmax_scale, at::Tensor& grad_q,          \
                                       at::Tensor& grad_k, at::Tensor& grad_v);                        \
  }

#define INTERNLM2_DECLARE_CPU_KERNELS(ISA)                                                            \
  namespace ISA {                                                                                    \
  void rms_norm_forward_kernel(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& y, \
                               at::Tensor& rstd);                                                    \
  void rms_norm_backward_kernel(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, \
                                const at::Tensor& rstd, at::Tensor& grad_x, at::Tensor& grad_weight);   \
  void swiglu_forward_kernel(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out);          \
  void swiglu_backward_kernel(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& up, \
                              at::Tensor& grad_gate, at::Tensor& grad_up);                            \
  void rope_cos_sin_kernel(const at::Tensor& position_ids, double theta, at::Tensor& cos, at::Tensor& sin); \
  void apply_rope_kernel(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse, \
                         at::Tensor& out);                                                            \
  void kv_cache_attention_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, \
                                 const int32_t* k_lengths, const int32_t* cu_seqlens_q, bool causal,         \
                                 double softmax_scale, at::Tensor& out, at::Tensor& lse);                     \
  void cross_entropy_chunk_kernel(at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,  \
                                  double z_loss_weight, const float* grad_scale, bool per_row_scale,   \
                                  at::Tensor& loss, at::Tensor& lse);                                  \
  }                                                                                                  \
  INTERNLM2_DECLARE_CPU_BF16_KERNELS(ISA)

namespace internlm2::cpu {
INTERNLM2_DECLARE_CPU_KERNELS(DEFAULT)
INTERNLM2_DECLARE_CPU_KERNELS(AVX2)
INTERNLM2_DECLARE_CPU_KERNELS(AVX512)
INTERNLM2_DECLARE_CPU_BF16_KERNELS(AVX512_BF16)
}  // namespace internlm2::cpu
