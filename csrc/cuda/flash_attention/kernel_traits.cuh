// Tile shapes, shared-memory layouts and copy/mma atoms of the flash attention kernels (sm_80 mma.sync,
// also what runs on sm_90).
#pragma once

#include <cute/tensor.hpp>

#include "cuda/flash_attention/utils.cuh"

namespace internlm2::cuda::flash {

template <typename Element>
using MmaAtom = MMA_Atom<std::conditional_t<std::is_same_v<Element, cutlass::half_t>, SM80_16x8x16_F32F16F16F32_TN,
                                            SM80_16x8x16_F32BF16BF16F32_TN>>;

// What both directions share: 16-byte global loads, ldmatrix shared->register copies and a swizzled
// shared-memory atom of 8 rows x 64 elements (128 B). The XOR swizzle spreads the 8 rows an ldmatrix
// reads (and the 8 threads that write a row with cp.async) over all 32 banks.
template <typename Element_, int kHeadDim_, int kThreads_>
struct CommonTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kThreads = kThreads_;
  static_assert(kHeadDim % 64 == 0, "head dims are multiples of the 64-element swizzle atom");

  using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));

  // A row segment of 64 elements is 8 threads x 16 B; the block's threads cover kThreads / 8 rows per step.
  using GmemThreads = Layout<Shape<Int<kThreads / 8>, _8>, Stride<_8, _1>>;
  using GmemLoad = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, Element>{},
                                            GmemThreads{}, Layout<Shape<_1, _8>>{}));
  using GmemVecCopy = decltype(make_tiled_copy(Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>{},
                                               GmemThreads{}, Layout<Shape<_1, _8>>{}));

  using SmemLoad = Copy_Atom<SM75_U32x4_LDSM_N, Element>;            // row-major operand
  using SmemLoadTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;  // operand read transposed
  using SmemStore = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>;

  template <int kRows, int kCols>
  using SmemLayout = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kCols>>{}));
  // The transpose of a (kRows, kCols) row-major swizzled tile, as a (kCols, kRows) view of the same bytes.
  template <int kRows, int kCols>
  using SmemLayoutT =
      decltype(composition(SmemLayout<kRows, kCols>{}, make_layout(Shape<Int<kCols>, Int<kRows>>{}, GenRowMajor{})));
  template <int kRows, int kCols>
  using SmemLayoutTNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutT<kRows, kCols>{}));
};

// Forward: one CTA owns kBlockM query rows of one head and walks the key blocks of its sequence. Warps
// split the rows (16 each per mma step), so softmax statistics never leave a warp.
template <typename Element, int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps>
struct FwdTraits : CommonTraits<Element, kHeadDim_, kWarps * 32> {
  using Base = CommonTraits<Element, kHeadDim_, kWarps * 32>;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kHeadDim = kHeadDim_;

  using TiledMma = TiledMMA<MmaAtom<Element>, Layout<Shape<Int<kWarps>, _1, _1>>, Tile<Int<16 * kWarps>, _16, _16>>;

  using SmemLayoutQ = typename Base::template SmemLayout<kBlockM, kHeadDim>;
  using SmemLayoutKV = typename Base::template SmemLayout<kBlockN, kHeadDim>;
  using SmemLayoutVt = typename Base::template SmemLayoutT<kBlockN, kHeadDim>;
  using SmemLayoutVtNoSwizzle = typename Base::template SmemLayoutTNoSwizzle<kBlockN, kHeadDim>;

  // Q, then two stages of K and V (the output tile reuses Q's space at the end).
  static constexpr int kSmemBytes = (cosize_v<SmemLayoutQ> + 4 * cosize_v<SmemLayoutKV>) * sizeof(Element);
};

// Backward: one CTA owns kBlockN keys of one KV head and walks the query blocks of every query head in
// that KV head's group, accumulating dK and dV in fp32 registers (GQA needs no second reduction); dQ parts
// go to an fp32 buffer with atomics. Three mma tilings: S and dP (query rows x keys) with kWarpsM warps
// along the rows; dK and dV (keys x head dim) with kWarpsNdKV along the keys; dQ (rows x head dim) with
// kWarpsMdQ along the rows.
template <typename Element, int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps, int kWarpsMSdP, int kWarpsNdKV,
          int kWarpsMdQ>
struct BwdTraits : CommonTraits<Element, kHeadDim_, kWarps * 32> {
  using Base = CommonTraits<Element, kHeadDim_, kWarps * 32>;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kWarps % kWarpsMSdP == 0 && kWarps % kWarpsNdKV == 0 && kWarps % kWarpsMdQ == 0);

  template <int kWarpsRows>
  using Mma = TiledMMA<MmaAtom<Element>, Layout<Shape<Int<kWarpsRows>, Int<kWarps / kWarpsRows>, _1>>,
                       Tile<Int<16 * kWarpsRows>, Int<16 * kWarps / kWarpsRows>, _16>>;
  using TiledMmaSdP = Mma<kWarpsMSdP>;
  using TiledMmadKV = Mma<kWarpsNdKV>;
  using TiledMmadQ = Mma<kWarpsMdQ>;

  using SmemLayoutQ = typename Base::template SmemLayout<kBlockM, kHeadDim>;    // Q and dO
  using SmemLayoutQt = typename Base::template SmemLayoutT<kBlockM, kHeadDim>;  // (D, M) views
  using SmemLayoutQtNoSwizzle = typename Base::template SmemLayoutTNoSwizzle<kBlockM, kHeadDim>;
  using SmemLayoutKV = typename Base::template SmemLayout<kBlockN, kHeadDim>;
  using SmemLayoutKt = typename Base::template SmemLayoutT<kBlockN, kHeadDim>;
  using SmemLayoutKtNoSwizzle = typename Base::template SmemLayoutTNoSwizzle<kBlockN, kHeadDim>;
  using SmemLayoutPdS = typename Base::template SmemLayout<kBlockM, kBlockN>;  // P and dS
  using SmemLayoutPdSt = typename Base::template SmemLayoutT<kBlockM, kBlockN>;
  using SmemLayoutPdStNoSwizzle = typename Base::template SmemLayoutTNoSwizzle<kBlockM, kBlockN>;

  // Two Q buffers (the next query block loads while dK uses the current one), dO, K, V, P and dS.
  static constexpr int kSmemBytes =
      (3 * cosize_v<SmemLayoutQ> + 2 * cosize_v<SmemLayoutKV> + 2 * cosize_v<SmemLayoutPdS>) * sizeof(Element);
};

}  // namespace internlm2::cuda::flash
