// bf16 dot-product tile products for CPUs with AVX512-BF16 (vdpbf16ps: Zen 4+, Cooper Lake+), used only
// by the AVX512_BF16 build of the attention kernels (isa.h): C (+)= A B with bf16 operands and float32
// accumulation, twice the multiply-adds per instruction of float32 FMAs, and the packing of float32 tiles
// into the operand layouts.
//
// Layouts. A is row-major and each row's consecutive pairs (k, k+1) are adjacent, so one 32-bit broadcast
// feeds a pair. B is pair-interleaved ("VNNI"): rows k and k+1 of a [K, N] matrix stored as one row of N
// pairs, element (k, j) at b[(k / 2) * ldb + 2 * j + k % 2]; 16 columns of pairs fill one zmm, and whole
// zmms are read, so a B row must be readable up to a multiple of 16 columns (the extra columns' results
// are never stored). K is even: callers pad a zero pair.
#pragma once

#if !defined(CPU_CAPABILITY_AVX512_BF16)
#error "bf16_gemm.h is for the AVX512_BF16 build only"
#endif

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#include "cpu/vec.h"

namespace internlm2::cpu::CPU_CAPABILITY {

constexpr int kGemmRows = 8;     // rows of C per micro-tile
constexpr int kGemmVectors = 3;  // 16-column vectors of C per micro-tile: 24 zmm accumulators

// Elements of a B row holding n columns of pairs, rounded so that whole zmms can be read.
constexpr int64_t pair_row_elements(int64_t n) { return 2 * ((n + 15) / 16 * 16); }

inline __mmask16 lanes_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

template <int MR, int NV>
void gemm_bf16_tile(int64_t pairs, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float* c,
                    int64_t ldc, bool accumulate, __mmask16 last) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = accumulate ? _mm512_maskz_loadu_ps(v == NV - 1 ? last : __mmask16(0xFFFF), c + r * ldc + 16 * v)
                             : _mm512_setzero_ps();
    }
  }
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + p * ldb + 32 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * p, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      _mm512_mask_storeu_ps(c + r * ldc + 16 * v, v == NV - 1 ? last : __mmask16(0xFFFF), acc[r][v]);
    }
  }
}

using GemmTile = void (*)(int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, bool,
                          __mmask16);

// Micro-tile (rows r, vectors v) at index (r - 1) * kGemmVectors + v - 1.
template <std::size_t... I>
constexpr std::array<GemmTile, sizeof...(I)> gemm_tiles(std::index_sequence<I...>) {
  return {&gemm_bf16_tile<static_cast<int>(I / kGemmVectors) + 1, static_cast<int>(I % kGemmVectors) + 1>...};
}

// C[m, n] (+)= A[m, k] B[k, n] (layouts above; lda, ldb, ldc in elements, k even). B panels of
// kGemmVectors * 16 columns stay in L1 while every row block of A passes over them.
inline void gemm_bf16(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b,
                      int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  static constexpr auto kTiles = gemm_tiles(std::make_index_sequence<kGemmRows * kGemmVectors>{});
  const auto* a16 = reinterpret_cast<const uint16_t*>(a);
  const auto* b16 = reinterpret_cast<const uint16_t*>(b);
  for (int64_t n0 = 0; n0 < n; n0 += 16 * kGemmVectors) {
    const int64_t cols = std::min<int64_t>(16 * kGemmVectors, n - n0);
    const int64_t vectors = (cols + 15) / 16;
    const __mmask16 last = lanes_mask(cols - 16 * (vectors - 1));
    for (int64_t m0 = 0; m0 < m; m0 += kGemmRows) {
      const int64_t rows = std::min<int64_t>(kGemmRows, m - m0);
      kTiles[(rows - 1) * kGemmVectors + vectors - 1](k / 2, a16 + m0 * lda, lda, b16 + 2 * n0, ldb, c + m0 * ldc + n0, ldc, accumulate,
                                    last);
    }
  }
}

// Pair-interleaves rows 2p and 2p + 1 of a [rows, cols] float32 (or bf16) matrix into row p of dst
// (ldd elements per row), rounding to bf16; an odd last row is paired with zeros.
template <typename T>
void pack_row_pairs(const T* src, int64_t rows, int64_t cols, int64_t lds, c10::BFloat16* dst, int64_t ldd) {
  // Element i of the result takes element i / 2 of the first row (even i) or of the second (odd i).
  alignas(64) static constexpr std::array<int16_t, 32> kInterleave = [] {
    std::array<int16_t, 32> idx{};
    for (int i = 0; i < 16; ++i) {
      idx[2 * i] = static_cast<int16_t>(i);
      idx[2 * i + 1] = static_cast<int16_t>(16 + i);
    }
    return idx;
  }();
  const __m512i interleave = _mm512_load_si512(kInterleave.data());
  for (int64_t r = 0; r < rows; r += 2) {
    const T* first = src + r * lds;
    const T* second = r + 1 < rows ? first + lds : nullptr;
    auto* out = reinterpret_cast<uint16_t*>(dst + (r / 2) * ldd);
    for (int64_t j = 0; j < cols; j += 16) {
      const int64_t w = std::min<int64_t>(16, cols - j);
      const __m512 lo = load_float_upto(first + j, w);
      const __m512 hi = second ? __m512(load_float_upto(second + j, w)) : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // [first 16 | second 16]
      const __mmask32 mask = w == 16 ? __mmask32(0xFFFFFFFFu) : __mmask32((1ull << (2 * w)) - 1);
      _mm512_mask_storeu_epi16(out + 2 * j, mask, _mm512_permutexvar_epi16(interleave, both));
    }
  }
}

// dst[0, n) = bf16(src[0, n)), rounding to nearest even.
inline void store_bf16_row(const float* src, int64_t n, c10::BFloat16* dst) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = lanes_mask(n - j);
    const __m256i packed = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + j));
    _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(dst) + j, mask, packed);
  }
}

}  // namespace internlm2::cpu::CPU_CAPABILITY
