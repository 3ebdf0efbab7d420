// Host-side facts about the current CUDA device. Kept to c10/cuda headers: ATen/cuda/CUDAContext.h pulls
// in cuBLAS/cuSPARSE headers, which a minimal CUDA toolkit (nvcc + cudart) does not ship.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <array>

namespace internlm2::cuda {

// Streaming multiprocessors on the current device (cached per device).
inline int sm_count() {
  static std::array<int, 64> cache{};
  const int device = c10::cuda::current_device();
  int& n = cache.at(device);
  if (n == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace internlm2::cuda
