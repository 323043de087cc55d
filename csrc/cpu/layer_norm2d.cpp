// CPU kernels of the channel LayerNorm (DESIGN.md §5); per-pixel math in csrc/common/layer_norm2d.h.
//
// NCHW keeps one channel of a row of pixels contiguous, so the kernels work on blocks of kBlock
// neighbouring pixels of one image and walk the channels: every inner loop runs along the block
// (vectorised), and the block's C x kBlock values stay in cache between the passes.
// Forward: per block, the channel sums (mean), the squared deviations (rstd), then the output.
// The block's C rows are C separate streams a plane apart, too many for the hardware prefetcher
// to follow, so the first pass over a block asks for the rows of a block kPrefetchAhead further on
// (and the output pass for the output rows there, to write): without it the first touch of every
// row waits for memory (about a tenth of the forward time at 48 x 256², one thread). The backward does the
// same for x and grad_out, and for grad_x.
// Backward: per block, the channel sums of g and g·ŷ, then dx; the weight and bias gradients are
// summed per task (a fixed run of kChunk pixels of one image) into a row of partials and the rows
// are added in order afterwards, so every result is independent of the number of threads.
// On x86 the tasks are compiled for AVX2 and AVX-512 too and picked at run time (cpu/isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common/layer_norm2d.h"
#include "common/layer_norm2d_args.h"
#include "cpu/isa.h"

#if defined(__GNUC__)
#define LN2D_INLINE inline __attribute__((always_inline))
#else
#define LN2D_INLINE inline
#endif

namespace sparse_attn {
namespace ln2d {
namespace {

using at::Tensor;

constexpr int64_t kBlock = 64;     // pixels walked together through the channels
constexpr int64_t kChunk = 2048;   // pixels per task (a multiple of kBlock)
constexpr int64_t kLanes = 8;      // running sums of the weight-gradient reductions
constexpr int64_t kPrefetchAhead = 2 * kBlock;  // pixels ahead that a block's passes prefetch

struct Geometry {
  int64_t batch, channels, plane;
  int64_t chunks() const { return (plane + kChunk - 1) / kChunk; }
  int64_t tasks() const { return batch * chunks(); }
};

// Tasks per parallel chunk: small images (gradcheck, tests) run on the calling thread.
int64_t grain_of(const Geometry& g) {
  constexpr int64_t kValuesPerChunk = 1 << 16;
  return std::max<int64_t>(1, kValuesPerChunk / (std::min(g.plane, kChunk) * g.channels));
}

// Asks for the cache lines of one channel's row of a block (kBlock values from `row`); a hint
// only (it never faults, so a row past the end of the tensor is harmless).
template <typename T>
LN2D_INLINE void prefetch_row(const T* row, bool for_write) {
#if defined(__GNUC__)
  constexpr int64_t kLineValues = 64 / sizeof(T);
  for (int64_t l = 0; l < kBlock; l += kLineValues) {
    if (for_write)
      __builtin_prefetch(row + l, 1);
    else
      __builtin_prefetch(row + l, 0);
  }
#endif
}

template <typename T>
struct Params {
  const T *weight, *bias;
  T eps;
};

// One block of n <= kBlock pixels starting at `x` (channel stride `plane`).
template <typename T>
LN2D_INLINE void forward_block(const Geometry& g, const Params<T>& p, const T* __restrict x, T* __restrict out,
                               T* __restrict mean_out, T* __restrict rstd_out, int64_t n) {
  T sum[kBlock] = {}, mean[kBlock], rstd[kBlock];
  for (int64_t c = 0; c < g.channels; ++c) {
    const T* __restrict xc = x + c * g.plane;
    prefetch_row(xc + kPrefetchAhead, false);
    for (int64_t j = 0; j < n; ++j) sum[j] += xc[j];
  }
  for (int64_t j = 0; j < n; ++j) {
    mean[j] = sum[j] / T(g.channels);
    sum[j] = T(0);
  }
  for (int64_t c = 0; c < g.channels; ++c) {
    const T* __restrict xc = x + c * g.plane;
    for (int64_t j = 0; j < n; ++j) {
      const T d = xc[j] - mean[j];
      sum[j] += d * d;
    }
  }
  for (int64_t j = 0; j < n; ++j) rstd[j] = inverse_std(sum[j], static_cast<int>(g.channels), p.eps);
  const bool centred = p.bias != nullptr;
  for (int64_t c = 0; c < g.channels; ++c) {
    const T* __restrict xc = x + c * g.plane;
    T* __restrict oc = out + c * g.plane;
    const T w = p.weight[c], b = centred ? p.bias[c] : T(0);
    prefetch_row(oc + kPrefetchAhead, true);
    for (int64_t j = 0; j < n; ++j) oc[j] = normalised(xc[j], mean[j], rstd[j], centred) * w + b;
  }
  std::copy(mean, mean + n, mean_out);
  std::copy(rstd, rstd + n, rstd_out);
}

template <typename T>
LN2D_INLINE void forward_task(const Geometry& g, const Params<T>& p, const T* x, T* out, T* mean, T* rstd,
                              int64_t task) {
  const int64_t b = task / g.chunks(), first = (task % g.chunks()) * kChunk;
  const int64_t last = std::min(first + kChunk, g.plane);
  for (int64_t j0 = first; j0 < last; j0 += kBlock) {
    const int64_t offset = b * g.channels * g.plane + j0, pixel = b * g.plane + j0;
    if (last - j0 >= kBlock)  // a full block: n is a constant, the loops over it unroll into registers
      forward_block(g, p, x + offset, out + offset, mean + pixel, rstd + pixel, kBlock);
    else
      forward_block(g, p, x + offset, out + offset, mean + pixel, rstd + pixel, last - j0);
  }
}

// The sum of a[0..n) in a fixed order: kLanes running sums (vector registers), then in double.
template <typename T>
LN2D_INLINE double block_sum(const T* __restrict a, int64_t n) {
  T lanes[kLanes] = {};
  const int64_t n_full = n / kLanes * kLanes;
  for (int64_t j = 0; j < n_full; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[j + l];
  for (int64_t j = n_full; j < n; ++j) lanes[j - n_full] += a[j];
  double s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// One block of the backward: dx, and the block's weight and bias gradients added to `partial`
// (weight at [0, C), bias at [C, 2C)).
template <typename T>
LN2D_INLINE void backward_block(const Geometry& g, const Params<T>& p, const T* __restrict grad_out,
                                const T* __restrict x, const T* __restrict mean, const T* __restrict rstd,
                                T* __restrict grad_x, double* __restrict partial, int64_t n) {
  const bool centred = p.bias != nullptr;
  T sum_g[kBlock] = {}, sum_gy[kBlock] = {}, dy_yhat[kBlock];
  for (int64_t c = 0; c < g.channels; ++c) {
    const T* __restrict xc = x + c * g.plane;
    const T* __restrict dc = grad_out + c * g.plane;
    const T w = p.weight[c];
    prefetch_row(xc + kPrefetchAhead, false);
    prefetch_row(dc + kPrefetchAhead, false);
    for (int64_t j = 0; j < n; ++j) {
      const T y_hat = normalised(xc[j], mean[j], rstd[j], centred);
      dy_yhat[j] = dc[j] * y_hat;
      sum_g[j] += dc[j] * w;
      sum_gy[j] += dy_yhat[j] * w;
    }
    partial[c] += block_sum(dy_yhat, n);
    partial[g.channels + c] += block_sum(dc, n);
  }
  for (int64_t j = 0; j < n; ++j) {
    sum_g[j] /= T(g.channels);
    sum_gy[j] /= T(g.channels);
  }
  for (int64_t c = 0; c < g.channels; ++c) {
    const T* __restrict xc = x + c * g.plane;
    const T* __restrict dc = grad_out + c * g.plane;
    T* __restrict dxc = grad_x + c * g.plane;
    const T w = p.weight[c];
    prefetch_row(dxc + kPrefetchAhead, true);
    for (int64_t j = 0; j < n; ++j) dxc[j] = input_grad(dc[j] * w, xc[j], mean[j], rstd[j], sum_g[j], sum_gy[j], centred);
  }
}

template <typename T>
LN2D_INLINE void backward_task(const Geometry& g, const Params<T>& p, const T* grad_out, const T* x, const T* mean,
                               const T* rstd, T* grad_x, double* partials, int64_t task) {
  const int64_t b = task / g.chunks(), first = (task % g.chunks()) * kChunk;
  const int64_t last = std::min(first + kChunk, g.plane);
  double* partial = partials + task * 2 * g.channels;
  for (int64_t j0 = first; j0 < last; j0 += kBlock) {
    const int64_t offset = b * g.channels * g.plane + j0, pixel = b * g.plane + j0;
    if (last - j0 >= kBlock)  // as in forward_task
      backward_block(g, p, grad_out + offset, x + offset, mean + pixel, rstd + pixel, grad_x + offset, partial,
                     kBlock);
    else
      backward_block(g, p, grad_out + offset, x + offset, mean + pixel, rstd + pixel, grad_x + offset, partial,
                     last - j0);
  }
}

// ---------------------------------------------------------------------------------------------
// Run-time choice of the instruction set, and the task loops
// ---------------------------------------------------------------------------------------------
template <typename T>
void forward_task_portable(const Geometry& g, const Params<T>& p, const T* x, T* out, T* mean, T* rstd, int64_t t) {
  forward_task(g, p, x, out, mean, rstd, t);
}
template <typename T>
void backward_task_portable(const Geometry& g, const Params<T>& p, const T* grad_out, const T* x, const T* mean,
                            const T* rstd, T* grad_x, double* partials, int64_t t) {
  backward_task(g, p, grad_out, x, mean, rstd, grad_x, partials, t);
}

#ifdef SA_HAS_ISA_CLONES
template <typename T>
SA_TARGET_AVX512 void forward_task_avx512(const Geometry& g, const Params<T>& p, const T* x, T* out, T* mean, T* rstd,
                                          int64_t t) {
  forward_task(g, p, x, out, mean, rstd, t);
}
template <typename T>
SA_TARGET_AVX2 void forward_task_avx2(const Geometry& g, const Params<T>& p, const T* x, T* out, T* mean, T* rstd,
                                      int64_t t) {
  forward_task(g, p, x, out, mean, rstd, t);
}
template <typename T>
SA_TARGET_AVX512 void backward_task_avx512(const Geometry& g, const Params<T>& p, const T* grad_out, const T* x,
                                           const T* mean, const T* rstd, T* grad_x, double* partials, int64_t t) {
  backward_task(g, p, grad_out, x, mean, rstd, grad_x, partials, t);
}
template <typename T>
SA_TARGET_AVX2 void backward_task_avx2(const Geometry& g, const Params<T>& p, const T* grad_out, const T* x,
                                       const T* mean, const T* rstd, T* grad_x, double* partials, int64_t t) {
  backward_task(g, p, grad_out, x, mean, rstd, grad_x, partials, t);
}
#endif

Geometry geometry_of(const Tensor& x) { return {x.size(0), x.size(1), x.size(2) * x.size(3)}; }

std::tuple<Tensor, Tensor, Tensor> forward_cpu(const Tensor& x_in, const Tensor& weight_in,
                                               const std::optional<Tensor>& bias_in, double eps) {
  const Operands o = forward_operands(x_in, weight_in, bias_in);
  const Tensor& x = o.x;
  const Geometry g = geometry_of(x);
  Tensor out = at::empty_like(x);
  Tensor mean = at::empty({x.size(0), x.size(2), x.size(3)}, x.options().dtype(stats_dtype(x)));
  Tensor rstd = at::empty_like(mean);
  if (x.numel() == 0) return {out, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_norm2d_forward_cpu", [&] {
    const Params<scalar_t> p{o.weight.const_data_ptr<scalar_t>(), pointer_or_null<scalar_t>(o.bias),
                             static_cast<scalar_t>(eps)};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t *op = out.mutable_data_ptr<scalar_t>(), *mp = mean.mutable_data_ptr<scalar_t>(),
             *rp = rstd.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.tasks(), grain_of(g), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
#ifdef SA_HAS_ISA_CLONES
        if (cpu_isa() == Isa::kAvx512) {
          forward_task_avx512(g, p, xp, op, mp, rp, t);
          continue;
        }
        if (cpu_isa() == Isa::kAvx2) {
          forward_task_avx2(g, p, xp, op, mp, rp, t);
          continue;
        }
#endif
        forward_task_portable(g, p, xp, op, mp, rp, t);
      }
    });
  });
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& grad_out_in, const Tensor& x_in,
                                                const Tensor& weight_in, const std::optional<Tensor>& bias_in,
                                                const Tensor& mean_in, const Tensor& rstd_in) {
  const Operands o = backward_operands(grad_out_in, x_in, weight_in, bias_in, mean_in, rstd_in);
  const Tensor& x = o.x;
  const Geometry g = geometry_of(x);
  Tensor grad_x = at::empty_like(x);
  Tensor partials = at::zeros({g.tasks(), 2 * g.channels}, x.options().dtype(at::kDouble));
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_norm2d_backward_cpu", [&] {
      const Params<scalar_t> p{o.weight.const_data_ptr<scalar_t>(), pointer_or_null<scalar_t>(o.bias), scalar_t(0)};
      const scalar_t *gp = o.grad_out.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>(),
                     *mp = o.mean.const_data_ptr<scalar_t>(), *rp = o.rstd.const_data_ptr<scalar_t>();
      scalar_t* dxp = grad_x.mutable_data_ptr<scalar_t>();
      double* pp = partials.mutable_data_ptr<double>();
      at::parallel_for(0, g.tasks(), grain_of(g), [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
#ifdef SA_HAS_ISA_CLONES
          if (cpu_isa() == Isa::kAvx512) {
            backward_task_avx512(g, p, gp, xp, mp, rp, dxp, pp, t);
            continue;
          }
          if (cpu_isa() == Isa::kAvx2) {
            backward_task_avx2(g, p, gp, xp, mp, rp, dxp, pp, t);
            continue;
          }
#endif
          backward_task_portable(g, p, gp, xp, mp, rp, dxp, pp, t);
        }
      });
    });
  }
  // The rows of partials, added in row order (a fixed order, whatever the thread count).
  Tensor sums = at::zeros({2 * g.channels}, partials.options());
  {
    const double* pp = partials.const_data_ptr<double>();
    double* sp = sums.mutable_data_ptr<double>();
    for (int64_t row = 0; row < partials.size(0); ++row)
      for (int64_t k = 0; k < 2 * g.channels; ++k) sp[k] += pp[row * 2 * g.channels + k];
  }
  const Tensor grads = sums.to(x.scalar_type());
  return {grad_x, grads.narrow(0, 0, g.channels).clone(), grads.narrow(0, g.channels, g.channels).clone()};
}

}  // namespace
}  // namespace ln2d
}  // namespace sparse_attn

TORCH_LIBRARY_IMPL(sparse_attn, CPU, m) {
  m.impl("layer_norm2d_forward", &sparse_attn::ln2d::forward_cpu);
  m.impl("layer_norm2d_backward", &sparse_attn::ln2d::backward_cpu);
}
