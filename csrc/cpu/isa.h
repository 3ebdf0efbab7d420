// Run-time choice of the instruction set for CPU kernels.
//
// Every file listed in INTERNLM2_CPU_KERNEL_SOURCES (CMakeLists.txt) is compiled once per instruction
// set with CPU_CAPABILITY set to DEFAULT, AVX2 or AVX512, which puts its functions (and ATen's
// at::vec::Vectorized) into a namespace of that name. kernels.h declares each kernel in every such
// namespace, and INTERNLM2_CPU_DISPATCH picks the best one this CPU supports, honouring
// ATEN_CPU_CAPABILITY like ATen itself does. The files in INTERNLM2_CPU_BF16_KERNEL_SOURCES are also
// compiled as AVX512_BF16 (AVX-512 plus the bf16 dot products of vdpbf16ps, with ATen's AVX-512 vectors);
// INTERNLM2_CPU_DISPATCH_BF16 picks those on CPUs that have them, unless ATEN_CPU_CAPABILITY names a
// level explicitly (then exactly that level runs, as tests use it to pin one).
#pragma once

namespace internlm2::cpu {

enum class Isa { kDefault, kAvx2, kAvx512, kAvx512Bf16 };

// The best instruction set that is both compiled in and supported by this CPU (cached).
Isa best_isa();
const char* isa_name(Isa isa);

// avx512_bf16_fn is null for kernels without an AVX512_BF16 build: their AVX512 build runs there.
template <typename Fn>
Fn pick_isa(Fn default_fn, [[maybe_unused]] Fn avx2_fn, [[maybe_unused]] Fn avx512_fn,
            [[maybe_unused]] Fn avx512_bf16_fn = nullptr) {
  switch (best_isa()) {
    case Isa::kAvx512Bf16:
      return avx512_bf16_fn ? avx512_bf16_fn : avx512_fn;
    case Isa::kAvx512:
      return avx512_fn;
    case Isa::kAvx2:
      return avx2_fn;
    default:
      return default_fn;
  }
}

}  // namespace internlm2::cpu

// Functions of the instruction sets this build compiled; nullptr stands in for the others (best_isa
// never selects an instruction set that was not compiled).
#if defined(INTERNLM2_CPU_HAS_AVX512)
#define INTERNLM2_ISA_FN_AVX512(fn) &::internlm2::cpu::AVX512::fn
#else
#define INTERNLM2_ISA_FN_AVX512(fn) nullptr
#endif
#if defined(INTERNLM2_CPU_HAS_AVX2)
#define INTERNLM2_ISA_FN_AVX2(fn) &::internlm2::cpu::AVX2::fn
#else
#define INTERNLM2_ISA_FN_AVX2(fn) nullptr
#endif

#if defined(INTERNLM2_CPU_HAS_AVX512_BF16)
#define INTERNLM2_ISA_FN_AVX512_BF16(fn) &::internlm2::cpu::AVX512_BF16::fn
#else
#define INTERNLM2_ISA_FN_AVX512_BF16(fn) nullptr
#endif

#define INTERNLM2_CPU_DISPATCH(fn)                                                                     \
  (::internlm2::cpu::pick_isa<decltype(&::internlm2::cpu::DEFAULT::fn)>(                               \
      &::internlm2::cpu::DEFAULT::fn, INTERNLM2_ISA_FN_AVX2(fn), INTERNLM2_ISA_FN_AVX512(fn)))
#define INTERNLM2_CPU_DISPATCH_BF16(fn)                                                                \
  (::internlm2::cpu::pick_isa<decltype(&::internlm2::cpu::DEFAULT::fn)>(                               \
      &::internlm2::cpu::DEFAULT::fn, INTERNLM2_ISA_FN_AVX2(fn), INTERNLM2_ISA_FN_AVX512(fn),            \
      INTERNLM2_ISA_FN_AVX512_BF16(fn)))
