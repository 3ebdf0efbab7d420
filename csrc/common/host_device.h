// Marks small helpers that both the C++ CPU kernels and the CUDA kernels call: under nvcc they compile
// for host and device, elsewhere they are plain inline functions.
#pragma once

#if defined(__CUDACC__)
#define INTERNLM2_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define INTERNLM2_HOST_DEVICE inline
#endif
