// The CPU backend of internlm2::cross_entropy_chunk_: check (including the label values, which are on the
// host here), allocate, dispatch to the kernel compiled for the best instruction set
// (cross_entropy_kernel.cpp).
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "ops.h"

namespace internlm2::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> cross_entropy_chunk_(at::Tensor& logits, const at::Tensor& labels,
                                                        int64_t ignore_index, double z_loss_weight,
                                                        const std::optional<at::Tensor>& grad_scale) {
  check_cross_entropy_chunk(logits, labels, grad_scale);
  check_cross_entropy_labels(labels, logits.size(1), ignore_index);
  at::Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  const float* scale = grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr;
  const bool per_row = grad_scale.has_value() && grad_scale->dim() == 1;
  INTERNLM2_CPU_DISPATCH(cross_entropy_chunk_kernel)(logits, labels, ignore_index, z_loss_weight, scale, per_row, loss,
                                                     lse);
  return {loss, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(internlm2, CPU, m) { m.impl("cross_entropy_chunk_", &cross_entropy_chunk_); }

}  // namespace internlm2::cpu
