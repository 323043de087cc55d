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
#include <type_traits>

#include "common/host_device.h"
#include "common/mixed_scale_dwconv.h"  // tap_sum, flipped_tap_sum: the K x K window sums

namespace sparse_attn {
namespace gdw {

// Activation codes, as in the op schema (csrc/ops.cpp). Their one source is
// GATE_ACTIVATION_CODES in sparse_attn/encodings.py; the `encoding` op reports these copies and
// tests/test_gated_dwconv.py checks that they agree.
constexpr int kGelu = 0;      // exact: z·Φ(z), Φ by erf
constexpr int kPrelu = 1;     // z > 0 ? z : slope·z, one learnable slope
constexpr int kRelu2 = 2;     // relu(z)²
constexpr int kIdentity = 3;  // z
constexpr int kActivations = 4;

using msdw::flipped_tap_sum;
using msdw::tap_sum;

// erf and exp in float on the CPU as straight-line arithmetic that the compiler vectorises along
// a row (libm's erff and expf are calls, which keep a loop scalar). double, and CUDA (whose erff
// and expf are fast device functions), use the library functions.
#if !defined(__CUDA_ARCH__)
// A rational approximation x·P(x²)/Q(x²) on [-4, 4] (erf is ±1 in float beyond): within 5e-7 of
// erf everywhere (tests/test_gated_dwconv.py checks it).
inline float erf_rational(float x) {
  x = x < -4.f ? -4.f : (x > 4.f ? 4.f : x);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p / q;
}

// exp(x) for x <= 0: 2^n·e^r with n = round(x/ln 2), |r| <= ln2/2, e^r by its Taylor series to
// r^7 (relative error below 1e-8 before rounding); 2^n built in the exponent bits.
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;  // e^-87 is still a normal float
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;  // ln 2 in two parts
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int bits = (static_cast<int>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
#endif

template <typename T>
SA_HOST_DEVICE inline T gate_erf(T x) {
#if defined(__CUDA_ARCH__)
  return erf(x);
#else
  if constexpr (std::is_same<T, float>::value) return erf_rational(x);
  else return std::erf(x);
#endif
}

// exp(x) for x <= 0.
template <typename T>
SA_HOST_DEVICE inline T gate_exp(T x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  if constexpr (std::is_same<T, float>::value) return exp_nonpositive(x);
  else return std::exp(x);
#endif
}

// The activation's value and derivative at z.
template <int Act, typename T>
SA_HOST_DEVICE inline T activation(T z, T slope) {
  if (Act == kGelu) return T(0.5) * z * (T(1) + gate_erf(z * T(0.70710678118654752440)));
  // Both sides computed, then selected: a conditional multiply would keep the CPU loops scalar
  // (the compiler does not speculate floating-point operations that may trap).
  const T negative = slope * z, positive = z > T(0) ? z : T(0);
  if (Act == kPrelu) return z > T(0) ? z : negative;
  if (Act == kRelu2) return positive * positive;
  return z;
}

template <int Act, typename T>
SA_HOST_DEVICE inline T activation_grad(T z, T slope) {
  if (Act == kGelu) {
    const T cdf = T(0.5) * (T(1) + gate_erf(z * T(0.70710678118654752440)));
    return cdf + z * gate_exp(T(-0.5) * z * z) * T(0.39894228040143267794);  // Φ(z) + z·φ(z)
  }
  if (Act == kPrelu) return z > T(0) ? T(1) : slope;
  if (Act == kRelu2) return T(2) * (z > T(0) ? z : T(0));
  return T(1);
}

// d act(z) / d slope (PReLU only): z where the slope applies.
template <int Act, typename T>
SA_HOST_DEVICE inline T activation_slope_grad(T z) {
  return (Act == kPrelu && !(z > T(0))) ? z : T(0);
}

}  // namespace gdw
}  // namespace sparse_attn
