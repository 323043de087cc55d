// Per-element math of the mixed-scale depthwise core of DRSformer's MSFN (DESIGN.md §2), shared
// by the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda) so that the CPU tests cover both.
//
//   y3 = relu(dwconv3x3(x)), y5 = relu(dwconv5x5(x))                     2h first-stage maps each
//   x1 = cat(y3[:h], y5[:h]), x2 = cat(y3[h:], y5[h:])
//   out[g] = relu(conv3x3(x1[2g], x1[2g+1])), out[h+g] = relu(conv5x5(x2[2g], x2[2g+1]))
//
// Every first-stage map is read by exactly one output channel, in one of its two input slots:
// output channel o reads maps source_of(o, 0) and source_of(o, 1), and map (kind, c) is read by
// consumer_of(kind, c). This partition lets the forward run per output channel and the backward
// per input channel without two tasks ever writing the same value.
#pragma once

#include "common/host_device.h"

#if defined(__CUDACC__)
#define MSDW_UNROLL _Pragma("unroll")
#else
#define MSDW_UNROLL _Pragma("GCC unroll 8")
#endif

namespace sparse_attn {
namespace msdw {

constexpr int kKind3 = 0;  // a first-stage map of the 3x3 depthwise convolution (y3)
constexpr int kKind5 = 1;  // ... of the 5x5 one (y5)

// A first-stage map: which convolution (kKind3/kKind5) of which input channel.
struct StageOneMap {
  int kind;
  int channel;
};

// A second-stage input slot: output channel `out_channel`, slot 0 or 1 of its grouped conv.
struct StageTwoSlot {
  int out_channel;
  int slot;
};

SA_HOST_DEVICE inline int kernel_size_of_kind(int kind) { return kind == kKind3 ? 3 : 5; }

// Output channels 0..h-1 are z1 (3x3 over x1), h..2h-1 are z2 (5x5 over x2).
SA_HOST_DEVICE inline int stage_two_kernel_size(int out_channel, int hidden) {
  return out_channel < hidden ? 3 : 5;
}

// The first-stage map that output channel `out_channel` reads in `slot`: channel j = 2g + slot
// of x1 (or x2), which cat() took from y3 when j < h and from y5 otherwise.
SA_HOST_DEVICE inline StageOneMap source_of(int out_channel, int slot, int hidden) {
  const bool second = out_channel >= hidden;
  const int j = 2 * (second ? out_channel - hidden : out_channel) + slot;
  StageOneMap m;
  if (j < hidden) {
    m.kind = kKind3;
    m.channel = second ? hidden + j : j;
  } else {
    m.kind = kKind5;
    m.channel = second ? j : j - hidden;
  }
  return m;
}

// The inverse of source_of: who reads first-stage map (kind, channel).
SA_HOST_DEVICE inline StageTwoSlot consumer_of(int kind, int channel, int hidden) {
  const bool second = channel >= hidden;  // y[:, h:] goes to x2, y[:, :h] to x1
  int j;                                  // position in x1 (or x2)
  if (kind == kKind3) {
    j = second ? channel - hidden : channel;
  } else {
    j = second ? channel : channel + hidden;
  }
  StageTwoSlot s;
  s.out_channel = (second ? hidden : 0) + j / 2;
  s.slot = j % 2;
  return s;
}

template <typename T>
SA_HOST_DEVICE inline T relu(T v) {
  return v > T(0) ? v : T(0);
}

// Cross-correlation of a K x K window (what F.conv2d computes) at one pixel: `window` points at
// the window's top-left element of a row-major map with row stride `ld`; taps are row-major.
template <int K, typename T>
SA_HOST_DEVICE inline T tap_sum(const T* window, long ld, const T* taps) {
  T acc = T(0);
MSDW_UNROLL
  for (int ky = 0; ky < K; ++ky)
MSDW_UNROLL
    for (int kx = 0; kx < K; ++kx) acc += taps[ky * K + kx] * window[ky * ld + kx];
  return acc;
}

// The same window against the kernel rotated by 180 degrees: the transposed convolution that
// takes a gradient back through a K x K cross-correlation (dy[q] = sum_t w[t] dz[q - t + r]).
template <int K, typename T>
SA_HOST_DEVICE inline T flipped_tap_sum(const T* window, long ld, const T* taps) {
  T acc = T(0);
MSDW_UNROLL
  for (int ky = 0; ky < K; ++ky)
MSDW_UNROLL
    for (int kx = 0; kx < K; ++kx) acc += taps[(K - 1 - ky) * K + (K - 1 - kx)] * window[ky * ld + kx];
  return acc;
}

}  // namespace msdw
}  // namespace sparse_attn
