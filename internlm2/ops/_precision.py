"""The float type the `*_reference` functions compute in: float32 for low-precision inputs, float64 kept as
float64 so that the same references, fed float64 tensors, are the tests' exact oracles."""

import torch


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
