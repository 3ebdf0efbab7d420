// RoPE on CUDA, HF's rotate_half layout (see csrc/cpu/rope_kernel.cpp for the math):
//   rope_cos_sin: cos/sin[t, i] = cos/sin(pos[t] * theta^(-2i/D)), columns i and i + D/2 share a frequency;
//                 angles in float64 (one thread per (token, frequency)), tables float32.
//   apply_rope:   for each (token, head) row with x1 = x[:D/2], x2 = x[D/2:]
//                   forward  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2
//                   inverse  y1 = x1 c1 + x2 s2,  y2 = x2 c2 - x1 s1   (the forward's exact transpose)
//                 D/2 / kVec threads per row, each rotating kVec pairs with 16-byte loads and stores.
// x may be any strided [T, ..., D] view with unit stride in D (q and k sliced out of the fused qkv
// projection, up to kMaxMiddleDims dims between T and D); the output is contiguous.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "common/dispatch.h"
#include "cuda/device.cuh"
#include "cuda/vec.cuh"
#include "ops.h"

namespace internlm2::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxMiddleDims = 4;

// Where row j of token t (j counts the middle dims of x row-major) starts in x.
struct RowGeometry {
  int64_t token_stride;
  int64_t strides[kMaxMiddleDims];
  int sizes[kMaxMiddleDims];
  int rows_per_token;
  int middle_dims;

  __device__ __forceinline__ int64_t offset(int64_t t, int j) const {
    int64_t off = t * token_stride;
#pragma unroll
    for (int d = kMaxMiddleDims - 1; d >= 0; --d) {  // static indices: the struct stays in registers
      if (d < middle_dims) {
        off += int64_t(j % sizes[d]) * strides[d];
        j /= sizes[d];
      }
    }
    return off;
  }
};

template <typename P>
__global__ void __launch_bounds__(kThreads)
    rope_cos_sin_kernel(const P* __restrict__ positions, float* __restrict__ cos, float* __restrict__ sin,
                        int64_t tokens, int dim, double theta) {
  const int half = dim / 2;
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= tokens * half) return;
  const int64_t t = i / half;
  const int f = static_cast<int>(i % half);
  const double inv_freq = ::pow(theta, -static_cast<double>(2 * f) / dim);
  double s, c;
  ::sincos(static_cast<double>(positions[t]) * inv_freq, &s, &c);
  cos[t * dim + f] = cos[t * dim + f + half] = static_cast<float>(c);
  sin[t * dim + f] = sin[t * dim + f + half] = static_cast<float>(s);
}

// kVec floats of a cos/sin table through float4 loads.
template <int kVec>
__device__ __forceinline__ void load_floats(const float* p, float (&v)[kVec]) {
  if constexpr (kVec % 4 == 0) {
#pragma unroll
    for (int q = 0; q < kVec / 4; ++q) {
      const float4 f = reinterpret_cast<const float4*>(p)[q];
      v[4 * q] = f.x;
      v[4 * q + 1] = f.y;
      v[4 * q + 2] = f.z;
      v[4 * q + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[e] = p[e];
  }
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    apply_rope_kernel(const T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                      T* __restrict__ out, RowGeometry geo, int64_t tokens, int dim, bool inverse) {
  using V = Pack<T, kVec>;
  const int half = dim / 2;
  const int lanes = half / kVec;
  const int64_t gid = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t row = gid / lanes;
  if (row >= tokens * geo.rows_per_token) return;
  const int i = static_cast<int>(gid % lanes) * kVec;
  const int64_t t = row / geo.rows_per_token;
  const T* xr = x + geo.offset(t, static_cast<int>(row % geo.rows_per_token));
  T* o = out + row * dim;
  const float* c = cos + t * dim;
  const float* s = sin + t * dim;

  const V x1 = *reinterpret_cast<const V*>(xr + i);
  const V x2 = *reinterpret_cast<const V*>(xr + half + i);
  float c1[kVec], c2[kVec], s1[kVec], s2[kVec];
  load_floats<kVec>(c + i, c1);
  load_floats<kVec>(c + half + i, c2);
  load_floats<kVec>(s + i, s1);
  load_floats<kVec>(s + half + i, s2);
  V y1, y2;
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const float a = static_cast<float>(x1.v[e]), b = static_cast<float>(x2.v[e]);
    if (inverse) {
      y1.v[e] = static_cast<T>(a * c1[e] + b * s2[e]);
      y2.v[e] = static_cast<T>(b * c2[e] - a * s1[e]);
    } else {
      y1.v[e] = static_cast<T>(a * c1[e] - b * s1[e]);
      y2.v[e] = static_cast<T>(b * c2[e] + a * s2[e]);
    }
  }
  *reinterpret_cast<V*>(o + i) = y1;
  *reinterpret_cast<V*>(o + half + i) = y2;
}

std::tuple<at::Tensor, at::Tensor> rope_cos_sin(const at::Tensor& position_ids, int64_t head_dim, double theta) {
  check_rope_cos_sin(position_ids, head_dim, theta);
  TORCH_CHECK(head_dim <= INT32_MAX, "rope_cos_sin: head_dim ", head_dim, " is too large");
  const c10::cuda::CUDAGuard guard(position_ids.device());
  const auto options = position_ids.options().dtype(at::kFloat);
  const int64_t tokens = position_ids.size(0);
  at::Tensor cos = at::empty({tokens, head_dim}, options);
  at::Tensor sin = at::empty({tokens, head_dim}, options);
  const int64_t work = tokens * (head_dim / 2);
  if (work == 0) return {cos, sin};
  AT_DISPATCH_INDEX_TYPES(position_ids.scalar_type(), "rope_cos_sin_cuda", [&] {
    rope_cos_sin_kernel<index_t><<<(work + kThreads - 1) / kThreads, kThreads, 0, current_stream()>>>(
        position_ids.const_data_ptr<index_t>(), cos.mutable_data_ptr<float>(), sin.mutable_data_ptr<float>(), tokens,
        static_cast<int>(head_dim), theta);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {cos, sin};
}

at::Tensor apply_rope(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  check_apply_rope(x_in, cos, sin);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor out = at::empty(x_in.sizes(), x_in.options());
  if (out.numel() == 0) return out;
  // Dims of size 1 carry no layout; beyond kMaxMiddleDims real middle dims the view is copied once.
  at::Tensor x = x_in;
  int middle = 0;
  for (int64_t d = 1; d + 1 < x.dim(); ++d) middle += x.size(d) != 1;
  if (middle > kMaxMiddleDims) x = x.contiguous();

  RowGeometry geo{};
  geo.token_stride = x.stride(0);
  geo.rows_per_token = 1;
  int64_t rows_per_token = 1;
  for (int64_t d = 1; d + 1 < x.dim(); ++d) {
    if (x.size(d) == 1) continue;
    geo.sizes[geo.middle_dims] = static_cast<int>(x.size(d));
    geo.strides[geo.middle_dims] = x.stride(d);
    rows_per_token *= x.size(d);
    ++geo.middle_dims;
  }
  TORCH_CHECK(rows_per_token <= INT32_MAX, "apply_rope: ", rows_per_token, " rows per token is more than supported");
  geo.rows_per_token = static_cast<int>(rows_per_token);
  const int64_t tokens = x.size(0);
  const int64_t dim = x.size(-1);
  TORCH_CHECK(dim <= INT32_MAX, "apply_rope: head_dim ", dim, " is too large");
  INTERNLM2_DISPATCH_FLOAT_TYPES(x.scalar_type(), "apply_rope_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    // The vector path needs every row start (and the second half) on a 16-byte boundary, in x and in
    // the tables (which may be slices of longer ones).
    bool vec = (dim / 2) % kVec == 0 && geo.token_stride % kVec == 0 &&
               packs_aligned<kVec, scalar_t>({x.const_data_ptr<scalar_t>()}) &&
               packs_aligned<4, float>({cos.const_data_ptr<float>(), sin.const_data_ptr<float>()});
    for (int d = 0; d < geo.middle_dims; ++d) vec = vec && geo.strides[d] % kVec == 0;
    auto launch = [&](auto vec_width) {
      constexpr int kV = decltype(vec_width)::value;
      const int64_t threads = tokens * geo.rows_per_token * (dim / 2 / kV);
      apply_rope_kernel<scalar_t, kV><<<(threads + kThreads - 1) / kThreads, kThreads, 0, current_stream()>>>(
          x.const_data_ptr<scalar_t>(), cos.const_data_ptr<float>(), sin.const_data_ptr<float>(),
          out.mutable_data_ptr<scalar_t>(), geo, tokens, static_cast<int>(dim), inverse);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec)
      launch(std::integral_constant<int, kVec>{});
    else
      launch(std::integral_constant<int, 1>{});
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(internlm2, CUDA, m) {
  m.impl("rope_cos_sin", &rope_cos_sin);
  m.impl("apply_rope", &apply_rope);
}

}  // namespace internlm2::cuda
