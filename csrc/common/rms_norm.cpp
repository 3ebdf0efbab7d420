#include "common/checks.h"
#include "ops.h"

#include <cmath>

namespace internlm2 {

int64_t rms_norm_rows(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

void check_rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() >= 1, "rms_norm: x must have at least 1 dimension [..., H], got a scalar");
  check_float_dtype(x, "rms_norm: x");
  check_contiguous(x, "rms_norm: x");
  check_dim(weight, "rms_norm: weight", 1, "[H]");
  TORCH_CHECK(weight.size(0) == x.size(-1), "rms_norm: weight must have shape [", x.size(-1),
              "] to match the last dimension of x ", shape_str(x), ", got ", shape_str(weight));
  check_same_dtype(weight, "rms_norm: weight", x, "x");
  check_same_device(weight, "rms_norm: weight", x, "x");
  check_contiguous(weight, "rms_norm: weight");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "rms_norm: eps must be finite and >= 0, got ", eps);
}

void check_rms_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& rstd) {
  check_rms_norm_forward(x, weight, 0.0);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "rms_norm backward: grad_y must have the shape of x ",
              shape_str(x), ", got ", shape_str(grad_y));
  check_same_dtype(grad_y, "rms_norm backward: grad_y", x, "x");
  check_same_device(grad_y, "rms_norm backward: grad_y", x, "x");
  check_contiguous(grad_y, "rms_norm backward: grad_y");
  const int64_t rows = rms_norm_rows(x);
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == rows, "rms_norm backward: rstd must have shape [", rows,
              "] (one per row of x), got ", shape_str(rstd));
  check_dtype(rstd, "rms_norm backward: rstd", at::kFloat);
  check_same_device(rstd, "rms_norm backward: rstd", x, "x");
  check_contiguous(rstd, "rms_norm backward: rstd");
}

}  // namespace internlm2
