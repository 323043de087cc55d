// The weight gradient of a depthwise K x K convolution on CPU: for every tap t = (ty, tx) of the
// window, the sum over a patch of pixels p of a[p] * b[p + offset(t)] (a: the gradient at the
// convolution's output, b: its input).
//
// Summed tap by tap, each sum is a pass over both maps: two loads per multiply-add. The one-pass
// form (the AVX-512 clones'; the others keep the tap-by-tap form, at the end) makes one pass
// per row of the window: a block of kCorrelationBlock pixels of a is loaded once and multiplied
// with the K shifted blocks of b that the window row reads, into K register blocks of running
// sums, so a load feeds about one multiply-add. The running sums go into double lanes every few
// rows, and the lanes into the result at the end: a fixed order, whatever the thread count.
#pragma once

#include <cstdint>

// The blocks below are GCC vectors wider than the baseline's registers; they never cross a
// function boundary that is not inlined, so the ABI note GCC gives for them does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__GNUC__)
#define WC_INLINE inline __attribute__((always_inline))
#else
#define WC_INLINE inline
#endif

namespace sparse_attn {

constexpr int64_t kCorrelationBlock = 16;  // one AVX-512 register of floats, two AVX2 ones

// kCorrelationBlock values of T as one GCC vector (the compiler splits it into the registers the
// clone has), so that the K running sums stay in registers.
template <typename T>
struct CorrelationBlock {
  typedef T type __attribute__((vector_size(sizeof(T) * kCorrelationBlock)));
};
// The running sums go into double lanes every kRowsPerWidening rows (and at the end).
constexpr int64_t kRowsPerWidening = 4;
typedef double WideBlock __attribute__((vector_size(sizeof(double) * kCorrelationBlock)));

template <typename V, typename T>
WC_INLINE V load_block(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));  // an unaligned load
  return v;
}

// The one-pass form (see the top of the file).
template <int K, typename T>
WC_INLINE void correlate_window_rows(const T* a, int64_t lda, const T* b, int64_t ldb, int dilation, int64_t rows,
                                int64_t n, double* dst) {
  using V = typename CorrelationBlock<T>::type;
  constexpr int64_t L = kCorrelationBlock;
  const int64_t full = n / L * L;
  for (int ty = 0; ty < K; ++ty) {
    WideBlock wide[K] = {};
    V acc[K] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const T* ar = a + r * lda;
      const T* br = b + r * ldb + ty * ldb * dilation;
      for (int64_t j0 = 0; j0 < full; j0 += L) {
        const V av = load_block<V>(ar + j0);
#pragma GCC unroll 8
        for (int tx = 0; tx < K; ++tx) acc[tx] += av * load_block<V>(br + tx * dilation + j0);
      }
      for (int tx = 0; tx < K; ++tx)
        for (int64_t j = full; j < n; ++j) acc[tx][j - full] += ar[j] * br[tx * dilation + j];
      if (r % kRowsPerWidening == kRowsPerWidening - 1 || r == rows - 1)
        for (int tx = 0; tx < K; ++tx) {
          wide[tx] += __builtin_convertvector(acc[tx], WideBlock);
          acc[tx] = V{};
        }
    }
    for (int tx = 0; tx < K; ++tx) {
      double sum = 0;
      for (int64_t l = 0; l < L; ++l) sum += wide[tx][l];
      dst[ty * K + tx] += sum;
    }
  }
}

// The tap-by-tap form: for each tap, kTapLanes running sums along each row (four AVX2 chains),
// added into double lanes after the row.
constexpr int64_t kTapLanes = 32;

template <int K, typename T>
WC_INLINE void correlate_window_taps(const T* a, int64_t lda, const T* b, int64_t ldb, int dilation, int64_t rows,
                                     int64_t n, double* dst) {
  const int64_t full = n / kTapLanes * kTapLanes;
  for (int tap = 0; tap < K * K; ++tap) {
    const int64_t shift = ((tap / K) * ldb + tap % K) * dilation;
    double wide[kTapLanes] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const T* __restrict ar = a + r * lda;
      const T* __restrict br = b + r * ldb + shift;
      T lanes[kTapLanes] = {};
      for (int64_t j = 0; j < full; j += kTapLanes)
        for (int64_t l = 0; l < kTapLanes; ++l) lanes[l] += ar[j + l] * br[j + l];
      for (int64_t j = full; j < n; ++j) lanes[j - full] += ar[j] * br[j];
      for (int64_t l = 0; l < kTapLanes; ++l) wide[l] += lanes[l];
    }
    double sum = 0;
    for (int64_t l = 0; l < kTapLanes; ++l) sum += wide[l];
    dst[tap] += sum;
  }
}

// dst[ty * K + tx] += Σ_{r < rows} Σ_{j < n} a[r * lda + j] * b[r * ldb + (ty * ldb + tx) * dilation + j],
// b pointing at the window's top-left tap for the patch's first pixel. OnePass: the one-pass
// form, which the AVX-512 clones run; the others run the tap-by-tap form, which inside the
// kernels' AVX2 clones measured faster (the depthwise backward at 288 channels, 128², one
// thread: 12.6 ms against 20 ms), though the one-pass form is faster there alone.
template <int K, bool OnePass, typename T>
WC_INLINE void correlate_window(const T* a, int64_t lda, const T* b, int64_t ldb, int dilation, int64_t rows,
                                int64_t n, double* dst) {
  if constexpr (OnePass) correlate_window_rows<K>(a, lda, b, ldb, dilation, rows, n, dst);
  else correlate_window_taps<K>(a, lda, b, ldb, dilation, rows, n, dst);
}

}  // namespace sparse_attn

#pragma GCC diagnostic pop
