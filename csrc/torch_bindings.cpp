// The one place where internlm2's ops are declared: every schema in one TORCH_LIBRARY block. Backends
// register implementations in their own files (TORCH_LIBRARY_IMPL(internlm2, CPU|CUDA, m)); Python adds
// fake (meta) and autograd registrations in internlm2/ops/. The small pybind11 module reports how this
// binary was built.
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include "cpu/isa.h"

TORCH_LIBRARY(internlm2, m) {
  // x [..., H], weight [H] -> (y [..., H], rstd [rows] float32)
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
}

namespace py = pybind11;

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
}
