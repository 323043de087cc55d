// Per-element math of the gated depthwise core of Restormer's GDFN (DESIGN.md §5), shared by the
// CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda) so that the CPU tests cover both.
//
//   z = dwconv3x3(x) + bias            2h channels, zero padding 1
//   out[g] = act(z[g]) · z[h + g]      g < h
//
// Group g reads input channels g and h + g and nothing else, so the forward and the backward
// both run per group without two tasks ever writing the same value.
#pragma once

#include <cmath>

#include "common/host_device.h"
#include "common/mixed_scale_dwconv.h"  // tap_sum, flipped_tap_sum: the K x K window sums

namespace sparse_attn {
namespace gdw {

// Activation codes, as in the op schema (csrc/ops.cpp). Their one source is ACTIVATIONS in
// sparse_attn/reference/gated_dwconv.py (the code is the index); a test checks these against it.
constexpr int kGelu = 0;      // exact: z·Φ(z), Φ by erf
constexpr int kPrelu = 1;     // z > 0 ? z : slope·z, one learnable slope
constexpr int kRelu2 = 2;     // relu(z)²
constexpr int kIdentity = 3;  // z
constexpr int kActivations = 4;

using msdw::flipped_tap_sum;
using msdw::tap_sum;

// The activation's value and derivative at z.
template <int Act, typename T>
SA_HOST_DEVICE inline T activation(T z, T slope) {
  using std::erf;
  if (Act == kGelu) return T(0.5) * z * (T(1) + erf(z * T(0.70710678118654752440)));
  if (Act == kPrelu) return z > T(0) ? z : slope * z;
  if (Act == kRelu2) return z > T(0) ? z * z : T(0);
  return z;
}

template <int Act, typename T>
SA_HOST_DEVICE inline T activation_grad(T z, T slope) {
  using std::erf;
  using std::exp;
  if (Act == kGelu) {
    const T cdf = T(0.5) * (T(1) + erf(z * T(0.70710678118654752440)));
    return cdf + z * exp(T(-0.5) * z * z) * T(0.39894228040143267794);  // Φ(z) + z·φ(z)
  }
  if (Act == kPrelu) return z > T(0) ? T(1) : slope;
  if (Act == kRelu2) return z > T(0) ? T(2) * z : T(0);
  return T(1);
}

// d act(z) / d slope (PReLU only): z where the slope applies.
template <int Act, typename T>
SA_HOST_DEVICE inline T activation_slope_grad(T z) {
  return (Act == kPrelu && !(z > T(0))) ? z : T(0);
}

}  // namespace gdw
}  // namespace sparse_attn
