// Math of patch attention (DESIGN.md §3) shared by the CPU and CUDA kernels: the key
// normalisation, the top-k order and tie rule, and the index arithmetic of the pixel-level
// formulation (a 3×3 patch dot product is the sum of nine pixel dot products along a diagonal).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace sparse_attn {
namespace patch {

// 1 / max(‖K_m‖, key_eps) from ‖K_m‖² (a 3×3 box sum of the key map's squared pixel norms).
template <typename T>
SA_HOST_DEVICE inline T key_inverse_norm(T norm_sq, T key_eps) {
  const T norm = sqrt(norm_sq);
  return T(1) / (norm > key_eps ? norm : key_eps);
}

// Whether the key's norm was clamped to key_eps (then the normalisation's gradient is a plain
// division: the clamp passes no gradient to the norm).
template <typename T>
SA_HOST_DEVICE inline bool key_norm_clamped(T inverse_norm, T key_eps) {
  return inverse_norm * key_eps >= T(1);
}

// The top-k order: a higher score first; among equal scores the lower key index.
template <typename T>
SA_HOST_DEVICE inline bool ranks_before(T score, int64_t key, T other_score, int64_t other_key) {
  return score > other_score || (score == other_score && key < other_key);
}

// Whether key `key` with `score` is among its query's top t, given the t-th largest score
// (`threshold`) and the highest key index kept at exactly that score (`last_kept`): a replay of
// the selection that needs only two numbers per query. Dense attention keeps every key.
template <typename T>
SA_HOST_DEVICE inline bool is_kept(T score, int64_t key, T threshold, int64_t last_kept, bool dense) {
  return dense || score > threshold || (score == threshold && key <= last_kept);
}

// A rectangle of pixels of one map with its one-pixel halo: `halo_index(y, x)` numbers the halo
// pixel at offset (y, x) from the rectangle's origin, y, x in -1..rows, -1..cols.
struct HaloRect {
  int64_t y0, x0, rows, cols;
  SA_HOST_DEVICE int64_t halo_cols() const { return cols + 2; }
  SA_HOST_DEVICE int64_t halo_size() const { return (rows + 2) * (cols + 2); }
  SA_HOST_DEVICE int64_t halo_index(int64_t y, int64_t x) const { return (y + 1) * (cols + 2) + (x + 1); }
};

}  // namespace patch
}  // namespace sparse_attn
