// Flash attention on CPU, compiled once per instruction set (isa.h): the executable specification of the
// op, exact in float32. Index math for packed sequences and causal tiles comes from common/varlen.h, the
// same helpers the CUDA kernels use.
//
// Forward: one work item per (sequence, KV head, block of kBlockQ queries), for all query heads of the KV
// head's group. It walks the visible key blocks, each read once for the group, with an online softmax
// (running row max and sum, rescaling the float32 output accumulator), so no more than one
// kBlockQ x kBlockK score tile exists per thread.
//
// Backward (FlashAttention-2's algorithm): one work item per (sequence, KV head). It owns dK/dV of its
// key blocks, summed over the whole query group in float32 accumulators (GQA without repeated K/V), and
// dQ of the group's query heads for its sequence, so threads never share an output and the result is
// deterministic. Per tile: S = Q K^T, P = exp(S * scale - lse), dP = dO V^T,
// dS = P (dP - delta) * scale with delta = rowsum(dO * O) - grad_lse; dV += P^T dO, dK += dS^T Q, dQ += dS K.
// A tile crossed by the causal diagonal stops at the last key its queries see.
//
// The tile products come from a `Products` policy that owns the operand layouts, built once per call:
// float32 brgemms on every instruction set (inputs converted to float32, K, V, Q, dO transposed to
// [H, D, T] so each product is row-major), and in the AVX512_BF16 build bf16 dot products for bf16 inputs
// (bf16_gemm.h: operands stay bf16, P and dS are rounded to bf16 per tile, accumulation in float32).
//
// Work items run largest first from a shared counter: causal items differ in cost, and a static split
// would leave a thread idle at the end.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "common/dispatch.h"
#include "common/varlen.h"
#include "cpu/attention.h"
#include "cpu/kernels.h"
#if defined(CPU_CAPABILITY_AVX512_BF16)
#include "cpu/bf16_gemm.h"
#endif

namespace internlm2::cpu::CPU_CAPABILITY {
namespace {

using attention::ceil_div;
using attention::kv_head_of;
using attention::lse_offset;
using attention::sequence_span;
using attention::SeqSpan;
using attention::tile_mask;
using attention::TileMask;
using attention::token_head_offset;
using attention::visible_keys;

constexpr int64_t kBlockQ = 64;   // query rows per tile
constexpr int64_t kBlockK = 256;  // keys per tile (64 x 256 measured fastest on Zen 5, fp32 and bf16)

struct Dims {
  int64_t total;     // T, packed tokens
  int64_t heads_q;   // Hq
  int64_t heads_kv;  // Hkv
  int64_t dim;       // D
};

// Rows of D elements of one head, as A or B operands: a [T, H, D] input used as it is (rows H * D apart)
// or a head-major [H, T, D] copy (rows D apart).
template <typename T>
struct HeadRows {
  at::Tensor owner;  // the copy, when one was made
  const T* data;
  int64_t token_stride;
  int64_t head_stride;
  const T* at(int64_t head, int64_t token) const { return data + head * head_stride + token * token_stride; }
};

// t's rows in dtype T: t itself when it has that dtype (unless `head_major`), else a head-major copy.
// float32 rows H * D apart run as fast as a copy would (measured, Zen 4); bf16 rows H * D apart are often a
// multiple of 4 KiB, all in the same L1 sets, and the bf16 kernels take a copy.
template <typename T>
HeadRows<T> head_rows(const at::Tensor& t, bool head_major) {
  if (t.scalar_type() == c10::CppTypeToScalarType<T>::value && !head_major) {
    return {t, t.const_data_ptr<T>(), t.size(1) * t.size(2), t.size(2)};
  }
  at::Tensor copy = t.to(c10::CppTypeToScalarType<T>::value).transpose(0, 1).contiguous();
  return {copy, copy.const_data_ptr<T>(), t.size(2), t.size(0) * t.size(2)};
}

// [T, H, D] -> [H, D, ld_dst >= T]: the per-head transposed copy that turns Q K^T, dO V^T, P^T dO and
// dS^T Q into row-major tile products. Square blocks go through ATen's vectorised transposes (32 x 32 is
// the most its bf16 one takes); a dtype change happens on the way, in a block held in L1.
constexpr int64_t kTransposeBlock = 32;

template <typename In, typename Out>
void transpose_tokens(const In* src, int64_t tokens, int64_t heads, int64_t dim, Out* dst, int64_t ld_dst) {
  const int64_t blocks = ceil_div(tokens, kTransposeBlock), ld_src = heads * dim;
  at::parallel_for(0, heads * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Out> converted(std::is_same_v<In, Out> ? 0 : kTransposeBlock * kTransposeBlock);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t h = job / blocks, t0 = (job % blocks) * kTransposeBlock;
      const int n = static_cast<int>(std::min(kTransposeBlock, tokens - t0));
      const In* in = src + token_head_offset(t0, h, heads, dim);
      for (int64_t d0 = 0; d0 < dim; d0 += kTransposeBlock) {
        const int w = static_cast<int>(std::min(kTransposeBlock, dim - d0));
        Out* out = dst + (h * dim + d0) * ld_dst + t0;
        if constexpr (std::is_same_v<In, Out>) {
          at::vec::transpose_mxn<Out>(in + d0, ld_src, out, ld_dst, n, w);
        } else {
          for (int t = 0; t < n; ++t) {
            for (int c = 0; c < w; ++c) converted[t * kTransposeBlock + c] = static_cast<Out>(in[t * ld_src + d0 + c]);
          }
          at::vec::transpose_mxn<Out>(converted.data(), kTransposeBlock, out, ld_dst, n, w);
        }
      }
    }
  });
}

// Row length of the float32 transposes: T plus a little, so that rows of a power-of-two T do not all map
// to the same cache sets (measured 10% faster tile products at T = 2048 on Zen 4).
inline int64_t transposed_row(int64_t total) { return total + 16; }

// [T, H, D] -> float32 [H, D, transposed_row(T)].
at::Tensor transposed_float(const at::Tensor& t) {
  const int64_t ld = transposed_row(t.size(0));
  at::Tensor out = at::empty({t.size(1), t.size(2), ld}, t.options().dtype(at::kFloat));
  INTERNLM2_DISPATCH_FLOAT_TYPES(t.scalar_type(), "flash_attention_transpose_cpu", [&] {
    transpose_tokens(t.const_data_ptr<scalar_t>(), t.size(0), t.size(1), t.size(2), out.mutable_data_ptr<float>(), ld);
  });
  return out;
}

// How many of the n keys from first_key the query at position `query` sees (all of them unless the tile
// is crossed by the causal diagonal).
inline int64_t visible(bool partial, int64_t query, int64_t first_key, int64_t n, bool causal) {
  return partial ? visible_keys(query, first_key, first_key + n, causal) : n;
}

inline void zero_tail(float* row, int64_t from, int64_t to) { std::fill(row + from, row + to, 0.f); }

// ---------------------------------------------------------------------------------------------- forward

// The forward's two tile products in float32, on every instruction set: Q and V as float32 rows (head_rows),
// K transposed to [Hkv, D, T], so both are row-major brgemms.
struct Fp32ForwardProducts {
  HeadRows<float> q, v;
  at::Tensor kt_;
  const float* kt;
  Dims dims;

  Fp32ForwardProducts(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const Dims& d)
      : q(head_rows<float>(q_in, false)), v(head_rows<float>(v_in, false)), kt_(transposed_float(k_in)),
        kt(kt_.const_data_ptr<float>()), dims(d) {}

  struct Scratch {};
  Scratch make_scratch() const { return {}; }

  // s [m, n] (leading dimension kBlockK) = Q K^T of query rows from q_row (head h) and keys from k_row.
  void scores(int64_t h, int64_t hk, int64_t q_row, int64_t m, int64_t k_row, int64_t n, float* s, Scratch&) const {
    const auto [total, Hq, Hkv, D] = dims;
    const int64_t ld = transposed_row(total);
    gemm(m, n, D, q.at(h, q_row), q.token_stride, kt + hk * D * ld + k_row, ld, s, kBlockK, false);
  }

  // acc [m, D] += P V with p [m, n] (leading dimension kBlockK).
  void accumulate(int64_t hk, int64_t m, int64_t k_row, int64_t n, const float* p, float* acc, Scratch&) const {
    const auto [total, Hq, Hkv, D] = dims;
    gemm(m, D, n, p, kBlockK, v.at(hk, k_row), v.token_stride, acc, D, true);
  }
};

#if defined(CPU_CAPABILITY_AVX512_BF16)
// ---- bf16 operand layouts of bf16_gemm.h, built once per call from [T, H, D] bf16 tensors.
using bf16 = c10::BFloat16;

// [H, D, T + 1]: the transpose, an A operand with pairs of tokens; the extra zero column keeps the last
// pair of a block with an odd number of tokens inside the tensor.
at::Tensor transposed_bf16(const at::Tensor& t) {
  const int64_t total = t.size(0), heads = t.size(1), dim = t.size(2);
  at::Tensor out = at::empty({heads, dim, total + 1}, t.options());
  transpose_tokens(t.const_data_ptr<bf16>(), total, heads, dim, out.mutable_data_ptr<bf16>(), total + 1);
  out.select(2, total).zero_();
  return out;
}

// [H, D / 2, T + 16, 2]: a B operand with pairs of dims (each token's pair is one 32-bit word, transposed
// as if it were a float: only moved, never computed on); 16 padding columns so that whole zmms can be read
// at the last tokens.
constexpr int64_t dim_pairs_row(int64_t total) { return 2 * (total + 16); }

at::Tensor dim_pairs(const at::Tensor& t) {
  const int64_t total = t.size(0), heads = t.size(1), dim = t.size(2);
  at::Tensor out = at::zeros({heads, dim / 2, total + 16, 2}, t.options());
  transpose_tokens(reinterpret_cast<const float*>(t.const_data_ptr<bf16>()), total, heads, dim / 2,
                   reinterpret_cast<float*>(out.mutable_data_ptr<bf16>()), total + 16);
  return out;
}

// [H, T / 2 + 1, pair_row_elements(D)]: a B operand with pairs of tokens, pairs starting at even packed
// tokens (zero padding after the last token).
at::Tensor token_pairs(const at::Tensor& t) {
  const int64_t total = t.size(0), heads = t.size(1), dim = t.size(2), row = pair_row_elements(dim);
  at::Tensor out = at::zeros({heads, total / 2 + 1, row}, t.options());
  bf16* dst = out.mutable_data_ptr<bf16>();
  const bf16* src = t.const_data_ptr<bf16>();
  constexpr int64_t kTokens = 128;
  const int64_t chunks = ceil_div(total, kTokens);
  at::parallel_for(0, heads * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t h = job / chunks, t0 = (job % chunks) * kTokens;
      pack_row_pairs(src + token_head_offset(t0, h, heads, dim), std::min(kTokens, total - t0), dim, heads * dim,
                     dst + (h * (total / 2 + 1) + t0 / 2) * row, row);
    }
  });
  return out;
}

// The A operand matching token_pairs for the keys from packed token k_row: rows of src [m, n] (float32,
// leading dimension lds) in bf16, behind a zero column when k_row is odd (it is the second half of its
// pair), then padded to an even length. Returns that length, the product's K.
constexpr int64_t kPairedKeysRow = kBlockK + 2;

inline int64_t rows_on_token_pairs(const float* src, int64_t m, int64_t n, int64_t lds, int64_t k_row, bf16* dst) {
  const int64_t shift = k_row % 2, keys = n + shift, keys_even = keys + keys % 2;
  for (int64_t r = 0; r < m; ++r) {
    bf16* row = dst + r * kPairedKeysRow;
    row[0] = bf16(0.f);
    row[keys_even - 1] = bf16(0.f);
    store_bf16_row(src + r * lds, n, row + shift);
  }
  return keys_even;
}

// The forward's tile products with bf16 dot products (bf16 inputs, even head dim): S = Q K^T with K in
// pairs of dims, P V with V in pairs of tokens and P rounded to bf16, as FlashAttention does on GPUs.
struct Bf16DotForwardProducts {
  Dims dims;
  HeadRows<bf16> q;
  at::Tensor kt_, vp_;
  const bf16 *kt, *vp;

  Bf16DotForwardProducts(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const Dims& d)
      : dims(d), q(head_rows<bf16>(q_in, true)), kt_(dim_pairs(k_in)), vp_(token_pairs(v_in)), kt(kt_.const_data_ptr<bf16>()),
        vp(vp_.const_data_ptr<bf16>()) {}

  struct Scratch {
    std::vector<bf16> p_rows = std::vector<bf16>(kBlockQ * kPairedKeysRow);
  };
  Scratch make_scratch() const { return {}; }

  void scores(int64_t h, int64_t hk, int64_t q_row, int64_t m, int64_t k_row, int64_t n, float* s, Scratch&) const {
    const auto [total, Hq, Hkv, D] = dims;
    gemm_bf16(m, n, D, q.at(h, q_row), q.token_stride, kt + hk * (D / 2) * dim_pairs_row(total) + 2 * k_row,
              dim_pairs_row(total), s, kBlockK, false);
  }

  void accumulate(int64_t hk, int64_t m, int64_t k_row, int64_t n, const float* p, float* acc, Scratch& scratch) const {
    const auto [total, Hq, Hkv, D] = dims;
    const int64_t keys = rows_on_token_pairs(p, m, n, kBlockK, k_row, scratch.p_rows.data());
    const int64_t row = pair_row_elements(D);
    gemm_bf16(m, D, keys, scratch.p_rows.data(), kPairedKeysRow, vp + (hk * (total / 2 + 1) + k_row / 2) * row, row,
              acc, D, true);
  }
};
#endif

template <typename T, typename Products>
struct Forward {
  const Products& products;
  T* out;           // [T, Hq, D]
  float* lse;       // [Hq, T]
  const int32_t* cu_seqlens;
  Dims dims;
  bool causal;
  float scale;

  auto make_worker() const {
    const int64_t group = dims.heads_q / dims.heads_kv;
    return [this, s = std::vector<float>(kBlockQ * kBlockK), acc = std::vector<float>(group * kBlockQ * dims.dim),
            rows = std::vector<SoftmaxRow>(group * kBlockQ),
            scratch = products.make_scratch()](const WorkItem& item) mutable {
      run(item, s.data(), acc.data(), rows.data(), scratch);
    };
  }

  // The item's query block for every head of KV head item.head's group: each key tile is read once for
  // the whole group (acc and rows hold group x kBlockQ rows).
  void run(const WorkItem& item, float* s, float* acc, SoftmaxRow* rows, typename Products::Scratch& scratch) const {
    const auto [total, Hq, Hkv, D] = dims;
    const SeqSpan span = sequence_span(cu_seqlens, item.seq, total);
    const int64_t hk = item.head, group = Hq / Hkv;
    const int64_t i0 = item.block * kBlockQ, m = std::min(kBlockQ, span.length - i0);
    std::fill(rows, rows + group * kBlockQ, SoftmaxRow{});
    std::fill(acc, acc + group * kBlockQ * D, 0.f);

    const int64_t key_end = attention::key_end_for_queries(i0 + m, span.length, causal);
    for (int64_t j0 = 0; j0 < key_end; j0 += kBlockK) {
      const int64_t n = std::min(kBlockK, key_end - j0);
      const bool partial = tile_mask(i0, i0 + m, j0, j0 + n, causal) == TileMask::kPartial;
      for (int64_t g = 0; g < group; ++g) {
        float* acc_h = acc + g * kBlockQ * D;
        SoftmaxRow* rows_h = rows + g * kBlockQ;
        products.scores(hk * group + g, hk, span.start + i0, m, span.start + j0, n, s, scratch);
        for (int64_t r = 0; r < m; ++r) {
          online_softmax_step(s + r * kBlockK, visible(partial, i0 + r, j0, n, causal), n, scale, rows_h[r],
                              acc_h + r * D, D);
        }
        products.accumulate(hk, m, span.start + j0, n, s, acc_h, scratch);
      }
    }

    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = hk * group + g;
      for (int64_t r = 0; r < m; ++r) {
        lse[lse_offset(h, span.start + i0 + r, total)] = finish_softmax_row(
            acc + (g * kBlockQ + r) * D, rows[g * kBlockQ + r], D, out + token_head_offset(span.start + i0 + r, h, Hq, D));
      }
    }
  }
};

// --------------------------------------------------------------------------------------------- backward

// One tile of the backward: query rows [i0, i0 + m) of head h against keys [j0, j0 + n) of its KV head hk
// (positions in the sequence), q_row and k_row the packed token indices of the first of each.
struct BwdTile {
  int64_t h, hk, i0, m, j0, n, q_row, k_row;
};

// The backward's five tile products in float32, on every instruction set: Q, K, dO as float32 rows
// (head_rows) and K, V transposed to [Hkv, D, T] once, so each product is a row-major brgemm; dV and dK of
// a key block are key-major [n, D], accumulated from the tile's P^T and dS^T (transposed in L1), so Q and
// dO need no transposed copies.
struct Fp32BackwardProducts {
  HeadRows<float> q, k, dout;
  at::Tensor kt_, vt_;
  const float *kt, *vt;
  Dims dims;

  // The layout of the key block's dK/dV accumulators: [n, D] (key-major) here, [D, n] for bf16.
  static constexpr bool kKeyMajorGrads = true;

  Fp32BackwardProducts(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& grad_out,
                       const Dims& d)
      : q(head_rows<float>(q_in, false)), k(head_rows<float>(k_in, false)), dout(head_rows<float>(grad_out, false)),
        kt_(transposed_float(k_in)), vt_(transposed_float(v_in)), kt(kt_.const_data_ptr<float>()),
        vt(vt_.const_data_ptr<float>()), dims(d) {}

  struct Scratch {
    std::vector<float> transposed = std::vector<float>(kBlockK * kBlockQ);  // P^T or dS^T [n, m]
  };
  Scratch make_scratch() const { return {}; }

  // s = Q K^T and dp = dO V^T, [m, n] with leading dimension kBlockK.
  void scores(const BwdTile& t, float* s, float* dp, Scratch&) const {
    const auto [total, Hq, Hkv, D] = dims;
    const int64_t ld = transposed_row(total);
    gemm(t.m, t.n, D, q.at(t.h, t.q_row), q.token_stride, kt + t.hk * D * ld + t.k_row, ld, s, kBlockK, false);
    gemm(t.m, t.n, D, dout.at(t.h, t.q_row), dout.token_stride, vt + t.hk * D * ld + t.k_row, ld, dp, kBlockK, false);
  }

  // dV += P^T dO and dK += dS^T Q ([n, D] accumulators), dQ += dS K (float32 [T, Hq, D]).
  void accumulate(const BwdTile& t, const float* p, const float* ds, float* dk, float* dv, float* dq,
                  Scratch& scratch) const {
    const auto [total, Hq, Hkv, D] = dims;
    float* transposed = scratch.transposed.data();
    at::vec::transpose_mxn<float>(p, kBlockK, transposed, kBlockQ, static_cast<int>(t.m), static_cast<int>(t.n));
    gemm(t.n, D, t.m, transposed, kBlockQ, dout.at(t.h, t.q_row), dout.token_stride, dv, D, true);
    at::vec::transpose_mxn<float>(ds, kBlockK, transposed, kBlockQ, static_cast<int>(t.m), static_cast<int>(t.n));
    gemm(t.n, D, t.m, transposed, kBlockQ, q.at(t.h, t.q_row), q.token_stride, dk, D, true);
    gemm(t.m, D, t.n, ds, kBlockK, k.at(t.hk, t.k_row), k.token_stride, dq + token_head_offset(t.q_row, t.h, Hq, D),
         Hq * D, true);
  }
};

#if defined(CPU_CAPABILITY_AVX512_BF16)
// The backward's tile products with bf16 dot products (bf16 inputs, even head dim). Q and dO are A
// operands as they are; built once per call: Q^T and dO^T (A of dV^T and dK^T), K and V in pairs of dims
// (B of S and dP) and K in pairs of tokens (B of dQ). P and dS are rounded to bf16 per tile.
struct Bf16DotBackwardProducts {
  Dims dims;
  HeadRows<bf16> q, dout;
  at::Tensor qt_, doutt_, kt_, vt_, kp_;
  const bf16 *qt, *doutt, *kt, *vt, *kp;

  Bf16DotBackwardProducts(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                          const at::Tensor& grad_out, const Dims& d)
      : dims(d), q(head_rows<bf16>(q_in, true)), dout(head_rows<bf16>(grad_out, true)), qt_(transposed_bf16(q_in)),
        doutt_(transposed_bf16(grad_out)), kt_(dim_pairs(k_in)), vt_(dim_pairs(v_in)), kp_(token_pairs(k_in)),
        qt(qt_.const_data_ptr<bf16>()), doutt(doutt_.const_data_ptr<bf16>()), kt(kt_.const_data_ptr<bf16>()),
        vt(vt_.const_data_ptr<bf16>()), kp(kp_.const_data_ptr<bf16>()) {}

  static constexpr bool kKeyMajorGrads = false;  // dK^T, dV^T [D, n]: P and dS are the B operands
  static constexpr int64_t kPairedTileRow = pair_row_elements(kBlockK);
  struct Scratch {
    std::vector<bf16> p_pairs = std::vector<bf16>(kBlockQ / 2 * kPairedTileRow);
    std::vector<bf16> ds_pairs = std::vector<bf16>(kBlockQ / 2 * kPairedTileRow);
    std::vector<bf16> ds_rows = std::vector<bf16>(kBlockQ * kPairedKeysRow);
  };
  Scratch make_scratch() const { return {}; }

  void scores(const BwdTile& t, float* s, float* dp, Scratch&) const {
    const auto [total, Hq, Hkv, D] = dims;
    const int64_t ld = dim_pairs_row(total), head = t.hk * (D / 2) * ld;
    gemm_bf16(t.m, t.n, D, q.at(t.h, t.q_row), q.token_stride, kt + head + 2 * t.k_row, ld, s, kBlockK, false);
    gemm_bf16(t.m, t.n, D, dout.at(t.h, t.q_row), dout.token_stride, vt + head + 2 * t.k_row, ld, dp, kBlockK, false);
  }

  void accumulate(const BwdTile& t, const float* p, const float* ds, float* dkt, float* dvt, float* dq,
                  Scratch& scratch) const {
    const auto [total, Hq, Hkv, D] = dims;
    const int64_t m_even = t.m + t.m % 2, ld_t = total + 1;
    pack_row_pairs(p, t.m, t.n, kBlockK, scratch.p_pairs.data(), kPairedTileRow);
    pack_row_pairs(ds, t.m, t.n, kBlockK, scratch.ds_pairs.data(), kPairedTileRow);
    gemm_bf16(D, t.n, m_even, doutt + t.h * D * ld_t + t.q_row, ld_t, scratch.p_pairs.data(), kPairedTileRow, dvt,
              kBlockK, true);
    gemm_bf16(D, t.n, m_even, qt + t.h * D * ld_t + t.q_row, ld_t, scratch.ds_pairs.data(), kPairedTileRow, dkt,
              kBlockK, true);
    const int64_t keys = rows_on_token_pairs(ds, t.m, t.n, kBlockK, t.k_row, scratch.ds_rows.data());
    const int64_t row = pair_row_elements(D);
    gemm_bf16(t.m, D, keys, scratch.ds_rows.data(), kPairedKeysRow, kp + (t.hk * (total / 2 + 1) + t.k_row / 2) * row,
              row, dq + token_head_offset(t.q_row, t.h, Hq, D), Hq * D, true);
  }
};
#endif

// Backward (see the top of the file) over tile products `Products` (float32 or bf16 dot products).
template <typename T, typename Products>
struct Backward {
  const Products& products;
  const float* lse;     // [Hq, T]
  const float* delta;   // [Hq, T]
  float* dq;            // [T, Hq, D] float32 accumulator
  T* dk;                // [T, Hkv, D]
  T* dv;                // [T, Hkv, D]
  const int32_t* cu_seqlens;
  Dims dims;
  bool causal;
  float scale;

  auto make_worker() const {
    return [this, p = std::vector<float>(kBlockQ * kBlockK), ds = std::vector<float>(kBlockQ * kBlockK),
            dk_acc = std::vector<float>(dims.dim * kBlockK), dv_acc = std::vector<float>(dims.dim * kBlockK),
            scratch = products.make_scratch()](const WorkItem& item) mutable {
      run(item, p.data(), ds.data(), dk_acc.data(), dv_acc.data(), scratch);
    };
  }

  // dk_acc/dv_acc: the key block's dK and dV, float32 in Products' layout ([n, D] or [D, n]).
  void run(const WorkItem& item, float* p, float* ds, float* dk_acc, float* dv_acc,
           typename Products::Scratch& scratch) const {
    const auto [total, Hq, Hkv, D] = dims;
    const SeqSpan span = sequence_span(cu_seqlens, item.seq, total);
    const int64_t hk = item.head, group = Hq / Hkv;
    for (int64_t j0 = 0; j0 < span.length; j0 += kBlockK) {
      const int64_t n = std::min(kBlockK, span.length - j0);
      std::fill(dk_acc, dk_acc + D * kBlockK, 0.f);
      std::fill(dv_acc, dv_acc + D * kBlockK, 0.f);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const int64_t first_block = attention::query_begin_for_keys(j0, causal) / kBlockQ;
        for (int64_t i0 = first_block * kBlockQ; i0 < span.length; i0 += kBlockQ) {
          const int64_t m = std::min(kBlockQ, span.length - i0);
          const TileMask mask = tile_mask(i0, i0 + m, j0, j0 + n, causal);
          if (mask == TileMask::kEmpty) continue;
          // Keys past the block's last query are masked for all its rows: a diagonal tile stops there.
          const int64_t keys = mask == TileMask::kPartial ? std::min(n, i0 + m - j0) : n;
          tile({h, hk, i0, m, j0, keys, span.start + i0, span.start + j0}, mask == TileMask::kPartial, p, ds, dk_acc,
               dv_acc, scratch);
        }
      }
      for (int64_t c = 0; c < n; ++c) {
        T* dk_row = dk + token_head_offset(span.start + j0 + c, hk, Hkv, D);
        T* dv_row = dv + token_head_offset(span.start + j0 + c, hk, Hkv, D);
        for (int64_t d = 0; d < D; ++d) {
          const int64_t at = Products::kKeyMajorGrads ? c * D + d : d * kBlockK + c;
          dk_row[d] = static_cast<T>(dk_acc[at]);
          dv_row[d] = static_cast<T>(dv_acc[at]);
        }
      }
    }
  }

  void tile(const BwdTile& t, bool partial, float* p, float* ds, float* dk_acc, float* dv_acc,
            typename Products::Scratch& scratch) const {
    const int64_t total = dims.total;
    products.scores(t, p, ds, scratch);
    for (int64_t r = 0; r < t.m; ++r) {
      float* pr = p + r * kBlockK;
      float* dsr = ds + r * kBlockK;
      const int64_t cnt = visible(partial, t.i0 + r, t.j0, t.n, causal);
      const fVec row_lse(lse[lse_offset(t.h, t.q_row + r, total)]);
      const fVec row_delta(delta[lse_offset(t.h, t.q_row + r, total)]);
      for (int64_t c = 0; c < cnt; c += kFloatLanes) {
        const int64_t w = std::min(kFloatLanes, cnt - c);
        const fVec pv = (fVec::loadu(pr + c, w) * fVec(scale) - row_lse).exp_u20();
        pv.store(pr + c, w);
        (pv * (fVec::loadu(dsr + c, w) - row_delta) * fVec(scale)).store(dsr + c, w);
      }
      zero_tail(pr, cnt, t.n);
      zero_tail(dsr, cnt, t.n);
    }
    products.accumulate(t, p, ds, dk_acc, dv_acc, dq, scratch);
  }
};

// delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] - grad_lse[h, t]
template <typename T>
void compute_delta(const T* dout, const T* out, const float* grad_lse, const Dims& dims, float* delta) {
  const auto [total, Hq, Hkv, D] = dims;
  at::parallel_for(0, total * Hq, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row / Hq, h = row % Hq;
      fVec acc(0.f);
      for (int64_t d = 0; d < D; d += kFloatLanes) {
        const int64_t w = std::min(kFloatLanes, D - d);
        acc = at::vec::fmadd(load_float_upto(dout + row * D + d, w), load_float_upto(out + row * D + d, w), acc);
      }
      const int64_t o = lse_offset(h, t, total);
      delta[o] = sum_lanes(acc) - (grad_lse ? grad_lse[o] : 0.f);
    }
  });
}

std::vector<WorkItem> sequences(const int32_t* cu_seqlens, int64_t num_seqs, int64_t total) {
  std::vector<WorkItem> items;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t length = sequence_span(cu_seqlens, b, total).length;
    if (length > 0) items.push_back({b, 0, 0, length});
  }
  return items;
}

Dims dims_of(const at::Tensor& q, const at::Tensor& k) { return {q.size(0), q.size(1), k.size(1), q.size(2)}; }

}  // namespace

void flash_attention_forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const int32_t* cu_seqlens, int64_t num_seqs, bool causal, double softmax_scale,
                                    at::Tensor& out, at::Tensor& lse) {
  const Dims dims = dims_of(q, k);
  std::vector<WorkItem> items;
  for (const WorkItem& seq : sequences(cu_seqlens, num_seqs, dims.total)) {
    for (int64_t block = 0; block < ceil_div(seq.cost, kBlockQ); ++block) {
      const int64_t keys = attention::key_end_for_queries(std::min((block + 1) * kBlockQ, seq.cost), seq.cost, causal);
      for (int64_t hk = 0; hk < dims.heads_kv; ++hk) items.push_back({seq.seq, block, hk, keys});
    }
  }
  INTERNLM2_DISPATCH_FLOAT_TYPES(q.scalar_type(), "flash_attention_forward_cpu", [&] {
    auto run = [&](const auto& products) {
      const Forward<scalar_t, std::decay_t<decltype(products)>> fwd{
          products, out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>(), cu_seqlens, dims, causal,
          static_cast<float>(softmax_scale)};
      run_largest_first(items, [&] { return fwd.make_worker(); });
    };
#if defined(CPU_CAPABILITY_AVX512_BF16)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (dims.dim % 2 == 0) {
        run(Bf16DotForwardProducts(q, k, v, dims));
        return;
      }
    }
#endif
    run(Fp32ForwardProducts(q, k, v, dims));
  });
}

void flash_attention_backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                     const float* grad_lse, const int32_t* cu_seqlens, int64_t num_seqs, bool causal,
                                     double softmax_scale, at::Tensor& grad_q, at::Tensor& grad_k,
                                     at::Tensor& grad_v) {
  const Dims dims = dims_of(q, k);
  std::vector<WorkItem> items;
  for (const WorkItem& seq : sequences(cu_seqlens, num_seqs, dims.total)) {
    for (int64_t hk = 0; hk < dims.heads_kv; ++hk) items.push_back({seq.seq, 0, hk, seq.cost});
  }
  // Keys of empty sequences get no item; their gradients (there are none: such sequences have no
  // tokens) need no zeroing, but dQ accumulates and starts at zero.
  at::Tensor dq = grad_q.scalar_type() == at::kFloat ? grad_q.zero_() : at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  at::Tensor delta = at::empty({dims.heads_q, dims.total}, q.options().dtype(at::kFloat));
  INTERNLM2_DISPATCH_FLOAT_TYPES(q.scalar_type(), "flash_attention_backward_cpu", [&] {
    compute_delta<scalar_t>(grad_out.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), grad_lse, dims,
                            delta.mutable_data_ptr<float>());
    auto run = [&](const auto& products) {
      const Backward<scalar_t, std::decay_t<decltype(products)>> bwd{
          products, lse.const_data_ptr<float>(), delta.const_data_ptr<float>(), dq.mutable_data_ptr<float>(),
          grad_k.mutable_data_ptr<scalar_t>(), grad_v.mutable_data_ptr<scalar_t>(), cu_seqlens, dims, causal,
          static_cast<float>(softmax_scale)};
      run_largest_first(items, [&] { return bwd.make_worker(); });
    };
#if defined(CPU_CAPABILITY_AVX512_BF16)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (dims.dim % 2 == 0) {
        run(Bf16DotBackwardProducts(q, k, v, grad_out, dims));
        return;
      }
    }
#endif
    run(Fp32BackwardProducts(q, k, v, grad_out, dims));
  });
  if (!dq.is_same(grad_q)) grad_q.copy_(dq);
}

}  // namespace internlm2::cpu::CPU_CAPABILITY
