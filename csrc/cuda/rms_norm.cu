// RMSNorm on CUDA.
//
// A "row group" of threads owns one row at a time: one warp per row when the row is short (several rows
// per block, no block-wide barrier), the whole block when it is long. Rows move through 16-byte vector
// loads when the hidden size and the pointers allow it, else element by element. All math is float32.
//
// The forward reads a row twice (sum of squares, then normalise); the second read hits L1/L2, so DRAM
// sees each byte once. The backward keeps grad_weight partial sums in registers: a thread always owns
// the same columns, accumulates them over every row its group visits, and the block writes one partial
// row; a second kernel sums the partial rows column-wise. No atomics anywhere.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "common/dispatch.h"
#include "cuda/device.cuh"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"
#include "ops.h"

namespace internlm2::cuda {
namespace {

// Rows up to this many elements get one warp each.
constexpr int kWarpRowMaxHidden = 1024;
constexpr int kWarpModeBlock = 256;  // 8 rows per block
constexpr int kMaxForwardBlock = 1024;
// The backward holds 32 grad_weight accumulators per thread in registers, which needs more than the 64
// registers a 1024-thread block allows: its blocks stop at 512 threads, so hidden <= 512 * 32.
constexpr int kMaxAccPerThread = 32;
constexpr int kMaxBackwardBlock = 512;
constexpr int kMaxHiddenBackward = kMaxBackwardBlock * kMaxAccPerThread;

struct LaunchShape {
  bool warp_per_row;
  int block;           // threads per block
  int group_threads;   // threads per row
  int rows_per_block;
};

LaunchShape launch_shape(int64_t hidden, int max_block) {
  if (hidden <= kWarpRowMaxHidden) return {true, kWarpModeBlock, 32, kWarpModeBlock / 32};
  // ~16 elements per thread: enough loads in flight per thread without idling lanes on short rows.
  int threads = static_cast<int>((hidden + 15) / 16);
  threads = std::min(max_block, std::max(64, (threads + 31) / 32 * 32));
  return {false, threads, threads, 1};
}

template <int kVec, typename T>
bool vectorizable(int64_t hidden, std::initializer_list<const T*> ptrs) {
  if (hidden % kVec != 0) return false;
  for (const T* p : ptrs)
    if (reinterpret_cast<std::uintptr_t>(p) % (sizeof(T) * kVec) != 0) return false;
  return true;
}

template <typename T, int kVec, bool kWarpPerRow>
__global__ void __launch_bounds__(kWarpPerRow ? kWarpModeBlock : kMaxForwardBlock) rms_norm_forward_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                                T* __restrict__ y, float* __restrict__ rstd,
                                                                int64_t rows, int hidden, float eps) {
  using V = Pack<T, kVec>;
  __shared__ float scratch[32];
  const int group_threads = kWarpPerRow ? 32 : blockDim.x;
  const int lane = threadIdx.x % group_threads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / group_threads) + threadIdx.x / group_threads;
  const bool active = row < rows;  // only the last block of warp mode has idle rows
  const int nvec = hidden / kVec;
  const V* xr = reinterpret_cast<const V*>(x + (active ? row : 0) * hidden);
  const V* wr = reinterpret_cast<const V*>(w);
  V* yr = reinterpret_cast<V*>(y + (active ? row : 0) * hidden);

  float ss = 0.f;
  if (active) {
#pragma unroll 4
    for (int j = lane; j < nvec; j += group_threads) {
      const V v = xr[j];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const float f = static_cast<float>(v.v[e]);
        ss += f * f;
      }
    }
  }
  ss = kWarpPerRow ? warp_sum(ss) : block_sum(ss, scratch);
  const float rs = rsqrtf(ss / static_cast<float>(hidden) + eps);
  if (!active) return;
  if (lane == 0) rstd[row] = rs;
#pragma unroll 4
  for (int j = lane; j < nvec; j += group_threads) {
    const V v = xr[j];
    const V g = wr[j];
    V out;
#pragma unroll
    for (int e = 0; e < kVec; ++e) out.v[e] = static_cast<T>(static_cast<float>(v.v[e]) * rs * static_cast<float>(g.v[e]));
    yr[j] = out;
  }
}

// dx = rs * (dy * w) - x * rs^3 * sum(dy * w * x) / H;  dw = sum over rows of dy * x * rs.
template <typename T, int kVec, bool kWarpPerRow>
__global__ void __launch_bounds__(kWarpPerRow ? kWarpModeBlock : kMaxBackwardBlock) rms_norm_backward_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ rstd,
    T* __restrict__ dx, float* __restrict__ dw_partial, int64_t rows, int hidden) {
  using V = Pack<T, kVec>;
  constexpr int kAccVecs = kMaxAccPerThread / kVec;
  extern __shared__ float warp_dw[];  // warp mode: [warps per block][hidden]
  __shared__ float scratch[32];
  const int group_threads = kWarpPerRow ? 32 : blockDim.x;
  const int groups_per_block = blockDim.x / group_threads;
  const int lane = threadIdx.x % group_threads;
  const int group = threadIdx.x / group_threads;
  const int64_t groups_total = static_cast<int64_t>(gridDim.x) * groups_per_block;
  const int nvec = hidden / kVec;
  const V* wr = reinterpret_cast<const V*>(w);

  float acc[kAccVecs][kVec];
#pragma unroll
  for (int k = 0; k < kAccVecs; ++k)
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[k][e] = 0.f;

  // Block mode: every thread of the block takes the same number of trips (barriers inside block_sum).
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * groups_per_block + group; row < rows; row += groups_total) {
    const V* dyr = reinterpret_cast<const V*>(dy + row * hidden);
    const V* xr = reinterpret_cast<const V*>(x + row * hidden);
    V* dxr = reinterpret_cast<V*>(dx + row * hidden);
    const float rs = rstd[row];
    float dot = 0.f;
#pragma unroll 2
    for (int k = 0; k < kAccVecs; ++k) {
      const int j = lane + k * group_threads;
      if (j < nvec) {
        const V a = dyr[j], b = xr[j], g = wr[j];
#pragma unroll
        for (int e = 0; e < kVec; ++e)
          dot += static_cast<float>(a.v[e]) * static_cast<float>(g.v[e]) * static_cast<float>(b.v[e]);
      }
    }
    dot = kWarpPerRow ? warp_sum(dot) : block_sum(dot, scratch);
    const float coef = rs * rs * rs * dot / static_cast<float>(hidden);
#pragma unroll
    for (int k = 0; k < kAccVecs; ++k) {
      const int j = lane + k * group_threads;
      if (j < nvec) {
        const V a = dyr[j], b = xr[j], g = wr[j];
        V out;
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float fdy = static_cast<float>(a.v[e]), fx = static_cast<float>(b.v[e]);
          out.v[e] = static_cast<T>(rs * fdy * static_cast<float>(g.v[e]) - coef * fx);
          acc[k][e] += fdy * fx * rs;
        }
        dxr[j] = out;
      }
    }
  }

  float* partial = dw_partial + static_cast<int64_t>(blockIdx.x) * hidden;
  if constexpr (kWarpPerRow) {
    // Sum the warps' accumulators in shared memory so the block writes one partial row.
    float* mine = warp_dw + static_cast<int64_t>(group) * hidden;
#pragma unroll
    for (int k = 0; k < kAccVecs; ++k) {
      const int j = lane + k * group_threads;
      if (j < nvec)
#pragma unroll
        for (int e = 0; e < kVec; ++e) mine[j * kVec + e] = acc[k][e];
    }
    __syncthreads();
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
      float s = 0.f;
      for (int g = 0; g < groups_per_block; ++g) s += warp_dw[g * hidden + c];
      partial[c] = s;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kAccVecs; ++k) {
      const int j = lane + k * group_threads;
      if (j < nvec)
#pragma unroll
        for (int e = 0; e < kVec; ++e) partial[j * kVec + e] = acc[k][e];
    }
  }
}

// dw[c] = sum over partial rows. 32 columns per block (coalesced), 8 thread rows splitting the sum.
template <typename T>
__global__ void sum_partial_rows_kernel(const float* __restrict__ partial, T* __restrict__ dw, int n_partial,
                                        int hidden) {
  __shared__ float tile[8][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (c < hidden)
    for (int r = threadIdx.y; r < n_partial; r += 8) s += partial[static_cast<int64_t>(r) * hidden + c];
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < hidden) {
    for (int r = 1; r < 8; ++r) s += tile[r][threadIdx.x];
    dw[c] = static_cast<T>(s);
  }
}

template <typename T, int kVec>
void launch_forward(const T* x, const T* w, T* y, float* rstd, int64_t rows, int hidden, float eps,
                    cudaStream_t stream) {
  const LaunchShape s = launch_shape(hidden, kMaxForwardBlock);
  const int64_t blocks = (rows + s.rows_per_block - 1) / s.rows_per_block;
  if (s.warp_per_row)
    rms_norm_forward_kernel<T, kVec, true><<<blocks, s.block, 0, stream>>>(x, w, y, rstd, rows, hidden, eps);
  else
    rms_norm_forward_kernel<T, kVec, false><<<blocks, s.block, 0, stream>>>(x, w, y, rstd, rows, hidden, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kVec>
void launch_backward(const T* dy, const T* x, const T* w, const float* rstd, T* dx, at::Tensor& dw_partial,
                     int64_t rows, int hidden, cudaStream_t stream) {
  const LaunchShape s = launch_shape(hidden, kMaxBackwardBlock);
  float* partial = dw_partial.mutable_data_ptr<float>();
  const int blocks = static_cast<int>(dw_partial.size(0));
  if (s.warp_per_row) {
    const size_t smem = sizeof(float) * s.rows_per_block * hidden;
    rms_norm_backward_kernel<T, kVec, true><<<blocks, s.block, smem, stream>>>(dy, x, w, rstd, dx, partial, rows, hidden);
  } else {
    rms_norm_backward_kernel<T, kVec, false><<<blocks, s.block, 0, stream>>>(dy, x, w, rstd, dx, partial, rows, hidden);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_forward(x, weight, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(hidden <= INT32_MAX, "rms_norm: hidden size ", hidden, " is too large");
  const int64_t rows = rms_norm_rows(x);
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (hidden == 0) rstd.fill_(NAN);
  if (x.numel() == 0) return {y, rstd};
  const cudaStream_t stream = current_stream();
  INTERNLM2_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rms_norm_forward_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    float* rp = rstd.mutable_data_ptr<float>();
    if (vectorizable<kVec, scalar_t>(hidden, {xp, wp, yp}))
      launch_forward<scalar_t, kVec>(xp, wp, yp, rp, rows, static_cast<int>(hidden), static_cast<float>(eps), stream);
    else
      launch_forward<scalar_t, 1>(xp, wp, yp, rp, rows, static_cast<int>(hidden), static_cast<float>(eps), stream);
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd) {
  check_rms_norm_backward(grad_y, x, weight, rstd);
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(hidden <= kMaxHiddenBackward, "rms_norm backward on CUDA supports hidden sizes up to ",
              kMaxHiddenBackward, ", got ", hidden);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = rms_norm_rows(x);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_weight = at::empty_like(weight);
  if (x.numel() == 0) {
    grad_weight.zero_();
    return {grad_x, grad_weight};
  }
  const cudaStream_t stream = current_stream();
  const LaunchShape shape = launch_shape(hidden, kMaxBackwardBlock);
  // Enough blocks to fill every SM (2048 resident threads each), no more: each block adds a partial row.
  const int sms = sm_count();
  const int64_t wanted = (rows + shape.rows_per_block - 1) / shape.rows_per_block;
  const int64_t blocks = std::min<int64_t>(wanted, static_cast<int64_t>(sms) * std::max(1, 2048 / shape.block));
  at::Tensor partial = at::empty({blocks, hidden}, x.options().dtype(at::kFloat));
  INTERNLM2_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rms_norm_backward_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* dyp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    scalar_t* dxp = grad_x.mutable_data_ptr<scalar_t>();
    const float* rp = rstd.const_data_ptr<float>();
    if (vectorizable<kVec, scalar_t>(hidden, {dyp, xp, wp, dxp}))
      launch_backward<scalar_t, kVec>(dyp, xp, wp, rp, dxp, partial, rows, static_cast<int>(hidden), stream);
    else
      launch_backward<scalar_t, 1>(dyp, xp, wp, rp, dxp, partial, rows, static_cast<int>(hidden), stream);
    const dim3 block(32, 8);
    sum_partial_rows_kernel<scalar_t><<<(hidden + 31) / 32, block, 0, stream>>>(
        partial.const_data_ptr<float>(), grad_weight.mutable_data_ptr<scalar_t>(), static_cast<int>(blocks),
        static_cast<int>(hidden));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(internlm2, CUDA, m) {
  m.impl("rms_norm_forward", &rms_norm_forward);
  m.impl("rms_norm_backward", &rms_norm_backward);
}

}  // namespace internlm2::cuda
