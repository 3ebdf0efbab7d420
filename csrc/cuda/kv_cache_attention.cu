// KV-cache attention on CUDA (decoding, few new queries per sequence): flash-decoding with SIMT math.
//
// A CTA owns (a block of kRowsPerCta query rows of one sequence and KV head, one split of the keys). Its
// rows are new tokens x the KV head's query group, so every cached key/value is read once for the heads
// that share it. Each row is held by a group of kLanesPerRow lanes, each lane a D / kLanesPerRow slice of
// q, of the output accumulator and of every key and value it reads (16-byte loads; the lane groups of a
// warp read the same key row, so each load instruction moves one contiguous key). The warps of a CTA take
// interleaved tiles of kTileKeys keys with an online softmax each (scores reduced over the row's lanes by
// shuffles), then merge their partial results through shared memory. When (row blocks x sequences x KV
// heads) would not fill the GPU, the keys are split over CTAs and a second kernel merges the splits by
// their log-sum-exps. Softmax in base 2 (exp2 of log2(e)-scaled scores), all math in float32.
//
// bf16/fp16, head dims 64 and 128; the Python op runs the reference elsewhere. No host synchronisation:
// the grid is sized from max_seqlen_q and the cache capacity S, so the op can be captured in a CUDA graph;
// k_lengths are clamped to [0, S] on the device (a query that sees no key gets 0 and lse -inf).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "cuda/device.cuh"
#include "cuda/vec.cuh"
#include "ops.h"

namespace internlm2::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kLanesPerRow = 8;                  // lanes sharing one query row
constexpr int kRowsPerCta = 32 / kLanesPerRow;  // every warp holds all of the CTA's rows
constexpr int kTileKeys = 16;                    // keys a warp scores per step
constexpr int kMinSplitKeys = 256;               // keys per split, at least
constexpr int kMaxSplits = 64;
constexpr int kMaxGridY = 65535;
constexpr float kLn2 = 0.6931471805599453f;

struct Params {
  const void* q;  // [Tq, Hq, D]
  const void* k;  // [B, Hkv, S, D]
  const void* v;
  const int* k_lengths;  // [B]
  const int* cu_q;       // [B + 1] or nullptr: one query per sequence
  void* out;             // [Tq, Hq, D]
  float* lse;            // [Hq, Tq]
  float* split_out;      // [splits, Tq, Hq, D] when splits > 1
  float* split_lse;      // [splits, Hq, Tq]
  int64_t total_q;
  int64_t capacity;
  int64_t split_keys;  // keys per split, a multiple of kWarps * kTileKeys
  int heads_q;
  int heads_kv;
  int group;
  int splits;
  float scale_log2;  // softmax_scale * log2(e)
  bool causal;
};

template <typename T, int kVec>
__device__ __forceinline__ void load_floats(const T* src, float* dst) {
  using V = Pack<T, 8>;
#pragma unroll
  for (int i = 0; i < kVec / 8; ++i) {
    const V p = reinterpret_cast<const V*>(src)[i];
#pragma unroll
    for (int e = 0; e < 8; ++e) dst[i * 8 + e] = static_cast<float>(p.v[e]);
  }
}

// The keys [0, end) new token t of a sequence with q_len new queries and k_len keys sees: causal attention
// is aligned to the end of the cache.
__device__ __forceinline__ int key_end(int t, int q_len, int k_len, bool causal) {
  return causal ? min(max(k_len - q_len + t + 1, 0), k_len) : k_len;
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads) kv_cache_attention_kernel(const Params p) {
  constexpr int kSlice = kHeadDim / kLanesPerRow;  // dims per lane: 16 (D = 128) or 8 (D = 64)
  constexpr float kNoKey = -INFINITY;
  __shared__ float merge_max[kWarps][kRowsPerCta];
  __shared__ float merge_sum[kWarps][kRowsPerCta];
  __shared__ float merge_acc[kWarps][kRowsPerCta][kHeadDim];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_in_cta = lane / kLanesPerRow, slice = lane % kLanesPerRow;
  const int split = blockIdx.x % p.splits, row_block = blockIdx.x / p.splits;
  const int b = blockIdx.y / p.heads_kv, hk = blockIdx.y % p.heads_kv;
  const int q_start = p.cu_q ? p.cu_q[b] : b;
  const int q_len = p.cu_q ? p.cu_q[b + 1] - q_start : 1;
  const int rows = q_len * p.group, row0 = row_block * kRowsPerCta;
  if (row0 >= rows) return;  // the whole CTA: this sequence has fewer rows than the longest one

  const int k_len = min(max(p.k_lengths[b], 0), static_cast<int>(p.capacity));
  const int r = row0 + row_in_cta;
  const bool active = r < rows;
  const int t = active ? r / p.group : 0;
  const int h = hk * p.group + (active ? r % p.group : 0);
  const int row_end = active ? key_end(t, q_len, k_len, p.causal) : 0;
  // The CTA's last row sees the most keys.
  const int block_end = key_end((min(rows, row0 + kRowsPerCta) - 1) / p.group, q_len, k_len, p.causal);
  const int64_t lo = min(static_cast<int64_t>(split) * p.split_keys, static_cast<int64_t>(block_end));
  const int hi = static_cast<int>(min(lo + p.split_keys, static_cast<int64_t>(block_end)));

  const T* q = static_cast<const T*>(p.q);
  float qf[kSlice];
  if (active) {
    load_floats<T, kSlice>(q + ((q_start + t) * int64_t(p.heads_q) + h) * kHeadDim + slice * kSlice, qf);
  } else {
#pragma unroll
    for (int e = 0; e < kSlice; ++e) qf[e] = 0.f;
  }
#pragma unroll
  for (int e = 0; e < kSlice; ++e) qf[e] *= p.scale_log2;

  const int64_t head_offset = (int64_t(b) * p.heads_kv + hk) * p.capacity * kHeadDim + slice * kSlice;
  const T* k = static_cast<const T*>(p.k) + head_offset;
  const T* v = static_cast<const T*>(p.v) + head_offset;
  float acc[kSlice];
#pragma unroll
  for (int e = 0; e < kSlice; ++e) acc[e] = 0.f;
  float row_max = kNoKey, row_sum = 0.f;

  // Keys past hi in a warp's last tile read row hi - 1 again (valid memory, cached) and are masked, so
  // the tile loop has no branches.
  const int visible_end = min(row_end, hi);
  for (int j0 = static_cast<int>(lo) + warp * kTileKeys; j0 < hi; j0 += kWarps * kTileKeys) {
    float s[kTileKeys];
    float tile_max = kNoKey;
#pragma unroll
    for (int j = 0; j < kTileKeys; ++j) {
      float kf[kSlice];
      load_floats<T, kSlice>(k + int64_t(min(j0 + j, hi - 1)) * kHeadDim, kf);
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < kSlice; ++e) dot = fmaf(qf[e], kf[e], dot);
#pragma unroll
      for (int offset = kLanesPerRow / 2; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
      s[j] = j0 + j < visible_end ? dot : kNoKey;
      tile_max = fmaxf(tile_max, s[j]);
    }
    const float new_max = fmaxf(row_max, tile_max);
    // A row that has seen no key yet keeps max -inf: exponents against 0 then give alpha = p = 0.
    const float base = new_max == kNoKey ? 0.f : new_max;
    const float alpha = exp2f(row_max - base);
    row_sum *= alpha;
#pragma unroll
    for (int e = 0; e < kSlice; ++e) acc[e] *= alpha;
#pragma unroll
    for (int j = 0; j < kTileKeys; ++j) {
      const float pj = exp2f(s[j] - base);
      row_sum += pj;
      float vf[kSlice];
      load_floats<T, kSlice>(v + int64_t(min(j0 + j, hi - 1)) * kHeadDim, vf);
#pragma unroll
      for (int e = 0; e < kSlice; ++e) acc[e] = fmaf(pj, vf[e], acc[e]);
    }
    row_max = new_max;
  }

  // Merge the warps' partial softmaxes of each row.
  if (slice == 0) {
    merge_max[warp][row_in_cta] = row_max;
    merge_sum[warp][row_in_cta] = row_sum;
  }
#pragma unroll
  for (int e = 0; e < kSlice; ++e) merge_acc[warp][row_in_cta][slice * kSlice + e] = acc[e];
  __syncthreads();
  if (warp != 0 || !active) return;
  float m = kNoKey;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) m = fmaxf(m, merge_max[w][row_in_cta]);
  float total = 0.f, out[kSlice];
#pragma unroll
  for (int e = 0; e < kSlice; ++e) out[e] = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const float weight = m == kNoKey ? 0.f : exp2f(merge_max[w][row_in_cta] - m);
    total += weight * merge_sum[w][row_in_cta];
#pragma unroll
    for (int e = 0; e < kSlice; ++e) out[e] = fmaf(weight, merge_acc[w][row_in_cta][slice * kSlice + e], out[e]);
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  const float lse = total > 0.f ? (m + log2f(total)) * kLn2 : kNoKey;
  const int64_t token = q_start + t;
  const int64_t o = (token * p.heads_q + h) * kHeadDim + slice * kSlice;
  if (p.splits == 1) {
#pragma unroll
    for (int i = 0; i < kSlice / 8; ++i) {  // 16-byte stores
      Pack<T, 8> part;
#pragma unroll
      for (int e = 0; e < 8; ++e) part.v[e] = static_cast<T>(out[i * 8 + e] * inv);
      reinterpret_cast<Pack<T, 8>*>(static_cast<T*>(p.out) + o)[i] = part;
    }
    if (slice == 0) p.lse[int64_t(h) * p.total_q + token] = lse;
  } else {
    float* dst = p.split_out + split * p.total_q * p.heads_q * kHeadDim + o;
#pragma unroll
    for (int e = 0; e < kSlice; ++e) dst[e] = out[e] * inv;
    if (slice == 0) p.split_lse[(int64_t(split) * p.heads_q + h) * p.total_q + token] = lse;
  }
}

// One warp per (token, head) row: out = sum_s w_s out_s / sum_s w_s, w_s = exp(lse_s - max lse).
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads) kv_cache_merge_splits_kernel(const Params p) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;  // token * Hq + head
  const int lane = threadIdx.x % 32;
  if (row >= p.total_q * p.heads_q) return;
  const int64_t token = row / p.heads_q;
  const int h = static_cast<int>(row % p.heads_q);
  auto split_lse = [&](int s) { return p.split_lse[(int64_t(s) * p.heads_q + h) * p.total_q + token]; };
  float m = -INFINITY;
  for (int s = 0; s < p.splits; ++s) m = fmaxf(m, split_lse(s));
  float total = 0.f, out[kHeadDim / 32] = {};
  for (int s = 0; s < p.splits; ++s) {
    const float weight = m == -INFINITY ? 0.f : __expf(split_lse(s) - m);
    total += weight;
    const float* src = p.split_out + (s * p.total_q * p.heads_q + row) * kHeadDim;
#pragma unroll
    for (int i = 0; i < kHeadDim / 32; ++i) out[i] = fmaf(weight, src[i * 32 + lane], out[i]);
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  T* dst = static_cast<T*>(p.out) + row * kHeadDim;
#pragma unroll
  for (int i = 0; i < kHeadDim / 32; ++i) dst[i * 32 + lane] = static_cast<T>(out[i] * inv);
  if (lane == 0) p.lse[int64_t(h) * p.total_q + token] = total > 0.f ? m + __logf(total) : -INFINITY;
}

template <typename T, int kHeadDim>
void launch(const Params& p, int row_blocks, int batch_heads, cudaStream_t stream) {
  kv_cache_attention_kernel<T, kHeadDim><<<dim3(row_blocks * p.splits, batch_heads), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.splits > 1) {
    const int64_t rows = p.total_q * p.heads_q;
    kv_cache_merge_splits_kernel<T, kHeadDim><<<(rows + kWarps - 1) / kWarps, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void check_aligned(const at::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % 16 == 0, "kv_cache_attention on CUDA: ", name,
              " must start on a 16-byte boundary (the kernel reads 16-byte vectors); got a view at an odd offset");
}

std::tuple<at::Tensor, at::Tensor> kv_cache_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache, const at::Tensor& k_lengths,
                                                      const std::optional<at::Tensor>& cu_seqlens_q,
                                                      int64_t max_seqlen_q, bool causal, double softmax_scale) {
  check_kv_cache_attention(q, k_cache, v_cache, k_lengths, cu_seqlens_q, max_seqlen_q, softmax_scale);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "kv_cache_attention on CUDA supports bfloat16 and float16, got ", q.scalar_type(),
              " (internlm2.ops.kv_cache_attention runs the reference for other dtypes)");
  const int64_t head_dim = q.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "kv_cache_attention on CUDA supports head dims 64 and 128, got ",
              head_dim);
  check_aligned(q, "q");
  check_aligned(k_cache, "k_cache");
  check_aligned(v_cache, "v_cache");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t total_q = q.size(0), heads_q = q.size(1), batch = k_cache.size(0), heads_kv = k_cache.size(1);
  const int64_t capacity = k_cache.size(2);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({heads_q, total_q}, q.options().dtype(at::kFloat));
  if (total_q == 0 || batch == 0 || max_seqlen_q == 0) return {out, lse};

  const int64_t group = heads_q / heads_kv;
  const int64_t row_blocks = (max_seqlen_q * group + kRowsPerCta - 1) / kRowsPerCta;
  TORCH_CHECK(batch * heads_kv <= kMaxGridY, "kv_cache_attention on CUDA: B x Hkv = ", batch * heads_kv,
              " is beyond the ", kMaxGridY, " (sequence, KV head) pairs of one launch");
  TORCH_CHECK(row_blocks * kMaxSplits <= INT32_MAX && capacity <= INT32_MAX && total_q <= INT32_MAX,
              "kv_cache_attention on CUDA: max_seqlen_q = ", max_seqlen_q, " or S = ", capacity, " is too large");
  // Split the keys when the CTAs would not give every SM two; a split needs kMinSplitKeys keys to pay off.
  const int64_t ctas = row_blocks * batch * heads_kv, wanted = 2 * int64_t(sm_count());
  int64_t splits = ctas >= wanted ? 1 : (wanted + ctas - 1) / ctas;
  splits = std::max<int64_t>(1, std::min({splits, capacity / kMinSplitKeys, int64_t(kMaxSplits)}));
  constexpr int64_t kStep = kWarps * kTileKeys;
  const int64_t split_keys = ((capacity + splits - 1) / splits + kStep - 1) / kStep * kStep;

  Params p{};
  p.q = q.const_data_ptr();
  p.k = k_cache.const_data_ptr();
  p.v = v_cache.const_data_ptr();
  p.k_lengths = k_lengths.const_data_ptr<int>();
  p.cu_q = cu_seqlens_q ? cu_seqlens_q->const_data_ptr<int>() : nullptr;
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  at::Tensor split_out, split_lse;
  if (splits > 1) {
    split_out = at::empty({splits, total_q, heads_q, head_dim}, q.options().dtype(at::kFloat));
    split_lse = at::empty({splits, heads_q, total_q}, q.options().dtype(at::kFloat));
    p.split_out = split_out.mutable_data_ptr<float>();
    p.split_lse = split_lse.mutable_data_ptr<float>();
  }
  p.total_q = total_q;
  p.capacity = capacity;
  p.split_keys = split_keys;
  p.heads_q = static_cast<int>(heads_q);
  p.heads_kv = static_cast<int>(heads_kv);
  p.group = static_cast<int>(group);
  p.splits = static_cast<int>(splits);
  p.scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);
  p.causal = causal;

  const int blocks = static_cast<int>(row_blocks), pairs = static_cast<int>(batch * heads_kv);
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const cudaStream_t stream = current_stream();
  if (head_dim == 64) {
    bf16 ? launch<at::BFloat16, 64>(p, blocks, pairs, stream) : launch<at::Half, 64>(p, blocks, pairs, stream);
  } else {
    bf16 ? launch<at::BFloat16, 128>(p, blocks, pairs, stream) : launch<at::Half, 128>(p, blocks, pairs, stream);
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(internlm2, CUDA, m) { m.impl("kv_cache_attention", &kv_cache_attention); }

}  // namespace internlm2::cuda
