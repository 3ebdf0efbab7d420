// Argument checks shared by every backend. Each message names the argument and what was expected, so
// a user reading a traceback from deep inside a model knows which tensor was wrong without a debugger.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <string>

namespace internlm2 {

// fp32, bf16 or fp16: the dtypes the kernels compute on.
void check_float_dtype(const at::Tensor& t, const char* name);

// `t` has exactly `dim` dimensions; `shape_hint` (e.g. "[..., H]") goes into the message.
void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* shape_hint);

void check_contiguous(const at::Tensor& t, const char* name);

// `t` lives on the same device as `ref` (named `ref_name`).
void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name);

// `t` has the dtype of `ref` (named `ref_name`).
void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name);

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected);

// "[4, 7, 128]"
std::string shape_str(const at::Tensor& t);

}  // namespace internlm2
