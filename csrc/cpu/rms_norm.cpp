// The CPU backend of internlm2::rms_norm_forward / rms_norm_backward: check, allocate, dispatch to the
// kernel compiled for the best instruction set (rms_norm_kernel.cpp).
#include <torch/library.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "ops.h"

namespace internlm2::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_forward(x, weight, eps);
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({rms_norm_rows(x)}, x.options().dtype(at::kFloat));
  if (x.size(-1) == 0) return {y, rstd.fill_(NAN)};
  INTERNLM2_CPU_DISPATCH(rms_norm_forward_kernel)(x, weight, eps, y, rstd);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd) {
  check_rms_norm_backward(grad_y, x, weight, rstd);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_weight = at::empty_like(weight);
  INTERNLM2_CPU_DISPATCH(rms_norm_backward_kernel)(grad_y, x, weight, rstd, grad_x, grad_weight);
  return {grad_x, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(internlm2, CPU, m) {
  m.impl("rms_norm_forward", &rms_norm_forward);
  m.impl("rms_norm_backward", &rms_norm_backward);
}

}  // namespace internlm2::cpu
