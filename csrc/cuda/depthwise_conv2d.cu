// CUDA kernels of the depthwise convolution op (DESIGN.md §5); the per-pixel math comes from
// csrc/common/depthwise_conv2d.h, which the CPU tests cover.
//
// A dilated convolution only ever combines pixels whose rows and columns agree modulo the
// dilation d: the image splits into d x d phases (the pixels (py + a·d, px + e·d)), and on each
// phase's lattice (a, e) the op is an undilated K x K convolution with zero padding. A thread
// block works on one (image, channel, phase, kTileH x kTileW lattice tile) and keeps the tile
// plus a (K - 1) / 2 border in a shared-memory frame (zero outside the image), so its shared
// memory is the same for every dilation and DRSformer's dilation 2 reads no wider halo than 1.
// (At d = 1 the only phase is the image.) Blocks of the same tile's phases are neighbours in the
// grid, so the rows they read with a stride of d share cache lines while they run.
// Forward: out = bias + the window sums over the input's frame.
// Backward: grad_x = the rotated window sums over grad_out's frame, written once by its block;
// the weight and bias gradients are reduced within the block by a fixed tree, written as one
// partial per (image, tile, phase) row, per channel its K² weight sums then its bias sum (the CPU
// kernel's layout), and summed in row order by a second kernel: the result is deterministic.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/depthwise_conv2d.h"
#include "common/depthwise_conv2d_args.h"
#include "common/depthwise_conv2d_grid.h"
#include "cuda/sum_rows.cuh"

namespace sparse_attn {
namespace dwc {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileH = kCudaTileH;
constexpr int kTileW = kCudaTileW;

// A K x K kernel's frame: the tile and a border of its reach (in lattice pixels) on every side.
template <int K>
struct Frame {
  static constexpr int kReach = (K - 1) / 2;
  static constexpr int kLd = kTileW + K - 1;
  static constexpr int kSize = (kTileH + K - 1) * kLd;
};

struct Geometry {
  int channels, height, width, dilation;
  int phases_h, phases_w, tiles_w, tiles;  // phases holding pixels; lattice tiles per phase
  SA_HOST_DEVICE int phases() const { return phases_h * phases_w; }
};

// What a block works on. Blocks run phase fastest, then tile, channel and image; its partial row
// is (image, tile, phase).
struct Block {
  int64_t b, plane_offset, partial_row;
  int c, py, px, a0, e0;  // phase (py, px); the tile's first lattice row and column

  __device__ Block(const Geometry& g) {
    int64_t rest = blockIdx.x;
    const int phase = static_cast<int>(rest % g.phases());
    rest /= g.phases();
    const int tile = static_cast<int>(rest % g.tiles);
    rest /= g.tiles;
    c = static_cast<int>(rest % g.channels);
    b = rest / g.channels;
    py = phase / g.phases_w;
    px = phase % g.phases_w;
    a0 = (tile / g.tiles_w) * kTileH;
    e0 = (tile % g.tiles_w) * kTileW;
    plane_offset = (b * g.channels + c) * static_cast<int64_t>(g.height) * g.width;
    partial_row = (b * g.tiles + tile) * g.phases() + phase;
  }
  // The image position of lattice pixel (a, e), or -1 outside the image.
  __device__ int64_t pixel(int a, int e, const Geometry& g) const {
    if (a < 0 || e < 0) return -1;
    const int64_t y = py + static_cast<int64_t>(a) * g.dilation, x = px + static_cast<int64_t>(e) * g.dilation;
    return y < g.height && x < g.width ? y * g.width + x : -1;
  }
};

// Copies the block's frame of `plane` into shared memory, zero outside the image.
template <int K, typename T>
__device__ void load_frame(const T* __restrict__ plane, const Block& blk, const Geometry& g, T* frame) {
  using F = Frame<K>;
  for (int idx = threadIdx.x; idx < F::kSize; idx += kThreads) {
    const int64_t p = blk.pixel(blk.a0 - F::kReach + idx / F::kLd, blk.e0 - F::kReach + idx % F::kLd, g);
    frame[idx] = p >= 0 ? plane[p] : T(0);
  }
}

template <int K, typename T>
__device__ void load_taps(const T* __restrict__ weight, int c, T* taps) {
  if (threadIdx.x < K * K) taps[threadIdx.x] = weight[c * K * K + threadIdx.x];
}

template <int K, typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias, Geometry g,
                   T* __restrict__ out) {
  using F = Frame<K>;
  __shared__ T frame[F::kSize];
  __shared__ T taps[K * K];
  const Block blk(g);
  load_frame<K>(x + blk.plane_offset, blk, g, frame);
  load_taps<K>(weight, blk.c, taps);
  __syncthreads();
  const T shift = bias ? bias[blk.c] : T(0);
  for (int q = threadIdx.x; q < kTileH * kTileW; q += kThreads) {
    const int ti = q / kTileW, tj = q % kTileW;
    const int64_t p = blk.pixel(blk.a0 + ti, blk.e0 + tj, g);
    // The window of lattice pixel (ti, tj) starts at frame (ti, tj): the frame begins a reach
    // above and to the left of the tile. On the lattice the taps are adjacent (dilation 1).
    if (p >= 0) out[blk.plane_offset + p] = shift + window_sum<K>(frame + ti * F::kLd + tj, F::kLd, 1, taps);
  }
}

// Sums each of kCount per-thread values over the block (warp shuffles, then warps in order: a
// fixed tree) and writes the totals to dst[0..kCount) as double.
template <int kCount, typename T>
__device__ void block_sums(const T (&values)[kCount], T (*scratch)[kWarps], double* dst) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int k = 0; k < kCount; ++k) {
    T v = values[k];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) scratch[k][warp] = v;
  }
  __syncthreads();
  for (int k = threadIdx.x; k < kCount; k += kThreads) {
    double total = 0;
    for (int w = 0; w < kWarps; ++w) total += scratch[k][w];
    dst[k] = total;
  }
}

template <int K, typename T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ x, const T* __restrict__ weight, Geometry g,
                    T* __restrict__ grad_x, double* __restrict__ partials) {
  using F = Frame<K>;
  constexpr int kSums = K * K + 1;  // the weight's taps, then the bias
  __shared__ T x_frame[F::kSize];
  __shared__ T grad_frame[F::kSize];
  __shared__ T taps[K * K];
  __shared__ T scratch[kSums][kWarps];
  const Block blk(g);
  load_frame<K>(x + blk.plane_offset, blk, g, x_frame);
  load_frame<K>(grad_out + blk.plane_offset, blk, g, grad_frame);
  load_taps<K>(weight, blk.c, taps);
  __syncthreads();
  T values[kSums];
  DWC_UNROLL
  for (int k = 0; k < kSums; ++k) values[k] = T(0);
  for (int q = threadIdx.x; q < kTileH * kTileW; q += kThreads) {
    const int ti = q / kTileW, tj = q % kTileW;
    const int64_t p = blk.pixel(blk.a0 + ti, blk.e0 + tj, g);
    if (p < 0) continue;
    grad_x[blk.plane_offset + p] = flipped_window_sum<K>(grad_frame + ti * F::kLd + tj, F::kLd, 1, taps);
    // Tap (i, j) of the weight's gradient: grad_out here times x at the tap's offset, which is
    // frame (ti + i, tj + j); grad_out's own pixel sits a reach into its window.
    const T gr = grad_frame[(ti + F::kReach) * F::kLd + tj + F::kReach];
    DWC_UNROLL
    for (int i = 0; i < K; ++i)
      DWC_UNROLL
      for (int j = 0; j < K; ++j) values[i * K + j] += gr * x_frame[(ti + i) * F::kLd + tj + j];
    values[K * K] += gr;
  }
  block_sums(values, scratch, partials + blk.partial_row * g.channels * kSums + blk.c * kSums);
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------
Geometry geometry_of(const Operands& o) {
  const Tensor& x = o.x;
  TORCH_CHECK(x.size(2) * x.size(3) < (int64_t(1) << 31), "depthwise_conv2d (CUDA): H*W must fit in int32");
  const int h = static_cast<int>(x.size(2)), w = static_cast<int>(x.size(3)), d = o.dilation;
  const int lattice_h = (h + d - 1) / d, lattice_w = (w + d - 1) / d;
  const int tiles_w = (lattice_w + kTileW - 1) / kTileW, tiles_h = (lattice_h + kTileH - 1) / kTileH;
  return {static_cast<int>(x.size(1)), h, w, d, std::min(d, h), std::min(d, w), tiles_w, tiles_w * tiles_h};
}

unsigned blocks_of(const Tensor& x, const Geometry& g) {
  const int64_t count = x.size(0) * x.size(1) * cuda_blocks_per_plane(g.height, g.width, g.dilation);
  TORCH_CHECK(count < kCudaGridLimit, "depthwise_conv2d (CUDA): too many blocks for one grid");
  return static_cast<unsigned>(count);
}

Tensor forward_cuda(const Tensor& x_in, const Tensor& weight_in, const std::optional<Tensor>& bias_in,
                    int64_t dilation) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Operands o = forward_operands(x_in, weight_in, bias_in, dilation);
  const Tensor& x = o.x;
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const Geometry g = geometry_of(o);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_conv2d_forward_cuda", [&] {
    with_kernel_size(o.kernel, [&](auto size) {
      forward_kernel<decltype(size)::value, scalar_t>
          <<<blocks_of(x, g), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              x.const_data_ptr<scalar_t>(), o.weight.const_data_ptr<scalar_t>(), pointer_or_null<scalar_t>(o.bias), g,
              out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

BackwardResult backward_cuda(const Tensor& grad_out_in, const Tensor& x_in, const Tensor& weight_in,
                             const std::optional<Tensor>& bias_in, int64_t dilation) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Operands o = backward_operands(grad_out_in, x_in, weight_in, bias_in, dilation);
  const Tensor& x = o.x;
  const int64_t channels = x.size(1), taps = int64_t(o.kernel) * o.kernel;
  Tensor grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return {grad_x, at::zeros_like(o.weight), at::zeros({channels}, x.options())};
  const Geometry g = geometry_of(o);
  // Every block writes its whole entry of its row, so the table needs no zeroing.
  const int64_t rows = x.size(0) * g.tiles * g.phases();
  Tensor partials = at::empty({rows, channels * (taps + 1)}, x.options().dtype(at::kDouble));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_conv2d_backward_cuda", [&] {
    with_kernel_size(o.kernel, [&](auto size) {
      backward_kernel<decltype(size)::value, scalar_t><<<blocks_of(x, g), kThreads, 0, stream>>>(
          o.grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), o.weight.const_data_ptr<scalar_t>(), g,
          grad_x.mutable_data_ptr<scalar_t>(), partials.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  const Tensor sums = sum_partial_rows(partials, stream).to(x.scalar_type()).reshape({channels, taps + 1});
  // Copies (for one channel, `contiguous` of these columns would be a view): the outputs share no storage.
  return {grad_x, sums.narrow(1, 0, taps).reshape_as(o.weight).clone(at::MemoryFormat::Contiguous),
          sums.select(1, taps).clone(at::MemoryFormat::Contiguous)};
}

}  // namespace
}  // namespace dwc
}  // namespace sparse_attn

TORCH_LIBRARY_IMPL(sparse_attn, CUDA, m) {
  m.impl("depthwise_conv2d_forward", &sparse_attn::dwc::forward_cuda);
  m.impl("depthwise_conv2d_backward", &sparse_attn::dwc::backward_cuda);
}
