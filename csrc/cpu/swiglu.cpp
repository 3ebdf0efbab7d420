// The CPU backend of internlm2::swiglu_forward / swiglu_backward: check, allocate, dispatch to the kernel
// compiled for the best instruction set (swiglu_kernel.cpp).
#include <torch/library.h>

#include <ATen/ops/empty_like.h>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "ops.h"

namespace internlm2::cpu {
namespace {

at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_forward(gate, up);
  at::Tensor out = at::empty_like(gate);
  INTERNLM2_CPU_DISPATCH(swiglu_forward_kernel)(gate, up, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad_out, const at::Tensor& gate,
                                                   const at::Tensor& up) {
  check_swiglu_backward(grad_out, gate, up);
  at::Tensor grad_gate = at::empty_like(gate);
  at::Tensor grad_up = at::empty_like(up);
  INTERNLM2_CPU_DISPATCH(swiglu_backward_kernel)(grad_out, gate, up, grad_gate, grad_up);
  return {grad_gate, grad_up};
}

}  // namespace

TORCH_LIBRARY_IMPL(internlm2, CPU, m) {
  m.impl("swiglu_forward", &swiglu_forward);
  m.impl("swiglu_backward", &swiglu_backward);
}

}  // namespace internlm2::cpu
