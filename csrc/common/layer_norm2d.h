// Per-pixel math of the channel LayerNorm (DESIGN.md §5), shared by the CPU kernels (csrc/cpu)
// and the CUDA kernels (csrc/cuda) so that the CPU tests cover both.
//
// For one pixel with channel values x_c (c < C), mean μ, biased variance σ², r = 1/√(σ² + eps):
//   centred (WithBias):   ŷ_c = (x_c − μ)·r,  out_c = ŷ_c·weight_c + bias_c
//   not centred (BiasFree): ŷ_c = x_c·r,      out_c = ŷ_c·weight_c
// Backward with g_c = grad_out_c·weight_c and x̂_c = (x_c − μ)·r:
//   centred:      dx_c = r·(g_c − mean(g) − x̂_c·mean(g·ŷ))
//   not centred:  dx_c = r·(g_c − x̂_c·mean(g·ŷ))       (μ only enters through σ²)
//   dweight_c = Σ_pixels grad_out_c·ŷ_c,   dbias_c = Σ_pixels grad_out_c
#pragma once

#include <cmath>

#include "common/host_device.h"

namespace sparse_attn {
namespace ln2d {

// 1/√(σ² + eps) from the sum of squared deviations over `channels` values.
template <typename T>
SA_HOST_DEVICE inline T inverse_std(T squared_deviations, int channels, T eps) {
  using std::sqrt;
  return T(1) / sqrt(squared_deviations / T(channels) + eps);
}

// ŷ: the normalised value before the affine weight.
template <typename T>
SA_HOST_DEVICE inline T normalised(T x, T mean, T rstd, bool centred) {
  return (centred ? x - mean : x) * rstd;
}

// dx of one channel from the pixel's mean(g) and mean(g·ŷ) over the channels.
template <typename T>
SA_HOST_DEVICE inline T input_grad(T g, T x, T mean, T rstd, T mean_g, T mean_g_yhat, bool centred) {
  const T x_hat = (x - mean) * rstd;
  return rstd * ((centred ? g - mean_g : g) - x_hat * mean_g_yhat);
}

}  // namespace ln2d
}  // namespace sparse_attn
