// The fixed-order sum of a patch of rows on the CPU: the depthwise kernels' bias gradients.
//
// Element j of a row goes into running sum j % kSumLanes in T (32 lanes: four independent AVX2
// chains, two AVX-512 ones, so the adds do not wait on each other); every kRowsPerWidening rows
// the running sums are added into double lanes, and at the end the double lanes are added in
// order. The order depends on the patch alone: not on the thread count, nor on the instruction
// set. Only the lanes a row reaches are widened: the patches of Restormer's deep levels are 16
// or 32 columns wide, and widening all 32 lanes after every row cost more than the row's sum.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__GNUC__)
#define PS_INLINE inline __attribute__((always_inline))
#else
#define PS_INLINE inline
#endif

namespace sparse_attn {

constexpr int64_t kSumLanes = 32;
constexpr int64_t kRowsPerWidening = 4;  // also the weight gradients' (cpu/window_correlation.h)

// Σ_{r < rows} Σ_{j < n} a[r·lda + j].
template <typename T>
PS_INLINE double patch_sum(const T* a, int64_t lda, int64_t rows, int64_t n) {
  const int64_t full = n / kSumLanes * kSumLanes, reached = std::min(n, kSumLanes);
  double wide[kSumLanes] = {};
  T lanes[kSumLanes] = {};
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict row = a + r * lda;
    for (int64_t j = 0; j < full; j += kSumLanes)
      for (int64_t l = 0; l < kSumLanes; ++l) lanes[l] += row[j + l];
    for (int64_t j = full; j < n; ++j) lanes[j - full] += row[j];
    if (r % kRowsPerWidening == kRowsPerWidening - 1 || r == rows - 1)
      for (int64_t l = 0; l < reached; ++l) {
        wide[l] += lanes[l];
        lanes[l] = T(0);
      }
  }
  double sum = 0;
  for (int64_t l = 0; l < reached; ++l) sum += wide[l];
  return sum;
}

}  // namespace sparse_attn
