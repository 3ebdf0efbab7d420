// RMSNorm on CPU, compiled once per instruction set (isa.h). Rows are split across threads with
// at::parallel_for (OpenMP in PyTorch builds); each row is read once for its sum of squares and once to
// normalise, both in float32 vectors. grad_weight is reduced without sharing between threads: every
// thread sums its rows into a private float32 row, and the per-thread rows are added at the end.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "common/dispatch.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"

namespace internlm2::cpu::CPU_CAPABILITY {
namespace {

// Rows per task so that each task touches at least ~32k elements (cheap rows are batched together).
int64_t row_grain(int64_t hidden) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(hidden, 1)); }

float reduce_sum(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, v);
}

template <typename T>
float sum_of_squares(const T* x, int64_t n) {
  fVec acc(0.f);
  int64_t i = 0;
  for (; i + kFloatLanes <= n; i += kFloatLanes) {
    const fVec v = load_float(x + i);
    acc = at::vec::fmadd(v, v, acc);
  }
  if (i < n) {
    const fVec v = load_float(x + i, n - i);
    acc = at::vec::fmadd(v, v, acc);
  }
  return reduce_sum(acc);
}

template <typename T>
void forward(const T* x, const T* w, T* y, float* rstd, int64_t rows, int64_t hidden, float eps) {
  at::parallel_for(0, rows, row_grain(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * hidden;
      T* yr = y + r * hidden;
      const float rs = 1.f / std::sqrt(sum_of_squares(xr, hidden) / static_cast<float>(hidden) + eps);
      rstd[r] = rs;
      const fVec rsv(rs);
      for (int64_t i = 0; i < hidden; i += kFloatLanes) {
        const int64_t n = std::min(kFloatLanes, hidden - i);
        const fVec xv = n == kFloatLanes ? load_float(xr + i) : load_float(xr + i, n);
        const fVec wv = n == kFloatLanes ? load_float(w + i) : load_float(w + i, n);
        store_float(yr + i, xv * rsv * wv, n);
      }
    }
  });
}

// y = x * rs * w, rs = (mean(x^2) + eps)^-1/2  =>
//   dx = rs * (dy * w) - x * rs^3 * sum(dy * w * x) / H,   dw = sum over rows of dy * x * rs.
template <typename T>
void backward(const T* dy, const T* x, const T* w, const float* rstd, T* dx, T* dw, int64_t rows,
              int64_t hidden) {
  const int threads = at::get_num_threads();
  std::vector<float> dw_per_thread(static_cast<size_t>(threads) * hidden, 0.f);
  at::parallel_for(0, rows, row_grain(hidden), [&](int64_t begin, int64_t end) {
    float* dw_acc = dw_per_thread.data() + static_cast<int64_t>(at::get_thread_num()) * hidden;
    for (int64_t r = begin; r < end; ++r) {
      const T* dyr = dy + r * hidden;
      const T* xr = x + r * hidden;
      T* dxr = dx + r * hidden;
      const float rs = rstd[r];
      fVec dot(0.f);
      for (int64_t i = 0; i < hidden; i += kFloatLanes) {
        const int64_t n = std::min(kFloatLanes, hidden - i);
        const fVec g = (n == kFloatLanes ? load_float(dyr + i) : load_float(dyr + i, n)) *
                       (n == kFloatLanes ? load_float(w + i) : load_float(w + i, n));
        dot = at::vec::fmadd(g, n == kFloatLanes ? load_float(xr + i) : load_float(xr + i, n), dot);
      }
      const fVec rsv(rs);
      const fVec coef(rs * rs * rs * reduce_sum(dot) / static_cast<float>(hidden));
      for (int64_t i = 0; i < hidden; i += kFloatLanes) {
        const int64_t n = std::min(kFloatLanes, hidden - i);
        const bool full = n == kFloatLanes;
        const fVec dyv = full ? load_float(dyr + i) : load_float(dyr + i, n);
        const fVec xv = full ? load_float(xr + i) : load_float(xr + i, n);
        const fVec wv = full ? load_float(w + i) : load_float(w + i, n);
        store_float(dxr + i, rsv * dyv * wv - coef * xv, n);
        const fVec acc = at::vec::fmadd(dyv * xv, rsv, fVec::loadu(dw_acc + i, n));
        acc.store(dw_acc + i, n);
      }
    }
  });
  at::parallel_for(0, hidden, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += kFloatLanes) {
      const int64_t n = std::min(kFloatLanes, end - i);
      fVec sum(0.f);
      for (int t = 0; t < threads; ++t) sum = sum + fVec::loadu(dw_per_thread.data() + t * hidden + i, n);
      store_float(dw + i, sum, n);
    }
  });
}

}  // namespace

void rms_norm_forward_kernel(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& y,
                             at::Tensor& rstd) {
  const int64_t hidden = x.size(-1);
  const int64_t rows = hidden == 0 ? 0 : x.numel() / hidden;
  if (rows == 0) return;
  INTERNLM2_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rms_norm_forward_cpu", [&] {
    forward<scalar_t>(x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                      y.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<float>(), rows, hidden,
                      static_cast<float>(eps));
  });
}

void rms_norm_backward_kernel(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& rstd, at::Tensor& grad_x, at::Tensor& grad_weight) {
  const int64_t hidden = x.size(-1);
  const int64_t rows = hidden == 0 ? 0 : x.numel() / hidden;
  if (rows == 0) {
    grad_weight.zero_();
    return;
  }
  INTERNLM2_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rms_norm_backward_cpu", [&] {
    backward<scalar_t>(grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                       weight.const_data_ptr<scalar_t>(), rstd.const_data_ptr<float>(),
                       grad_x.mutable_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<scalar_t>(), rows,
                       hidden);
  });
}

}  // namespace internlm2::cpu::CPU_CAPABILITY
