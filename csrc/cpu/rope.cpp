// The CPU backend of internlm2::rope_cos_sin / apply_rope: check, allocate, dispatch to the kernel
// compiled for the best instruction set (rope_kernel.cpp).
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "ops.h"

namespace internlm2::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> rope_cos_sin(const at::Tensor& position_ids, int64_t head_dim, double theta) {
  check_rope_cos_sin(position_ids, head_dim, theta);
  const auto options = position_ids.options().dtype(at::kFloat);
  at::Tensor cos = at::empty({position_ids.size(0), head_dim}, options);
  at::Tensor sin = at::empty({position_ids.size(0), head_dim}, options);
  INTERNLM2_CPU_DISPATCH(rope_cos_sin_kernel)(position_ids, theta, cos, sin);
  return {cos, sin};
}

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  check_apply_rope(x, cos, sin);
  at::Tensor out = at::empty(x.sizes(), x.options());
  INTERNLM2_CPU_DISPATCH(apply_rope_kernel)(x, cos, sin, inverse, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(internlm2, CPU, m) {
  m.impl("rope_cos_sin", &rope_cos_sin);
  m.impl("apply_rope", &apply_rope);
}

}  // namespace internlm2::cpu
