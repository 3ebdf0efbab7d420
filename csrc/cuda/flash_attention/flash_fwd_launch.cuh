// Forward tile configurations per head dim (FlashAttention-2's choices for A100/H100: 4 warps, 128 query
// rows; 128 keys per block at d=64, 64 at d=128 so that S and O fit the register file without spills).
#pragma once

#include "cuda/flash_attention/flash_fwd_kernel.cuh"

namespace internlm2::cuda::flash {

template <Dtype kDtype, int kHeadDim>
struct FwdConfig;
template <Dtype kDtype>
struct FwdConfig<kDtype, 64> {
  using Traits = FwdTraits<element_t<kDtype>, 64, 128, 64, 4>;
};
template <Dtype kDtype>
struct FwdConfig<kDtype, 128> {
  using Traits = FwdTraits<element_t<kDtype>, 128, 128, 32, 4>;
};

}  // namespace internlm2::cuda::flash

// The body of one instantiation file.
#define INTERNLM2_FLASH_FWD_INSTANTIATION(DTYPE, HEAD_DIM)                                         \
  namespace internlm2::cuda::flash {                                                               \
  template <>                                                                                      \
  void run_flash_fwd<Dtype::DTYPE, HEAD_DIM>(const FwdParams& params, cudaStream_t stream) {       \
    launch_flash_fwd<typename FwdConfig<Dtype::DTYPE, HEAD_DIM>::Traits>(params, stream);          \
  }                                                                                                \
  }
