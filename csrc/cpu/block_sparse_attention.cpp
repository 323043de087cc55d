// CPU kernels of block-sparse region attention (DESIGN.md §4); the online-softmax and gradient
// math in csrc/common/block_sparse_attention.h.
//
// Forward: one task per (image·head, query region): the region's queries are copied pixel-major,
// then for each of its t key regions the keys (channel-major) and values (pixel-major) are copied
// and every query row takes the block's scores, folds them into its running maximum and sum
// (online softmax) and adds the weighted values. No score outlives its key block.
// Backward, deterministic and without atomics: D = ⟨dout, out⟩ per pixel first; then one task per
// (image·head, query region) recomputes the probabilities of its key blocks from the saved
// log-sum-exp and sums dq; then one task per (image·head, key region) walks the query regions that
// read it (the inverse index, in ascending order) and sums dk and dv. Every output element is
// written by one task, in a fixed order, whatever the number of threads.
// Inner loops run over the pixels of a region (scores) or the channels (values, gradients), so
// that the compiler vectorises them; on x86 the tasks are compiled a second time for AVX2+FMA and
// picked at run time. The float exponential is a vectorisable polynomial (Cephes' expf, ~1 ulp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "common/block_sparse_attention.h"
#include "common/block_sparse_attention_args.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define BSA_HAS_AVX2_CLONE 1
#define BSA_AVX2 __attribute__((target("avx2,fma")))
#endif
#if defined(__GNUC__)
#define BSA_INLINE inline __attribute__((always_inline))
#else
#define BSA_INLINE inline
#endif

namespace sparse_attn {
namespace bsa {
namespace {

using at::Tensor;

// exp(x) for the softmax, x <= 0 (a score minus a maximum at least as large). float: Cephes'
// expf (Cody–Waite reduction, degree-6 polynomial), branch-free so that loops over it vectorise;
// x below −87 gives ~1e-38 instead of 0, which no sum of probabilities >= 1 notices.
template <typename T>
BSA_INLINE T exp_nonpositive(T x) {
  return std::exp(x);
}

template <>
BSA_INLINE float exp_nonpositive<float>(float x) {
  x = x < -87.0f ? -87.0f : x;
  // n = round(x / ln 2) by the 1.5·2^23 trick (no rounding instruction needed for vectors)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &bits, sizeof(two_to_n));
  return p * two_to_n;
}

template <typename T>
struct Problem {
  const T *q, *k, *v;           // (groups, d, plane)
  const int64_t* key_blocks;    // (groups, R, t)
  RegionGeometry geometry;
  int64_t d, t, plane;
  T scale;
  int64_t pixels() const { return geometry.pixels(); }
};

// Copies of one region of a (d, plane) map: channel-major (d × P) and pixel-major (P × d).
template <typename T>
BSA_INLINE void load_channel_major(const Problem<T>& pr, const T* map, int64_t region, T* __restrict dst) {
  const RegionGeometry& g = pr.geometry;
  for (int64_t c = 0; c < pr.d; ++c)
    for (int64_t row = 0; row < g.region_h; ++row)
      std::memcpy(dst + c * g.pixels() + row * g.region_w, map + c * pr.plane + g.row_offset(region, row),
                  g.region_w * sizeof(T));
}

template <typename T>
BSA_INLINE void load_pixel_major(const Problem<T>& pr, const T* map, int64_t region, T* __restrict dst) {
  const RegionGeometry& g = pr.geometry;
  for (int64_t c = 0; c < pr.d; ++c)
    for (int64_t row = 0; row < g.region_h; ++row) {
      const T* src = map + c * pr.plane + g.row_offset(region, row);
      for (int64_t x = 0; x < g.region_w; ++x) dst[(row * g.region_w + x) * pr.d + c] = src[x];
    }
}

template <typename T>
BSA_INLINE void store_pixel_major(const Problem<T>& pr, const T* __restrict src, int64_t region, T* map) {
  const RegionGeometry& g = pr.geometry;
  for (int64_t c = 0; c < pr.d; ++c)
    for (int64_t row = 0; row < g.region_h; ++row) {
      T* dst = map + c * pr.plane + g.row_offset(region, row);
      for (int64_t x = 0; x < g.region_w; ++x) dst[x] = src[(row * g.region_w + x) * pr.d + c];
    }
}

template <typename T>
BSA_INLINE void store_channel_major(const Problem<T>& pr, const T* __restrict src, int64_t region, T* map) {
  const RegionGeometry& g = pr.geometry;
  for (int64_t c = 0; c < pr.d; ++c)
    for (int64_t row = 0; row < g.region_h; ++row)
      std::memcpy(map + c * pr.plane + g.row_offset(region, row), src + c * g.pixels() + row * g.region_w,
                  g.region_w * sizeof(T));
}

// scores[j] = scale·Σ_c row[c]·keys[c][j] over the P pixels j of a channel-major block.
template <typename T>
BSA_INLINE void row_times_block(const T* __restrict row, const T* __restrict block, int64_t d, int64_t pixels,
                                T scale, T* __restrict scores) {
  for (int64_t j = 0; j < pixels; ++j) scores[j] = T(0);
  for (int64_t c = 0; c < d; ++c) {
    const T a = row[c];
    const T* __restrict bc = block + c * pixels;
    for (int64_t j = 0; j < pixels; ++j) scores[j] += a * bc[j];
  }
  for (int64_t j = 0; j < pixels; ++j) scores[j] *= scale;
}

// acc[c] += Σ_j weights[j]·block[j][c] over a pixel-major block.
template <typename T>
BSA_INLINE void weights_times_block(const T* __restrict weights, const T* __restrict block, int64_t d,
                                    int64_t pixels, T* __restrict acc) {
  for (int64_t j = 0; j < pixels; ++j) {
    const T w = weights[j];
    const T* __restrict bj = block + j * d;
    for (int64_t c = 0; c < d; ++c) acc[c] += w * bj[c];
  }
}

// acc[c][j] += a[c]·weights[j]: a rank-one update of a channel-major block.
template <typename T>
BSA_INLINE void add_outer(const T* __restrict a, const T* __restrict weights, int64_t d, int64_t pixels,
                          T* __restrict acc) {
  for (int64_t c = 0; c < d; ++c) {
    const T ac = a[c];
    T* __restrict row = acc + c * pixels;
    for (int64_t j = 0; j < pixels; ++j) row[j] += ac * weights[j];
  }
}

// Per-task scratch: sized once per chunk of tasks.
template <typename T>
struct Scratch {
  std::vector<T> buffer;
  T* take(int64_t n, int64_t& used) {
    T* p = buffer.data() + used;
    used += n;
    return p;
  }
};

// ---------------------------------------------------------------------------------------------
// Forward: one (group, query region)
// ---------------------------------------------------------------------------------------------
template <typename T>
BSA_INLINE void forward_task(const Problem<T>& pr, int64_t task, T* out, T* lse, T* scratch) {
  const int64_t regions = pr.geometry.regions(), P = pr.pixels(), d = pr.d;
  const int64_t group = task / regions, region = task % regions;
  const int64_t map = group * d * pr.plane;
  T* q = scratch;              // P × d
  T* keys = q + P * d;         // d × P
  T* values = keys + d * P;    // P × d
  T* acc = values + P * d;     // P × d
  T* scores = acc + P * d;     // P
  T* row_max = scores + P;     // P
  T* row_sum = row_max + P;    // P
  load_pixel_major(pr, pr.q + map, region, q);
  std::fill(acc, acc + P * d, T(0));
  std::fill(row_max, row_max + P, -std::numeric_limits<T>::infinity());
  std::fill(row_sum, row_sum + P, T(0));
  const int64_t* blocks = pr.key_blocks + (group * regions + region) * pr.t;
  for (int64_t slot = 0; slot < pr.t; ++slot) {
    load_channel_major(pr, pr.k + map, blocks[slot], keys);
    load_pixel_major(pr, pr.v + map, blocks[slot], values);
    for (int64_t i = 0; i < P; ++i) {
      row_times_block(q + i * d, keys, d, P, pr.scale, scores);
      T block_max = scores[0];
      for (int64_t j = 1; j < P; ++j) block_max = scores[j] > block_max ? scores[j] : block_max;
      const T new_max = row_max[i] > block_max ? row_max[i] : block_max;
      const T alpha = rescale_factor(row_max[i], new_max, exp_nonpositive<T>);
      T sum = T(0);
      for (int64_t j = 0; j < P; ++j) {
        scores[j] = exp_nonpositive<T>(scores[j] - new_max);
        sum += scores[j];
      }
      row_sum[i] = alpha * row_sum[i] + sum;
      row_max[i] = new_max;
      T* __restrict acc_i = acc + i * d;
      for (int64_t c = 0; c < d; ++c) acc_i[c] *= alpha;
      weights_times_block(scores, values, d, P, acc_i);
    }
  }
  for (int64_t i = 0; i < P; ++i) {
    const T inverse = T(1) / row_sum[i];
    for (int64_t c = 0; c < d; ++c) acc[i * d + c] *= inverse;
    lse[group * pr.plane + pr.geometry.offset(region, i)] = log_sum_exp(row_max[i], row_sum[i]);
  }
  store_pixel_major(pr, acc, region, out + map);
}

template <typename T>
int64_t forward_scratch_size(const Problem<T>& pr) {
  return 4 * pr.pixels() * pr.d + 3 * pr.pixels();
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Gradients {
  const T *grad_out, *out, *lse, *delta;  // delta: (groups, plane), D = ⟨dout, out⟩ per pixel
  T *grad_q, *grad_k, *grad_v;
};

// dq of one (group, query region): its key blocks in order.
template <typename T>
BSA_INLINE void grad_q_task(const Problem<T>& pr, const Gradients<T>& gr, int64_t task, T* scratch) {
  const int64_t regions = pr.geometry.regions(), P = pr.pixels(), d = pr.d;
  const int64_t group = task / regions, region = task % regions;
  const int64_t map = group * d * pr.plane;
  T* q = scratch;                    // P × d
  T* grad_out = q + P * d;           // P × d
  T* keys = grad_out + P * d;        // d × P
  T* keys_pm = keys + d * P;         // P × d
  T* values = keys_pm + P * d;       // d × P
  T* grad_q = values + d * P;        // P × d
  T* probs = grad_q + P * d;         // P
  T* dp = probs + P;                 // P
  T* lse = dp + P;                   // P
  T* delta = lse + P;                // P
  load_pixel_major(pr, pr.q + map, region, q);
  load_pixel_major(pr, gr.grad_out + map, region, grad_out);
  for (int64_t i = 0; i < P; ++i) {
    const int64_t at = group * pr.plane + pr.geometry.offset(region, i);
    lse[i] = gr.lse[at];
    delta[i] = gr.delta[at];
  }
  std::fill(grad_q, grad_q + P * d, T(0));
  const int64_t* blocks = pr.key_blocks + (group * regions + region) * pr.t;
  for (int64_t slot = 0; slot < pr.t; ++slot) {
    load_channel_major(pr, pr.k + map, blocks[slot], keys);
    load_pixel_major(pr, pr.k + map, blocks[slot], keys_pm);
    load_channel_major(pr, pr.v + map, blocks[slot], values);
    for (int64_t i = 0; i < P; ++i) {
      row_times_block(q + i * d, keys, d, P, pr.scale, probs);
      row_times_block(grad_out + i * d, values, d, P, T(1), dp);
      for (int64_t j = 0; j < P; ++j)
        dp[j] = pr.scale * score_grad(exp_nonpositive<T>(probs[j] - lse[i]), dp[j], delta[i]);
      weights_times_block(dp, keys_pm, d, P, grad_q + i * d);
    }
  }
  store_pixel_major(pr, grad_q, region, gr.grad_q + map);
}

template <typename T>
int64_t grad_q_scratch_size(const Problem<T>& pr) {
  return 6 * pr.pixels() * pr.d + 4 * pr.pixels();
}

// dk, dv of one (group, key region): the query regions that read it, in ascending order.
template <typename T>
BSA_INLINE void grad_kv_task(const Problem<T>& pr, const Gradients<T>& gr, const int64_t* offsets,
                             const int64_t* readers, int64_t task, T* scratch) {
  const int64_t regions = pr.geometry.regions(), P = pr.pixels(), d = pr.d;
  const int64_t group = task / regions, region = task % regions;
  const int64_t map = group * d * pr.plane;
  T* keys = scratch;                 // d × P
  T* values = keys + d * P;          // d × P
  T* grad_k = values + d * P;        // d × P
  T* grad_v = grad_k + d * P;        // d × P
  T* q = grad_v + d * P;             // P × d
  T* grad_out = q + P * d;           // P × d
  T* probs = grad_out + P * d;       // P
  T* dp = probs + P;                 // P
  T* lse = dp + P;                   // P
  T* delta = lse + P;                // P
  T* scaled_q = delta + P;           // d
  load_channel_major(pr, pr.k + map, region, keys);
  load_channel_major(pr, pr.v + map, region, values);
  std::fill(grad_k, grad_k + 2 * d * P, T(0));  // grad_k and grad_v
  for (int64_t n = offsets[task]; n < offsets[task + 1]; ++n) {
    const int64_t reader = readers[n];
    load_pixel_major(pr, pr.q + map, reader, q);
    load_pixel_major(pr, gr.grad_out + map, reader, grad_out);
    for (int64_t i = 0; i < P; ++i) {
      const int64_t at = group * pr.plane + pr.geometry.offset(reader, i);
      lse[i] = gr.lse[at];
      delta[i] = gr.delta[at];
    }
    for (int64_t i = 0; i < P; ++i) {
      row_times_block(q + i * d, keys, d, P, pr.scale, probs);
      row_times_block(grad_out + i * d, values, d, P, T(1), dp);
      for (int64_t j = 0; j < P; ++j) {
        probs[j] = exp_nonpositive<T>(probs[j] - lse[i]);
        dp[j] = score_grad(probs[j], dp[j], delta[i]);
      }
      add_outer(grad_out + i * d, probs, d, P, grad_v);
      for (int64_t c = 0; c < d; ++c) scaled_q[c] = pr.scale * q[i * d + c];
      add_outer(scaled_q, dp, d, P, grad_k);
    }
  }
  store_channel_major(pr, grad_k, region, gr.grad_k + map);
  store_channel_major(pr, grad_v, region, gr.grad_v + map);
}

template <typename T>
int64_t grad_kv_scratch_size(const Problem<T>& pr) {
  return 6 * pr.pixels() * pr.d + 4 * pr.pixels() + pr.d;
}

// ---------------------------------------------------------------------------------------------
// Run-time choice of the instruction set, and the task loops
// ---------------------------------------------------------------------------------------------
#ifdef BSA_HAS_AVX2_CLONE
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
template <typename T>
BSA_AVX2 void forward_task_avx2(const Problem<T>& pr, int64_t task, T* out, T* lse, T* scratch) {
  forward_task(pr, task, out, lse, scratch);
}
template <typename T>
BSA_AVX2 void grad_q_task_avx2(const Problem<T>& pr, const Gradients<T>& gr, int64_t task, T* scratch) {
  grad_q_task(pr, gr, task, scratch);
}
template <typename T>
BSA_AVX2 void grad_kv_task_avx2(const Problem<T>& pr, const Gradients<T>& gr, const int64_t* offsets,
                                const int64_t* readers, int64_t task, T* scratch) {
  grad_kv_task(pr, gr, offsets, readers, task, scratch);
}
#define BSA_RUN(task_fn, ...)                   \
  if (cpu_has_avx2()) {                         \
    task_fn##_avx2(__VA_ARGS__);                \
  } else {                                      \
    task_fn(__VA_ARGS__);                       \
  }
#else
#define BSA_RUN(task_fn, ...) task_fn(__VA_ARGS__);
#endif

// Tasks per parallel chunk: small problems (gradcheck, tests) run on the calling thread.
int64_t grain_of(const Operands& o) {
  const int64_t work = o.t * o.geometry.pixels() * o.geometry.pixels() * o.d;
  return std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, work));
}

template <typename T>
Problem<T> problem_of(const Operands& o, double scale) {
  return {o.q.const_data_ptr<T>(), o.k.const_data_ptr<T>(), o.v.const_data_ptr<T>(),
          o.key_blocks.const_data_ptr<int64_t>(), o.geometry, o.d, o.t, o.plane(), static_cast<T>(scale)};
}

// The kernels read k and v at these indices: out of range is an error, not a wild read.
void check_indices(const Operands& o) {
  const int64_t regions = o.geometry.regions();
  const int64_t* p = o.key_blocks.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < o.key_blocks.numel(); ++n)
    TORCH_CHECK(p[n] >= 0 && p[n] < regions, "key_blocks: indices must lie in 0..R-1 = 0..", regions - 1,
                ", got ", p[n]);
}

// The CPU kernels accumulate in the input dtype (float32 or float64), which is the accumulation
// dtype of DESIGN.md for the dtypes they take.
std::tuple<Tensor, Tensor> forward_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                       const Tensor& key_blocks_in, int64_t region_h, int64_t region_w,
                                       double scale) {
  const Operands o = forward_operands(q_in, k_in, v_in, key_blocks_in, region_h, region_w);
  TORCH_CHECK(o.q.scalar_type() == at::kFloat || o.q.scalar_type() == at::kDouble,
              "block_sparse_attention_forward (CPU): expected float32 or float64, got ", o.q.scalar_type());
  check_indices(o);
  Tensor out = at::empty_like(o.q);
  Tensor lse = at::empty({q_in.size(0), q_in.size(1), o.geometry.height, o.geometry.width},
                         o.q.options().dtype(accumulation_dtype(o.q)));
  const int64_t tasks = o.groups * o.geometry.regions();
  AT_DISPATCH_FLOATING_TYPES(o.q.scalar_type(), "block_sparse_attention_forward_cpu", [&] {
    const Problem<scalar_t> pr = problem_of<scalar_t>(o, scale);
    scalar_t *out_p = out.mutable_data_ptr<scalar_t>(), *lse_p = lse.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, tasks, grain_of(o), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(forward_scratch_size(pr));
      for (int64_t task = begin; task < end; ++task) {
        BSA_RUN(forward_task, pr, task, out_p, lse_p, scratch.data())
      }
    });
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& grad_out_in, const Tensor& q_in, const Tensor& k_in,
                                                const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
                                                const Tensor& key_blocks_in, int64_t region_h, int64_t region_w,
                                                double scale) {
  const Operands o = backward_operands(grad_out_in, q_in, k_in, v_in, out_in, lse_in, key_blocks_in, region_h,
                                       region_w);
  TORCH_CHECK(o.q.scalar_type() == at::kFloat || o.q.scalar_type() == at::kDouble,
              "block_sparse_attention_backward (CPU): expected float32 or float64, got ", o.q.scalar_type());
  check_indices(o);
  const int64_t regions = o.geometry.regions(), tasks = o.groups * regions;
  const InverseIndex inverse = inverse_index(o.key_blocks, o.groups, regions, o.t);
  // D = ⟨dout, out⟩ per pixel: (groups, plane), summed over the channels in one order.
  const Tensor delta = (o.grad_out * o.out).sum(2).contiguous();
  Tensor grad_q = at::empty_like(o.q), grad_k = at::empty_like(o.k), grad_v = at::empty_like(o.v);
  AT_DISPATCH_FLOATING_TYPES(o.q.scalar_type(), "block_sparse_attention_backward_cpu", [&] {
    const Problem<scalar_t> pr = problem_of<scalar_t>(o, scale);
    const Gradients<scalar_t> gr{o.grad_out.const_data_ptr<scalar_t>(), o.out.const_data_ptr<scalar_t>(),
                                 o.lse.const_data_ptr<scalar_t>(), delta.const_data_ptr<scalar_t>(),
                                 grad_q.mutable_data_ptr<scalar_t>(), grad_k.mutable_data_ptr<scalar_t>(),
                                 grad_v.mutable_data_ptr<scalar_t>()};
    const int64_t *offsets = inverse.offsets.const_data_ptr<int64_t>(),
                  *readers = inverse.readers.const_data_ptr<int64_t>();
    at::parallel_for(0, tasks, grain_of(o), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(grad_q_scratch_size(pr));
      for (int64_t task = begin; task < end; ++task) {
        BSA_RUN(grad_q_task, pr, gr, task, scratch.data())
      }
    });
    at::parallel_for(0, tasks, grain_of(o), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(grad_kv_scratch_size(pr));
      for (int64_t task = begin; task < end; ++task) {
        BSA_RUN(grad_kv_task, pr, gr, offsets, readers, task, scratch.data())
      }
    });
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace bsa
}  // namespace sparse_attn

TORCH_LIBRARY_IMPL(sparse_attn, CPU, m) {
  m.impl("block_sparse_attention_forward", &sparse_attn::bsa::forward_cpu);
  m.impl("block_sparse_attention_backward", &sparse_attn::bsa::backward_cpu);
}
