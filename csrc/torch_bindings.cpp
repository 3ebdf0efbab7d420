// The one place where internlm2's ops are declared: every schema in one TORCH_LIBRARY block. Backends
// register implementations in their own files (TORCH_LIBRARY_IMPL(internlm2, CPU|CUDA, m)); Python adds
// fake (meta) and autograd registrations in internlm2/ops/. The small pybind11 module reports how this
// binary was built.
#include <pybind11/pybind11.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor and std::optional arguments for the checks below
#include <torch/library.h>
#include <torch/version.h>

#include <functional>
#include <stdexcept>
#include <vector>

#include "cpu/isa.h"
#include "ops.h"

TORCH_LIBRARY(internlm2, m) {
  const std::vector<at::Tag> pt2 = {at::Tag::pt2_compliant_tag};

  // RMSNorm over the last dim. x [..., H], weight [H] -> (y [..., H], rstd [rows] float32)
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)", pt2);
  m.def("rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)", pt2);

  // SwiGLU: silu(gate) * up, elementwise, gate and up of one shape and dtype.
  m.def("swiglu_forward(Tensor gate, Tensor up) -> Tensor", pt2);
  // -> (grad_gate, grad_up)
  m.def("swiglu_backward(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor, Tensor)", pt2);

  // RoPE tables for position_ids [T] (int32/int64; positions restart per packed sequence):
  // -> (cos [T, head_dim], sin [T, head_dim]) float32 in HF's rotate_half layout (each frequency twice:
  // first half and second half), angles computed in float64. theta is the effective base (dynamic NTK
  // scaling is resolved in Python before the call).
  m.def("rope_cos_sin(Tensor position_ids, int head_dim, float theta) -> (Tensor, Tensor)", pt2);
  // x [T, ..., D] (any strides with x.stride(-1) == 1), cos/sin [T, D] float32 -> rotated x, contiguous,
  // x's dtype. inverse=True rotates by the negative angle (the backward of the forward rotation).
  m.def("apply_rope(Tensor x, Tensor cos, Tensor sin, bool inverse=False) -> Tensor", pt2);

  // Flash attention. q [T, Hq, D], k/v [T, Hkv, D] with Hq % Hkv == 0; cu_seqlens int32 [B+1] packs
  // sequences (None: one sequence of length T); max_seqlen bounds every packed sequence.
  // -> (out [T, Hq, D], lse [Hq, T] float32: natural-log log-sum-exp of the scaled scores per query)
  m.def(
      "flash_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, int max_seqlen, bool causal, "
      "float softmax_scale) -> (Tensor, Tensor)",
      pt2);
  // grad_lse (optional, [Hq, T] float32) is the gradient flowing into lse when a caller used it (ring
  // attention merges); -> (grad_q, grad_k, grad_v), grad_k/grad_v summed over each KV head's query group.
  m.def(
      "flash_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? grad_lse, Tensor? cu_seqlens, int max_seqlen, bool causal, float softmax_scale) "
      "-> (Tensor, Tensor, Tensor)",
      pt2);

  // Attention of new queries against a KV cache (decoding, prefill with a cache). q [Tq, Hq, D] packs the
  // new queries of B sequences by cu_seqlens_q int32 [B+1] (None: one query per sequence, Tq == B);
  // k_cache/v_cache [B, Hkv, S, D] hold sequence b's keys/values in slots 0..k_lengths[b]-1 (int32 [B],
  // the new tokens' keys already written). causal: query i of a sequence with L new queries sees the keys
  // j <= k_lengths[b] - L + i. -> (out [Tq, Hq, D], lse [Hq, Tq] float32); a query that sees no key gets
  // out 0 and lse -inf.
  m.def(
      "kv_cache_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_lengths, Tensor? cu_seqlens_q, "
      "int max_seqlen_q, bool causal, float softmax_scale) -> (Tensor, Tensor)",
      pt2);

  // Fused softmax cross-entropy over one chunk of logits [N, V] (any float dtype) with labels [N] int64
  // (ignore_index rows give loss 0 and gradient 0). loss = lse - logit[label] + z_loss_weight * lse^2.
  // When grad_scale (float32, [N] or a scalar) is given, logits are overwritten in place with
  // grad_scale * d(loss)/d(logits); linear_cross_entropy (Python) chunks the tokens and does the matmuls.
  // -> (loss [N] float32, lse [N] float32)
  m.def(
      "cross_entropy_chunk_(Tensor(a!) logits, Tensor labels, int ignore_index, float z_loss_weight, "
      "Tensor? grad_scale) -> (Tensor, Tensor)",
      pt2);
}

namespace py = pybind11;

namespace {

// A failed check raises RuntimeError with the one-line message the op itself would raise (c10::Error's
// what() would append a C++ backtrace).
void run_check(const std::function<void()>& check) {
  try {
    check();
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "internlm2 compiled kernels; the ops themselves are torch.ops.internlm2.*";
  m.attr("torch_version") = TORCH_VERSION;
#if defined(INTERNLM2_WITH_CUDA)
  m.attr("with_cuda") = true;
  m.attr("cuda_version") = INTERNLM2_CUDA_VERSION;
  m.attr("cuda_archs") = INTERNLM2_CUDA_ARCHS;
#if defined(INTERNLM2_HAS_SM90_KERNELS)
  m.attr("sm90_kernels") = true;
#else
  m.attr("sm90_kernels") = false;
#endif
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_version") = py::none();
  m.attr("cuda_archs") = "";
  m.attr("sm90_kernels") = false;
#endif
  m.def("cpu_isa", [] { return internlm2::cpu::isa_name(internlm2::cpu::best_isa()); },
        "Instruction set the CPU kernels run with on this machine (default, avx2 or avx512)");
  // The op's argument contract, for Python code that runs the reference where no kernel was built for an
  // input (internlm2/ops/flash_attention.py), so bad input fails alike on both paths.
  m.def(
      "check_flash_attention_forward",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& cu_seqlens,
         int64_t max_seqlen, double softmax_scale) {
        run_check([&] { internlm2::check_flash_attention_forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale); });
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens"), py::arg("max_seqlen"), py::arg("softmax_scale"));
}
