#include "cpu/isa.h"

#include <ATen/Version.h>

#include <cstdlib>
#include <string>

namespace internlm2::cpu {

namespace {
Isa detect() {
  // ATen's own detection: cpuinfo plus the ATEN_CPU_CAPABILITY override, so `ATEN_CPU_CAPABILITY=default`
  // forces the portable kernels here too (useful for testing them on an AVX-512 machine).
  const std::string cap = at::get_cpu_capability();
#if defined(INTERNLM2_CPU_HAS_AVX512_BF16)
  // ATen has no level for bf16 dot products; an explicit ATEN_CPU_CAPABILITY=avx512 keeps them off.
  if (cap == "AVX512" && std::getenv("ATEN_CPU_CAPABILITY") == nullptr && __builtin_cpu_supports("avx512bf16")) {
    return Isa::kAvx512Bf16;
  }
#endif
#if defined(INTERNLM2_CPU_HAS_AVX512)
  if (cap == "AVX512") return Isa::kAvx512;
#endif
#if defined(INTERNLM2_CPU_HAS_AVX2)
  if (cap == "AVX2" || cap == "AVX512") return Isa::kAvx2;
#endif
  return Isa::kDefault;
}
}  // namespace

Isa best_isa() {
  static const Isa isa = detect();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16:
      return "avx512_bf16";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace internlm2::cpu
