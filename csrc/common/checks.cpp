#include "common/checks.h"

#include <sstream>

namespace internlm2 {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", dt);
}

void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* shape_hint) {
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions ", shape_hint, ", got shape ",
              shape_str(t));
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (shape ", shape_str(t), ", strides ",
              t.strides(), "); call .contiguous() first");
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; both must be on the same device");
}

void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name,
              " has dtype ", ref.scalar_type(), "; they must match");
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected) {
  TORCH_CHECK(t.scalar_type() == expected, name, " must be ", expected, ", got ", t.scalar_type());
}

}  // namespace internlm2
