// SwiGLU on CPU, compiled once per instruction set (isa.h): out = silu(gate) * up, elementwise in float32
// vectors. The backward recomputes sigmoid(gate) rather than reading a saved activation:
//   s = sigmoid(g), silu(g) = g s, silu'(g) = s (1 + g (1 - s))
//   grad_gate = grad_out * up * silu'(g),  grad_up = grad_out * silu(g).
#include <ATen/Parallel.h>

#include <type_traits>

#include "common/dispatch.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"

namespace internlm2::cpu::CPU_CAPABILITY {
namespace {

// Elements per task: large enough that scheduling is free, small enough to split a layer over threads.
constexpr int64_t kGrain = 1 << 15;

// float32 results get Sleef's 1-ulp exp; bf16/fp16 results round to 8 or 11 bits anyway, so they take the
// cheaper 20-ulp exp (their kernels are compute-bound, the float32 ones memory-bound).
template <typename T>
inline fVec sigmoid(const fVec& g) {
  const fVec e = std::is_same_v<T, float> ? g.neg().exp() : g.neg().exp_u20();
  return fVec(1.f) / (fVec(1.f) + e);
}

// Runs body(begin, n) over [0, numel) in vector-sized steps (n < kFloatLanes only at the very end).
template <typename Body>
void for_each_vector(int64_t numel, const Body& body) {
  at::parallel_for(0, at::divup(numel, kFloatLanes), kGrain / kFloatLanes, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      const int64_t i = v * kFloatLanes;
      body(i, std::min(kFloatLanes, numel - i));
    }
  });
}

template <typename T>
void forward(const T* gate, const T* up, T* out, int64_t numel) {
  for_each_vector(numel, [&](int64_t i, int64_t n) {
    const fVec g = load_float_upto(gate + i, n);
    store_float(out + i, g * sigmoid<T>(g) * load_float_upto(up + i, n), n);
  });
}

template <typename T>
void backward(const T* grad_out, const T* gate, const T* up, T* grad_gate, T* grad_up, int64_t numel) {
  for_each_vector(numel, [&](int64_t i, int64_t n) {
    const fVec dy = load_float_upto(grad_out + i, n);
    const fVec g = load_float_upto(gate + i, n);
    const fVec u = load_float_upto(up + i, n);
    const fVec s = sigmoid<T>(g);
    const fVec silu = g * s;
    const fVec dsilu = s * (fVec(1.f) + g * (fVec(1.f) - s));
    store_float(grad_gate + i, dy * u * dsilu, n);
    store_float(grad_up + i, dy * silu, n);
  });
}

}  // namespace

void swiglu_forward_kernel(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out) {
  INTERNLM2_DISPATCH_FLOAT_TYPES(gate.scalar_type(), "swiglu_forward_cpu", [&] {
    forward<scalar_t>(gate.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                      gate.numel());
  });
}

void swiglu_backward_kernel(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& up,
                            at::Tensor& grad_gate, at::Tensor& grad_up) {
  INTERNLM2_DISPATCH_FLOAT_TYPES(gate.scalar_type(), "swiglu_backward_cpu", [&] {
    backward<scalar_t>(grad_out.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(),
                       up.const_data_ptr<scalar_t>(), grad_gate.mutable_data_ptr<scalar_t>(),
                       grad_up.mutable_data_ptr<scalar_t>(), gate.numel());
  });
}

}  // namespace internlm2::cpu::CPU_CAPABILITY
