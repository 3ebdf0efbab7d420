#include "common/checks.h"
#include "ops.h"

#include <cmath>

namespace internlm2 {

namespace {

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  const std::string p = std::string(op) + ": ";
  check_dim(q, (p + "q").c_str(), 3, "[T, Hq, D]");
  check_dim(k, (p + "k").c_str(), 3, "[T, Hkv, D]");
  check_dim(v, (p + "v").c_str(), 3, "[T, Hkv, D]");
  check_float_dtype(q, (p + "q").c_str());
  check_same_dtype(k, (p + "k").c_str(), q, "q");
  check_same_dtype(v, (p + "v").c_str(), q, "q");
  check_same_device(k, (p + "k").c_str(), q, "q");
  check_same_device(v, (p + "v").c_str(), q, "q");
  check_contiguous(q, (p + "q").c_str());
  check_contiguous(k, (p + "k").c_str());
  check_contiguous(v, (p + "v").c_str());
  TORCH_CHECK(k.sizes() == v.sizes(), p, "k and v must have one shape [T, Hkv, D], got k ", shape_str(k), " and v ",
              shape_str(v));
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2), p,
              "k must have the tokens and head dim of q (T, D) = (", q.size(0), ", ", q.size(2), "), got k ",
              shape_str(k));
  TORCH_CHECK(q.size(2) > 0, p, "head dim D of q must be positive, got shape ", shape_str(q));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, p, "the number of query heads Hq = ", q.size(1),
              " must be a multiple of the number of KV heads Hkv = ", k.size(1), " (k ", shape_str(k), ")");
}

void check_cu_seqlens_meta(const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& q, int64_t max_seqlen,
                           const char* op) {
  TORCH_CHECK(max_seqlen >= 0, op, ": max_seqlen must be >= 0, got ", max_seqlen);
  if (!cu_seqlens.has_value()) {
    TORCH_CHECK(max_seqlen >= q.size(0), op, ": max_seqlen = ", max_seqlen,
                " is smaller than the one sequence of T = ", q.size(0), " tokens (no cu_seqlens given)");
    return;
  }
  const std::string name = std::string(op) + ": cu_seqlens";
  check_dim(*cu_seqlens, name.c_str(), 1, "[B + 1]");
  check_dtype(*cu_seqlens, name.c_str(), at::kInt);
  check_same_device(*cu_seqlens, name.c_str(), q, "q");
  check_contiguous(*cu_seqlens, name.c_str());
  TORCH_CHECK(cu_seqlens->size(0) >= 1, name, " must hold at least one offset (0), got an empty tensor");
  TORCH_CHECK(q.size(0) < (int64_t{1} << 31), op, ": T = ", q.size(0), " tokens do not fit int32 cu_seqlens");
}

void check_lse_like(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == q.size(1) && t.size(1) == q.size(0), name, " must have shape [Hq, T] = [",
              q.size(1), ", ", q.size(0), "], got ", shape_str(t));
  check_dtype(t, name, at::kFloat);
  check_same_device(t, name, q, "q");
  check_contiguous(t, name);
}

// A negative scale turns the softmax upside down (no attention means that), and the CUDA kernels rely on a
// positive one: they take each row's max over the unscaled scores, and masked scores (-inf) times a zero
// scale would be NaN. Zero (uniform attention) is not a scale any model uses, so it is refused as well.
void check_softmax_scale(double softmax_scale, const char* op) {
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, op, ": softmax_scale must be finite and > 0, got ",
              softmax_scale);
}

void check_like_q(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.sizes() == q.sizes(), name, " must have the shape of q ", shape_str(q), ", got ", shape_str(t));
  check_same_dtype(t, name, q, "q");
  check_same_device(t, name, q, "q");
  check_contiguous(t, name);
}

}  // namespace

void check_flash_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                   double softmax_scale) {
  check_qkv(q, k, v, "flash_attention");
  check_cu_seqlens_meta(cu_seqlens, q, max_seqlen, "flash_attention");
  check_softmax_scale(softmax_scale, "flash_attention");
}

void check_flash_attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                    const std::optional<at::Tensor>& grad_lse,
                                    const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                    double softmax_scale) {
  check_qkv(q, k, v, "flash_attention backward");
  check_cu_seqlens_meta(cu_seqlens, q, max_seqlen, "flash_attention backward");
  check_softmax_scale(softmax_scale, "flash_attention backward");
  check_like_q(grad_out, "flash_attention backward: grad_out", q);
  check_like_q(out, "flash_attention backward: out", q);
  check_lse_like(lse, "flash_attention backward: lse", q);
  if (grad_lse.has_value()) check_lse_like(*grad_lse, "flash_attention backward: grad_lse", q);
}

void check_cu_seqlens_values(const at::Tensor& cu_seqlens, int64_t total_tokens, int64_t max_seqlen, const char* op,
                             const char* suffix) {
  TORCH_CHECK(cu_seqlens.device().is_cpu(), "check_cu_seqlens_values reads cu_seqlens on the host; got a tensor on ",
              cu_seqlens.device());
  const int32_t* cu = cu_seqlens.const_data_ptr<int32_t>();
  const int64_t n = cu_seqlens.numel();
  TORCH_CHECK(cu[0] == 0, op, ": cu_seqlens", suffix, " must start at 0, got cu_seqlens", suffix, "[0] = ", cu[0]);
  for (int64_t i = 1; i < n; ++i) {
    const int64_t length = static_cast<int64_t>(cu[i]) - cu[i - 1];
    TORCH_CHECK(length >= 0, op, ": cu_seqlens", suffix, " must be non-decreasing, got cu_seqlens", suffix, "[", i,
                "] = ", cu[i], " < cu_seqlens", suffix, "[", i - 1, "] = ", cu[i - 1]);
    TORCH_CHECK(length <= max_seqlen, op, ": max_seqlen", suffix, " = ", max_seqlen, " is smaller than sequence ",
                i - 1, " of length ", length, " (cu_seqlens", suffix, "[", i - 1, ":", i + 1, "] = ", cu[i - 1], ", ",
                cu[i], ")");
  }
  TORCH_CHECK(cu[n - 1] == total_tokens, op, ": cu_seqlens", suffix, " must end at T", suffix, " = ", total_tokens,
              " (the tokens of q), got cu_seqlens", suffix, "[-1] = ", cu[n - 1]);
}

}  // namespace internlm2
