// Flash attention backward (FlashAttention-2's key-block-parallel schedule on sm_80 tensor cores).
//
// Three kernels:
//   1. flash_bwd_delta_kernel: delta = rowsum(dO * O) - grad_lse per (head, token), the softmax-gradient
//      term (grad_lse, when a caller used the lse, enters dS as P * grad_lse, i.e. with the opposite sign).
//   2. flash_bwd_kernel: a CTA owns kBlockN keys of one KV head. For each query head of its share of the
//      group and each query block that sees those keys (causal: only blocks on or below the diagonal), it
//      recomputes P = exp(scale * Q K^T - lse), then
//          dV += P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dK += dS^T Q,   dQ += dS K
//      dK and dV stay in fp32 registers across its heads; dQ parts are added to an fp32 buffer with atomics
//      (other key blocks add theirs). Serial schedule: a CTA walks the whole query group and writes dK and
//      dV once. Split schedule (kSplitGroup, its own instantiation so the serial kernel's registers are not
//      touched): a CTA per query head, each adding its part of dK and dV to fp32 buffers with atomics.
//   3. flash_bwd_dq_kernel: dQ = softmax_scale * dq_accum in the input dtype (and layout [T, Hq, D]).
// Q is double-buffered (the next block loads while dK still reads the current one); P and dS go through
// shared memory because the dV/dK products need them transposed.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <cmath>

#include "cuda/flash_attention/kernel_traits.cuh"

namespace internlm2::cuda::flash {

// One query block of one query head.
struct QueryBlock {
  int head;
  int m_block;
};

template <typename Traits, bool kSplitGroup>
__global__ void __launch_bounds__(Traits::kThreads) flash_bwd_kernel(const __grid_constant__ BwdParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  extern __shared__ __align__(128) char smem[];

  const int tid = threadIdx.x;
  const int kv_head = blockIdx.x % p.num_kv_heads;
  const SeqSpan seq = seq_span(p.cu_seqlens, blockIdx.x / p.num_kv_heads, p.total_tokens);
  const int n_block = blockIdx.y;  // causal: low key blocks see the most queries and are scheduled first
  if (n_block * kBlockN >= seq.len) return;
  const int keys_valid = seq.len - n_block * kBlockN;
  const int m_begin = p.causal ? n_block * kBlockN / kBlockM : 0;
  const int m_count = ceil_div(seq.len, kBlockM) - m_begin;
  const int mask_m_end = p.causal ? ceil_div((n_block + 1) * kBlockN, kBlockM) : 0;  // blocks crossing the diagonal
  // Serial: every query head of the group. Split: query head blockIdx.z of the group alone.
  const int iterations = (kSplitGroup ? 1 : p.group) * m_count;
  const int first_head = kv_head * p.group + (kSplitGroup ? static_cast<int>(blockIdx.z) : 0);

  // Shared memory: Q[2], dO, K, V, P, dS.
  Tensor sQ0 = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(sQ0.data() + 2 * size(sQ0), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(sdO.data() + size(sdO), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
  Tensor sP = make_tensor(sV.data() + size(sV), typename Traits::SmemLayoutPdS{});
  Tensor sdS = make_tensor(sP.data() + size(sP), typename Traits::SmemLayoutPdS{});
  auto sQ_buffer = [&](int it) {
    return make_tensor(sQ0.data() + (it & 1) * size(sQ0), typename Traits::SmemLayoutQ{});
  };
  auto sQt_buffer = [&](int it) {
    return make_tensor(sQ0.data() + (it & 1) * size(sQ0), typename Traits::SmemLayoutQt{});
  };
  Tensor sdOt = make_tensor(sdO.data(), typename Traits::SmemLayoutQt{});
  Tensor sKt = make_tensor(sK.data(), typename Traits::SmemLayoutKt{});
  Tensor sPt = make_tensor(sP.data(), typename Traits::SmemLayoutPdSt{});
  Tensor sdSt = make_tensor(sdS.data(), typename Traits::SmemLayoutPdSt{});

  // Global memory: this CTA's key/value block and, per iteration, one query block of one head.
  const int64_t kv_row = seq.start + int64_t(n_block) * kBlockN;
  Tensor gK = make_tensor(
      make_gmem_ptr(static_cast<const Element*>(p.k) + kv_row * p.k_row_stride + kv_head * p.k_head_stride),
      Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_stride(p.k_row_stride, _1{}));
  Tensor gV = make_tensor(
      make_gmem_ptr(static_cast<const Element*>(p.v) + kv_row * p.v_row_stride + kv_head * p.v_head_stride),
      Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_stride(p.v_row_stride, _1{}));
  // The iterations walk (query head, query block) pairs: every block of the group's first head, then the
  // next head's, and so on.
  const int m_end = m_begin + m_count;
  auto next_of = [&](QueryBlock b) {
    return b.m_block + 1 < m_end ? QueryBlock{b.head, b.m_block + 1} : QueryBlock{b.head + 1, m_begin};
  };
  auto q_row_of = [&](QueryBlock b) { return seq.start + int64_t(b.m_block) * kBlockM; };
  auto rows_valid_of = [&](QueryBlock b) { return seq.len - b.m_block * kBlockM; };
  auto q_block = [&](QueryBlock b) {
    return make_tensor(
        make_gmem_ptr(static_cast<const Element*>(p.q) + q_row_of(b) * p.q_row_stride + b.head * p.q_head_stride),
        Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_stride(static_cast<int>(p.q_row_stride), _1{}));
  };
  auto do_block = [&](QueryBlock b) {
    return make_tensor(make_gmem_ptr(static_cast<const Element*>(p.dout) + q_row_of(b) * p.do_row_stride +
                                     b.head * p.do_head_stride),
                       Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_stride(static_cast<int>(p.do_row_stride), _1{}));
  };

  typename Traits::GmemLoad gmem_load;
  auto thr_load = gmem_load.get_thread_slice(tid);
  Tensor tQc = thr_load.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tKVc = thr_load.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));

  typename Traits::TiledMmaSdP mma_sdp;
  auto thr_sdp = mma_sdp.get_thread_slice(tid);
  Tensor tSrQ = thr_sdp.partition_fragment_A(sQ0);
  Tensor tSrK = thr_sdp.partition_fragment_B(sK);
  Tensor tdPrdO = thr_sdp.partition_fragment_A(sdO);
  Tensor tdPrV = thr_sdp.partition_fragment_B(sV);
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));

  typename Traits::TiledMmadKV mma_dkv;
  auto thr_dkv = mma_dkv.get_thread_slice(tid);
  Tensor tdVrPt = thr_dkv.partition_fragment_A(make_tensor(sP.data(), typename Traits::SmemLayoutPdStNoSwizzle{}));
  Tensor tdVrdOt = thr_dkv.partition_fragment_B(make_tensor(sdO.data(), typename Traits::SmemLayoutQtNoSwizzle{}));
  Tensor tdKrdSt = thr_dkv.partition_fragment_A(make_tensor(sdS.data(), typename Traits::SmemLayoutPdStNoSwizzle{}));
  Tensor tdKrQt = thr_dkv.partition_fragment_B(make_tensor(sQ0.data(), typename Traits::SmemLayoutQtNoSwizzle{}));
  Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});

  typename Traits::TiledMmadQ mma_dq;
  auto thr_dq = mma_dq.get_thread_slice(tid);
  Tensor tdQrdS = thr_dq.partition_fragment_A(sdS);
  Tensor tdQrKt = thr_dq.partition_fragment_B(make_tensor(sK.data(), typename Traits::SmemLayoutKtNoSwizzle{}));
  Tensor tdQcdQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));

  // Shared -> register copies, one per operand role.
  auto copy_a_sdp = make_tiled_copy_A(typename Traits::SmemLoad{}, mma_sdp);
  auto thr_a_sdp = copy_a_sdp.get_thread_slice(tid);
  auto copy_b_sdp = make_tiled_copy_B(typename Traits::SmemLoad{}, mma_sdp);
  auto thr_b_sdp = copy_b_sdp.get_thread_slice(tid);
  Tensor tSsK = thr_b_sdp.partition_S(sK);
  Tensor tdPsdO = thr_a_sdp.partition_S(sdO);
  Tensor tdPsV = thr_b_sdp.partition_S(sV);
  auto copy_c_sdp = make_tiled_copy_C(typename Traits::SmemStore{}, mma_sdp);
  auto thr_c_sdp = copy_c_sdp.get_thread_slice(tid);
  Tensor tPsP = thr_c_sdp.partition_D(sP);
  Tensor tdSsdS = thr_c_sdp.partition_D(sdS);

  auto copy_a_dkv = make_tiled_copy_A(typename Traits::SmemLoadTransposed{}, mma_dkv);
  auto thr_a_dkv = copy_a_dkv.get_thread_slice(tid);
  auto copy_b_dkv = make_tiled_copy_B(typename Traits::SmemLoadTransposed{}, mma_dkv);
  auto thr_b_dkv = copy_b_dkv.get_thread_slice(tid);
  Tensor tdVsPt = thr_a_dkv.partition_S(sPt);
  Tensor tdVsdOt = thr_b_dkv.partition_S(sdOt);
  Tensor tdKsdSt = thr_a_dkv.partition_S(sdSt);

  auto copy_a_dq = make_tiled_copy_A(typename Traits::SmemLoad{}, mma_dq);
  auto thr_a_dq = copy_a_dq.get_thread_slice(tid);
  auto copy_b_dq = make_tiled_copy_B(typename Traits::SmemLoadTransposed{}, mma_dq);
  auto thr_b_dq = copy_b_dq.get_thread_slice(tid);
  Tensor tdQsdS = thr_a_dq.partition_S(sdS);
  Tensor tdQsKt = thr_b_dq.partition_S(sKt);

  // Prologue: K, V (rows past the sequence end zero-filled) and the first Q and dO blocks.
  load_tile_async(gmem_load, thr_load.partition_S(gK), thr_load.partition_D(sK), tKVc, keys_valid);
  load_tile_async(gmem_load, thr_load.partition_S(gV), thr_load.partition_D(sV), tKVc, keys_valid);
  const QueryBlock first{first_head, m_begin};
  load_tile_async(gmem_load, thr_load.partition_S(q_block(first)), thr_load.partition_D(sQ_buffer(0)), tQc,
                  rows_valid_of(first));
  load_tile_async(gmem_load, thr_load.partition_S(do_block(first)), thr_load.partition_D(sdO), tQc,
                  rows_valid_of(first));
  cute::cp_async_fence();

  clear(acc_dk);
  clear(acc_dv);
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;

  QueryBlock cur = first;
  for (int it = 0; it < iterations; ++it) {
    const QueryBlock next = next_of(cur);
    const int head = cur.head;
    const int m_block = cur.m_block;
    const int rows_valid = rows_valid_of(cur);
    const int64_t stat_offset = int64_t(head) * p.total_tokens + q_row_of(cur);  // into lse / delta [Hq, T]

    // Softmax statistics of this thread's rows; rows past the sequence end get P = 0 (lse = +inf).
    float lse_log2[kRows], delta[kRows];
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const int row = get<0>(tScS_rc(mi, 0));
      const float lse = row < rows_valid ? p.lse[stat_offset + row] : INFINITY;
      lse_log2[mi] = lse == -INFINITY ? INFINITY : lse * float(M_LOG2E);
      delta[mi] = row < rows_valid ? p.delta[stat_offset + row] : 0.f;
    }

    cp_async_wait<0>();
    __syncthreads();  // Q[it], dO[it] have landed; every warp is done with iteration it - 1

    // P = exp(scale * Q K^T - lse)
    Tensor sQ = sQ_buffer(it);
    Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_ss(acc_s, tSrQ, tSrK, thr_a_sdp.partition_S(sQ), tSsK, mma_sdp, copy_a_sdp, copy_b_sdp, thr_a_sdp,
            thr_b_sdp);
    Tensor scores = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    const bool need_mask = m_block < mask_m_end || keys_valid < kBlockN;
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const int row = m_block * kBlockM + get<0>(tScS_rc(mi, 0));
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(scores); ++ni) {
        const int col = get<1>(tScS_rc(mi, ni));
        const bool masked =
            need_mask && (col >= keys_valid || attention::is_masked(row, n_block * kBlockN + col, p.causal));
        scores(mi, ni) = masked ? 0.f : exp2f(scores(mi, ni) * p.scale_log2 - lse_log2[mi]);
      }
    }
    Tensor rP = convert_fragment<Element>(acc_s);
    copy(copy_c_sdp, thr_c_sdp.retile_S(rP), tPsP);

    // dS = P * (dO V^T - delta)
    Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_dp);
    gemm_ss(acc_dp, tdPrdO, tdPrV, tdPsdO, tdPsV, mma_sdp, copy_a_sdp, copy_b_sdp, thr_a_sdp, thr_b_sdp);
    Tensor dp = make_tensor(acc_dp.data(), acc_rowcol(acc_dp.layout()));
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(dp); ++ni) dp(mi, ni) = scores(mi, ni) * (dp(mi, ni) - delta[mi]);
    }
    Tensor rdS = convert_fragment<Element>(acc_dp);
    copy(copy_c_sdp, thr_c_sdp.retile_S(rdS), tdSsdS);

    if (it + 1 < iterations) {  // the other Q buffer was last read in iteration it - 1
      load_tile_async(gmem_load, thr_load.partition_S(q_block(next)), thr_load.partition_D(sQ_buffer(it + 1)), tQc,
                      rows_valid_of(next));
      cute::cp_async_fence();
    }
    __syncthreads();  // P and dS are in shared memory

    // dV += P^T dO
    gemm_ss(acc_dv, tdVrPt, tdVrdOt, tdVsPt, tdVsdOt, mma_dkv, copy_a_dkv, copy_b_dkv, thr_a_dkv, thr_b_dkv);
    __syncthreads();  // dO is free
    if (it + 1 < iterations) {
      load_tile_async(gmem_load, thr_load.partition_S(do_block(next)), thr_load.partition_D(sdO), tQc,
                      rows_valid_of(next));
      cute::cp_async_fence();
    }

    // dQ += dS K (unscaled; the dq kernel applies softmax_scale)
    Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
    clear(acc_dq);
    gemm_ss(acc_dq, tdQrdS, tdQrKt, tdQsdS, tdQsKt, mma_dq, copy_a_dq, copy_b_dq, thr_a_dq, thr_b_dq);
    // dq_accum is [Hq, T, D]: within a block every offset is a compile-time constant from the thread's base.
    float* dq_block = p.dq_accum + stat_offset * kHeadDim;
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dq); ++i) {
      const int row = get<0>(tdQcdQ(i));
      if (row < rows_valid) atomicAdd(dq_block + row * kHeadDim + get<1>(tdQcdQ(i)), acc_dq(i));
    }

    // dK += dS^T Q
    gemm_ss(acc_dk, tdKrdSt, tdKrQt, tdKsdSt, thr_b_dkv.partition_S(sQt_buffer(it)), mma_dkv, copy_a_dkv, copy_b_dkv,
            thr_a_dkv, thr_b_dkv);
    cur = next;
  }

  // Epilogue: dK = scale * acc_dk, dV = acc_dv.
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dk); ++i) acc_dk(i) *= p.scale;
  const int64_t dkv_row_stride = int64_t(p.num_kv_heads) * kHeadDim;
  if constexpr (kSplitGroup) {  // one query head's part: added to the fp32 sums (the host casts them)
    Tensor tdKVcC = thr_dkv.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
    float* dk_block = p.dk_accum + kv_row * dkv_row_stride + kv_head * kHeadDim;
    float* dv_block = p.dv_accum + kv_row * dkv_row_stride + kv_head * kHeadDim;
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dk); ++i) {
      const int row = get<0>(tdKVcC(i));
      if (row < keys_valid) atomicAdd(dk_block + row * dkv_row_stride + get<1>(tdKVcC(i)), acc_dk(i));
    }
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dv); ++i) {
      const int row = get<0>(tdKVcC(i));
      if (row < keys_valid) atomicAdd(dv_block + row * dkv_row_stride + get<1>(tdKVcC(i)), acc_dv(i));
    }
    return;
  }
  // The whole group: staged through K/V's shared memory, 16-byte stores.
  Tensor rdK = convert_fragment<Element>(acc_dk);
  Tensor rdV = convert_fragment<Element>(acc_dv);
  auto copy_c_dkv = make_tiled_copy_C(typename Traits::SmemStore{}, mma_dkv);
  auto thr_c_dkv = copy_c_dkv.get_thread_slice(tid);
  __syncthreads();  // every warp is done reading K and V
  copy(copy_c_dkv, thr_c_dkv.retile_S(rdK), thr_c_dkv.partition_D(sK));
  copy(copy_c_dkv, thr_c_dkv.retile_S(rdV), thr_c_dkv.partition_D(sV));
  __syncthreads();

  Tensor gdK = make_tensor(make_gmem_ptr(static_cast<Element*>(p.dk) + kv_row * dkv_row_stride + kv_head * kHeadDim),
                           Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_stride(dkv_row_stride, _1{}));
  Tensor gdV = make_tensor(make_gmem_ptr(static_cast<Element*>(p.dv) + kv_row * dkv_row_stride + kv_head * kHeadDim),
                           Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_stride(dkv_row_stride, _1{}));
  typename Traits::GmemVecCopy gmem_store;
  auto thr_store = gmem_store.get_thread_slice(tid);
  Tensor tdKVc = thr_store.partition_D(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  Tensor tdKsdK = thr_store.partition_S(sK);
  Tensor tdKrdK = make_fragment_like(tdKsdK);
  copy(gmem_store, tdKsdK, tdKrdK);
  store_tile(gmem_store, tdKrdK, thr_store.partition_D(gdK), tdKVc, keys_valid);
  Tensor tdVsdV = thr_store.partition_S(sV);
  Tensor tdVrdV = make_fragment_like(tdVsdV);
  copy(gmem_store, tdVsdV, tdVrdV);
  store_tile(gmem_store, tdVrdV, thr_store.partition_D(gdV), tdKVc, keys_valid);
}

template <typename Traits>
void launch_flash_bwd_main(const BwdParams& p, cudaStream_t stream) {
  constexpr int smem = Traits::kSmemBytes;
  const bool split = p.dk_accum != nullptr;
  auto kernel = split ? &flash_bwd_kernel<Traits, true> : &flash_bwd_kernel<Traits, false>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  // x: (KV head, sequence) pairs, y: key blocks, z: query heads of the group (split) or one.
  const dim3 grid(p.num_kv_heads * p.batch, ceil_div(p.max_seqlen, Traits::kBlockN), split ? p.group : 1);
  kernel<<<grid, Traits::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace internlm2::cuda::flash
