// Math of block-sparse region attention (DESIGN.md §4) shared by the CPU kernels (csrc/cpu) and
// the CUDA kernels (csrc/cuda), so that the CPU tests cover both.
//
// The image (H × W, row-major pixels) is cut into p_h × p_w regions, row-major; pixel i of a
// region (row-major within it) lies at plane offset `RegionGeometry::offset(r, i)`.
// Forward of a query pixel over its key pixels j, with s_j = scale·⟨q, k_j⟩, in blocks of keys:
//   m' = max(m, max_j s_j);  α = exp(m − m');  l' = α·l + Σ_j exp(s_j − m');  o' = α·o + Σ_j exp(s_j − m')·v_j
//   out = o / l;  lse = m + log(l)
// Backward with p_j = exp(s_j − lse), D = ⟨dout, out⟩ (one per query pixel):
//   dp_j = ⟨dout, v_j⟩,  ds_j = p_j·(dp_j − D)
//   dq = scale·Σ_j ds_j·k_j;  dk_j += scale·ds_j·q;  dv_j += p_j·dout  (summed over the query pixels)
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace sparse_attn {
namespace bsa {

struct RegionGeometry {
  int64_t height, width, region_h, region_w;

  SA_HOST_DEVICE int64_t pixels() const { return region_h * region_w; }
  SA_HOST_DEVICE int64_t columns() const { return width / region_w; }
  SA_HOST_DEVICE int64_t regions() const { return (height / region_h) * columns(); }
  // Plane offset (row-major over H × W) of the first pixel of row `row` of region r.
  SA_HOST_DEVICE int64_t row_offset(int64_t r, int64_t row) const {
    return ((r / columns()) * region_h + row) * width + (r % columns()) * region_w;
  }
  // Plane offset of pixel i (row-major within the region) of region r.
  SA_HOST_DEVICE int64_t offset(int64_t r, int64_t i) const { return row_offset(r, i / region_w) + i % region_w; }
};

// exp of the library's math headers, as a function object for the helpers below (the CPU kernels
// pass their vectorisable float exponential instead).
struct StandardExp {
  template <typename T>
  SA_HOST_DEVICE T operator()(T x) const {
    using std::exp;
    return exp(x);
  }
};

// α of the online softmax: how much the running sums shrink when the running maximum rises from
// `old_max` to `new_max` (0 before the first block, whose running maximum is −∞).
template <typename T, typename Exp>
SA_HOST_DEVICE inline T rescale_factor(T old_max, T new_max, Exp exp_fn) {
  return old_max == -INFINITY ? T(0) : exp_fn(old_max - new_max);
}

// The log-sum-exp that the backward takes from the forward's running maximum and sum.
template <typename T>
SA_HOST_DEVICE inline T log_sum_exp(T running_max, T running_sum) {
  using std::log;
  return running_max + log(running_sum);
}

// ds_j = p_j·(dp_j − D): the gradient of a score from its probability, ⟨dout, v_j⟩ and D = ⟨dout, out⟩.
template <typename T>
SA_HOST_DEVICE inline T score_grad(T probability, T dp, T delta) {
  return probability * (dp - delta);
}

}  // namespace bsa
}  // namespace sparse_attn
