// dtype dispatch for the three dtypes the kernels compute on (check_float_dtype enforces the set), so
// no kernel is instantiated for float64.
#pragma once

#include <ATen/Dispatch.h>

#define INTERNLM2_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
