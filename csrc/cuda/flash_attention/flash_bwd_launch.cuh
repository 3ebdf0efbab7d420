// Backward tile configurations per head dim (8 warps; FlashAttention-2's shapes for GPUs with >= 144 KB
// of shared memory per block, i.e. A100/H100/H200).
#pragma once

#include "cuda/flash_attention/flash_bwd_kernel.cuh"

namespace internlm2::cuda::flash {

template <Dtype kDtype, int kHeadDim>
struct BwdConfig;
template <Dtype kDtype>
struct BwdConfig<kDtype, 64> {
  using Traits = BwdTraits<element_t<kDtype>, 64, 64, 128, 8, 2, 4, 2>;
};
template <Dtype kDtype>
struct BwdConfig<kDtype, 128> {
  using Traits = BwdTraits<element_t<kDtype>, 128, 64, 128, 8, 2, 4, 2>;
};

}  // namespace internlm2::cuda::flash

// The body of one instantiation file.
#define INTERNLM2_FLASH_BWD_INSTANTIATION(DTYPE, HEAD_DIM)                                         \
  namespace internlm2::cuda::flash {                                                               \
  template <>                                                                                      \
  void run_flash_bwd<Dtype::DTYPE, HEAD_DIM>(const BwdParams& params, cudaStream_t stream) {       \
    launch_flash_bwd_main<typename BwdConfig<Dtype::DTYPE, HEAD_DIM>::Traits>(params, stream);     \
  }                                                                                                \
  }
