// The C++ face of the library: for each op, the argument contract that every backend checks before it
// launches anything (so CPU and CUDA reject bad input with the same message), implemented in
// csrc/common/<op>.cpp. Schemas live in torch_bindings.cpp; kernels in cpu/ and cuda/.
#pragma once

#include <ATen/core/Tensor.h>

namespace internlm2 {

// ---- rms_norm
// rms_norm_forward(x [..., H], weight [H], eps) -> (y [..., H] in x.dtype, rstd [rows] float32)
// y = x * rstd * weight with rstd = 1 / sqrt(mean(x^2) + eps), all math in float32.
void check_rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps);
// rms_norm_backward(grad_y, x, weight, rstd) -> (grad_x, grad_weight)
void check_rms_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& rstd);

}  // namespace internlm2
