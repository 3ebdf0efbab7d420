// SwiGLU on CUDA: out = silu(gate) * up, elementwise in float32, forward and backward.
//
// Memory-bound: one thread per 16-byte vector of each input (8 bf16/fp16 or 4 fp32 values), a single pass,
// no shared memory. The backward recomputes sigmoid(gate) instead of reading a saved activation:
//   s = sigmoid(g), silu(g) = g s, silu'(g) = s (1 + g (1 - s))
//   grad_gate = grad_out * up * silu'(g),  grad_up = grad_out * silu(g).
// Misaligned views (a 2-byte offset, say) take the element-wise path of the same kernels.
#include <ATen/ops/empty_like.h>
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

// The fast exp (ex2.approx) is far more accurate than a bf16/fp16 result needs; float32 inputs get a
// float64 exp so that they keep float32 accuracy for large |g| (the kernel is memory-bound either way).
template <typename T>
__device__ __forceinline__ float sigmoid(float g) {
  if constexpr (std::is_same_v<T, float>)
    return static_cast<float>(1.0 / (1.0 + ::exp(-static_cast<double>(g))));
  else
    return 1.f / (1.f + __expf(-g));
}

// Calls launch(std::integral_constant<int, V>{}, blocks) with V = kVec when every pointer allows 16-byte
// vectors, else V = 1; thread i owns elements [i * V, i * V + V), the last one maybe a partial vector.
template <int kVec, typename T, typename Launch>
void launch_elementwise(int64_t n, std::initializer_list<const T*> ptrs, Launch&& launch) {
  auto with_width = [&](auto width) {
    constexpr int V = decltype(width)::value;
    launch(width, ((n + V - 1) / V + kThreads - 1) / kThreads);
  };
  if (packs_aligned<kVec, T>(ptrs))
    with_width(std::integral_constant<int, kVec>{});
  else
    with_width(std::integral_constant<int, 1>{});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    swiglu_forward_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, int64_t n) {
  using V = Pack<T, kVec>;
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t first = i * kVec;
  if (first + kVec <= n) {
    const V g = reinterpret_cast<const V*>(gate)[i];
    const V u = reinterpret_cast<const V*>(up)[i];
    V o;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float gf = static_cast<float>(g.v[e]);
      o.v[e] = static_cast<T>(gf * sigmoid<T>(gf) * static_cast<float>(u.v[e]));
    }
    reinterpret_cast<V*>(out)[i] = o;
  } else {
    for (int64_t j = first; j < n; ++j) {
      const float gf = static_cast<float>(gate[j]);
      out[j] = static_cast<T>(gf * sigmoid<T>(gf) * static_cast<float>(up[j]));
    }
  }
}

template <typename T>
__device__ __forceinline__ void swiglu_grad(T dy, T g, T u, T& dg, T& du) {
  const float gf = static_cast<float>(g), dyf = static_cast<float>(dy);
  const float s = sigmoid<T>(gf);
  dg = static_cast<T>(dyf * static_cast<float>(u) * s * (1.f + gf * (1.f - s)));
  du = static_cast<T>(dyf * gf * s);
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    swiglu_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ gate, const T* __restrict__ up,
                           T* __restrict__ grad_gate, T* __restrict__ grad_up, int64_t n) {
  using V = Pack<T, kVec>;
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t first = i * kVec;
  if (first + kVec <= n) {
    const V dy = reinterpret_cast<const V*>(grad_out)[i];
    const V g = reinterpret_cast<const V*>(gate)[i];
    const V u = reinterpret_cast<const V*>(up)[i];
    V dg, du;
#pragma unroll
    for (int e = 0; e < kVec; ++e) swiglu_grad(dy.v[e], g.v[e], u.v[e], dg.v[e], du.v[e]);
    reinterpret_cast<V*>(grad_gate)[i] = dg;
    reinterpret_cast<V*>(grad_up)[i] = du;
  } else {
    for (int64_t j = first; j < n; ++j) swiglu_grad(grad_out[j], gate[j], up[j], grad_gate[j], grad_up[j]);
  }
}

at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_forward(gate, up);
  const c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor out = at::empty_like(gate);
  const int64_t n = gate.numel();
  if (n == 0) return out;
  INTERNLM2_DISPATCH_FLOAT_TYPES(gate.scalar_type(), "swiglu_forward_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    const scalar_t* u = up.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    launch_elementwise<kVec, scalar_t>(n, {g, u, o}, [&](auto width, int64_t blocks) {
      swiglu_forward_kernel<scalar_t, decltype(width)::value><<<blocks, kThreads, 0, current_stream()>>>(g, u, o, n);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad_out, const at::Tensor& gate,
                                                   const at::Tensor& up) {
  check_swiglu_backward(grad_out, gate, up);
  const c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor grad_gate = at::empty_like(gate);
  at::Tensor grad_up = at::empty_like(up);
  const int64_t n = gate.numel();
  if (n == 0) return {grad_gate, grad_up};
  INTERNLM2_DISPATCH_FLOAT_TYPES(gate.scalar_type(), "swiglu_backward_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    const scalar_t* u = up.const_data_ptr<scalar_t>();
    scalar_t* dg = grad_gate.mutable_data_ptr<scalar_t>();
    scalar_t* du = grad_up.mutable_data_ptr<scalar_t>();
    launch_elementwise<kVec, scalar_t>(n, {dy, g, u, dg, du}, [&](auto width, int64_t blocks) {
      swiglu_backward_kernel<scalar_t, decltype(width)::value><<<blocks, kThreads, 0, current_stream()>>>(
          dy, g, u, dg, du, n);
    });
  });
  return {grad_gate, grad_up};
}

}  // namespace

TORCH_LIBRARY_IMPL(internlm2, CUDA, m) {
  m.impl("swiglu_forward", &swiglu_forward);
  m.impl("swiglu_backward", &swiglu_backward);
}

}  // namespace internlm2::cuda
