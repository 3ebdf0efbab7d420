// Warp- and block-wide float sums (block size a multiple of 32, at most 1024 threads).
#pragma once

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Every thread of the block gets the sum. `scratch` is 32 floats of shared memory; the leading barrier
// lets a caller reuse it in consecutive calls.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float s = 0.f;
  const int warps = blockDim.x / 32;
  for (int i = 0; i < warps; ++i) s += scratch[i];
  return s;
}
