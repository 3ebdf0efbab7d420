#include "common/checks.h"
#include "ops.h"

#include <cmath>

namespace internlm2 {

void check_rope_cos_sin(const at::Tensor& position_ids, int64_t head_dim, double theta) {
  check_dim(position_ids, "rope_cos_sin: position_ids", 1, "[T]");
  const auto dt = position_ids.scalar_type();
  TORCH_CHECK(dt == at::kInt || dt == at::kLong, "rope_cos_sin: position_ids must be int32 or int64, got ", dt);
  check_contiguous(position_ids, "rope_cos_sin: position_ids");
  TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0, "rope_cos_sin: head_dim must be a positive even number, got ",
              head_dim);
  TORCH_CHECK(std::isfinite(theta) && theta > 0, "rope_cos_sin: theta must be finite and > 0, got ", theta);
}

void check_apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() >= 2, "apply_rope: x must have at least 2 dimensions [T, ..., D], got shape ", shape_str(x));
  check_float_dtype(x, "apply_rope: x");
  const int64_t tokens = x.size(0);
  const int64_t head_dim = x.size(-1);
  TORCH_CHECK(head_dim % 2 == 0, "apply_rope: the last dimension of x (head_dim) must be even, got shape ",
              shape_str(x));
  TORCH_CHECK(x.stride(-1) == 1 || x.numel() == 0, "apply_rope: x must be contiguous in its last dimension (stride 1), ",
              "got strides ", x.strides());
  for (const auto& [t, name] : {std::pair{&cos, "apply_rope: cos"}, std::pair{&sin, "apply_rope: sin"}}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == tokens && t->size(1) == head_dim, name, " must have shape [",
                tokens, ", ", head_dim, "] ([T, D] of x ", shape_str(x), "), got ", shape_str(*t));
    check_dtype(*t, name, at::kFloat);
    check_same_device(*t, name, x, "x");
    check_contiguous(*t, name);
  }
}

}  // namespace internlm2
