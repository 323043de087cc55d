// The weight gradient of a depthwise K x K convolution on CPU: for every tap t = (ty, tx) of the
// window, the sum over a patch of pixels p of a[p] * b[p + offset(t)] (a: the gradient at the
// convolution's output, b: its input).
//
// Summed tap by tap, each sum would be a pass over both maps: two loads per multiply-add. Here
// each row of the window takes one pass: a block of Block pixels of a (one vector register of
// the clone) is loaded once and multiplied with the K shifted blocks of b that the window row
// reads, into K register blocks of running sums, so a load feeds about one multiply-add. The
// running sums go into double lanes every kRowsPerWidening rows and at the end, and the lanes
// into the result: a fixed order, whatever the thread count.
// Measured in the AVX2 clones (Restormer's backward shapes at 128² down to 16², one thread),
// against the tap-by-tap form: the gated depthwise backward 532 -> 482 ms a step, the depthwise
// one 198 -> 172 ms. With blocks of 16 floats (two AVX2 registers) instead of 8, it was slower
// than the tap-by-tap form.
#pragma once

#include <cstdint>

#include "cpu/patch_sum.h"

// The blocks below are GCC vectors that may be wider than the baseline's registers; they never
// cross a function boundary that is not inlined, so the ABI note GCC gives for them does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__GNUC__)
#define WC_INLINE inline __attribute__((always_inline))
#else
#define WC_INLINE inline
#endif

namespace sparse_attn {

// Block: values per block of running sums, one vector register of floats in each clone.
constexpr int64_t kBlockPortable = 4, kBlockAvx2 = 8, kBlockAvx512 = 16;

template <typename T, int64_t Block>
struct CorrelationBlock {
  typedef T type __attribute__((vector_size(sizeof(T) * Block)));
};
template <int64_t Block>
struct WideBlock {
  typedef double type __attribute__((vector_size(sizeof(double) * Block)));
};

template <typename V, typename T>
WC_INLINE V load_block(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));  // an unaligned load
  return v;
}

// dst[ty * K + tx] += Σ_{r < rows} Σ_{j < n} a[r * lda + j] * b[r * ldb + (ty * ldb + tx) * dilation + j],
// b pointing at the window's top-left tap for the patch's first pixel.
template <int K, int64_t Block, typename T>
WC_INLINE void correlate_window(const T* a, int64_t lda, const T* b, int64_t ldb, int dilation, int64_t rows,
                                int64_t n, double* dst) {
  using V = typename CorrelationBlock<T, Block>::type;
  using W = typename WideBlock<Block>::type;
  const int64_t full = n / Block * Block;
  for (int ty = 0; ty < K; ++ty) {
    W wide[K] = {};
    V acc[K] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const T* ar = a + r * lda;
      const T* br = b + r * ldb + ty * ldb * dilation;
      for (int64_t j0 = 0; j0 < full; j0 += Block) {
        const V av = load_block<V>(ar + j0);
#pragma GCC unroll 8
        for (int tx = 0; tx < K; ++tx) acc[tx] += av * load_block<V>(br + tx * dilation + j0);
      }
      for (int tx = 0; tx < K; ++tx)
        for (int64_t j = full; j < n; ++j) acc[tx][j - full] += ar[j] * br[tx * dilation + j];
      if (r % kRowsPerWidening == kRowsPerWidening - 1 || r == rows - 1)
        for (int tx = 0; tx < K; ++tx) {
          wide[tx] += __builtin_convertvector(acc[tx], W);
          acc[tx] = V{};
        }
    }
    for (int tx = 0; tx < K; ++tx) {
      double sum = 0;
      for (int64_t l = 0; l < Block; ++l) sum += wide[tx][l];
      dst[ty * K + tx] += sum;
    }
  }
}

}  // namespace sparse_attn

#pragma GCC diagnostic pop
