// Arguments of the flash attention kernels, shared by the host API (flash_attention.cu) and the CuTe
// instantiation files. Plain C++ on purpose: the host file includes this without pulling in CuTe, so it
// compiles in seconds and only the instantiation files pay for the templates.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace internlm2::cuda::flash {

enum class Dtype { kBF16, kFP16 };

// Token t of packed sequence b is row cu_seqlens[b] + t of q/k/v; without cu_seqlens there is one sequence
// of total_tokens. Every offset is computed in int64: row * row_stride exceeds 2^31 for long packs.
struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;               // [T, Hq, D], contiguous
  float* lse;              // [Hq, T]
  const int* cu_seqlens;   // [batch + 1] or nullptr
  int64_t q_row_stride, q_head_stride;  // in elements; the last dim is contiguous
  int64_t k_row_stride, k_head_stride;
  int64_t v_row_stride, v_head_stride;
  int64_t o_row_stride, o_head_stride;
  int64_t total_tokens;    // T
  int num_heads;           // Hq
  int group;               // Hq / Hkv: query head h reads KV head h / group
  int batch;
  int max_seqlen;          // bounds every sequence; sizes the grid
  float scale;             // softmax_scale
  float scale_log2;        // softmax_scale * log2(e): the kernels exponentiate with exp2
  bool causal;
};

struct BwdParams : FwdParams {
  const void* dout;        // [T, Hq, D]
  int64_t do_row_stride, do_head_stride;
  float* delta;            // [Hq, T]: rowsum(dout * out) - grad_lse, from the preprocessing kernel
  const float* grad_lse;   // [Hq, T] or nullptr
  float* dq_accum;         // [Hq, T, D] float32, zeroed; every key block adds its part of dS K
  void* dq;                // [T, Hq, D], contiguous
  void* dk;                // [T, Hkv, D], contiguous
  void* dv;                // [T, Hkv, D], contiguous
  int num_kv_heads;
  // The split GQA schedule (a CTA per query head) adds each head's dK/dV into these ([T, Hkv, D] float32,
  // zeroed); nullptr: the serial schedule (a CTA per KV head writes dk/dv once).
  float* dk_accum;
  float* dv_accum;
};

// One specialisation per (dtype, head dim), each in its own .cu file so the build parallelises.
template <Dtype kDtype, int kHeadDim>
void run_flash_fwd(const FwdParams& params, cudaStream_t stream);
template <Dtype kDtype, int kHeadDim>
void run_flash_bwd(const BwdParams& params, cudaStream_t stream);

}  // namespace internlm2::cuda::flash
