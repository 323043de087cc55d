// CUDA kernels of patch attention (DESIGN.md §3); the key normalisation, the top-k heap and tie
// rule, and the 3×3 neighbourhood and fold arithmetic come from csrc/common/patch_attention.h,
// which the CPU tests cover.
//
// A direct design, chosen to be clearly correct and deterministic (no atomics: every output
// element is written by one thread, its sums in a fixed order); it does the 9·C products of every
// patch dot product rather than the CPU's pixel-level GEMMs.
//
// One warp owns one pixel — a query (forward; D and dq in the backward) or a key (dk, dv) — and
// streams every pixel of the other side. Its 32 lanes split the channels: a 3×3 patch dot product
// is summed by each lane over its channels with explicit fused multiply-adds, then across the warp
// by a butterfly of shuffles, so every lane holds the same bits and a (query, key) score is
// bitwise the same in every kernel, as the top-k replay (is_kept) needs. The inputs are first
// copied pixel-major ((B, pixels, C), every level one after the other), so that the lanes read
// consecutive channels.
//
// Forward: the key inverse norms (a thread per key); pass 1, a warp per query: the log-sum-exp
// (online, summed in double) or the query's t best keys in a heap in local memory (t ≤ kMaxTopK);
// pass 2, a warp per query: its attended 3×3×Cv value patch Σ_m A_pm V_m, up to kGroupChannels
// channels per launch in registers, into a scratch (B, N, 9, channels); then the fold, a thread
// per output element summing its nine contributions.
// Backward: D_p = Σ_m A_pm dP_pm per query warp (double); dq patches per query warp, folded; dv
// and dK̂ patches per key warp streaming every query, with c_m = Σ_p dS_pm s_pm, folded per level;
// the fold of dk subtracts the normalisation's part k · box_sum(r² c) where the norm was not
// clamped, as the CPU kernels do.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/patch_attention.h"
#include "common/patch_attention_args.h"

namespace sparse_attn {
namespace patch {
namespace {

using at::Tensor;

// Bounds of these kernels (the Python table's `limits` says the same before dispatching here).
constexpr int64_t kMaxTopK = 64;   // the per-query heap, in local memory
constexpr int kMaxLevels = 16;     // the level table, a kernel argument
constexpr int kWarp = 32;
constexpr int kSlots = 4;          // channels a lane accumulates per patch element
constexpr int64_t kGroupChannels = kWarp * kSlots;  // channels of a patch accumulated per launch
constexpr int kBlockThreads = 128;
constexpr int64_t kMaxBlocks = 1 << 16;  // the loops stride over the grid beyond it

// ---------------------------------------------------------------------------------------------
// Maps and the problem
// ---------------------------------------------------------------------------------------------
struct Levels {  // the key/value maps: rows, cols, and the key index m of each one's pixel (0, 0)
  int count;
  int64_t rows[kMaxLevels], cols[kMaxLevels], first[kMaxLevels];
};

template <typename T>
struct PixelMap {  // one image's rows × cols map, pixel-major: `channels` values per pixel
  const T* data;
  int64_t rows, cols, channels;
  __device__ int64_t neighbour(int64_t y, int64_t x, int delta) const {
    return neighbour_index(rows, cols, y, x, patch_dy(delta), patch_dx(delta));
  }
  __device__ const T* pixel(int64_t i) const { return data + i * channels; }
};

template <typename T>
struct Problem {
  // Pixel-major copies: q (B, N, Cq), keys (B, M, Cq), values (B, M, Cv), and in the backward the
  // output gradient (B, N, Cv).
  const T *q, *keys, *values, *grad;
  const T* inverse_norm;  // (B, M)
  // Per query (B, N): the top-k threshold and last kept key; exp(s − lse) is computed as
  // exp(s − shift) · correction with shift = lse rounded to T (see probability_shift_kernel);
  // the backward's D.
  const T* threshold;
  const int64_t* last_kept;
  const T *shift, *correction, *delta;
  int64_t batch, rows, cols, n_queries, n_keys, cq, cv;
  Levels levels;
  T scale;
  bool dense;

  __device__ PixelMap<T> query_map(int64_t b) const { return {q + b * n_queries * cq, rows, cols, cq}; }
  __device__ PixelMap<T> grad_map(int64_t b) const { return {grad + b * n_queries * cv, rows, cols, cv}; }
  __device__ PixelMap<T> key_map(int64_t b, int l) const {
    return {keys + (b * n_keys + levels.first[l]) * cq, levels.rows[l], levels.cols[l], cq};
  }
  __device__ PixelMap<T> value_map(int64_t b, int l) const {
    return {values + (b * n_keys + levels.first[l]) * cv, levels.rows[l], levels.cols[l], cv};
  }
  __device__ int level_of(int64_t m) const {
    int l = 0;
    while (l + 1 < levels.count && m >= levels.first[l + 1]) ++l;
    return l;
  }
};

// ---------------------------------------------------------------------------------------------
// Device arithmetic: explicit rounding where the same bits must come out of every kernel
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ inline T fused_multiply_add(T a, T b, T c) {
  if constexpr (std::is_same_v<T, float>) return __fmaf_rn(a, b, c);
  else return __fma_rn(a, b, c);
}

template <typename T>
__device__ inline T multiply(T a, T b) {  // never contracted into a multiply-add
  if constexpr (std::is_same_v<T, float>) return __fmul_rn(a, b);
  else return __dmul_rn(a, b);
}

template <typename T>
__device__ inline T exponential(T x) {
  if constexpr (std::is_same_v<T, float>) return expf(x);
  else return exp(x);
}

template <typename T>
__device__ inline T warp_sum(T x) {  // a butterfly: every lane ends with the same bits
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ inline int lane_id() { return threadIdx.x % kWarp; }
// The warp loops: every lane of a warp runs the same tasks (the shuffles need all 32).
__device__ inline int64_t first_warp_task() { return (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; }
__device__ inline int64_t warp_task_stride() { return int64_t(gridDim.x) * blockDim.x / kWarp; }
__device__ inline int64_t first_thread_task() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ inline int64_t thread_task_stride() { return int64_t(gridDim.x) * blockDim.x; }

// ⟨A, B⟩ of the 3×3 patches centred on (ay, ax) of map a and on (by, bx) of map b (zero outside
// either map), over their channels: each lane its channels in order, then the warp's butterfly.
template <typename T>
__device__ T patch_dot(const PixelMap<T>& a, int64_t ay, int64_t ax, const PixelMap<T>& b, int64_t by, int64_t bx,
                       int lane) {
  T sum = T(0);
  for (int delta = 0; delta < kPatchElements; ++delta) {
    const int64_t ia = a.neighbour(ay, ax, delta), ib = b.neighbour(by, bx, delta);
    if (ia < 0 || ib < 0) continue;
    const T *pa = a.pixel(ia), *pb = b.pixel(ib);
    for (int64_t c = lane; c < a.channels; c += kWarp) sum = fused_multiply_add(pa[c], pb[c], sum);
  }
  return warp_sum(sum);
}

// s_pm = ⟨Q_p, K_m⟩ · (scale · r_m), as the CPU kernels round it.
template <typename T>
__device__ inline T score_of(const Problem<T>& pr, const PixelMap<T>& q, int64_t py, int64_t px, const PixelMap<T>& k,
                             int64_t ky, int64_t kx, T inverse_norm, int lane) {
  return multiply(patch_dot(q, py, px, k, ky, kx, lane), multiply(pr.scale, inverse_norm));
}

// What a warp needs of query p to turn its scores into probabilities and score gradients.
template <typename T>
struct QueryRow {
  T shift, correction, threshold, delta;
  int64_t last_kept;
  __device__ bool kept(T score, int64_t key, bool dense) const {
    return is_kept(score, key, threshold, last_kept, dense);
  }
  __device__ T probability(T score) const { return multiply(exponential(score - shift), correction); }
};

template <typename T>
__device__ inline QueryRow<T> query_row(const Problem<T>& pr, int64_t b, int64_t p) {
  const int64_t i = b * pr.n_queries + p;
  return {pr.shift[i], pr.correction[i], pr.threshold[i], pr.delta != nullptr ? pr.delta[i] : T(0),
          pr.last_kept[i]};
}

// acc[δ][j] += weight · src[(y, x) + δ][c0 + lane + 32 j] for the group's channels.
template <typename T>
__device__ inline void accumulate_patch(T (&acc)[kPatchElements][kSlots], const PixelMap<T>& src, int64_t y,
                                        int64_t x, T weight, int64_t c0, int64_t group, int lane) {
#pragma unroll
  for (int delta = 0; delta < kPatchElements; ++delta) {
    const int64_t i = src.neighbour(y, x, delta);
    if (i < 0) continue;
    const T* row = src.pixel(i) + c0;
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      const int64_t c = lane + kWarp * j;
      if (c < group) acc[delta][j] = fused_multiply_add(weight, row[c], acc[delta][j]);
    }
  }
}

// scratch (B, owners, 9, group)[b, owner] = acc.
template <typename T>
__device__ inline void store_patch(const T (&acc)[kPatchElements][kSlots], T* scratch, int64_t owner_index,
                                   int64_t group, int lane) {
  T* out = scratch + owner_index * kPatchElements * group;
#pragma unroll
  for (int delta = 0; delta < kPatchElements; ++delta)
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      const int64_t c = lane + kWarp * j;
      if (c < group) out[delta * group + c] = acc[delta][j];
    }
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------
// r_m = 1 / max(‖K_m‖, key_eps), a thread per key.
template <typename T>
__global__ void inverse_norms_kernel(const Problem<T> pr, T key_eps, T* __restrict__ out) {
  for (int64_t task = first_thread_task(); task < pr.batch * pr.n_keys; task += thread_task_stride()) {
    const int64_t b = task / pr.n_keys, m = task % pr.n_keys;
    const int l = pr.level_of(m);
    const PixelMap<T> k = pr.key_map(b, l);
    const int64_t local = m - pr.levels.first[l];
    const T norm_sq = box_sum<T>(k.rows, k.cols, local / k.cols, local % k.cols, [&](int64_t i) {
      const T* row = k.pixel(i);
      T sum = T(0);
      for (int64_t c = 0; c < k.channels; ++c) sum += row[c] * row[c];
      return sum;
    });
    out[task] = key_inverse_norm(norm_sq, key_eps);
  }
}

// Pass 1 of the forward, a warp per query: its log-sum-exp, and with topk its threshold and last
// kept key (dense: −∞ and M − 1, as on the CPU).
template <typename T>
__global__ void __launch_bounds__(kBlockThreads) query_statistics_kernel(const Problem<T> pr, int64_t topk,
                                                                         double* __restrict__ lse,
                                                                         T* __restrict__ threshold,
                                                                         int64_t* __restrict__ last_kept) {
  const int lane = lane_id();
  ScoredKey<T> items[kMaxTopK];  // lane 0's heap
  for (int64_t task = first_warp_task(); task < pr.batch * pr.n_queries; task += warp_task_stride()) {
    const int64_t b = task / pr.n_queries, p = task % pr.n_queries, py = p / pr.cols, px = p % pr.cols;
    const PixelMap<T> q = pr.query_map(b);
    T row_max = -INFINITY;
    double row_sum = 0.0;  // summed in double: M reaches tens of thousands of keys
    TopHeap<T> heap{items, 0, topk};
    for (int l = 0; l < pr.levels.count; ++l) {
      const PixelMap<T> k = pr.key_map(b, l);
      for (int64_t local = 0; local < k.rows * k.cols; ++local) {
        const int64_t m = pr.levels.first[l] + local;
        const T s = score_of(pr, q, py, px, k, local / k.cols, local % k.cols, pr.inverse_norm[b * pr.n_keys + m],
                             lane);
        if (pr.dense) {
          if (s > row_max) {
            row_sum = row_sum * exp_double(double(row_max) - double(s)) + 1.0;
            row_max = s;
          } else {
            row_sum += double(exponential(s - row_max));
          }
        } else if (lane == 0) {
          heap.offer(s, m);
        }
      }
    }
    if (lane == 0) {
      if (pr.dense) {
        threshold[task] = -INFINITY;
        last_kept[task] = pr.n_keys - 1;
      } else {
        row_max = heap.best();
        row_sum = heap.sum_exp(row_max);
        threshold[task] = heap.threshold();
        last_kept[task] = heap.last_kept();
      }
      lse[task] = double(row_max) + log_double(row_sum);
    }
  }
}

// exp(s − lse) = exp(s − shift) · exp(shift − lse), shift = lse rounded to T: the first
// difference is exact near the top scores, the second factor restores lse's bits below T's
// precision (1 in float64). A thread per query.
template <typename T>
__global__ void probability_shift_kernel(const double* __restrict__ lse, int64_t count, T* __restrict__ shift,
                                         T* __restrict__ correction) {
  for (int64_t i = first_thread_task(); i < count; i += thread_task_stride()) {
    const T s = static_cast<T>(lse[i]);
    shift[i] = s;
    correction[i] = static_cast<T>(exp_double(double(s) - lse[i]));
  }
}

// D_p = Σ_m A_pm dP_pm with dP_pm = ⟨dO_p, V_m⟩, a warp per query, summed in double (its
// difference with dP_pm is taken next).
template <typename T>
__global__ void __launch_bounds__(kBlockThreads) query_delta_kernel(const Problem<T> pr, T* __restrict__ delta) {
  const int lane = lane_id();
  for (int64_t task = first_warp_task(); task < pr.batch * pr.n_queries; task += warp_task_stride()) {
    const int64_t b = task / pr.n_queries, p = task % pr.n_queries, py = p / pr.cols, px = p % pr.cols;
    const PixelMap<T> q = pr.query_map(b), g = pr.grad_map(b);
    const QueryRow<T> row = query_row(pr, b, p);
    double sum = 0.0;
    for (int l = 0; l < pr.levels.count; ++l) {
      const PixelMap<T> k = pr.key_map(b, l), v = pr.value_map(b, l);
      for (int64_t local = 0; local < k.rows * k.cols; ++local) {
        const int64_t m = pr.levels.first[l] + local, ky = local / k.cols, kx = local % k.cols;
        const T s = score_of(pr, q, py, px, k, ky, kx, pr.inverse_norm[b * pr.n_keys + m], lane);
        if (!row.kept(s, m, pr.dense)) continue;
        const T probability = row.probability(s);
        if (probability == T(0)) continue;
        sum += double(probability) * double(patch_dot(g, py, px, v, ky, kx, lane));
      }
    }
    if (lane == 0) delta[task] = static_cast<T>(sum);
  }
}

// A warp per query p: Σ_m w_pm X_m over the channels [c0, c0 + group) of the patches X, into
// scratch (B, N, 9, group). Forward: w = A_pm, X = the value patches. Backward (kGrad): the
// gradient of ⟨Q_p, K_m⟩, w = A_pm (dP_pm − D_p) · scale · r_m, X = the key patches.
template <typename T, bool kGrad>
__global__ void __launch_bounds__(kBlockThreads) query_patches_kernel(const Problem<T> pr, int64_t c0,
                                                                      int64_t group, T* __restrict__ scratch) {
  const int lane = lane_id();
  for (int64_t task = first_warp_task(); task < pr.batch * pr.n_queries; task += warp_task_stride()) {
    const int64_t b = task / pr.n_queries, p = task % pr.n_queries, py = p / pr.cols, px = p % pr.cols;
    const PixelMap<T> q = pr.query_map(b);
    const QueryRow<T> row = query_row(pr, b, p);
    T acc[kPatchElements][kSlots] = {};
    for (int l = 0; l < pr.levels.count; ++l) {
      const PixelMap<T> k = pr.key_map(b, l), v = pr.value_map(b, l);
      for (int64_t local = 0; local < k.rows * k.cols; ++local) {
        const int64_t m = pr.levels.first[l] + local, ky = local / k.cols, kx = local % k.cols;
        const T r = pr.inverse_norm[b * pr.n_keys + m];
        const T s = score_of(pr, q, py, px, k, ky, kx, r, lane);
        if (!row.kept(s, m, pr.dense)) continue;
        const T probability = row.probability(s);
        if (probability == T(0)) continue;
        if constexpr (kGrad) {
          const T grad_probability = patch_dot(pr.grad_map(b), py, px, v, ky, kx, lane);
          const T weight = probability * (grad_probability - row.delta) * pr.scale * r;
          accumulate_patch(acc, k, ky, kx, weight, c0, group, lane);
        } else {
          accumulate_patch(acc, v, ky, kx, probability, c0, group, lane);
        }
      }
    }
    store_patch(acc, scratch, task, group, lane);
  }
}

// A warp per key m: Σ_p w_pm Y_p over the channels [c0, c0 + group) of the query-side patches Y,
// into scratch (B, M, 9, group). dv (kGrad false): w = A_pm, Y = the output gradient's patches
// dO_p. dK̂ (kGrad): w = A_pm (dP_pm − D_p) · scale · r_m, Y = the query patches; and, when
// key_dot is given, c_m = Σ_p dS_pm s_pm (double) for the normalisation's gradient.
template <typename T, bool kGrad>
__global__ void __launch_bounds__(kBlockThreads) key_patches_kernel(const Problem<T> pr, int64_t c0, int64_t group,
                                                                    T* __restrict__ scratch,
                                                                    double* __restrict__ key_dot) {
  const int lane = lane_id();
  for (int64_t task = first_warp_task(); task < pr.batch * pr.n_keys; task += warp_task_stride()) {
    const int64_t b = task / pr.n_keys, m = task % pr.n_keys;
    const int l = pr.level_of(m);
    const PixelMap<T> k = pr.key_map(b, l), v = pr.value_map(b, l), q = pr.query_map(b), g = pr.grad_map(b);
    const int64_t local = m - pr.levels.first[l], ky = local / k.cols, kx = local % k.cols;
    const T r = pr.inverse_norm[task];
    T acc[kPatchElements][kSlots] = {};
    double dot = 0.0;
    for (int64_t p = 0; p < pr.n_queries; ++p) {
      const int64_t py = p / pr.cols, px = p % pr.cols;
      const QueryRow<T> row = query_row(pr, b, p);
      const T s = score_of(pr, q, py, px, k, ky, kx, r, lane);
      if (!row.kept(s, m, pr.dense)) continue;
      const T probability = row.probability(s);
      if (probability == T(0)) continue;
      if constexpr (kGrad) {
        const T grad_score = probability * (patch_dot(g, py, px, v, ky, kx, lane) - row.delta);
        dot += double(grad_score) * double(s);
        accumulate_patch(acc, q, py, px, grad_score * pr.scale * r, c0, group, lane);
      } else {
        accumulate_patch(acc, g, py, px, probability, c0, group, lane);
      }
    }
    store_patch(acc, scratch, task, group, lane);
    if (kGrad && key_dot != nullptr && lane == 0) key_dot[task] = dot;
  }
}

// The normalisation's gradient of one level's keys, applied by the fold: dk[:, y] −= k[:, y] ·
// Σ_{3×3} w with w_m = r_m² c_m (0 where the norm was clamped to key_eps). key == nullptr: none.
template <typename T>
struct NormalisationGrad {
  const T* key;           // the level's key map (B, Cq, rows, cols)
  const T* inverse_norm;  // (B, M)
  const double* key_dot;  // c_m, (B, M)
  T key_eps;
};

// out[b, c0 + c] (a (B, channels, rows, cols) map) = the fold of the group's patches of this
// map's owners in scratch (B, owners, 9, group), which start at owner `first_owner`. A thread per
// output element, the nine contributions in order.
template <typename T>
__global__ void fold_kernel(const T* __restrict__ scratch, int64_t owners, int64_t first_owner, int64_t batch,
                            int64_t rows, int64_t cols, int64_t channels, int64_t c0, int64_t group,
                            NormalisationGrad<T> norm, T* __restrict__ out) {
  const int64_t plane = rows * cols;
  for (int64_t task = first_thread_task(); task < batch * group * plane; task += thread_task_stride()) {
    const int64_t pixel = task % plane, c = (task / plane) % group, b = task / (plane * group);
    const int64_t y = pixel / cols, x = pixel % cols;
    const T* patches = scratch + (b * owners + first_owner) * kPatchElements * group + c;
    T value = fold_sum<T>(rows, cols, y, x,
                          [&](int64_t p, int delta) { return patches[(p * kPatchElements + delta) * group]; });
    const int64_t at = (b * channels + c0 + c) * plane + pixel;
    if (norm.key != nullptr) {
      const int64_t keys0 = b * owners + first_owner;
      const T weight = box_sum<T>(rows, cols, y, x, [&](int64_t i) {
        const T r = norm.inverse_norm[keys0 + i];
        return key_norm_clamped(r, norm.key_eps) ? T(0) : r * r * static_cast<T>(norm.key_dot[keys0 + i]);
      });
      value -= norm.key[at] * weight;
    }
    out[at] = value;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
unsigned blocks_for(int64_t threads) {
  return static_cast<unsigned>(std::clamp<int64_t>((threads + kBlockThreads - 1) / kBlockThreads, 1, kMaxBlocks));
}

// (B, C, H_l, W_l) maps as one pixel-major (B, Σ H_l·W_l, C) tensor, level after level.
Tensor pixel_major(at::TensorList maps) {
  std::vector<Tensor> parts;
  for (const Tensor& t : maps)
    parts.push_back(t.permute({0, 2, 3, 1}).reshape({t.size(0), t.size(2) * t.size(3), t.size(1)}));
  return at::cat(parts, 1).contiguous();
}

void check_cuda_operands(const Tensor& q, at::TensorList keys, at::TensorList values, int64_t topk) {
  check_operands(q, keys, values);
  TORCH_CHECK(q.is_cuda(), "patch_attention (CUDA): expected CUDA tensors, got ", q.device());
  TORCH_CHECK(q.numel() > 0 && values[0].size(1) > 0, "patch_attention (CUDA): expected non-empty q and values");
  for (size_t l = 0; l < keys.size(); ++l)
    TORCH_CHECK(keys[l].size(2) > 0 && keys[l].size(3) > 0, "keys[", l, "]: expected a non-empty map");
  TORCH_CHECK(static_cast<int64_t>(keys.size()) <= kMaxLevels, "patch_attention (CUDA): at most ", kMaxLevels,
              " levels, got ", keys.size());
  const int64_t n_keys = key_count(keys);
  TORCH_CHECK(topk >= 0 && topk <= n_keys, "topk: expected 0 (dense) or 1..", n_keys, ", got ", topk);
  TORCH_CHECK(topk <= kMaxTopK, "patch_attention (CUDA): topk of at most ", kMaxTopK,
              " (the per-query heap), got ", topk);
}

template <typename T>
Problem<T> problem_of(const Tensor& q, at::TensorList keys, at::TensorList values, double scale, int64_t topk) {
  Problem<T> pr{};
  pr.batch = q.size(0);
  pr.rows = q.size(2);
  pr.cols = q.size(3);
  pr.n_queries = pr.rows * pr.cols;
  pr.n_keys = key_count(keys);
  pr.cq = q.size(1);
  pr.cv = values[0].size(1);
  pr.levels.count = static_cast<int>(keys.size());
  int64_t first = 0;
  for (size_t l = 0; l < keys.size(); ++l) {
    pr.levels.rows[l] = keys[l].size(2);
    pr.levels.cols[l] = keys[l].size(3);
    pr.levels.first[l] = first;
    first += keys[l].size(2) * keys[l].size(3);
  }
  pr.scale = static_cast<T>(scale);
  pr.dense = topk == 0;
  return pr;
}

// The query statistics' shift and correction (see probability_shift_kernel), set into pr.
template <typename T>
std::pair<Tensor, Tensor> probability_shifts(Problem<T>& pr, const Tensor& lse, cudaStream_t stream) {
  Tensor shift = at::empty(lse.sizes(), lse.options().dtype(c10::CppTypeToScalarType<T>::value));
  Tensor correction = at::empty_like(shift);
  probability_shift_kernel<T><<<blocks_for(lse.numel()), kBlockThreads, 0, stream>>>(
      lse.const_data_ptr<double>(), lse.numel(), shift.mutable_data_ptr<T>(), correction.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  pr.shift = shift.const_data_ptr<T>();
  pr.correction = correction.const_data_ptr<T>();
  return {shift, correction};
}

// Patches of `channels` channels per owner, accumulated kGroupChannels at a time by `accumulate`
// (c0, group, scratch) into a scratch (B, owners, 9, group) and folded by `fold` (c0, group,
// scratch) after each group.
template <typename T, typename Accumulate, typename Fold>
void by_channel_groups(const Tensor& like, int64_t batch, int64_t owners, int64_t channels, Accumulate accumulate,
                       Fold fold) {
  const int64_t width = std::min(channels, kGroupChannels);
  Tensor scratch = at::empty({batch, owners, kPatchElements, width}, like.options());
  for (int64_t c0 = 0; c0 < channels; c0 += kGroupChannels) {
    const int64_t group = std::min(kGroupChannels, channels - c0);
    accumulate(c0, group, scratch.mutable_data_ptr<T>());
    fold(c0, group, scratch.const_data_ptr<T>());
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward_cuda(const Tensor& q_in, at::TensorList keys_in,
                                                                 at::TensorList values_in, double scale, int64_t topk,
                                                                 double key_eps) {
  check_cuda_operands(q_in, keys_in, values_in, topk);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor q = pixel_major({q_in}), keys = pixel_major(keys_in), values = pixel_major(values_in);
  const int64_t batch = q_in.size(0), n_queries = q_in.size(2) * q_in.size(3), n_keys = key_count(keys_in);
  const int64_t cv = values_in[0].size(1);
  Tensor out = at::empty({batch, cv, q_in.size(2), q_in.size(3)}, q_in.options());
  Tensor inverse_norm = at::empty({batch, n_keys}, q_in.options());
  Tensor lse = at::empty({batch, n_queries}, q_in.options().dtype(at::kDouble));
  Tensor threshold = at::empty({batch, n_queries}, q_in.options());
  Tensor last_kept = at::empty({batch, n_queries}, q_in.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(q_in.scalar_type(), "patch_attention_forward_cuda", [&] {
    using T = scalar_t;
    Problem<T> pr = problem_of<T>(q_in, keys_in, values_in, scale, topk);
    pr.q = q.const_data_ptr<T>();
    pr.keys = keys.const_data_ptr<T>();
    pr.values = values.const_data_ptr<T>();
    inverse_norms_kernel<T><<<blocks_for(batch * n_keys), kBlockThreads, 0, stream>>>(
        pr, static_cast<T>(key_eps), inverse_norm.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pr.inverse_norm = inverse_norm.const_data_ptr<T>();
    const unsigned query_blocks = blocks_for(batch * n_queries * kWarp);
    query_statistics_kernel<T><<<query_blocks, kBlockThreads, 0, stream>>>(
        pr, topk, lse.mutable_data_ptr<double>(), threshold.mutable_data_ptr<T>(),
        last_kept.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pr.threshold = threshold.const_data_ptr<T>();
    pr.last_kept = last_kept.const_data_ptr<int64_t>();
    const auto shifts = probability_shifts(pr, lse, stream);
    by_channel_groups<T>(
        q, batch, n_queries, cv,
        [&](int64_t c0, int64_t group, T* scratch) {
          query_patches_kernel<T, false><<<query_blocks, kBlockThreads, 0, stream>>>(pr, c0, group, scratch);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        },
        [&](int64_t c0, int64_t group, const T* scratch) {
          fold_kernel<T><<<blocks_for(batch * group * n_queries), kBlockThreads, 0, stream>>>(
              scratch, n_queries, 0, batch, pr.rows, pr.cols, cv, c0, group, NormalisationGrad<T>{},
              out.mutable_data_ptr<T>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  });
  return {out, inverse_norm, lse, threshold, last_kept};
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> backward_cuda(
    const Tensor& grad_out_in, const Tensor& q_in, at::TensorList keys_in, at::TensorList values_in,
    const Tensor& inverse_norm_in, const Tensor& lse_in, const Tensor& threshold_in, const Tensor& last_kept_in,
    double scale, int64_t topk, double key_eps) {
  check_cuda_operands(q_in, keys_in, values_in, topk);
  check_grad_out(grad_out_in, q_in, values_in);
  check_statistics(q_in, key_count(keys_in), inverse_norm_in, lse_in, threshold_in, last_kept_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor q = pixel_major({q_in}), keys = pixel_major(keys_in), values = pixel_major(values_in);
  const Tensor grad = pixel_major({grad_out_in.to(q_in.scalar_type())});
  const std::vector<Tensor> key_maps = contiguous_all(keys_in);
  const Tensor inverse_norm = inverse_norm_in.contiguous(), lse = lse_in.contiguous(),
               threshold = threshold_in.contiguous(), last_kept = last_kept_in.contiguous();
  const int64_t batch = q_in.size(0), n_queries = q_in.size(2) * q_in.size(3), n_keys = key_count(keys_in);
  const int64_t cq = q_in.size(1), cv = values_in[0].size(1);
  Tensor grad_q = at::empty(q_in.sizes(), q_in.options());
  std::vector<Tensor> grad_keys, grad_values;
  for (size_t l = 0; l < keys_in.size(); ++l) {
    grad_keys.push_back(at::empty(keys_in[l].sizes(), keys_in[l].options()));
    grad_values.push_back(at::empty(values_in[l].sizes(), values_in[l].options()));
  }
  AT_DISPATCH_FLOATING_TYPES(q_in.scalar_type(), "patch_attention_backward_cuda", [&] {
    using T = scalar_t;
    Problem<T> pr = problem_of<T>(q_in, keys_in, values_in, scale, topk);
    pr.q = q.const_data_ptr<T>();
    pr.keys = keys.const_data_ptr<T>();
    pr.values = values.const_data_ptr<T>();
    pr.grad = grad.const_data_ptr<T>();
    pr.inverse_norm = inverse_norm.const_data_ptr<T>();
    pr.threshold = threshold.const_data_ptr<T>();
    pr.last_kept = last_kept.const_data_ptr<int64_t>();
    const auto shifts = probability_shifts(pr, lse, stream);
    const unsigned query_blocks = blocks_for(batch * n_queries * kWarp);
    const unsigned key_blocks = blocks_for(batch * n_keys * kWarp);

    Tensor delta = at::empty({batch, n_queries}, q_in.options());
    query_delta_kernel<T><<<query_blocks, kBlockThreads, 0, stream>>>(pr, delta.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pr.delta = delta.const_data_ptr<T>();

    // dq: a warp per query, folded onto q's map.
    by_channel_groups<T>(
        q, batch, n_queries, cq,
        [&](int64_t c0, int64_t group, T* scratch) {
          query_patches_kernel<T, true><<<query_blocks, kBlockThreads, 0, stream>>>(pr, c0, group, scratch);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        },
        [&](int64_t c0, int64_t group, const T* scratch) {
          fold_kernel<T><<<blocks_for(batch * group * n_queries), kBlockThreads, 0, stream>>>(
              scratch, n_queries, 0, batch, pr.rows, pr.cols, cq, c0, group, NormalisationGrad<T>{},
              grad_q.mutable_data_ptr<T>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });

    // dk, dv: a warp per key, folded onto each level's map; c_m comes with dk's first group.
    auto fold_levels = [&](std::vector<Tensor>& grads, int64_t channels, int64_t c0, int64_t group, const T* scratch,
                           bool normalisation, const double* key_dot) {
      for (int l = 0; l < pr.levels.count; ++l) {
        const NormalisationGrad<T> norm =
            normalisation ? NormalisationGrad<T>{key_maps[l].const_data_ptr<T>(), pr.inverse_norm, key_dot,
                                                 static_cast<T>(key_eps)}
                          : NormalisationGrad<T>{};
        const int64_t plane = pr.levels.rows[l] * pr.levels.cols[l];
        fold_kernel<T><<<blocks_for(batch * group * plane), kBlockThreads, 0, stream>>>(
            scratch, n_keys, pr.levels.first[l], batch, pr.levels.rows[l], pr.levels.cols[l], channels, c0, group,
            norm, grads[l].mutable_data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    by_channel_groups<T>(
        q, batch, n_keys, cv,
        [&](int64_t c0, int64_t group, T* scratch) {
          key_patches_kernel<T, false><<<key_blocks, kBlockThreads, 0, stream>>>(pr, c0, group, scratch, nullptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        },
        [&](int64_t c0, int64_t group, const T* scratch) {
          fold_levels(grad_values, cv, c0, group, scratch, false, nullptr);
        });
    Tensor key_dot = at::empty({batch, n_keys}, q_in.options().dtype(at::kDouble));
    by_channel_groups<T>(
        q, batch, n_keys, cq,
        [&](int64_t c0, int64_t group, T* scratch) {
          key_patches_kernel<T, true><<<key_blocks, kBlockThreads, 0, stream>>>(
              pr, c0, group, scratch, c0 == 0 ? key_dot.mutable_data_ptr<double>() : nullptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        },
        [&](int64_t c0, int64_t group, const T* scratch) {
          fold_levels(grad_keys, cq, c0, group, scratch, true, key_dot.const_data_ptr<double>());
        });
  });
  return {grad_q, grad_keys, grad_values};
}

}  // namespace
}  // namespace patch
}  // namespace sparse_attn

TORCH_LIBRARY_IMPL(sparse_attn, CUDA, m) {
  m.impl("patch_attention_forward", &sparse_attn::patch::forward_cuda);
  m.impl("patch_attention_backward", &sparse_attn::patch::backward_cuda);
}
