// Float-vector views of fp32/bf16/fp16 memory for CPU kernels compiled per instruction set (isa.h).
// Every kernel computes in float32; these helpers load and store one Vectorized<float> worth of
// elements of any input dtype, with a counted variant for row tails so loops need no scalar epilogue.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace internlm2::cpu::CPU_CAPABILITY {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kFloatLanes = fVec::size();

template <typename T>
inline fVec load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else {
    fVec out;
    at::vec::load_to_float(p, out);
    return out;
  }
}

// Loads n < kFloatLanes elements; the other lanes are zero.
template <typename T>
inline fVec load_float(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p, n);
  } else {
    auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, n));
    (void)hi;
    return lo;
  }
}

// Loads min(n, kFloatLanes) elements (zeros past n): one call serves both the body and the tail of a row.
template <typename T>
inline fVec load_float_upto(const T* p, int64_t n) {
  return n >= kFloatLanes ? load_float(p) : load_float(p, n);
}

inline float sum_lanes(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, v);
}

inline float max_lanes(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, v);
}

template <typename T>
inline void store_float(T* p, const fVec& v, int64_t n = kFloatLanes) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, n);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, n);
  }
}

}  // namespace internlm2::cpu::CPU_CAPABILITY
