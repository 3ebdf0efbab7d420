// Index math of attention over packed (varlen) sequences, shared by the CPU and CUDA kernels.
//
// Tensors are packed: q [T, Hq, D], k/v [T, Hkv, D], lse [Hq, T]; cu_seqlens int32 [B+1] holds the first
// token of each sequence (cu_seqlens[B] == T), or is absent for one sequence of T tokens. Queries and
// keys share the sequence, so a causal query at position i (counted from its sequence's start) sees the
// keys at positions 0..i of the same sequence and nothing of any other sequence. Products of a token
// index and a stride are int64: packed batches pass 2^31 elements easily.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace internlm2::attention {

// One packed sequence: the index of its first token in the packed tensors and its length.
struct SeqSpan {
  int64_t start;
  int64_t length;
};

INTERNLM2_HOST_DEVICE SeqSpan sequence_span(const int32_t* cu_seqlens, int64_t seq, int64_t total_tokens) {
  if (cu_seqlens == nullptr) return {0, total_tokens};
  return {cu_seqlens[seq], static_cast<int64_t>(cu_seqlens[seq + 1]) - cu_seqlens[seq]};
}

INTERNLM2_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Query head h reads KV head h / (Hq / Hkv): consecutive query heads share a KV head, as HF's repeat_kv.
INTERNLM2_HOST_DEVICE int64_t kv_head_of(int64_t q_head, int64_t heads_q, int64_t heads_kv) {
  return q_head / (heads_q / heads_kv);
}

// Element offset of (token, head, 0) in a contiguous [T, H, D] tensor.
INTERNLM2_HOST_DEVICE int64_t token_head_offset(int64_t token, int64_t head, int64_t heads, int64_t head_dim) {
  return (token * heads + head) * head_dim;
}

// Element offset of (head, token) in the lse [H, T] tensor.
INTERNLM2_HOST_DEVICE int64_t lse_offset(int64_t head, int64_t token, int64_t total_tokens) {
  return head * total_tokens + token;
}

// Positions are relative to the sequence start.
INTERNLM2_HOST_DEVICE bool is_masked(int64_t q_pos, int64_t k_pos, bool causal) { return causal && k_pos > q_pos; }

// The keys [0, end) that any of the query rows [.., q_end) of a sequence of `length` tokens may see.
INTERNLM2_HOST_DEVICE int64_t key_end_for_queries(int64_t q_end, int64_t length, bool causal) {
  return causal ? (q_end < length ? q_end : length) : length;
}

// The first query row that sees any of the keys [k_begin, ..).
INTERNLM2_HOST_DEVICE int64_t query_begin_for_keys(int64_t k_begin, bool causal) { return causal ? k_begin : 0; }

// How a tile of query rows [q_begin, q_end) x keys [k_begin, k_end) is masked: entirely (skip it), not at
// all, or partly (the causal diagonal crosses it).
enum class TileMask { kEmpty, kFull, kPartial };

INTERNLM2_HOST_DEVICE TileMask tile_mask(int64_t q_begin, int64_t q_end, int64_t k_begin, int64_t k_end, bool causal) {
  if (!causal) return TileMask::kFull;
  if (k_begin > q_end - 1) return TileMask::kEmpty;
  if (k_end - 1 <= q_begin) return TileMask::kFull;
  return TileMask::kPartial;
}

// In a tile whose keys start at k_begin and end at k_end, how many leading keys query row q_pos sees.
INTERNLM2_HOST_DEVICE int64_t visible_keys(int64_t q_pos, int64_t k_begin, int64_t k_end, bool causal) {
  if (!causal) return k_end - k_begin;
  const int64_t n = q_pos - k_begin + 1;
  return n < 0 ? 0 : (n > k_end - k_begin ? k_end - k_begin : n);
}

}  // namespace internlm2::attention
