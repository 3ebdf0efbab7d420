// One (dtype, head dim) per file so the build parallelises; the configuration is in flash_fwd_launch.cuh.
#include "cuda/flash_attention/flash_fwd_launch.cuh"

INTERNLM2_FLASH_FWD_INSTANTIATION(kBF16, 128)
