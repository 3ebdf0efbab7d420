#include "common/checks.h"
#include "ops.h"

namespace internlm2 {

void check_cross_entropy_chunk(const at::Tensor& logits, const at::Tensor& labels,
                               const std::optional<at::Tensor>& grad_scale) {
  check_dim(logits, "cross_entropy_chunk_: logits", 2, "[N, V]");
  check_float_dtype(logits, "cross_entropy_chunk_: logits");
  check_contiguous(logits, "cross_entropy_chunk_: logits");
  TORCH_CHECK(logits.size(1) > 0, "cross_entropy_chunk_: logits must have at least one class, got shape ",
              shape_str(logits));
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), "cross_entropy_chunk_: labels must have shape [",
              logits.size(0), "] (one per row of logits ", shape_str(logits), "), got ", shape_str(labels));
  check_dtype(labels, "cross_entropy_chunk_: labels", at::kLong);
  check_same_device(labels, "cross_entropy_chunk_: labels", logits, "logits");
  check_contiguous(labels, "cross_entropy_chunk_: labels");
  if (grad_scale.has_value()) {
    const at::Tensor& g = *grad_scale;
    TORCH_CHECK(g.dim() == 0 || (g.dim() == 1 && g.size(0) == logits.size(0)),
                "cross_entropy_chunk_: grad_scale must be a scalar or have shape [", logits.size(0), "], got ",
                shape_str(g));
    check_dtype(g, "cross_entropy_chunk_: grad_scale", at::kFloat);
    check_same_device(g, "cross_entropy_chunk_: grad_scale", logits, "logits");
    check_contiguous(g, "cross_entropy_chunk_: grad_scale");
  }
}

void check_cross_entropy_labels(const at::Tensor& labels, int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK(labels.device().is_cpu(), "check_cross_entropy_labels reads labels on the host; got a tensor on ",
              labels.device());
  const int64_t* l = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.numel(); ++i) {
    TORCH_CHECK(l[i] == ignore_index || (l[i] >= 0 && l[i] < num_classes), "cross_entropy: labels[", i, "] = ", l[i],
                " is out of range: labels must be in [0, ", num_classes, ") (the vocabulary) or ignore_index = ",
                ignore_index);
  }
}

}  // namespace internlm2
