// Flash attention on CUDA: argument checks, output allocation, the small memory-bound kernels of the
// backward (delta = rowsum(dO * O) - grad_lse, dQ from its fp32 accumulator) and dispatch to the CuTe
// kernels in flash_attention/ (one instantiation file per dtype x head dim x direction).
//
// Supported here: bf16 and fp16, head dims 64 and 128 (what InternLM2-family models use), any number of
// packed sequences, GQA/MQA, causal or not. Other dtypes and head dims raise here; internlm2.ops
// .flash_attention runs its reference for them instead (internlm2/ops/flash_attention.py).
// No host synchronisation: cu_seqlens is only read by the kernels, so the op can be captured in a CUDA
// graph; max_seqlen sizes the grid and must bound every sequence.
//
// Two backward schedules for GQA, chosen per call by INTERNLM2_FLASH_BWD_GQA (read on every call, so one
// process can time both):
//   serial (default): one CTA per (KV head, sequence, key block) walks every query head of the group and
//     writes dK/dV once, deterministically;
//   split: one CTA per query head as well (group times more CTAs, for few KV heads and short sequences),
//     dK/dV summed over the group in fp32 with atomics, then cast.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cuda/device.cuh"
#include "cuda/flash_attention/params.h"
#include "cuda/vec.cuh"
#include "ops.h"

namespace internlm2::cuda {
namespace {

using flash::Dtype;

constexpr int kMaxGridY = 65535;
constexpr int kLargestBlock = 128;  // query/key rows per CTA, at most, in any configuration

template <Dtype kDtype>
using at_type = std::conditional_t<kDtype == Dtype::kBF16, at::BFloat16, at::Half>;

// The attention kernels copy 16-byte vectors with cp.async: every row of every head must start on a
// 16-byte boundary. Contiguous tensors from the allocator always do; an odd view is copied once.
at::Tensor with_aligned_rows(const at::Tensor& t) {
  const bool aligned = t.stride(-1) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                       reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % 16 == 0;
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

void check_cuda_support(const at::Tensor& q, int64_t max_seqlen, const char* op) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op,
              " on CUDA supports bfloat16 and float16, got ", q.scalar_type(), " (use the CPU op or the reference)");
  const int64_t d = q.size(2);
  TORCH_CHECK(d == 64 || d == 128, op, " on CUDA supports head dims 64 and 128, got ", d);
  TORCH_CHECK((max_seqlen + kLargestBlock - 1) / kLargestBlock <= kMaxGridY, op, ": max_seqlen ", max_seqlen,
              " is beyond the ", int64_t(kMaxGridY) * kLargestBlock, " tokens one sequence may have on CUDA");
}

void fill_common(flash::FwdParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, bool causal, double scale) {
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.q_row_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k_row_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.v_row_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.cu_seqlens = cu_seqlens ? cu_seqlens->const_data_ptr<int>() : nullptr;
  p.batch = cu_seqlens ? static_cast<int>(cu_seqlens->size(0) - 1) : 1;
  p.total_tokens = q.size(0);
  p.num_heads = static_cast<int>(q.size(1));
  p.group = static_cast<int>(q.size(1) / k.size(1));
  p.max_seqlen = static_cast<int>(max_seqlen);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * M_LOG2E);
  p.causal = causal;
  TORCH_CHECK(int64_t(p.num_heads) * p.batch <= INT32_MAX, "flash_attention: too many (head, sequence) pairs");
}

// One kernel instantiation as a type, so generic lambdas (C++14) can take it: f(KernelCase<...>{}).
template <Dtype kDtype_, int kHeadDim_>
struct KernelCase {
  static constexpr Dtype kDtype = kDtype_;
  static constexpr int kHeadDim = kHeadDim_;
};

// Calls f with the KernelCase of q's dtype and head dim (check_cuda_support has vetted both).
template <typename F>
void dispatch(const at::Tensor& q, F&& f) {
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  if (q.size(2) == 64) {
    bf16 ? f(KernelCase<Dtype::kBF16, 64>{}) : f(KernelCase<Dtype::kFP16, 64>{});
  } else {
    bf16 ? f(KernelCase<Dtype::kBF16, 128>{}) : f(KernelCase<Dtype::kFP16, 128>{});
  }
}

// INTERNLM2_FLASH_BWD_GQA: "serial" (or unset) or "split" (see the top of this file).
bool split_query_group() {
  const char* v = std::getenv("INTERNLM2_FLASH_BWD_GQA");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "serial") == 0) return false;
  TORCH_CHECK(std::strcmp(v, "split") == 0, "INTERNLM2_FLASH_BWD_GQA must be 'serial' or 'split', got '", v, "'");
  return true;
}

std::tuple<at::Tensor, at::Tensor> flash_attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                           const at::Tensor& v_in,
                                                           const std::optional<at::Tensor>& cu_seqlens,
                                                           int64_t max_seqlen, bool causal, double softmax_scale) {
  check_flash_attention_forward(q_in, k_in, v_in, cu_seqlens, max_seqlen, softmax_scale);
  check_cuda_support(q_in, max_seqlen, "flash_attention");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = with_aligned_rows(q_in), k = with_aligned_rows(k_in), v = with_aligned_rows(v_in);
  const int64_t total = q.size(0), heads = q.size(1);
  at::Tensor out = at::empty({total, heads, q.size(2)}, q.options());
  at::Tensor lse = at::empty({heads, total}, q.options().dtype(at::kFloat));
  if (total == 0 || max_seqlen == 0) return {out, lse};

  flash::FwdParams p{};
  fill_common(p, q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale);
  if (p.batch == 0) return {out, lse};
  p.out = out.mutable_data_ptr();
  p.o_row_stride = out.stride(0);
  p.o_head_stride = out.stride(1);
  p.lse = lse.mutable_data_ptr<float>();
  dispatch(q, [&](auto c) {
    using C = decltype(c);
    flash::run_flash_fwd<C::kDtype, C::kHeadDim>(p, current_stream());
  });
  return {out, lse};
}

// delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] - grad_lse[h, t]. kHeadDim / 8 threads per (t, h) row,
// 16-byte loads, float32 sums.
template <typename T, int kHeadDim>
__global__ void flash_bwd_delta_kernel(const T* __restrict__ dout, const T* __restrict__ out,
                                       const float* __restrict__ grad_lse, float* __restrict__ delta,
                                       int64_t total_tokens, int num_heads, int64_t do_row_stride,
                                       int64_t do_head_stride, int64_t o_row_stride, int64_t o_head_stride) {
  constexpr int kVec = 8;
  constexpr int kGroup = kHeadDim / kVec;
  using V = Pack<T, kVec>;
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kGroup;  // t * num_heads + h
  const int lane = threadIdx.x % kGroup;
  const bool active = row < total_tokens * num_heads;
  const int64_t t = active ? row / num_heads : 0;
  const int h = active ? static_cast<int>(row % num_heads) : 0;
  float sum = 0.f;
  if (active) {
    const V a = reinterpret_cast<const V*>(dout + t * do_row_stride + h * do_head_stride)[lane];
    const V b = reinterpret_cast<const V*>(out + t * o_row_stride + h * o_head_stride)[lane];
#pragma unroll
    for (int e = 0; e < kVec; ++e) sum += static_cast<float>(a.v[e]) * static_cast<float>(b.v[e]);
  }
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (active && lane == 0) {
    const int64_t i = int64_t(h) * total_tokens + t;
    delta[i] = grad_lse == nullptr ? sum : sum - grad_lse[i];
  }
}

// dq[t, h] = scale * dq_accum[h, t]: [Hq, T, D] float32 to [T, Hq, D], 8 elements of one row per thread.
template <typename T, int kHeadDim>
__global__ void flash_bwd_dq_kernel(const float* __restrict__ dq_accum, T* __restrict__ dq, int64_t total_tokens,
                                    int num_heads, float scale) {
  constexpr int kVec = 8;
  constexpr int kPerRow = kHeadDim / kVec;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // over [T, Hq, D / kVec]
  if (i >= total_tokens * num_heads * kPerRow) return;
  const int64_t row = i / kPerRow;  // t * Hq + h
  const int64_t t = row / num_heads;
  const int h = static_cast<int>(row % num_heads);
  const float* src = dq_accum + (h * total_tokens + t) * kHeadDim + (i % kPerRow) * kVec;
  const float4 a = reinterpret_cast<const float4*>(src)[0];
  const float4 b = reinterpret_cast<const float4*>(src)[1];
  Pack<T, kVec> o;
  o.v[0] = static_cast<T>(a.x * scale);
  o.v[1] = static_cast<T>(a.y * scale);
  o.v[2] = static_cast<T>(a.z * scale);
  o.v[3] = static_cast<T>(a.w * scale);
  o.v[4] = static_cast<T>(b.x * scale);
  o.v[5] = static_cast<T>(b.y * scale);
  o.v[6] = static_cast<T>(b.z * scale);
  o.v[7] = static_cast<T>(b.w * scale);
  reinterpret_cast<Pack<T, kVec>*>(dq)[i] = o;
}

template <Dtype kDtype, int kHeadDim>
void launch_backward(const flash::BwdParams& p, const at::Tensor& dout, const at::Tensor& out, cudaStream_t stream) {
  using T = at_type<kDtype>;
  constexpr int kThreads = 256;
  const int64_t rows = p.total_tokens * p.num_heads;
  const int64_t delta_blocks = (rows * (kHeadDim / 8) + kThreads - 1) / kThreads;
  flash_bwd_delta_kernel<T, kHeadDim><<<delta_blocks, kThreads, 0, stream>>>(
      dout.const_data_ptr<T>(), out.const_data_ptr<T>(), p.grad_lse, p.delta, p.total_tokens, p.num_heads,
      dout.stride(0), dout.stride(1), out.stride(0), out.stride(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  flash::run_flash_bwd<kDtype, kHeadDim>(p, stream);
  const int64_t vectors = rows * kHeadDim / 8;
  flash_bwd_dq_kernel<T, kHeadDim><<<(vectors + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      p.dq_accum, static_cast<T*>(p.dq), p.total_tokens, p.num_heads, p.scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, bool causal, double softmax_scale) {
  check_flash_attention_backward(grad_out_in, q_in, k_in, v_in, out_in, lse, grad_lse, cu_seqlens, max_seqlen,
                                 softmax_scale);
  check_cuda_support(q_in, max_seqlen, "flash_attention backward");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = with_aligned_rows(q_in), k = with_aligned_rows(k_in), v = with_aligned_rows(v_in);
  const at::Tensor dout = with_aligned_rows(grad_out_in), out = with_aligned_rows(out_in);
  const int64_t total = q.size(0), heads = q.size(1), head_dim = q.size(2);
  at::Tensor dq = at::empty({total, heads, head_dim}, q.options());
  at::Tensor dk = at::empty({total, k.size(1), head_dim}, k.options());
  at::Tensor dv = at::empty({total, v.size(1), head_dim}, v.options());
  if (total == 0 || max_seqlen == 0) return {dq, dk, dv};

  flash::BwdParams p{};
  fill_common(p, q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale);
  if (p.batch == 0) return {dq, dk, dv};
  at::Tensor delta = at::empty({heads, total}, q.options().dtype(at::kFloat));
  at::Tensor dq_accum = at::zeros({heads, total, head_dim}, q.options().dtype(at::kFloat));
  p.lse = const_cast<float*>(lse.const_data_ptr<float>());
  p.dout = dout.const_data_ptr();
  p.do_row_stride = dout.stride(0);
  p.do_head_stride = dout.stride(1);
  p.delta = delta.mutable_data_ptr<float>();
  p.grad_lse = grad_lse ? grad_lse->const_data_ptr<float>() : nullptr;
  p.dq_accum = dq_accum.mutable_data_ptr<float>();
  p.dq = dq.mutable_data_ptr();
  p.dk = dk.mutable_data_ptr();
  p.dv = dv.mutable_data_ptr();
  p.num_kv_heads = static_cast<int>(k.size(1));
  // Split: each CTA takes one query head; its dK/dV parts meet in fp32 buffers of dk/dv's layout.
  const bool split = split_query_group() && p.group > 1;  // a group of one is the serial schedule
  at::Tensor dk_accum, dv_accum;
  if (split) {
    dk_accum = at::zeros(dk.sizes(), dk.options().dtype(at::kFloat));
    dv_accum = at::zeros(dv.sizes(), dv.options().dtype(at::kFloat));
    p.dk_accum = dk_accum.mutable_data_ptr<float>();
    p.dv_accum = dv_accum.mutable_data_ptr<float>();
  }

  dispatch(q, [&](auto c) {
    using C = decltype(c);
    launch_backward<C::kDtype, C::kHeadDim>(p, dout, out, current_stream());
  });
  if (split) {
    dk.copy_(dk_accum);
    dv.copy_(dv_accum);
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(internlm2, CUDA, m) {
  m.impl("flash_attention_forward", &flash_attention_forward);
  m.impl("flash_attention_backward", &flash_attention_backward);
}

}  // namespace internlm2::cuda
