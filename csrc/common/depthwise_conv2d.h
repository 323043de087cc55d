// Per-pixel math of the depthwise convolution op (DESIGN.md §5), shared by the CPU kernels
// (csrc/cpu) and the CUDA kernels (csrc/cuda) so that the CPU tests cover both.
//
//   out[c, y, x] = bias[c] + sum_{i,j < K} w[c, i, j] · in[c, y + (i - r)·d, x + (j - r)·d]
//
// r = (K - 1) / 2, d the dilation, zero outside the image ("same" padding, stride 1). Its
// gradient with respect to the input is the same window sum over grad_out with the kernel
// rotated by 180 degrees; the weight's gradient at tap (i, j) is the sum over the image of
// grad_out[y, x] · in[y + (i - r)·d, x + (j - r)·d].
#pragma once

#include "common/host_device.h"

#if defined(__CUDACC__)
#define DWC_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define DWC_UNROLL _Pragma("GCC unroll 49")
#else
#define DWC_UNROLL
#endif

namespace sparse_attn {
namespace dwc {

constexpr int kMaxKernel = 7;  // K is 1, 3, 5 or 7 (odd, so that the padding is symmetric)

// The half-width of the window in pixels: the padding on every side.
SA_HOST_DEVICE inline int reach(int k, int dilation) { return (k - 1) / 2 * dilation; }

// The window sum at one pixel: `window` points at the window's top-left input element (the
// pixel's position shifted up and left by the reach) in a row-major map of row stride `ld`;
// taps are row-major K x K, summed column by column (j-major): the CPU's AVX-512 forward keeps
// one tap column's weights in registers (csrc/cpu/depthwise_conv2d.cpp), and every kernel adds
// in its order so that the CPU clones agree bit for bit.
template <int K, typename T>
SA_HOST_DEVICE inline T window_sum(const T* window, long ld, int dilation, const T* taps) {
  T acc = T(0);
  DWC_UNROLL
  for (int j = 0; j < K; ++j)
    DWC_UNROLL
    for (int i = 0; i < K; ++i) acc += taps[i * K + j] * window[(i * ld + j) * dilation];
  return acc;
}

// The same window against the kernel rotated by 180 degrees: the input's gradient, from a window
// of grad_out placed as `window_sum` places one of the input.
template <int K, typename T>
SA_HOST_DEVICE inline T flipped_window_sum(const T* window, long ld, int dilation, const T* taps) {
  T acc = T(0);
  DWC_UNROLL
  for (int j = 0; j < K; ++j)
    DWC_UNROLL
    for (int i = 0; i < K; ++i) acc += taps[(K - 1 - i) * K + (K - 1 - j)] * window[(i * ld + j) * dilation];
  return acc;
}

}  // namespace dwc
}  // namespace sparse_attn
