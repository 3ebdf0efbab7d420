// Flash attention on CPU, compiled once per instruction set (isa.h): the executable specification of the
// op, exact in float32. Index math for packed sequences and causal tiles comes from common/varlen.h, the
// same helpers the CUDA kernels use.
//
// Forward: one work item per (sequence, query head, block of kBlockQ queries). It walks the visible key
// blocks with an online softmax (running row max and sum, rescaling the float32 output accumulator), so
// no more than one kBlockQ x kBlockK score tile exists per thread. Matmuls are ATen's fp32 brgemm on
// tiles; inputs of other dtypes are converted to float32 once, and keys are pre-transposed to [Hkv, D, T]
// so every tile product is a plain row-major GEMM.
//
// Backward (FlashAttention-2's algorithm): one work item per (sequence, KV head). It owns dK/dV of its
// key blocks, summed over the whole query group in float32 accumulators (GQA without repeated K/V), and
// dQ of the group's query heads for its sequence, so threads never share an output and the result is
// deterministic. Per tile: S = Q K^T, P = exp(S * scale - lse), dP = dO V^T,
// dS = P (dP - delta) * scale with delta = rowsum(dO * O) - grad_lse; dV += P^T dO, dK += dS^T Q, dQ += dS K.
//
// Work items run largest first from a shared counter: causal items differ in cost, and a static split
// would leave a thread idle at the end.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "common/dispatch.h"
#include "common/varlen.h"
#include "cpu/attention.h"
#include "cpu/kernels.h"

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

// t itself when already float32, else a float32 copy (the kernels compute in float32).
at::Tensor as_float(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

// [T, H, D] -> float32 [H, D, T]: the per-head transposed copy that turns Q K^T, dO V^T, P^T dO and
// dS^T Q into row-major tile products. Blocks of kTransposeTokens rows are read into L1 once and written
// out as D contiguous runs (a generic strided copy is several times slower).
constexpr int64_t kTransposeTokens = 64;

template <typename T>
void transpose_tokens(const T* src, int64_t tokens, int64_t heads, int64_t dim, float* dst) {
  const int64_t blocks = ceil_div(tokens, kTransposeTokens);
  at::parallel_for(0, heads * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t h = job / blocks, t0 = (job % blocks) * kTransposeTokens;
      const int64_t n = std::min(kTransposeTokens, tokens - t0);
      const T* in = src + token_head_offset(t0, h, heads, dim);
      for (int64_t d = 0; d < dim; ++d) {
        float* out = dst + (h * dim + d) * tokens + t0;
        for (int64_t t = 0; t < n; ++t) out[t] = static_cast<float>(in[t * heads * dim + d]);
      }
    }
  });
}

at::Tensor transposed_float(const at::Tensor& t) {
  at::Tensor out = at::empty({t.size(1), t.size(2), t.size(0)}, t.options().dtype(at::kFloat));
  INTERNLM2_DISPATCH_FLOAT_TYPES(t.scalar_type(), "flash_attention_transpose_cpu", [&] {
    transpose_tokens<scalar_t>(t.const_data_ptr<scalar_t>(), t.size(0), t.size(1), t.size(2),
                               out.mutable_data_ptr<float>());
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

template <typename T>
struct Forward {
  const float* q;   // [T, Hq, D]
  const float* kt;  // [Hkv, D, T]
  const float* v;   // [T, Hkv, D]
  T* out;           // [T, Hq, D]
  float* lse;       // [Hq, T]
  const int32_t* cu_seqlens;
  Dims dims;
  bool causal;
  float scale;

  auto make_worker() const {
    return [this, s = std::vector<float>(kBlockQ * kBlockK), acc = std::vector<float>(kBlockQ * dims.dim),
            rows = std::vector<SoftmaxRow>(kBlockQ)](const WorkItem& item) mutable {
      run(item, s.data(), acc.data(), rows.data());
    };
  }

  void run(const WorkItem& item, float* s, float* acc, SoftmaxRow* rows) const {
    const auto [total, Hq, Hkv, D] = dims;
    const SeqSpan span = sequence_span(cu_seqlens, item.seq, total);
    const int64_t h = item.head, hk = kv_head_of(h, Hq, Hkv);
    const int64_t i0 = item.block * kBlockQ, m = std::min(kBlockQ, span.length - i0);
    const float* q_tile = q + token_head_offset(span.start + i0, h, Hq, D);
    const float* kt_head = kt + hk * D * total + span.start;
    const float* v_head = v + token_head_offset(span.start, hk, Hkv, D);
    std::fill(rows, rows + m, SoftmaxRow{});
    std::fill(acc, acc + m * D, 0.f);

    const int64_t key_end = attention::key_end_for_queries(i0 + m, span.length, causal);
    for (int64_t j0 = 0; j0 < key_end; j0 += kBlockK) {
      const int64_t n = std::min(kBlockK, key_end - j0);
      gemm(m, n, D, q_tile, Hq * D, kt_head + j0, total, s, kBlockK, false);
      const bool partial = tile_mask(i0, i0 + m, j0, j0 + n, causal) == TileMask::kPartial;
      for (int64_t r = 0; r < m; ++r) {
        online_softmax_step(s + r * kBlockK, visible(partial, i0 + r, j0, n, causal), n, scale, rows[r], acc + r * D, D);
      }
      gemm(m, D, n, s, kBlockK, v_head + j0 * Hkv * D, Hkv * D, acc, D, true);
    }

    for (int64_t r = 0; r < m; ++r) {
      lse[lse_offset(h, span.start + i0 + r, total)] =
          finish_softmax_row(acc + r * D, rows[r], D, out + token_head_offset(span.start + i0 + r, h, Hq, D));
    }
  }
};

// --------------------------------------------------------------------------------------------- backward

template <typename T>
struct Backward {
  const float* q;       // [T, Hq, D]
  const float* qt;      // [Hq, D, T]
  const float* k;       // [T, Hkv, D]
  const float* kt;      // [Hkv, D, T]
  const float* vt;      // [Hkv, D, T]
  const float* dout;    // [T, Hq, D]
  const float* doutt;   // [Hq, D, T]
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
            dkt = std::vector<float>(dims.dim * kBlockK),
            dvt = std::vector<float>(dims.dim * kBlockK)](const WorkItem& item) mutable {
      run(item, p.data(), ds.data(), dkt.data(), dvt.data());
    };
  }

  void run(const WorkItem& item, float* p, float* ds, float* dkt, float* dvt) const {
    const auto [total, Hq, Hkv, D] = dims;
    const SeqSpan span = sequence_span(cu_seqlens, item.seq, total);
    const int64_t hk = item.head, group = Hq / Hkv;
    for (int64_t j0 = 0; j0 < span.length; j0 += kBlockK) {
      const int64_t n = std::min(kBlockK, span.length - j0);
      std::fill(dkt, dkt + D * kBlockK, 0.f);
      std::fill(dvt, dvt + D * kBlockK, 0.f);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const int64_t first_block = attention::query_begin_for_keys(j0, causal) / kBlockQ;
        for (int64_t i0 = first_block * kBlockQ; i0 < span.length; i0 += kBlockQ) {
          const int64_t m = std::min(kBlockQ, span.length - i0);
          const TileMask mask = tile_mask(i0, i0 + m, j0, j0 + n, causal);
          if (mask == TileMask::kEmpty) continue;
          tile(span, h, hk, i0, m, j0, n, mask == TileMask::kPartial, p, ds, dkt, dvt);
        }
      }
      for (int64_t c = 0; c < n; ++c) {
        T* dk_row = dk + token_head_offset(span.start + j0 + c, hk, Hkv, D);
        T* dv_row = dv + token_head_offset(span.start + j0 + c, hk, Hkv, D);
        for (int64_t d = 0; d < D; ++d) {
          dk_row[d] = static_cast<T>(dkt[d * kBlockK + c]);
          dv_row[d] = static_cast<T>(dvt[d * kBlockK + c]);
        }
      }
    }
  }

  void tile(const SeqSpan& span, int64_t h, int64_t hk, int64_t i0, int64_t m, int64_t j0, int64_t n, bool partial,
            float* p, float* ds, float* dkt, float* dvt) const {
    const auto [total, Hq, Hkv, D] = dims;
    const int64_t q_row = span.start + i0, k_row = span.start + j0;
    gemm(m, n, D, q + token_head_offset(q_row, h, Hq, D), Hq * D, kt + hk * D * total + k_row, total, p, kBlockK, false);
    gemm(m, n, D, dout + token_head_offset(q_row, h, Hq, D), Hq * D, vt + hk * D * total + k_row, total, ds, kBlockK, false);
    for (int64_t r = 0; r < m; ++r) {
      float* pr = p + r * kBlockK;
      float* dsr = ds + r * kBlockK;
      const int64_t cnt = visible(partial, i0 + r, j0, n, causal);
      const fVec row_lse(lse[lse_offset(h, q_row + r, total)]);
      const fVec row_delta(delta[lse_offset(h, q_row + r, total)]);
      for (int64_t c = 0; c < cnt; c += kFloatLanes) {
        const int64_t w = std::min(kFloatLanes, cnt - c);
        const fVec pv = (fVec::loadu(pr + c, w) * fVec(scale) - row_lse).exp_u20();
        pv.store(pr + c, w);
        (pv * (fVec::loadu(dsr + c, w) - row_delta) * fVec(scale)).store(dsr + c, w);
      }
      zero_tail(pr, cnt, n);
      zero_tail(dsr, cnt, n);
    }
    gemm(D, n, m, doutt + h * D * total + q_row, total, p, kBlockK, dvt, kBlockK, true);
    gemm(D, n, m, qt + h * D * total + q_row, total, ds, kBlockK, dkt, kBlockK, true);
    gemm(m, D, n, ds, kBlockK, k + token_head_offset(k_row, hk, Hkv, D), Hkv * D,
         dq + token_head_offset(q_row, h, Hq, D), Hq * D, true);
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
      for (int64_t h = 0; h < dims.heads_q; ++h) items.push_back({seq.seq, block, h, keys});
    }
  }
  const at::Tensor qf = as_float(q), kt = transposed_float(k), vf = as_float(v);
  INTERNLM2_DISPATCH_FLOAT_TYPES(q.scalar_type(), "flash_attention_forward_cpu", [&] {
    const Forward<scalar_t> fwd{qf.const_data_ptr<float>(), kt.const_data_ptr<float>(), vf.const_data_ptr<float>(),
                                out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>(), cu_seqlens, dims,
                                causal, static_cast<float>(softmax_scale)};
    run_largest_first(items, [&] { return fwd.make_worker(); });
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
  const at::Tensor qf = as_float(q), qt = transposed_float(q), kf = as_float(k), kt = transposed_float(k),
                   vt = transposed_float(v), dof = as_float(grad_out), dot = transposed_float(grad_out);
  INTERNLM2_DISPATCH_FLOAT_TYPES(q.scalar_type(), "flash_attention_backward_cpu", [&] {
    compute_delta<scalar_t>(grad_out.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), grad_lse, dims,
                            delta.mutable_data_ptr<float>());
    const Backward<scalar_t> bwd{qf.const_data_ptr<float>(),  qt.const_data_ptr<float>(),
                                 kf.const_data_ptr<float>(),  kt.const_data_ptr<float>(),
                                 vt.const_data_ptr<float>(),  dof.const_data_ptr<float>(),
                                 dot.const_data_ptr<float>(), lse.const_data_ptr<float>(),
                                 delta.const_data_ptr<float>(), dq.mutable_data_ptr<float>(),
                                 grad_k.mutable_data_ptr<scalar_t>(), grad_v.mutable_data_ptr<scalar_t>(),
                                 cu_seqlens, dims, causal, static_cast<float>(softmax_scale)};
    run_largest_first(items, [&] { return bwd.make_worker(); });
  });
  if (!dq.is_same(grad_q)) grad_q.copy_(dq);
}

}  // namespace internlm2::cpu::CPU_CAPABILITY
