// Small CuTe building blocks shared by the flash attention forward and backward kernels.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include <cstdint>

#include "common/varlen.h"
#include "cuda/flash_attention/params.h"

namespace internlm2::cuda::flash {

using namespace cute;

template <Dtype kDtype>
using element_t = std::conditional_t<kDtype == Dtype::kBF16, cutlass::bfloat16_t, cutlass::half_t>;

// Where packed sequence `b` lives (common/varlen.h): its first row and its length, which fits an int
// because cu_seqlens is int32.
struct SeqSpan {
  int64_t start;
  int len;
};

__device__ __forceinline__ SeqSpan seq_span(const int* cu_seqlens, int b, int64_t total_tokens) {
  const attention::SeqSpan span = attention::sequence_span(cu_seqlens, b, total_tokens);
  return {span.start, static_cast<int>(span.length)};
}

// An mma.sync accumulator fragment (4 values per 16x8 atom: columns 2t, 2t+1 of rows g and g+8) viewed
// as a matrix: (rows = (2, MMA_M), cols = (2, MMA_N)), so row statistics are loops over mode 1.
template <typename Layout>
CUTE_HOST_DEVICE auto acc_rowcol(Layout acc) {
  static_assert(decltype(size<0>(acc))::value == 4 && decltype(rank(acc))::value == 3);
  auto l = logical_divide(acc, Shape<_2>{});  // ((2 cols, 2 rows), MMA_M, MMA_N)
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// The same registers reinterpreted as the A operand of an m16n8k16 mma: two neighbouring 8-column
// accumulator atoms form one 16-wide k slice, ((4, 2), MMA_M, MMA_N / 2).
template <typename Layout>
CUTE_HOST_DEVICE auto acc_as_a_operand(Layout acc) {
  static_assert(decltype(size<0>(acc))::value == 4 && decltype(rank(acc))::value == 3);
  auto l = logical_divide(acc, Shape<Underscore, Underscore, _2>{});  // (4, MMA_M, (2, MMA_N / 2))
  return make_layout(make_layout(get<0>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

// Register tensor converted element-wise to To (vectorised: the fragment must be contiguous).
template <typename To, typename Engine, typename Layout>
__device__ __forceinline__ auto convert_fragment(const Tensor<Engine, Layout>& t) {
  using From = typename Engine::value_type;
  constexpr int N = decltype(size(t))::value;
  cutlass::NumericArrayConverter<To, From, N> op;
  auto converted = op(*reinterpret_cast<const cutlass::Array<From, N>*>(t.data()));
  Tensor out = make_tensor<To>(t.layout());
  *reinterpret_cast<cutlass::Array<To, N>*>(out.data()) = converted;
  return out;
}

// acc += A * B with both operands staged from shared memory through ldmatrix, loading k-slice i + 1
// while the tensor cores work on slice i.
template <typename Acc, typename RA, typename RB, typename SA, typename SB, typename TiledMma, typename CopyA,
          typename CopyB, typename ThrCopyA, typename ThrCopyB>
__device__ __forceinline__ void gemm_ss(Acc& acc, RA& rA, RB& rB, const SA& sA, const SB& sB, const TiledMma& mma,
                                        const CopyA& copy_a, const CopyB& copy_b, const ThrCopyA& thr_a,
                                        const ThrCopyB& thr_b) {
  Tensor rA_view = thr_a.retile_D(rA);
  Tensor rB_view = thr_b.retile_D(rB);
  constexpr int K = decltype(size<2>(rA))::value;
  copy(copy_a, sA(_, _, 0), rA_view(_, _, 0));
  copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < K; ++k) {
    if (k + 1 < K) {
      copy(copy_a, sA(_, _, k + 1), rA_view(_, _, k + 1));
      copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    }
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// acc += A * B with A already in registers (e.g. probabilities just computed) and B from shared memory.
template <typename Acc, typename RA, typename RB, typename SB, typename TiledMma, typename CopyB, typename ThrCopyB>
__device__ __forceinline__ void gemm_rs(Acc& acc, const RA& rA, RB& rB, const SB& sB, const TiledMma& mma,
                                        const CopyB& copy_b, const ThrCopyB& thr_b) {
  Tensor rB_view = thr_b.retile_D(rB);
  constexpr int K = decltype(size<2>(rA))::value;
  copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < K; ++k) {
    if (k + 1 < K) copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// cp.async a tile (partitioned (CPY, CPY_ROWS, CPY_COLS)) into shared memory. Rows at or beyond
// `valid_rows` are not read at all (their addresses may lie past the end of the tensor): plain stores
// zero them, so a partial tile computes as if padded with zeros.
template <typename TiledCopy, typename Src, typename Dst, typename Coord>
__device__ __forceinline__ void load_tile_async(const TiledCopy& tiled_copy, const Src& src, Dst&& dst,
                                                const Coord& coord, int valid_rows) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    if (get<0>(coord(0, m, 0)) < valid_rows) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(src); ++k) copy(tiled_copy, src(_, m, k), dst(_, m, k));
    } else {
      clear(dst(_, m, _));
    }
  }
}

// Store rows below `valid_rows` of a register tile to global memory.
template <typename TiledCopy, typename Src, typename Dst, typename Coord>
__device__ __forceinline__ void store_tile(const TiledCopy& tiled_copy, const Src& src, Dst&& dst, const Coord& coord,
                                           int valid_rows) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    if (get<0>(coord(0, m, 0)) < valid_rows) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(src); ++k) copy(tiled_copy, src(_, m, k), dst(_, m, k));
    }
  }
}

// Max / sum over the 4 threads (a quad) that share the rows of an mma accumulator.
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Waits until at most N groups of cp.async are still in flight (wait_group, not wait_all).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace internlm2::cuda::flash
