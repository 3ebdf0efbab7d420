// One (dtype, head dim) per file so the build parallelises; the configuration is in flash_bwd_launch.cuh.
#include "cuda/flash_attention/flash_bwd_launch.cuh"

INTERNLM2_FLASH_BWD_INSTANTIATION(kFP16, 128)
