// The instruction sets the CPU kernels are compiled for, and the run-time choice among them.
//
// A kernel file compiles its task loops (inline templates) up to three times, through the
// target attributes below: portable (the build's baseline, SSE2 on x86-64), AVX2+FMA and
// AVX-512, and each call takes the widest one the CPU has. The clones run the same arithmetic
// in the same order (no fast-math, so the compiler may not reassociate a sum), so the AVX2 and
// AVX-512 clones give the same bits; the portable one rounds a*b+c twice where they fuse it. The
// exception: the depthwise weight gradients, summed in blocks of one vector register of the clone
// (cpu/window_correlation.h).
// The environment variable SPARSE_ATTN_CPU_ISA (portable, avx2 or avx512) caps the choice; the
// tests use it to run every clone.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#define SA_HAS_ISA_CLONES 1
#define SA_TARGET_AVX2 __attribute__((target("avx2,fma")))
// Auto-vectorised loops get 16-float registers and 32 of them (the taps of a 5x5 window stay in
// registers): one thread, 2h = 254 at 128², forward+backward, against the AVX2 clone: the
// mixed-scale core 111 -> 94 ms, the gated depthwise core 17-22 -> 12.5 ms.
#define SA_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#endif

namespace sparse_attn {

enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest clone this CPU runs, capped by SPARSE_ATTN_CPU_ISA; decided once per process.
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kPortable;
#ifdef SA_HAS_ISA_CLONES
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      best = Isa::kAvx512;
#endif
    const char* cap = std::getenv("SPARSE_ATTN_CPU_ISA");
    Isa limit = Isa::kAvx512;
    if (cap != nullptr && std::strcmp(cap, "portable") == 0) limit = Isa::kPortable;
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0) limit = Isa::kAvx2;
    return best < limit ? best : limit;
  }();
  return isa;
}

}  // namespace sparse_attn
