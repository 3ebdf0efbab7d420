// Pieces shared by the CPU attention kernels (flash_attention_kernel.cpp, kv_cache_attention_kernel.cpp),
// compiled per instruction set with them (isa.h): work scheduling, the fp32 tile product and the online
// softmax of one score row.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/vec.h"

namespace internlm2::cpu::CPU_CAPABILITY {

// C[m, n] (+)= A[m, k] B[k, n], float32, row-major with leading dimensions.
inline void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                 int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
}

struct WorkItem {
  int64_t seq;
  int64_t block;
  int64_t head;
  int64_t cost;
  int64_t split = 0;  // which part of the keys (kv_cache_attention's split-K; 0 elsewhere)
};

// Runs every item on the thread pool, largest first from a shared counter (items differ in cost, and a
// static split would leave a thread idle at the end); make_worker() builds one worker (with its scratch)
// per thread.
template <typename MakeWorker>
void run_largest_first(std::vector<WorkItem>& items, const MakeWorker& make_worker) {
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  const auto count = static_cast<int64_t>(items.size());
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    auto worker = make_worker();
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) worker(items[i]);
  });
}

// The running maximum and sum of exp(score - max) of one query row.
struct SoftmaxRow {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.f;
};

// Folds one tile of a row's scores s[0, n), of which the first `visible` are unmasked, into the row's
// online softmax: s becomes exp(s * scale - new max) (0 where masked, so the tile's P V product can run
// over all n keys), and the row's output accumulator acc[0, dim) is rescaled to the new max.
inline void online_softmax_step(float* s, int64_t visible, int64_t n, float scale, SoftmaxRow& row, float* acc,
                                int64_t dim) {
  if (visible == 0) {  // a causal row before this tile's first key
    std::fill(s, s + n, 0.f);
    return;
  }
  fVec vmax(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < visible; c += kFloatLanes) {
    const int64_t w = std::min(kFloatLanes, visible - c);
    const fVec x = fVec::loadu(s + c, w) * fVec(scale);
    x.store(s + c, w);
    vmax = at::vec::maximum(vmax, w == kFloatLanes ? x : fVec::set(vmax, x, w));
  }
  const float new_max = std::max(row.max, max_lanes(vmax));
  fVec vsum(0.f);
  for (int64_t c = 0; c < visible; c += kFloatLanes) {
    const int64_t w = std::min(kFloatLanes, visible - c);
    const fVec p = (fVec::loadu(s + c, w) - fVec(new_max)).exp_u20();
    p.store(s + c, w);
    vsum = vsum + (w == kFloatLanes ? p : fVec::set(fVec(0.f), p, w));
  }
  std::fill(s + visible, s + n, 0.f);
  const float alpha = std::exp(row.max - new_max);
  row.sum = row.sum * alpha + sum_lanes(vsum);
  row.max = new_max;
  if (alpha != 1.f) {
    for (int64_t d = 0; d < dim; d += kFloatLanes) {
      const int64_t w = std::min(kFloatLanes, dim - d);
      (fVec::loadu(acc + d, w) * fVec(alpha)).store(acc + d, w);
    }
  }
}

// out[0, dim) = acc / sum; returns the row's log-sum-exp. A row that saw no key gets 0 and -inf.
template <typename T>
inline float finish_softmax_row(const float* acc, const SoftmaxRow& row, int64_t dim, T* out) {
  const float inv = row.sum > 0.f ? 1.f / row.sum : 0.f;
  for (int64_t d = 0; d < dim; d += kFloatLanes) {
    const int64_t w = std::min(kFloatLanes, dim - d);
    store_float(out + d, fVec::loadu(acc + d, w) * fVec(inv), w);
  }
  return row.sum > 0.f ? row.max + std::log(row.sum) : -std::numeric_limits<float>::infinity();
}

}  // namespace internlm2::cpu::CPU_CAPABILITY
