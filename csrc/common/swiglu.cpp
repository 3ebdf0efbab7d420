#include "common/checks.h"
#include "ops.h"

namespace internlm2 {

void check_swiglu_forward(const at::Tensor& gate, const at::Tensor& up) {
  check_float_dtype(gate, "swiglu: gate");
  check_contiguous(gate, "swiglu: gate");
  TORCH_CHECK(up.sizes() == gate.sizes(), "swiglu: up must have the shape of gate ", shape_str(gate), ", got ",
              shape_str(up));
  check_same_dtype(up, "swiglu: up", gate, "gate");
  check_same_device(up, "swiglu: up", gate, "gate");
  check_contiguous(up, "swiglu: up");
}

void check_swiglu_backward(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_forward(gate, up);
  TORCH_CHECK(grad_out.sizes() == gate.sizes(), "swiglu backward: grad_out must have the shape of gate ",
              shape_str(gate), ", got ", shape_str(grad_out));
  check_same_dtype(grad_out, "swiglu backward: grad_out", gate, "gate");
  check_same_device(grad_out, "swiglu backward: grad_out", gate, "gate");
  check_contiguous(grad_out, "swiglu backward: grad_out");
}

}  // namespace internlm2
