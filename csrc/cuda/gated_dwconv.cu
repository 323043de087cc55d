// CUDA kernels of the gated depthwise core of Restormer's GDFN (DESIGN.md §5); the per-element
// math comes from csrc/common/gated_dwconv.h, which the CPU tests cover.
//
// Forward: one thread per output pixel of group g reads the two 3x3 windows of input channels g
// and h + g (neighbouring threads share them in L1) and writes act(z[g])·z[h + g].
// Backward: one thread block per (batch, group, kTileH x kTileW tile) recomputes z of both
// channels on the tile widened by one pixel, takes grad_out through the gate into shared-memory
// frames dz (zero outside the image), then writes dx of both channels on the tile (only this
// block writes them). Weight, bias and slope gradients are reduced within the block by a fixed
// tree, written as one partial per (batch, tile), and summed in row order by a second kernel:
// the result is deterministic.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/gated_dwconv.h"
#include "common/gated_dwconv_args.h"
#include "cuda/sum_rows.cuh"

namespace sparse_attn {
namespace gdw {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileH = kCudaTileH;
constexpr int kTileW = kCudaTileW;
constexpr int kLd = kTileW + 2;                // a frame: the tile and a one-pixel border
constexpr int kFrame = (kTileH + 2) * kLd;
constexpr int kSums = 21;                      // 2 x (9 taps + bias) + slope

struct Geometry {
  int channels, hidden, height, width, tiles_w, tiles;
};

// bias + the 3x3 cross-correlation of `plane` at (i, j), zero outside the image.
template <typename T>
__device__ T conv3x3_at(const T* plane, int i, int j, const Geometry& g, const T* taps, T bias) {
  T acc = bias;
  for (int dy = -1; dy <= 1; ++dy) {
    const int r = i + dy;
    if (r < 0 || r >= g.height) continue;
    for (int dx = -1; dx <= 1; ++dx) {
      const int c = j + dx;
      if (c >= 0 && c < g.width) acc += taps[(dy + 1) * 3 + dx + 1] * plane[static_cast<int64_t>(r) * g.width + c];
    }
  }
  return acc;
}

template <typename T>
__device__ T bias_or_zero(const T* b, int index) {
  return b ? b[index] : T(0);
}

template <int Act, typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                   const T* __restrict__ slope_ptr, Geometry g, int64_t outputs, T* __restrict__ out) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (index >= outputs) return;
  const int64_t plane = static_cast<int64_t>(g.height) * g.width;
  const int64_t p = index % plane, bg = index / plane;
  const int grp = static_cast<int>(bg % g.hidden);
  const int64_t b = bg / g.hidden;
  const int i = static_cast<int>(p / g.width), j = static_cast<int>(p % g.width);
  const int ca = grp, cb = g.hidden + grp;
  const T za = conv3x3_at(x + (b * g.channels + ca) * plane, i, j, g, weight + ca * 9, bias_or_zero(bias, ca));
  const T zb = conv3x3_at(x + (b * g.channels + cb) * plane, i, j, g, weight + cb * 9, bias_or_zero(bias, cb));
  out[index] = activation<Act>(za, slope_ptr ? *slope_ptr : T(0)) * zb;
}

// Sums each of kSums per-thread values over the block (warp shuffles, then warps in order: a
// fixed tree) and writes the totals to dst[0..kSums) as double.
template <typename T>
__device__ void block_sums(T (&values)[kSums], T (*scratch)[kWarps], double* totals) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int k = 0; k < kSums; ++k) {
    T v = values[k];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) scratch[k][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < kSums) {
    double total = 0;
    for (int w = 0; w < kWarps; ++w) total += scratch[threadIdx.x][w];
    totals[threadIdx.x] = total;
  }
  __syncthreads();
}

template <int Act, typename T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ x, const T* __restrict__ weight,
                    const T* __restrict__ bias, const T* __restrict__ slope_ptr, Geometry g, GradLayout layout, T* __restrict__ grad_x,
                    double* __restrict__ partials) {
  __shared__ T dz[2][kFrame];
  __shared__ T scratch[kSums][kWarps];
  __shared__ double totals[kSums];
  const int64_t block = blockIdx.x;
  const int tile = static_cast<int>(block % g.tiles);
  const int grp = static_cast<int>((block / g.tiles) % g.hidden);
  const int64_t b = block / (static_cast<int64_t>(g.tiles) * g.hidden);
  const int i0 = (tile / g.tiles_w) * kTileH, j0 = (tile % g.tiles_w) * kTileW;
  const int64_t plane = static_cast<int64_t>(g.height) * g.width;
  const int channel[2] = {grp, g.hidden + grp};
  const T* x_plane[2] = {x + (b * g.channels + channel[0]) * plane, x + (b * g.channels + channel[1]) * plane};
  const T* grad_plane = grad_out + (b * g.hidden + grp) * plane;
  const T bias_of[2] = {bias_or_zero(bias, channel[0]), bias_or_zero(bias, channel[1])};
  const T slope = slope_ptr ? *slope_ptr : T(0);

  T values[kSums];
  for (int k = 0; k < kSums; ++k) values[k] = T(0);
  // dz on the frame (zero outside the image); the slope's gradient on the tile itself.
  for (int idx = threadIdx.x; idx < kFrame; idx += kThreads) {
    const int i = i0 - 1 + idx / kLd, j = j0 - 1 + idx % kLd;
    T da = T(0), db = T(0);
    if (i >= 0 && i < g.height && j >= 0 && j < g.width) {
      const T za = conv3x3_at(x_plane[0], i, j, g, weight + channel[0] * 9, bias_of[0]);
      const T zb = conv3x3_at(x_plane[1], i, j, g, weight + channel[1] * 9, bias_of[1]);
      const T gr = grad_plane[static_cast<int64_t>(i) * g.width + j];
      da = gr * zb * activation_grad<Act>(za, slope);
      db = gr * activation<Act>(za, slope);
      if (Act == kPrelu && i >= i0 && i < i0 + kTileH && j >= j0 && j < j0 + kTileW)
        values[kSums - 1] += gr * zb * activation_slope_grad<Act>(za);
    }
    dz[0][idx] = da;
    dz[1][idx] = db;
  }
  __syncthreads();

  for (int p = threadIdx.x; p < kTileH * kTileW; p += kThreads) {
    const int ti = p / kTileW, tj = p % kTileW, i = i0 + ti, j = j0 + tj;
    if (i >= g.height || j >= g.width) continue;
    for (int s = 0; s < 2; ++s) {
      const T* frame = dz[s];
      const T* taps = weight + channel[s] * 9;
      const T d = frame[(ti + 1) * kLd + tj + 1];
      // Weight taps: dz(p)·x(p + shift), zero outside the image.
      for (int dy = -1; dy <= 1; ++dy)
        for (int dx = -1; dx <= 1; ++dx) {
          const int r = i + dy, c = j + dx;
          if (r >= 0 && r < g.height && c >= 0 && c < g.width)
            values[s * 10 + (dy + 1) * 3 + dx + 1] += d * x_plane[s][static_cast<int64_t>(r) * g.width + c];
        }
      values[s * 10 + 9] += d;
      grad_x[(b * g.channels + channel[s]) * plane + static_cast<int64_t>(i) * g.width + j] =
          flipped_tap_sum<3>(frame + ti * kLd + tj, kLd, taps);
    }
  }
  block_sums(values, scratch, totals);
  if (threadIdx.x < kSums) {
    double* partial = partials + (b * g.tiles + tile) * layout.total;
    const int k = threadIdx.x, s = k / 10, r = k % 10;
    if (k == kSums - 1) partial[layout.slope + grp] = totals[k];
    else if (r < 9) partial[layout.weight + channel[s] * 9 + r] = totals[k];
    else partial[layout.bias + channel[s]] = totals[k];
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------
Geometry geometry_of(const Tensor& x) {
  TORCH_CHECK(x.size(2) * x.size(3) < (int64_t(1) << 31), "gated_dwconv (CUDA): H*W must fit in int32");
  const int h = static_cast<int>(x.size(2)), w = static_cast<int>(x.size(3));
  const int tiles_w = (w + kTileW - 1) / kTileW, tiles_h = (h + kTileH - 1) / kTileH;
  return {static_cast<int>(x.size(1)), static_cast<int>(x.size(1) / 2), h, w, tiles_w, tiles_w * tiles_h};
}

unsigned blocks_for(int64_t count) {
  TORCH_CHECK(count < (int64_t(1) << 31), "gated_dwconv (CUDA): too many blocks for one grid");
  return static_cast<unsigned>(count);
}

template <typename Fn>
void with_activation(int64_t act, Fn&& fn) {
  switch (act) {
    case kGelu: fn(std::integral_constant<int, kGelu>()); break;
    case kPrelu: fn(std::integral_constant<int, kPrelu>()); break;
    case kRelu2: fn(std::integral_constant<int, kRelu2>()); break;
    default: fn(std::integral_constant<int, kIdentity>()); break;
  }
}

Tensor forward_cuda(const Tensor& x_in, const Tensor& weight_in, const std::optional<Tensor>& bias_in, int64_t act,
                    const std::optional<Tensor>& activation_weight_in) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Operands o = forward_operands(x_in, weight_in, bias_in, act, activation_weight_in);
  const Tensor& x = o.x;
  Tensor out = at::empty({x.size(0), x.size(1) / 2, x.size(2), x.size(3)}, x.options());
  if (out.numel() == 0) return out;
  const Geometry g = geometry_of(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gated_dwconv_forward_cuda", [&] {
    with_activation(act, [&](auto code) {
      forward_kernel<decltype(code)::value, scalar_t>
          <<<blocks_for((out.numel() + kThreads - 1) / kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              x.const_data_ptr<scalar_t>(), o.weight.const_data_ptr<scalar_t>(), pointer_or_null<scalar_t>(o.bias),
              pointer_or_null<scalar_t>(o.activation_weight), g, out.numel(), out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

BackwardResult backward_cuda(const Tensor& grad_out_in, const Tensor& x_in, const Tensor& weight_in,
                             const std::optional<Tensor>& bias_in, int64_t act,
                             const std::optional<Tensor>& activation_weight_in) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Operands o = backward_operands(grad_out_in, x_in, weight_in, bias_in, act, activation_weight_in);
  const Tensor& x = o.x;
  const Geometry g = geometry_of(x);
  const GradLayout layout(g.hidden);
  Tensor grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor partials = at::zeros({x.size(0) * g.tiles, layout.total}, x.options().dtype(at::kDouble));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gated_dwconv_backward_cuda", [&] {
        with_activation(act, [&](auto code) {
        backward_kernel<decltype(code)::value, scalar_t>
            <<<blocks_for(x.size(0) * g.hidden * g.tiles), kThreads, 0, stream>>>(
                o.grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                o.weight.const_data_ptr<scalar_t>(), pointer_or_null<scalar_t>(o.bias),
                pointer_or_null<scalar_t>(o.activation_weight), g, layout,
                grad_x.mutable_data_ptr<scalar_t>(), partials.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  const Tensor summed = sum_partial_rows(partials, stream);
  auto [grad_weight, grad_bias, grad_slope] = layout.split(summed, x);
  return {grad_x, grad_weight, grad_bias, grad_slope};
}

}  // namespace
}  // namespace gdw
}  // namespace sparse_attn

TORCH_LIBRARY_IMPL(sparse_attn, CUDA, m) {
  m.impl("gated_dwconv_forward", &sparse_attn::gdw::forward_cuda);
  m.impl("gated_dwconv_backward", &sparse_attn::gdw::backward_cuda);
}
