// RoPE on CPU, compiled once per instruction set (isa.h).
//
// rope_cos_sin: HF's rotate_half tables, cos/sin[t, i] = cos/sin(pos[t] * theta^(-2i/D)) with column i and
// i + D/2 sharing a frequency; angles in float64 so positions of long contexts keep float32 accuracy.
// apply_rope: for each (token, head) row, with x1 = x[:D/2], x2 = x[D/2:],
//   forward  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2
//   inverse  y1 = x1 c1 + x2 s2,  y2 = x2 c2 - x1 s1   (the exact transpose: the forward's gradient)
// x may be any strided [T, ..., D] view with unit stride in D (e.g. q and k sliced out of the fused qkv
// projection), so the model never copies before rotating; the output is contiguous.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "common/dispatch.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"

namespace internlm2::cpu::CPU_CAPABILITY {
namespace {

// Rows (or table entries) per task so that a task handles at least ~16k elements.
int64_t grain_for(int64_t row_elements) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_elements, 1)); }

template <typename P>
void cos_sin_tables(const P* positions, int64_t tokens, int64_t dim, double theta, float* cos, float* sin) {
  const int64_t half = dim / 2;
  std::vector<double> inv_freq(half);
  for (int64_t i = 0; i < half; ++i) inv_freq[i] = std::pow(theta, -static_cast<double>(2 * i) / dim);
  at::parallel_for(0, tokens, grain_for(dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const double pos = static_cast<double>(positions[t]);
      float* c = cos + t * dim;
      float* s = sin + t * dim;
      for (int64_t i = 0; i < half; ++i) {
        const double angle = pos * inv_freq[i];
        c[i] = c[i + half] = static_cast<float>(std::cos(angle));
        s[i] = s[i + half] = static_cast<float>(std::sin(angle));
      }
    }
  });
}

// Element offsets of every index of the middle dimensions of x [T, ..., D], in row-major order.
std::vector<int64_t> middle_offsets(const at::Tensor& x) {
  std::vector<int64_t> offsets{0};
  for (int64_t d = 1; d + 1 < x.dim(); ++d) {
    std::vector<int64_t> next;
    next.reserve(offsets.size() * x.size(d));
    for (int64_t base : offsets)
      for (int64_t i = 0; i < x.size(d); ++i) next.push_back(base + i * x.stride(d));
    offsets = std::move(next);
  }
  return offsets;
}

template <typename T>
void rotate(const T* x, const float* cos, const float* sin, T* out, int64_t tokens, int64_t token_stride,
            const std::vector<int64_t>& row_offsets, int64_t dim, bool inverse) {
  const int64_t half = dim / 2;
  const int64_t rows_per_token = static_cast<int64_t>(row_offsets.size());
  at::parallel_for(0, tokens * rows_per_token, grain_for(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / rows_per_token;
      const T* xr = x + t * token_stride + row_offsets[r % rows_per_token];
      const float* c = cos + t * dim;
      const float* s = sin + t * dim;
      T* o = out + r * dim;
      for (int64_t i = 0; i < half; i += kFloatLanes) {
        const int64_t n = std::min(kFloatLanes, half - i);
        const fVec x1 = load_float_upto(xr + i, n), x2 = load_float_upto(xr + half + i, n);
        const fVec c1 = load_float_upto(c + i, n), c2 = load_float_upto(c + half + i, n);
        const fVec s1 = load_float_upto(s + i, n), s2 = load_float_upto(s + half + i, n);
        if (inverse) {
          store_float(o + i, x1 * c1 + x2 * s2, n);
          store_float(o + half + i, x2 * c2 - x1 * s1, n);
        } else {
          store_float(o + i, x1 * c1 - x2 * s1, n);
          store_float(o + half + i, x2 * c2 + x1 * s2, n);
        }
      }
    }
  });
}

}  // namespace

void rope_cos_sin_kernel(const at::Tensor& position_ids, double theta, at::Tensor& cos, at::Tensor& sin) {
  AT_DISPATCH_INDEX_TYPES(position_ids.scalar_type(), "rope_cos_sin_cpu", [&] {
    cos_sin_tables<index_t>(position_ids.const_data_ptr<index_t>(), cos.size(0), cos.size(1), theta,
                            cos.mutable_data_ptr<float>(), sin.mutable_data_ptr<float>());
  });
}

void apply_rope_kernel(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse,
                       at::Tensor& out) {
  if (x.numel() == 0) return;
  const std::vector<int64_t> row_offsets = middle_offsets(x);
  INTERNLM2_DISPATCH_FLOAT_TYPES(x.scalar_type(), "apply_rope_cpu", [&] {
    rotate<scalar_t>(x.const_data_ptr<scalar_t>(), cos.const_data_ptr<float>(), sin.const_data_ptr<float>(),
                     out.mutable_data_ptr<scalar_t>(), x.size(0), x.stride(0), row_offsets, x.size(-1), inverse);
  });
}

}  // namespace internlm2::cpu::CPU_CAPABILITY
