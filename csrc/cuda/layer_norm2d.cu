// CUDA kernels of the channel LayerNorm (DESIGN.md §5); the per-pixel math comes from
// csrc/common/layer_norm2d.h, which the CPU tests cover.
//
// NCHW keeps the pixels of one channel contiguous, so one thread owns one pixel and walks its
// channels: every load of a warp is coalesced, and the pixel's C values stay in L1/L2 between
// the passes. Forward: channel sums (mean), squared deviations (rstd), output. Backward: sums of
// g and g·ŷ, then dx; the weight and bias gradients are reduced by a second kernel, one block per
// (channel, run of pixels) through a fixed tree, one partial per run, and the runs are added in
// order by a third: the result is deterministic.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/layer_norm2d.h"
#include "common/layer_norm2d_args.h"
#include "cuda/sum_rows.cuh"

namespace sparse_attn {
namespace ln2d {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kRun = 8192;  // pixels per block of the weight-gradient reduction

struct Geometry {
  int channels;
  int64_t plane, pixels;  // H*W, B*H*W
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias, T eps,
                   Geometry g, T* __restrict__ out, T* __restrict__ mean_out, T* __restrict__ rstd_out) {
  const int64_t pixel = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (pixel >= g.pixels) return;
  const int64_t b = pixel / g.plane, p = pixel % g.plane;
  const T* xp = x + b * g.channels * g.plane + p;
  T sum = T(0);
  for (int c = 0; c < g.channels; ++c) sum += xp[c * g.plane];
  const T mean = sum / T(g.channels);
  T squares = T(0);
  for (int c = 0; c < g.channels; ++c) {
    const T d = xp[c * g.plane] - mean;
    squares += d * d;
  }
  const T rstd = inverse_std(squares, g.channels, eps);
  const bool centred = bias != nullptr;
  T* op = out + b * g.channels * g.plane + p;
  for (int c = 0; c < g.channels; ++c)
    op[c * g.plane] = normalised(xp[c * g.plane], mean, rstd, centred) * weight[c] + (centred ? bias[c] : T(0));
  mean_out[pixel] = mean;
  rstd_out[pixel] = rstd;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    input_grad_kernel(const T* __restrict__ grad_out, const T* __restrict__ x, const T* __restrict__ weight,
                      const T* __restrict__ mean_in, const T* __restrict__ rstd_in, bool centred, Geometry g,
                      T* __restrict__ grad_x) {
  const int64_t pixel = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (pixel >= g.pixels) return;
  const int64_t offset = (pixel / g.plane) * g.channels * g.plane + pixel % g.plane;
  const T mean = mean_in[pixel], rstd = rstd_in[pixel];
  T sum_g = T(0), sum_gy = T(0);
  for (int c = 0; c < g.channels; ++c) {
    const T gc = grad_out[offset + c * g.plane] * weight[c];
    sum_g += gc;
    sum_gy += gc * normalised(x[offset + c * g.plane], mean, rstd, centred);
  }
  sum_g /= T(g.channels);
  sum_gy /= T(g.channels);
  for (int c = 0; c < g.channels; ++c) {
    const int64_t k = offset + c * g.plane;
    grad_x[k] = input_grad(grad_out[k] * weight[c], x[k], mean, rstd, sum_g, sum_gy, centred);
  }
}

// Block (run r, channel c): Σ grad_out·ŷ and Σ grad_out over the run's pixels, through a fixed
// tree, into partials[r][c] and partials[r][C + c].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    param_grad_kernel(const T* __restrict__ grad_out, const T* __restrict__ x, const T* __restrict__ mean_in,
                      const T* __restrict__ rstd_in, bool centred, Geometry g, double* __restrict__ partials) {
  __shared__ double scratch[2][kWarps];
  const int c = blockIdx.y;
  const int64_t run = blockIdx.x, first = run * kRun, last = min(first + kRun, g.pixels);
  T dw = T(0), db = T(0);
  for (int64_t pixel = first + threadIdx.x; pixel < last; pixel += kThreads) {
    const int64_t k = (pixel / g.plane) * g.channels * g.plane + static_cast<int64_t>(c) * g.plane + pixel % g.plane;
    dw += grad_out[k] * normalised(x[k], mean_in[pixel], rstd_in[pixel], centred);
    db += grad_out[k];
  }
  double sums[2] = {static_cast<double>(dw), static_cast<double>(db)};
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int s = 0; s < 2; ++s) {
    for (int offset = 16; offset > 0; offset /= 2) sums[s] += __shfl_down_sync(0xffffffffu, sums[s], offset);
    if (lane == 0) scratch[s][warp] = sums[s];
  }
  __syncthreads();
  if (threadIdx.x < 2) {
    double total = 0;
    for (int w = 0; w < kWarps; ++w) total += scratch[threadIdx.x][w];
    partials[run * 2 * g.channels + threadIdx.x * g.channels + c] = total;
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------
Geometry geometry_of(const Tensor& x) {
  const int64_t plane = x.size(2) * x.size(3);
  return {static_cast<int>(x.size(1)), plane, x.size(0) * plane};
}

unsigned pixel_blocks(const Geometry& g) {
  const int64_t blocks = (g.pixels + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "layer_norm2d (CUDA): B*H*W is too large");
  return static_cast<unsigned>(blocks);
}

std::tuple<Tensor, Tensor, Tensor> forward_cuda(const Tensor& x_in, const Tensor& weight_in,
                                                const std::optional<Tensor>& bias_in, double eps) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Operands o = forward_operands(x_in, weight_in, bias_in);
  const Tensor& x = o.x;
  const Geometry g = geometry_of(x);
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor mean = at::empty({x.size(0), x.size(2), x.size(3)}, x.options().dtype(stats_dtype(x)));
  Tensor rstd = at::empty_like(mean);
  if (x.numel() == 0) return {out, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_norm2d_forward_cuda", [&] {
    forward_kernel<scalar_t><<<pixel_blocks(g), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), o.weight.const_data_ptr<scalar_t>(), pointer_or_null<scalar_t>(o.bias),
        static_cast<scalar_t>(eps), g, out.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<scalar_t>(),
        rstd.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> backward_cuda(const Tensor& grad_out_in, const Tensor& x_in,
                                                 const Tensor& weight_in, const std::optional<Tensor>& bias_in,
                                                 const Tensor& mean_in, const Tensor& rstd_in) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Operands o = backward_operands(grad_out_in, x_in, weight_in, bias_in, mean_in, rstd_in);
  const Tensor& x = o.x;
  const Geometry g = geometry_of(x);
  const bool centred = o.bias.has_value();
  Tensor grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t runs = (g.pixels + kRun - 1) / kRun;
  TORCH_CHECK(g.channels < 65536, "layer_norm2d (CUDA): C must be below 65536");
  Tensor partials = at::zeros({runs, 2 * g.channels}, x.options().dtype(at::kDouble));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_norm2d_backward_cuda", [&] {
      const scalar_t *gp = o.grad_out.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>(),
                     *mp = o.mean.const_data_ptr<scalar_t>(), *rp = o.rstd.const_data_ptr<scalar_t>();
      input_grad_kernel<scalar_t><<<pixel_blocks(g), kThreads, 0, stream>>>(
          gp, xp, o.weight.const_data_ptr<scalar_t>(), mp, rp, centred, g, grad_x.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      param_grad_kernel<scalar_t><<<dim3(static_cast<unsigned>(runs), static_cast<unsigned>(g.channels)), kThreads, 0,
                                    stream>>>(gp, xp, mp, rp, centred, g, partials.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const Tensor summed = sum_partial_rows(partials, stream);
  const Tensor grads = summed.to(x.scalar_type());
  return {grad_x, grads.narrow(0, 0, g.channels).clone(), grads.narrow(0, g.channels, g.channels).clone()};
}

}  // namespace
}  // namespace ln2d
}  // namespace sparse_attn

TORCH_LIBRARY_IMPL(sparse_attn, CUDA, m) {
  m.impl("layer_norm2d_forward", &sparse_attn::ln2d::forward_cuda);
  m.impl("layer_norm2d_backward", &sparse_attn::ln2d::backward_cuda);
}
