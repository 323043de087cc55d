// Math of patch attention (DESIGN.md §3) shared by the CPU and CUDA kernels: the key
// normalisation, the top-k order, tie rule and heap, the 3×3 neighbourhood and fold arithmetic,
// and the index arithmetic of the pixel-level formulation (a 3×3 patch dot product is the sum of
// nine pixel dot products along a diagonal).
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

// Exponential and logarithm in double of the host's and the device's math libraries.
SA_HOST_DEVICE inline double exp_double(double x) {
  using std::exp;
  return exp(x);
}
SA_HOST_DEVICE inline double log_double(double x) {
  using std::log;
  return log(x);
}

// A query's t best (score, key) so far: a binary heap with the worst at the root, over storage
// the caller owns (capacity t). Once every key was offered, its root holds the threshold and the
// statistics below are those the kernels save.
template <typename T>
struct ScoredKey {
  T score;
  int64_t key;
};

template <typename T>
struct TopHeap {
  ScoredKey<T>* items;
  int64_t size = 0, capacity;

  SA_HOST_DEVICE static bool worse(const ScoredKey<T>& a, const ScoredKey<T>& b) {
    return ranks_before(b.score, b.key, a.score, a.key);
  }

  SA_HOST_DEVICE void offer(T score, int64_t key) {
    const ScoredKey<T> item{score, key};
    if (size < capacity) {
      int64_t i = size++;
      while (i > 0 && worse(item, items[(i - 1) / 2])) {
        items[i] = items[(i - 1) / 2];
        i = (i - 1) / 2;
      }
      items[i] = item;
      return;
    }
    if (!worse(items[0], item)) return;
    int64_t i = 0;
    for (;;) {
      int64_t child = 2 * i + 1;
      if (child >= size) break;
      if (child + 1 < size && worse(items[child + 1], items[child])) ++child;
      if (!worse(items[child], item)) break;
      items[i] = items[child];
      i = child;
    }
    items[i] = item;
  }

  // The t-th largest score: the worst kept.
  SA_HOST_DEVICE T threshold() const { return items[0].score; }

  // The highest key index kept at exactly the threshold (the tie rule's replay, see is_kept).
  SA_HOST_DEVICE int64_t last_kept() const {
    int64_t last = items[0].key;
    for (int64_t i = 0; i < size; ++i)
      if (items[i].score == items[0].score && items[i].key > last) last = items[i].key;
    return last;
  }

  SA_HOST_DEVICE T best() const {
    T best = items[0].score;
    for (int64_t i = 0; i < size; ++i) best = items[i].score > best ? items[i].score : best;
    return best;
  }

  // Σ exp(s − best) over the kept scores, in double (heap order).
  SA_HOST_DEVICE double sum_exp(T best) const {
    double sum = 0.0;
    for (int64_t i = 0; i < size; ++i) sum += exp_double(double(items[i].score) - double(best));
    return sum;
  }
};

// The nine elements δ = 0..8 of a 3×3 patch, row-major: offset (dy, dx) = (δ / 3 − 1, δ % 3 − 1)
// from its centre.
constexpr int kPatchElements = 9;
SA_HOST_DEVICE inline int patch_dy(int delta) { return delta / 3 - 1; }
SA_HOST_DEVICE inline int patch_dx(int delta) { return delta % 3 - 1; }

// The flat (row-major) index of pixel (y + dy, x + dx) of a rows × cols map, or −1 when it lies
// outside (where the patches' zero padding is).
SA_HOST_DEVICE inline int64_t neighbour_index(int64_t rows, int64_t cols, int64_t y, int64_t x, int64_t dy,
                                              int64_t dx) {
  const int64_t ny = y + dy, nx = x + dx;
  return (ny >= 0 && ny < rows && nx >= 0 && nx < cols) ? ny * cols + nx : -1;
}

// Σ value(i) over the pixels i of the 3×3 neighbourhood of (y, x) that lie inside the map, in
// row-major order: the key norms' box sum of squared pixel norms, and the normalisation
// gradient's box sum of per-key weights.
template <typename T, typename Value>
SA_HOST_DEVICE inline T box_sum(int64_t rows, int64_t cols, int64_t y, int64_t x, Value value) {
  T sum = T(0);
  for (int delta = 0; delta < kPatchElements; ++delta) {
    const int64_t i = neighbour_index(rows, cols, y, x, patch_dy(delta), patch_dx(delta));
    if (i >= 0) sum += value(i);
  }
  return sum;
}

// The fold of one pixel (y, x): Σ_δ patch(p, δ) over the patches p = (y − dy, x − dx) inside the
// map, whose element δ lies on (y, x) — every patch pasted back centred on its pixel. δ in order.
template <typename T, typename PatchElement>
SA_HOST_DEVICE inline T fold_sum(int64_t rows, int64_t cols, int64_t y, int64_t x, PatchElement patch) {
  T sum = T(0);
  for (int delta = 0; delta < kPatchElements; ++delta) {
    const int64_t p = neighbour_index(rows, cols, y, x, -patch_dy(delta), -patch_dx(delta));
    if (p >= 0) sum += patch(p, delta);
  }
  return sum;
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
