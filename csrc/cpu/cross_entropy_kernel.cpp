// Softmax cross-entropy of one chunk of logits on CPU, compiled once per instruction set (isa.h). Each row
// is read once for its log-sum-exp (an online max and rescaled sum in float32 vectors) and, when a
// gradient is wanted, once more to overwrite it in place with
//   grad_scale * (softmax(x) * (1 + 2 z lse) - onehot(label))
// the derivative of loss = lse - x[label] + z * lse^2. Ignored rows get loss 0 and a zero gradient.
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "common/dispatch.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"

namespace internlm2::cpu::CPU_CAPABILITY {
namespace {

template <typename T>
float row_logsumexp(const T* x, int64_t classes) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  fVec vmax(kNegInf), vsum(0.f);
  for (int64_t c = 0; c < classes; c += kFloatLanes) {
    const int64_t w = std::min(kFloatLanes, classes - c);
    fVec v = load_float_upto(x + c, w);
    if (w < kFloatLanes) v = fVec::set(fVec(kNegInf), v, w);
    const fVec new_max = at::vec::maximum(vmax, v);
    // Lanes still at -inf contribute 0 (and must not compute -inf - -inf).
    const fVec rescale = fVec::blendv(((vmax - new_max).exp_u20()), fVec(0.f), vmax == fVec(kNegInf));
    vsum = vsum * rescale + fVec::blendv((v - new_max).exp_u20(), fVec(0.f), v == fVec(kNegInf));
    vmax = new_max;
  }
  const float m = max_lanes(vmax);
  if (m == kNegInf) return kNegInf;
  const float sum = sum_lanes(fVec::blendv(vsum * (vmax - fVec(m)).exp_u20(), fVec(0.f), vmax == fVec(kNegInf)));
  return m + std::log(sum);
}

template <typename T>
void chunk(T* logits, const int64_t* labels, int64_t rows, int64_t classes, int64_t ignore_index, float z,
           const float* grad_scale, bool per_row_scale, float* loss, float* lse) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* x = logits + r * classes;
      const bool ignored = labels[r] == ignore_index;
      const float row_lse = row_logsumexp(x, classes);
      const float x_label = ignored ? 0.f : static_cast<float>(x[labels[r]]);
      lse[r] = row_lse;
      loss[r] = ignored ? 0.f : row_lse - x_label + z * row_lse * row_lse;
      if (grad_scale == nullptr) continue;
      const float scale = ignored ? 0.f : grad_scale[per_row_scale ? r : 0];
      const float coef = scale * (1.f + 2.f * z * row_lse);
      for (int64_t c = 0; c < classes; c += kFloatLanes) {
        const int64_t w = std::min(kFloatLanes, classes - c);
        store_float(x + c, (load_float_upto(x + c, w) - fVec(row_lse)).exp_u20() * fVec(coef), w);
      }
      // The label's entry from the float32 input, rounded once like every other entry.
      if (!ignored) x[labels[r]] = static_cast<T>(std::exp(x_label - row_lse) * coef - scale);
    }
  });
}

}  // namespace

void cross_entropy_chunk_kernel(at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                                double z_loss_weight, const float* grad_scale, bool per_row_scale, at::Tensor& loss,
                                at::Tensor& lse) {
  INTERNLM2_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "cross_entropy_chunk_cpu", [&] {
    chunk<scalar_t>(logits.mutable_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(), logits.size(0),
                    logits.size(1), ignore_index, static_cast<float>(z_loss_weight), grad_scale, per_row_scale,
                    loss.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>());
  });
}

}  // namespace internlm2::cpu::CPU_CAPABILITY
