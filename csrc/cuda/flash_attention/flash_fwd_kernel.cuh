// Flash attention forward (FlashAttention-2 schedule on sm_80 tensor cores).
//
// A CTA owns kBlockM query rows of one head of one packed sequence. It walks that sequence's key/value
// blocks from the last to the first, so the only block that can be partial (the sequence end) and the
// blocks on the causal diagonal come first and every later block runs without masks. Per block:
//   S = Q K^T (fp32 accumulators), mask, online softmax (running row max and sum in registers, the output
//   accumulator rescaled when the max grows), O += P V with P converted to bf16/fp16 in registers.
// Keys and values are double-buffered: block n - 1 loads while block n is used, one barrier per block.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <cmath>

#include "cuda/flash_attention/kernel_traits.cuh"

namespace internlm2::cuda::flash {

// Running softmax statistics of the rows a thread holds (2 per 16-row mma step).
template <int kRows>
struct OnlineSoftmax {
  float row_max[kRows];
  float row_sum[kRows];  // this thread's partial sums; reduced over the quad once at the end

  __device__ __forceinline__ OnlineSoftmax() {
    CUTE_UNROLL
    for (int i = 0; i < kRows; ++i) {
      row_max[i] = -INFINITY;
      row_sum[i] = 0.f;
    }
  }

  // Turns the scores into unnormalised probabilities exp(scale * (s - max)) and rescales acc_o when a
  // row's max grows. Fully masked rows (max still -inf) use 0 as their max so that no -inf - -inf occurs.
  template <typename AccS, typename AccO>
  __device__ __forceinline__ void update(AccS& acc_s, AccO& acc_o, float scale_log2) {
    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    Tensor o = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
    static_assert(decltype(size<0>(s))::value == kRows);
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      float m = row_max[mi];
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(s); ++ni) m = fmaxf(m, s(mi, ni));
      m = quad_max(m);
      const float m_scaled = m == -INFINITY ? 0.f : m * scale_log2;
      const float correction = exp2f(row_max[mi] * scale_log2 - m_scaled);
      row_max[mi] = m;
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(o); ++ni) o(mi, ni) *= correction;
      float sum = 0.f;
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(s); ++ni) {
        s(mi, ni) = exp2f(s(mi, ni) * scale_log2 - m_scaled);
        sum += s(mi, ni);
      }
      row_sum[mi] = row_sum[mi] * correction + sum;
    }
  }

  // Divides acc_o by the row sums and returns each row's natural-log log-sum-exp of the scaled scores.
  template <typename AccO>
  __device__ __forceinline__ void finalize(AccO& acc_o, float scale, float (&lse)[kRows]) {
    Tensor o = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const float sum = quad_sum(row_sum[mi]);
      const bool empty = sum == 0.f || sum != sum;
      const float inv = empty ? 0.f : 1.f / sum;
      lse[mi] = empty ? -INFINITY : row_max[mi] * scale + __logf(sum);
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(o); ++ni) o(mi, ni) *= inv;
    }
  }
};

// Sets scores outside the sequence (column >= len) and, when causal, above the diagonal to -inf.
// `coord` holds each accumulator element's (row, column) within the tile.
template <typename AccS, typename Coord>
__device__ __forceinline__ void mask_scores(AccS& acc_s, const Coord& coord, int row0, int col0, int len,
                                            bool causal) {
  CUTE_UNROLL
  for (int i = 0; i < size(acc_s); ++i) {
    const int row = row0 + get<0>(coord(i));
    const int col = col0 + get<1>(coord(i));
    if (col >= len || attention::is_masked(row, col, causal)) acc_s(i) = -INFINITY;
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads) flash_fwd_kernel(const __grid_constant__ FwdParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  extern __shared__ __align__(128) char smem[];

  const int tid = threadIdx.x;
  const int head = blockIdx.x % p.num_heads;
  // Causal: the longest rows (last query blocks) are scheduled first, so the short ones fill the tail.
  const int m_block = p.causal ? gridDim.y - 1 - blockIdx.y : blockIdx.y;
  const SeqSpan seq = seq_span(p.cu_seqlens, blockIdx.x / p.num_heads, p.total_tokens);
  if (m_block * kBlockM >= seq.len) return;
  const int rows_valid = seq.len - m_block * kBlockM;

  int n_blocks = ceil_div(seq.len, kBlockN);
  if (p.causal) n_blocks = min(n_blocks, ceil_div((m_block + 1) * kBlockM, kBlockN));
  // Key blocks below this one lie entirely inside the sequence and (causal) below the diagonal.
  const int first_masked_block = p.causal ? min(m_block * kBlockM, seq.len) / kBlockN : seq.len / kBlockN;
  const int kv_head = head / p.group;

  const auto* q_ptr = static_cast<const Element*>(p.q) + (seq.start + int64_t(m_block) * kBlockM) * p.q_row_stride +
                      head * p.q_head_stride;
  Tensor gQ = make_tensor(make_gmem_ptr(q_ptr), Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_stride(p.q_row_stride, _1{}));
  // Key/value block n starts at row n * kBlockN of the sequence: a 64-bit base per block and 32-bit offsets
  // inside it (kBlockN rows of one head fit easily), which keeps the address registers few.
  const auto* k_seq = static_cast<const Element*>(p.k) + seq.start * p.k_row_stride + kv_head * p.k_head_stride;
  const auto* v_seq = static_cast<const Element*>(p.v) + seq.start * p.v_row_stride + kv_head * p.v_head_stride;
  const int k_row_stride = static_cast<int>(p.k_row_stride);
  const int v_row_stride = static_cast<int>(p.v_row_stride);
  auto k_block = [&](int n) {
    return make_tensor(make_gmem_ptr(k_seq + int64_t(n) * kBlockN * p.k_row_stride),
                       Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_stride(k_row_stride, _1{}));
  };
  auto v_block = [&](int n) {
    return make_tensor(make_gmem_ptr(v_seq + int64_t(n) * kBlockN * p.v_row_stride),
                       Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_stride(v_row_stride, _1{}));
  };

  // Shared memory: Q, then two stages of (K, V); key block n lives in stage n % 2, so block n - 1 loads
  // while block n is being used.
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutQ{});
  Tensor sK0 = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutKV{});
  auto sK = [&](int n) { return make_tensor(sK0.data() + (n & 1) * 2 * size(sK0), typename Traits::SmemLayoutKV{}); };
  auto sV = [&](int n) { return make_tensor(sK(n).data() + size(sK0), typename Traits::SmemLayoutKV{}); };
  auto sVt = [&](int n) { return make_tensor(sV(n).data(), typename Traits::SmemLayoutVt{}); };

  typename Traits::GmemLoad gmem_load;
  auto thr_load = gmem_load.get_thread_slice(tid);
  Tensor tQcQ = thr_load.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tKVcKV = thr_load.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // cp.async block n's keys and values into its stage; rows past the sequence end become zeros (their
  // probabilities are 0, and 0 * garbage could be NaN).
  auto load_kv = [&](int n) {
    const int valid = seq.len - n * kBlockN;
    load_tile_async(gmem_load, thr_load.partition_S(k_block(n)), thr_load.partition_D(sK(n)), tKVcKV, valid);
    load_tile_async(gmem_load, thr_load.partition_S(v_block(n)), thr_load.partition_D(sV(n)), tKVcKV, valid);
    cute::cp_async_fence();
  };

  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(sK0);
  Tensor tOrVt = thr_mma.partition_fragment_B(make_tensor(sK0.data(), typename Traits::SmemLayoutVtNoSwizzle{}));
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));

  auto smem_copy_q = make_tiled_copy_A(typename Traits::SmemLoad{}, mma);
  auto thr_copy_q = smem_copy_q.get_thread_slice(tid);
  Tensor tSsQ = thr_copy_q.partition_S(sQ);
  auto smem_copy_k = make_tiled_copy_B(typename Traits::SmemLoad{}, mma);
  auto thr_copy_k = smem_copy_k.get_thread_slice(tid);
  auto smem_copy_v = make_tiled_copy_B(typename Traits::SmemLoadTransposed{}, mma);
  auto thr_copy_v = smem_copy_v.get_thread_slice(tid);

  // Prologue: Q and the last key block in flight.
  load_tile_async(gmem_load, thr_load.partition_S(gQ), thr_load.partition_D(sQ), tQcQ, rows_valid);
  load_kv(n_blocks - 1);

  clear(acc_o);
  OnlineSoftmax<2 * size<1>(acc_o)> softmax;

  for (int n_block = n_blocks - 1; n_block >= 0; --n_block) {
    cp_async_wait<0>();
    __syncthreads();  // block n has landed; every warp is done with block n + 1, whose stage is reused now
    if (n_block > 0) load_kv(n_block - 1);

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, thr_copy_k.partition_S(sK(n_block)), mma, smem_copy_q, smem_copy_k, thr_copy_q,
            thr_copy_k);
    if (n_block >= first_masked_block) mask_scores(acc_s, tScS, m_block * kBlockM, n_block * kBlockN, seq.len, p.causal);

    softmax.update(acc_s, acc_o, p.scale_log2);
    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_as_a_operand(rP.layout()));
    gemm_rs(acc_o, tOrP, tOrVt, thr_copy_v.partition_S(sVt(n_block)), mma, smem_copy_v, thr_copy_v);
  }

  // Epilogue: normalise, write the log-sum-exp, stage O through shared memory (Q's space, once every warp
  // is done reading Q) and store it with 16-byte writes.
  constexpr int kRows = 2 * size<1>(acc_o);
  float lse[kRows];
  softmax.finalize(acc_o, p.scale, lse);

  Tensor tOcO = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tOcO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
  if (get<1>(tOcO_rc(0, 0)) == 0) {  // the thread holding column 0 of its rows writes their lse
    float* lse_ptr = p.lse + int64_t(head) * p.total_tokens + seq.start + int64_t(m_block) * kBlockM;
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const int row = get<0>(tOcO_rc(mi, 0));
      if (row < rows_valid) lse_ptr[row] = lse[mi];
    }
  }

  Tensor rO = convert_fragment<Element>(acc_o);
  Tensor sO = make_tensor(sQ.data(), typename Traits::SmemLayoutQ{});
  __syncthreads();
  auto smem_copy_o = make_tiled_copy_C(typename Traits::SmemStore{}, mma);
  auto thr_copy_o = smem_copy_o.get_thread_slice(tid);
  copy(smem_copy_o, thr_copy_o.retile_S(rO), thr_copy_o.partition_D(sO));

  auto* o_ptr = static_cast<Element*>(p.out) + (seq.start + int64_t(m_block) * kBlockM) * p.o_row_stride +
                head * p.o_head_stride;
  Tensor gO = make_tensor(make_gmem_ptr(o_ptr), Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_stride(p.o_row_stride, _1{}));
  typename Traits::GmemVecCopy gmem_store;
  auto thr_store = gmem_store.get_thread_slice(tid);
  Tensor tOsO = thr_store.partition_S(sO);
  Tensor tOgO = thr_store.partition_D(gO);
  Tensor tOcO_store = thr_store.partition_D(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  __syncthreads();
  Tensor tOrO = make_fragment_like(tOsO);
  copy(gmem_store, tOsO, tOrO);
  store_tile(gmem_store, tOrO, tOgO, tOcO_store, rows_valid);
}

template <typename Traits>
void launch_flash_fwd(const FwdParams& p, cudaStream_t stream) {
  constexpr int smem = Traits::kSmemBytes;
  auto kernel = &flash_fwd_kernel<Traits>;
  if (smem >= 48 * 1024) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  // x: (head, sequence) pairs, y: query blocks (<= 65535 blocks of 128 rows: sequences up to 8M tokens).
  const dim3 grid(p.num_heads * p.batch, ceil_div(p.max_seqlen, Traits::kBlockM));
  kernel<<<grid, Traits::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace internlm2::cuda::flash
