// Fused softmax cross-entropy of one chunk of logits on CUDA (the inner kernel of linear_cross_entropy).
//
// One CTA per row. Pass 1 reads the row once for its log-sum-exp: each thread keeps an online (max, sum)
// over its 16-byte vectors, then the block combines the pairs. The loss is
//   loss = lse - x[label] + z * lse^2          (0 for ignore_index rows)
// and, when a gradient is wanted, pass 2 overwrites the row in place with
//   grad_scale * (softmax(x) * (1 + 2 z lse) - onehot(label))
// (zero for ignored rows). The second read usually hits L2: a chunk's rows are read and rewritten by
// CTAs that run at the same time. Labels are only read on the device (no host sync, CUDA-graph safe); a
// label outside [0, V) that is not ignore_index makes that row's loss and gradient NaN.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "common/dispatch.h"
#include "cuda/device.cuh"
#include "cuda/vec.cuh"
#include "ops.h"

namespace internlm2::cuda {
namespace {

constexpr int kThreads = 512;

// Log-sum-exp state: running max and the sum of exp(x - max).
struct MaxSum {
  float max;
  float sum;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, 0.f};  // both empty: no -inf - -inf
  return {m, a.sum * __expf(a.max - m) + b.sum * __expf(b.max - m)};
}

__device__ MaxSum block_max_sum(MaxSum v, MaxSum* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const MaxSum other{__shfl_xor_sync(0xffffffffu, v.max, offset), __shfl_xor_sync(0xffffffffu, v.sum, offset)};
    v = combine(v, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  MaxSum total{-INFINITY, 0.f};
  for (int w = 0; w < kThreads / 32; ++w) total = combine(total, scratch[w]);
  return total;
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_chunk_kernel(T* __restrict__ logits, const int64_t* __restrict__ labels, int64_t classes,
                               int64_t ignore_index, float z, const float* __restrict__ grad_scale,
                               bool per_row_scale, float* __restrict__ loss, float* __restrict__ lse_out) {
  using V = Pack<T, kVec>;
  __shared__ MaxSum scratch[kThreads / 32];
  __shared__ float label_logit;
  const int64_t row = blockIdx.x;
  T* x = logits + row * classes;
  const int64_t vectors = classes / kVec;
  const int64_t label = labels[row];
  const bool ignored = label == ignore_index;
  const bool valid = !ignored && label >= 0 && label < classes;
  if (threadIdx.x == 0) label_logit = valid ? static_cast<float>(x[label]) : 0.f;  // before pass 2 rewrites it

  MaxSum acc{-INFINITY, 0.f};
  for (int64_t i = threadIdx.x; i < vectors; i += kThreads) {
    const V p = reinterpret_cast<const V*>(x)[i];
    float vmax = -INFINITY;
#pragma unroll
    for (int e = 0; e < kVec; ++e) vmax = fmaxf(vmax, static_cast<float>(p.v[e]));
    if (vmax == -INFINITY) continue;
    const float m = fmaxf(acc.max, vmax);
    float s = acc.sum * __expf(acc.max - m);
#pragma unroll
    for (int e = 0; e < kVec; ++e) s += __expf(static_cast<float>(p.v[e]) - m);
    acc = {m, s};
  }
  for (int64_t c = vectors * kVec + threadIdx.x; c < classes; c += kThreads) acc = combine(acc, {static_cast<float>(x[c]), 1.f});
  const MaxSum total = block_max_sum(acc, scratch);  // its barrier also publishes label_logit
  const float lse = total.max == -INFINITY ? -INFINITY : total.max + __logf(total.sum);

  if (threadIdx.x == 0) {
    lse_out[row] = lse;
    loss[row] = ignored ? 0.f : (valid ? lse - label_logit + z * lse * lse : NAN);
  }
  if (grad_scale == nullptr) return;
  const float scale = ignored ? 0.f : (valid ? grad_scale[per_row_scale ? row : 0] : NAN);
  const float coef = scale * (1.f + 2.f * z * lse);
  for (int64_t i = threadIdx.x; i < vectors; i += kThreads) {
    V p = reinterpret_cast<const V*>(x)[i];
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int64_t c = i * kVec + e;
      // The label's entry from the float32 input, rounded once like every other entry.
      const float xf = c == label ? label_logit : static_cast<float>(p.v[e]);
      p.v[e] = static_cast<T>(__expf(xf - lse) * coef - (c == label ? scale : 0.f));
    }
    reinterpret_cast<V*>(x)[i] = p;
  }
  for (int64_t c = vectors * kVec + threadIdx.x; c < classes; c += kThreads) {
    const float xf = c == label ? label_logit : static_cast<float>(x[c]);
    x[c] = static_cast<T>(__expf(xf - lse) * coef - (c == label ? scale : 0.f));
  }
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_chunk_(at::Tensor& logits, const at::Tensor& labels,
                                                        int64_t ignore_index, double z_loss_weight,
                                                        const std::optional<at::Tensor>& grad_scale) {
  check_cross_entropy_chunk(logits, labels, grad_scale);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), classes = logits.size(1);
  at::Tensor loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({rows}, logits.options().dtype(at::kFloat));
  if (rows == 0) return {loss, lse};
  TORCH_CHECK(rows <= INT32_MAX, "cross_entropy_chunk_: ", rows, " rows are more than one launch covers");
  const float* scale = grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr;
  const bool per_row = grad_scale.has_value() && grad_scale->dim() == 1;
  INTERNLM2_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "cross_entropy_chunk_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    scalar_t* x = logits.mutable_data_ptr<scalar_t>();
    auto launch = [&](auto vec_width) {
      constexpr int kV = decltype(vec_width)::value;
      cross_entropy_chunk_kernel<scalar_t, kV><<<rows, kThreads, 0, current_stream()>>>(
          x, labels.const_data_ptr<int64_t>(), classes, ignore_index, static_cast<float>(z_loss_weight), scale,
          per_row, loss.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // Vector loads need every row start aligned: an aligned base and a row length that is a multiple.
    if (classes % kVec == 0 && packs_aligned<kVec, scalar_t>({x}))
      launch(std::integral_constant<int, kVec>{});
    else
      launch(std::integral_constant<int, 1>{});
  });
  return {loss, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(internlm2, CUDA, m) { m.impl("cross_entropy_chunk_", &cross_entropy_chunk_); }

}  // namespace internlm2::cuda
