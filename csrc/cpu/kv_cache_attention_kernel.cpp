// KV-cache attention on CPU (decoding and prefill with a cache), compiled once per instruction set (isa.h).
//
// One work item per (sequence, KV head, block of new query tokens, split of the keys): its rows are the
// block's tokens times the KV head's whole query group, so each cached key and value is read once for all
// the heads that share it (GQA without repeating K/V). The item walks its keys in tiles straight out of
// the cache ([B, Hkv, S, D]: a tile is kTileKeys contiguous rows): scores are row-by-key dot products (no
// transposed copy of the cache), then the online softmax and the P V product into a float32 accumulator.
// Decoding has few rows and many keys, so when (sequences x KV heads x query blocks) would leave threads
// idle the keys are split (flash-decoding): every split writes a partial output with its log-sum-exp, and
// a final pass merges the splits of each row by their log-sum-exps.
#include <ATen/ops/empty.h>

#include "common/dispatch.h"
#include "common/varlen.h"
#include "cpu/attention.h"
#include "cpu/kernels.h"

namespace internlm2::cpu::CPU_CAPABILITY {
namespace {

using attention::ceil_div;
using attention::lse_offset;
using attention::SeqSpan;
using attention::token_head_offset;

constexpr int64_t kBlockRows = 64;     // query rows (tokens x group heads) per item, at most
constexpr int64_t kTileKeys = 64;      // keys per tile: a float32 tile of 64 x 128 fits in L1
constexpr int64_t kMinSplitKeys = 512;  // keys per split, at least: fewer cost more in merging than they save

// The new queries of sequence b: packed by cu_seqlens_q, or one per sequence.
inline SeqSpan query_span(const int32_t* cu_q, int64_t b) {
  if (cu_q == nullptr) return {b, 1};
  return {cu_q[b], static_cast<int64_t>(cu_q[b + 1]) - cu_q[b]};
}

// s[r * lds + j] = q[r] . k[j] for m rows of q (float32, contiguous rows of dim) and n rows of k (ldk).
// Four keys at a time share each loaded chunk of q.
void dot_scores(int64_t m, int64_t n, int64_t dim, const float* q, const float* k, int64_t ldk, float* s,
                int64_t lds) {
  for (int64_t r = 0; r < m; ++r) {
    const float* qr = q + r * dim;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      const float* k0 = k + j * ldk;
      fVec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
      for (int64_t d = 0; d < dim; d += kFloatLanes) {
        const int64_t w = std::min(kFloatLanes, dim - d);
        const fVec x = fVec::loadu(qr + d, w);
        a0 = at::vec::fmadd(x, fVec::loadu(k0 + d, w), a0);
        a1 = at::vec::fmadd(x, fVec::loadu(k0 + ldk + d, w), a1);
        a2 = at::vec::fmadd(x, fVec::loadu(k0 + 2 * ldk + d, w), a2);
        a3 = at::vec::fmadd(x, fVec::loadu(k0 + 3 * ldk + d, w), a3);
      }
      s[r * lds + j] = sum_lanes(a0);
      s[r * lds + j + 1] = sum_lanes(a1);
      s[r * lds + j + 2] = sum_lanes(a2);
      s[r * lds + j + 3] = sum_lanes(a3);
    }
    for (; j < n; ++j) {
      fVec a(0.f);
      for (int64_t d = 0; d < dim; d += kFloatLanes) {
        const int64_t w = std::min(kFloatLanes, dim - d);
        a = at::vec::fmadd(fVec::loadu(qr + d, w), fVec::loadu(k + j * ldk + d, w), a);
      }
      s[r * lds + j] = sum_lanes(a);
    }
  }
}

// acc[r] += sum_j p[r, j] v[j] for m rows (acc: contiguous rows of dim, p: ldp) and n keys (v: rows of dim).
void accumulate_pv(int64_t m, int64_t n, int64_t dim, const float* p, int64_t ldp, const float* v, float* acc) {
  for (int64_t r = 0; r < m; ++r) {
    float* ar = acc + r * dim;
    for (int64_t d = 0; d < dim; d += kFloatLanes) {
      const int64_t w = std::min(kFloatLanes, dim - d);
      fVec a = fVec::loadu(ar + d, w);
      for (int64_t j = 0; j < n; ++j) a = at::vec::fmadd(fVec(p[r * ldp + j]), fVec::loadu(v + j * dim + d, w), a);
      a.store(ar + d, w);
    }
  }
}

// n rows of dim elements of T -> float32 (a no-op view for float32).
template <typename T>
const float* tile_as_float(const T* src, int64_t n, int64_t dim, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n * dim; i += kFloatLanes) {
      const int64_t w = std::min(kFloatLanes, n * dim - i);
      load_float_upto(src + i, w).store(scratch + i, w);
    }
    return scratch;
  }
}

struct Shape {
  int64_t total_q;   // Tq
  int64_t heads_q;   // Hq
  int64_t heads_kv;  // Hkv
  int64_t dim;       // D
  int64_t capacity;  // S, slots per cache row
  int64_t group() const { return heads_q / heads_kv; }
  // Query tokens per item: the rows of a block are tokens x the KV head's query group.
  int64_t block_tokens() const { return std::max<int64_t>(1, kBlockRows / group()); }
};

template <typename T>
struct KvCacheAttention {
  const T* q;       // [Tq, Hq, D]
  const T* k;       // [B, Hkv, S, D]
  const T* v;       // [B, Hkv, S, D]
  const int32_t* k_lengths;
  const int32_t* cu_q;
  T* out;           // [Tq, Hq, D]
  float* lse;       // [Hq, Tq]
  float* split_out;  // [splits, Tq, Hq, D] float32 partial outputs (splits > 1), else nullptr
  float* split_lse;  // [splits, Hq, Tq]
  Shape shape;
  int64_t splits;
  bool causal;
  float scale;

  auto make_worker() const {
    const int64_t rows = shape.block_tokens() * shape.group(), D = shape.dim;
    return [this, qs = std::vector<float>(rows * D), s = std::vector<float>(rows * kTileKeys),
            acc = std::vector<float>(rows * D), kf = std::vector<float>(kTileKeys * D),
            vf = std::vector<float>(kTileKeys * D), state = std::vector<SoftmaxRow>(rows)](const WorkItem& item) mutable {
      run(item, qs.data(), s.data(), acc.data(), kf.data(), vf.data(), state.data());
    };
  }

  // The keys [0, end) the t-th new query of a sequence with q_len queries and k_len keys sees.
  int64_t key_end(int64_t t, int64_t q_len, int64_t k_len) const {
    return causal ? std::clamp<int64_t>(k_len - q_len + t + 1, 0, k_len) : k_len;
  }

  void run(const WorkItem& item, float* qs, float* s, float* acc, float* kf, float* vf, SoftmaxRow* state) const {
    const auto [Tq, Hq, Hkv, D, S] = shape;
    const int64_t g = shape.group(), hk = item.head;
    const SeqSpan qspan = query_span(cu_q, item.seq);
    const int64_t k_len = k_lengths[item.seq];
    const int64_t t0 = item.block * shape.block_tokens();
    const int64_t tokens = std::min(shape.block_tokens(), qspan.length - t0), m = tokens * g;
    // Row r is token t0 + r / g of the block, query head hk * g + r % g: one token's group is g * D
    // contiguous elements of q.
    for (int64_t t = 0; t < tokens; ++t) {
      const T* src = q + token_head_offset(qspan.start + t0 + t, hk * g, Hq, D);
      for (int64_t i = 0; i < g * D; i += kFloatLanes) {
        const int64_t w = std::min(kFloatLanes, g * D - i);
        (load_float_upto(src + i, w) * fVec(scale)).store(qs + t * g * D + i, w);
      }
    }
    std::fill(state, state + m, SoftmaxRow{});
    std::fill(acc, acc + m * D, 0.f);

    const int64_t block_end = key_end(t0 + tokens - 1, qspan.length, k_len);
    const int64_t chunk = ceil_div(ceil_div(block_end, splits), kTileKeys) * kTileKeys;
    const int64_t lo = std::min(block_end, item.split * chunk), hi = std::min(block_end, lo + chunk);
    const int64_t head_offset = (item.seq * Hkv + hk) * S * D;
    for (int64_t j0 = lo; j0 < hi; j0 += kTileKeys) {
      const int64_t n = std::min(kTileKeys, hi - j0);
      dot_scores(m, n, D, qs, tile_as_float(k + head_offset + j0 * D, n, D, kf), D, s, kTileKeys);
      for (int64_t r = 0; r < m; ++r) {
        const int64_t visible = std::clamp<int64_t>(key_end(t0 + r / g, qspan.length, k_len) - j0, 0, n);
        online_softmax_step(s + r * kTileKeys, visible, n, 1.f, state[r], acc + r * D, D);
      }
      accumulate_pv(m, n, D, s, kTileKeys, tile_as_float(v + head_offset + j0 * D, n, D, vf), acc);
    }

    for (int64_t r = 0; r < m; ++r) {
      const int64_t token = qspan.start + t0 + r / g, h = hk * g + r % g;
      if (splits == 1) {
        lse[lse_offset(h, token, Tq)] = finish_softmax_row(acc + r * D, state[r], D, out + token_head_offset(token, h, Hq, D));
      } else {
        float* o = split_out + item.split * Tq * Hq * D + token_head_offset(token, h, Hq, D);
        split_lse[item.split * Hq * Tq + lse_offset(h, token, Tq)] = finish_softmax_row(acc + r * D, state[r], D, o);
      }
    }
  }
};

// out = sum_s w_s out_s / sum_s w_s with w_s = exp(lse_s - max_s lse_s), lse = log sum_s exp(lse_s), per
// (token, head) row; a row that no split saw a key for gets 0 and -inf.
template <typename T>
void merge_splits(const float* split_out, const float* split_lse, int64_t splits, const Shape& shape, T* out,
                  float* lse) {
  const int64_t Tq = shape.total_q, Hq = shape.heads_q, D = shape.dim;
  constexpr float kNoKeys = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, Tq * Hq, std::max<int64_t>(1, 4096 / D), [&](int64_t begin, int64_t end) {
    std::vector<float> weights(splits);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row / Hq, h = row % Hq;
      float max_lse = kNoKeys;
      for (int64_t sp = 0; sp < splits; ++sp) max_lse = std::max(max_lse, split_lse[sp * Hq * Tq + lse_offset(h, t, Tq)]);
      float total = 0.f;
      for (int64_t sp = 0; sp < splits; ++sp) {
        weights[sp] = max_lse == kNoKeys ? 0.f : std::exp(split_lse[sp * Hq * Tq + lse_offset(h, t, Tq)] - max_lse);
        total += weights[sp];
      }
      const float inv = total > 0.f ? 1.f / total : 0.f;
      for (int64_t d = 0; d < D; d += kFloatLanes) {
        const int64_t w = std::min(kFloatLanes, D - d);
        fVec acc(0.f);
        for (int64_t sp = 0; sp < splits; ++sp) {
          acc = at::vec::fmadd(fVec(weights[sp]), fVec::loadu(split_out + sp * Tq * Hq * D + row * D + d, w), acc);
        }
        store_float(out + row * D + d, acc * fVec(inv), w);
      }
      lse[lse_offset(h, t, Tq)] = total > 0.f ? max_lse + std::log(total) : kNoKeys;
    }
  });
}

}  // namespace

void kv_cache_attention_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const int32_t* k_lengths, const int32_t* cu_seqlens_q, bool causal, double softmax_scale,
                               at::Tensor& out, at::Tensor& lse) {
  const Shape shape{q.size(0), q.size(1), k_cache.size(1), q.size(2), k_cache.size(2)};
  const int64_t batch = k_cache.size(0);
  std::vector<WorkItem> items;
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t q_len = query_span(cu_seqlens_q, b).length;
    for (int64_t block = 0; block < ceil_div(q_len, shape.block_tokens()); ++block) {
      const int64_t rows = std::min(shape.block_tokens(), q_len - block * shape.block_tokens()) * shape.group();
      for (int64_t hk = 0; hk < shape.heads_kv; ++hk) items.push_back({b, block, hk, rows * k_lengths[b]});
    }
    if (q_len > 0) longest = std::max<int64_t>(longest, k_lengths[b]);
  }
  // Split the keys only when the items would not keep every thread busy twice over.
  const int64_t threads = at::get_num_threads(), base = static_cast<int64_t>(items.size());
  const int64_t splits = base == 0 || base >= 2 * threads
                             ? 1
                             : std::max<int64_t>(1, std::min(ceil_div(2 * threads, base), longest / kMinSplitKeys));
  if (splits > 1) {
    std::vector<WorkItem> split_items;
    for (const WorkItem& item : items) {
      for (int64_t sp = 0; sp < splits; ++sp) split_items.push_back({item.seq, item.block, item.head, item.cost / splits, sp});
    }
    items = std::move(split_items);
  }
  at::Tensor split_out, split_lse;
  if (splits > 1) {
    split_out = at::empty({splits, shape.total_q, shape.heads_q, shape.dim}, q.options().dtype(at::kFloat));
    split_lse = at::empty({splits, shape.heads_q, shape.total_q}, q.options().dtype(at::kFloat));
  }
  INTERNLM2_DISPATCH_FLOAT_TYPES(q.scalar_type(), "kv_cache_attention_cpu", [&] {
    const KvCacheAttention<scalar_t> attn{
        q.const_data_ptr<scalar_t>(), k_cache.const_data_ptr<scalar_t>(), v_cache.const_data_ptr<scalar_t>(),
        k_lengths, cu_seqlens_q, out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>(),
        splits > 1 ? split_out.mutable_data_ptr<float>() : nullptr,
        splits > 1 ? split_lse.mutable_data_ptr<float>() : nullptr, shape, splits, causal,
        static_cast<float>(softmax_scale)};
    run_largest_first(items, [&] { return attn.make_worker(); });
    if (splits > 1) {
      merge_splits<scalar_t>(split_out.const_data_ptr<float>(), split_lse.const_data_ptr<float>(), splits, shape,
                             out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>());
    }
  });
}

}  // namespace internlm2::cpu::CPU_CAPABILITY
