// Declarations of the CPU kernels, once per instruction-set namespace (see isa.h). Kernels receive
// checked, contiguous tensors with outputs already allocated; the op files in this folder do the
// checking and allocation and pick the kernel with INTERNLM2_CPU_DISPATCH.
#pragma once

#include <ATen/core/Tensor.h>

#define INTERNLM2_DECLARE_CPU_KERNELS(ISA)                                                            \
  namespace ISA {                                                                                    \
  void rms_norm_forward_kernel(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& y, \
                               at::Tensor& rstd);                                                    \
  void rms_norm_backward_kernel(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, \
                                const at::Tensor& rstd, at::Tensor& grad_x, at::Tensor& grad_weight);   \
  }

namespace internlm2::cpu {
INTERNLM2_DECLARE_CPU_KERNELS(DEFAULT)
INTERNLM2_DECLARE_CPU_KERNELS(AVX2)
INTERNLM2_DECLARE_CPU_KERNELS(AVX512)
}  // namespace internlm2::cpu
