// CUDA kernels of the mixed-scale depthwise core of DRSformer's MSFN (DESIGN.md §2); the
// per-element math comes from csrc/common/mixed_scale_dwconv.h, which the CPU tests cover.
//
// One thread block per (batch, channel, kTileH x kTileW tile). Each block keeps its maps in
// shared-memory frames of the tile plus a kHalo-pixel border (zero outside the image), so the
// first-stage maps y3, y5 only exist for one tile at a time.
// Forward: per output channel, load the two input channels, compute the two first-stage maps
// on the tile widened by the second-stage radius, write the output tile.
// Backward: per input channel, recompute its two maps, take the gradient of each map's reader
// back through both stages into dx (written once, by this block); weight and bias gradients are
// reduced within the block by a fixed tree, written as one partial per (batch, tile), and summed
// in row order by a second kernel: the result is deterministic.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/mixed_scale_dwconv.h"
#include "common/mixed_scale_dwconv_args.h"
#include "cuda/sum_rows.cuh"

namespace sparse_attn {
namespace msdw {
namespace {

using at::Tensor;

constexpr int kTileH = kCudaTileH;
constexpr int kTileW = kCudaTileW;
constexpr int kHalo = 4;  // first-stage radius (<= 2) plus second-stage radius (<= 2)
constexpr int kLd = kTileW + 2 * kHalo;
constexpr int kFrame = (kTileH + 2 * kHalo) * kLd;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPixelsPerThread = kTileH * kTileW / kThreads;
constexpr int kMaxTaps = 25;

struct Geometry {
  int channels, hidden, height, width, tiles_w;
};

// The tile of this block, its frame origin, and image-bounds tests in frame coordinates.
struct TileFrame {
  int i0, j0;  // image coordinates of the tile's top-left pixel
  __device__ int top() const { return i0 - kHalo; }
  __device__ int left() const { return j0 - kHalo; }
  // Whether frame pixel (i, j) is inside the image and within `halo` of the tile.
  __device__ bool covers(int i, int j, int halo, const Geometry& g) const {
    const int gi = top() + i, gj = left() + j;
    return gi >= 0 && gi < g.height && gj >= 0 && gj < g.width && gi >= i0 - halo && gi < i0 + kTileH + halo &&
           gj >= j0 - halo && gj < j0 + kTileW + halo;
  }
};

__device__ inline TileFrame tile_of_block(const Geometry& g) {
  return {static_cast<int>(blockIdx.y) * kTileH, static_cast<int>(blockIdx.x) * kTileW};
}

template <typename T>
__device__ T bias_or_zero(const T* b, int index) {
  return b ? b[index] : T(0);
}

// frame = plane over the whole frame, zero outside the image.
template <typename T>
__device__ void load_frame(const T* plane, const Geometry& g, const TileFrame& tf, T* frame) {
  for (int idx = threadIdx.x; idx < kFrame; idx += kThreads) {
    const int i = idx / kLd, j = idx % kLd;
    frame[idx] = tf.covers(i, j, kHalo, g) ? plane[(tf.top() + i) * g.width + tf.left() + j] : T(0);
  }
}

// y = relu(bias + conv_K1(x)) within `halo` of the tile (inside the image), zero elsewhere.
template <int K1, typename T>
__device__ void first_stage(const T* x, const T* taps, T bias, int halo, const Geometry& g, const TileFrame& tf,
                            T* y) {
  constexpr int r = K1 / 2;
  for (int idx = threadIdx.x; idx < kFrame; idx += kThreads) {
    const int i = idx / kLd, j = idx % kLd;
    y[idx] = tf.covers(i, j, halo, g) ? relu(bias + tap_sum<K1>(x + (i - r) * kLd + (j - r), kLd, taps)) : T(0);
  }
}

template <typename T>
__device__ void first_stage(int kind, const T* x, const T* taps, T bias, int halo, const Geometry& g,
                            const TileFrame& tf, T* y) {
  if (kind == kKind3) first_stage<3>(x, taps, bias, halo, g, tf, y);
  else first_stage<5>(x, taps, bias, halo, g, tf, y);
}

template <typename T>
struct StageOneParams {
  const T *w3, *w5, *b3, *b5;
  __device__ const T* taps(int kind, int c) const { return kind == kKind3 ? w3 + c * 9 : w5 + c * 25; }
  __device__ T bias(int kind, int c) const { return bias_or_zero(kind == kKind3 ? b3 : b5, c); }
};

template <typename T>
struct StageTwoParams {
  const T *w3_1, *w5_1, *b3_1, *b5_1;
  __device__ const T* taps(int o, int slot, int hidden) const {
    return o < hidden ? w3_1 + (o * 2 + slot) * 9 : w5_1 + ((o - hidden) * 2 + slot) * 25;
  }
  __device__ T bias(int o, int hidden) const { return o < hidden ? bias_or_zero(b3_1, o) : bias_or_zero(b5_1, o - hidden); }
};

template <int K2, typename T>
__device__ void second_stage(const T* y0, const T* y1, const T* taps0, const T* taps1, T bias, const Geometry& g,
                             const TileFrame& tf, T* out_plane) {
  constexpr int r = K2 / 2;
  for (int p = threadIdx.x; p < kTileH * kTileW; p += kThreads) {
    const int i = kHalo + p / kTileW, j = kHalo + p % kTileW;
    if (!tf.covers(i, j, 0, g)) continue;
    const int offset = (i - r) * kLd + (j - r);
    out_plane[(tf.top() + i) * g.width + tf.left() + j] =
        relu(bias + tap_sum<K2>(y0 + offset, kLd, taps0) + tap_sum<K2>(y1 + offset, kLd, taps1));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(const T* __restrict__ x, StageOneParams<T> p1,
                                                           StageTwoParams<T> p2, Geometry g, T* __restrict__ out) {
  __shared__ T x_frame[kFrame];
  __shared__ T maps[2][kFrame];
  const int o = blockIdx.z % g.channels, b = blockIdx.z / g.channels;
  const TileFrame tf = tile_of_block(g);
  const int k2 = stage_two_kernel_size(o, g.hidden);
  const long plane = static_cast<long>(g.height) * g.width;
  for (int slot = 0; slot < 2; ++slot) {
    const StageOneMap m = source_of(o, slot, g.hidden);
    load_frame(x + (static_cast<long>(b) * g.channels + m.channel) * plane, g, tf, x_frame);
    __syncthreads();
    first_stage(m.kind, x_frame, p1.taps(m.kind, m.channel), p1.bias(m.kind, m.channel), k2 / 2, g, tf, maps[slot]);
    __syncthreads();
  }
  T* out_plane = out + (static_cast<long>(b) * g.channels + o) * plane;
  if (k2 == 3)
    second_stage<3>(maps[0], maps[1], p2.taps(o, 0, g.hidden), p2.taps(o, 1, g.hidden), p2.bias(o, g.hidden), g, tf, out_plane);
  else
    second_stage<5>(maps[0], maps[1], p2.taps(o, 0, g.hidden), p2.taps(o, 1, g.hidden), p2.bias(o, g.hidden), g, tf, out_plane);
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Sums each of `count` per-thread values over the block (warp shuffles, then warps in order: a
// fixed tree) and writes the totals to dst[0..count) as double.
template <int kCount, typename T>
__device__ void block_sums(T (&values)[kCount], int count, T (*scratch)[kWarps], double* dst) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int k = 0; k < count; ++k) {
    T v = values[k];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) scratch[k][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < count) {
    double total = 0;
    for (int w = 0; w < kWarps; ++w) total += scratch[threadIdx.x][w];
    dst[threadIdx.x] = total;
  }
  __syncthreads();
}

// values[t] = sum over this thread's tile pixels p of a[p] * b[p + t - r] (t over K x K taps).
template <int K, typename T>
__device__ void correlate(const T* a, const T* b, const Geometry& g, const TileFrame& tf, T (&values)[kMaxTaps + 1]) {
  constexpr int r = K / 2;
  for (int t = 0; t < K * K; ++t) values[t] = T(0);
  for (int p = threadIdx.x; p < kTileH * kTileW; p += kThreads) {
    const int i = kHalo + p / kTileW, j = kHalo + p % kTileW;
    if (!tf.covers(i, j, 0, g)) continue;
    const T av = a[i * kLd + j];
    for (int ty = 0; ty < K; ++ty)
      for (int tx = 0; tx < K; ++tx) values[ty * K + tx] += av * b[(i + ty - r) * kLd + (j + tx - r)];
  }
}

template <typename T>
__device__ T tile_sum(const T* a, const Geometry& g, const TileFrame& tf) {
  T s = T(0);
  for (int p = threadIdx.x; p < kTileH * kTileW; p += kThreads) {
    const int i = kHalo + p / kTileW, j = kHalo + p % kTileW;
    if (tf.covers(i, j, 0, g)) s += a[i * kLd + j];
  }
  return s;
}

template <typename T>
struct BackwardFrames {
  T x[kFrame], y[kFrame], dz[kFrame], dy[kFrame];
  T scratch[kMaxTaps + 1][kWarps];
};

template <int K1, int K2, typename T>
__device__ void backward_map(int kind, int c, int b, const T* grad_out, const T* out, StageOneParams<T> p1,
                             StageTwoParams<T> p2, const Geometry& g, const TileFrame& tf, const GradLayout& layout,
                             BackwardFrames<T>& f, double* partial, T (&dx)[kPixelsPerThread]) {
  constexpr int r1 = K1 / 2, r2 = K2 / 2, reach = r1 > r2 ? r1 : r2;
  const StageTwoSlot reader = consumer_of(kind, c, g.hidden);
  const int o = reader.out_channel, g2 = o < g.hidden ? o : o - g.hidden;
  const long plane = static_cast<long>(g.height) * g.width;
  const T* grad_plane = grad_out + (static_cast<long>(b) * g.channels + o) * plane;
  const T* out_plane = out + (static_cast<long>(b) * g.channels + o) * plane;

  first_stage<K1>(f.x, p1.taps(kind, c), p1.bias(kind, c), reach, g, tf, f.y);
  for (int idx = threadIdx.x; idx < kFrame; idx += kThreads) {
    const int i = idx / kLd, j = idx % kLd;
    T v = T(0);
    if (tf.covers(i, j, r1 + r2, g)) {
      const long pixel = (tf.top() + i) * static_cast<long>(g.width) + tf.left() + j;
      v = out_plane[pixel] > T(0) ? grad_plane[pixel] : T(0);
    }
    f.dz[idx] = v;
  }
  __syncthreads();

  T values[kMaxTaps + 1];
  correlate<K2>(f.dz, f.y, g, tf, values);
  values[K2 * K2] = tile_sum(f.dz, g, tf);
  double* w2_dst = partial + (o < g.hidden ? layout.w3_1 : layout.w5_1) + (g2 * 2 + reader.slot) * K2 * K2;
  block_sums(values, K2 * K2, f.scratch, w2_dst);
  if (reader.slot == 0) {  // the slot-0 block owns the output channel's bias
    T bias_value[kMaxTaps + 1] = {values[K2 * K2]};
    block_sums(bias_value, 1, f.scratch, partial + (o < g.hidden ? layout.b3_1 : layout.b5_1) + g2);
  }

  const T* w2 = p2.taps(o, reader.slot, g.hidden);
  for (int idx = threadIdx.x; idx < kFrame; idx += kThreads) {
    const int i = idx / kLd, j = idx % kLd;
    f.dy[idx] = tf.covers(i, j, r1, g) && f.y[idx] > T(0)
                    ? flipped_tap_sum<K2>(f.dz + (i - r2) * kLd + (j - r2), kLd, w2)
                    : T(0);
  }
  __syncthreads();

  correlate<K1>(f.dy, f.x, g, tf, values);
  block_sums(values, K1 * K1, f.scratch, partial + (kind == kKind3 ? layout.w3 : layout.w5) + c * K1 * K1);
  T bias_value[kMaxTaps + 1] = {tile_sum(f.dy, g, tf)};
  block_sums(bias_value, 1, f.scratch, partial + (kind == kKind3 ? layout.b3 : layout.b5) + c);

  const T* w1 = p1.taps(kind, c);
  for (int k = 0; k < kPixelsPerThread; ++k) {
    const int p = threadIdx.x + k * kThreads;
    const int i = kHalo + p / kTileW, j = kHalo + p % kTileW;
    dx[k] += flipped_tap_sum<K1>(f.dy + (i - r1) * kLd + (j - r1), kLd, w1);
  }
  __syncthreads();  // f.y, f.dz, f.dy are rewritten by the next map
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ x, const T* __restrict__ out,
                    StageOneParams<T> p1, StageTwoParams<T> p2, Geometry g, GradLayout layout, int tiles,
                    T* __restrict__ grad_x, double* __restrict__ partials) {
  __shared__ BackwardFrames<T> f;
  const int c = blockIdx.z % g.channels, b = blockIdx.z / g.channels;
  const TileFrame tf = tile_of_block(g);
  const int tile = blockIdx.y * g.tiles_w + blockIdx.x;
  const long plane = static_cast<long>(g.height) * g.width;
  const long x_plane = (static_cast<long>(b) * g.channels + c) * plane;
  load_frame(x + x_plane, g, tf, f.x);
  __syncthreads();
  T dx[kPixelsPerThread];
  for (int k = 0; k < kPixelsPerThread; ++k) dx[k] = T(0);
  double* partial = partials + (static_cast<long>(b) * tiles + tile) * layout.total;
  for (int kind = kKind3; kind <= kKind5; ++kind) {
    const int k2 = stage_two_kernel_size(consumer_of(kind, c, g.hidden).out_channel, g.hidden);
    if (kind == kKind3 && k2 == 3) backward_map<3, 3>(kind, c, b, grad_out, out, p1, p2, g, tf, layout, f, partial, dx);
    else if (kind == kKind3) backward_map<3, 5>(kind, c, b, grad_out, out, p1, p2, g, tf, layout, f, partial, dx);
    else if (k2 == 3) backward_map<5, 3>(kind, c, b, grad_out, out, p1, p2, g, tf, layout, f, partial, dx);
    else backward_map<5, 5>(kind, c, b, grad_out, out, p1, p2, g, tf, layout, f, partial, dx);
  }
  for (int k = 0; k < kPixelsPerThread; ++k) {
    const int p = threadIdx.x + k * kThreads;
    const int i = kHalo + p / kTileW, j = kHalo + p % kTileW;
    if (tf.covers(i, j, 0, g)) grad_x[x_plane + (tf.top() + i) * static_cast<long>(g.width) + tf.left() + j] = dx[k];
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------
template <typename T>
StageOneParams<T> stage_one_params(const Operands& o) {
  return {o.w3.const_data_ptr<T>(), o.w5.const_data_ptr<T>(), pointer_or_null<T>(o.b3), pointer_or_null<T>(o.b5)};
}

template <typename T>
StageTwoParams<T> stage_two_params(const Operands& o) {
  return {o.w3_1.const_data_ptr<T>(), o.w5_1.const_data_ptr<T>(), pointer_or_null<T>(o.b3_1),
          pointer_or_null<T>(o.b5_1)};
}

Geometry geometry_of(const Tensor& x) {
  TORCH_CHECK(x.size(2) * x.size(3) < (int64_t(1) << 31), "mixed_scale_dwconv (CUDA): H*W must fit in int32");
  const int w = static_cast<int>(x.size(3));
  return {static_cast<int>(x.size(1)), static_cast<int>(x.size(1) / 2), static_cast<int>(x.size(2)), w,
          (w + kTileW - 1) / kTileW};
}

dim3 grid_of(const Tensor& x, const Geometry& g) {
  const int64_t tiles_h = (g.height + kTileH - 1) / kTileH;
  TORCH_CHECK(tiles_h < kCudaGridLimit && x.size(0) * g.channels < kCudaGridLimit,
              "mixed_scale_dwconv (CUDA): H / 16 and B * 2h must be below 65536");
  return dim3(g.tiles_w, static_cast<unsigned>(tiles_h), static_cast<unsigned>(x.size(0) * g.channels));
}

Tensor forward_cuda(const Tensor& x_in, const Tensor& w3_in, const Tensor& w5_in, const Tensor& w3_1_in,
                    const Tensor& w5_1_in, const std::optional<Tensor>& b3_in, const std::optional<Tensor>& b5_in,
                    const std::optional<Tensor>& b3_1_in, const std::optional<Tensor>& b5_1_in) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Operands o = forward_operands(x_in, w3_in, w5_in, w3_1_in, w5_1_in, b3_in, b5_in, b3_1_in, b5_1_in);
  const Tensor& x = o.x;
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
  const Geometry g = geometry_of(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mixed_scale_dwconv_forward_cuda", [&] {
    const StageOneParams<scalar_t> p1 = stage_one_params<scalar_t>(o);
    const StageTwoParams<scalar_t> p2 = stage_two_params<scalar_t>(o);
    forward_kernel<scalar_t><<<grid_of(x, g), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), p1, p2, g, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

BackwardResult backward_cuda(const Tensor& grad_out_in, const Tensor& x_in, const Tensor& out_in, const Tensor& w3_in,
                             const Tensor& w5_in, const Tensor& w3_1_in, const Tensor& w5_1_in,
                             const std::optional<Tensor>& b3_in, const std::optional<Tensor>& b5_in) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Operands o = backward_operands(grad_out_in, x_in, out_in, w3_in, w5_in, w3_1_in, w5_1_in, b3_in, b5_in);
  const Tensor& x = o.x;
  const Geometry g = geometry_of(x);
  const GradLayout layout(g.hidden);
  const dim3 grid = grid_of(x, g);
  const int tiles = static_cast<int>(grid.x * grid.y);
  Tensor grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor partials = at::zeros({x.size(0) * tiles, layout.total}, x.options().dtype(at::kDouble));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mixed_scale_dwconv_backward_cuda", [&] {
    const StageOneParams<scalar_t> p1 = stage_one_params<scalar_t>(o);
    const StageTwoParams<scalar_t> p2 = stage_two_params<scalar_t>(o);  // the backward has no b3_1, b5_1
    backward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        o.grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), o.out.const_data_ptr<scalar_t>(), p1, p2,
        g, layout, tiles, grad_x.mutable_data_ptr<scalar_t>(), partials.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const Tensor summed = sum_partial_rows(partials, stream);
  return backward_result(grad_x, layout.split(summed, x));
}

}  // namespace
}  // namespace msdw
}  // namespace sparse_attn

TORCH_LIBRARY_IMPL(sparse_attn, CUDA, m) {
  m.impl("mixed_scale_dwconv_forward", &sparse_attn::msdw::forward_cuda);
  m.impl("mixed_scale_dwconv_backward", &sparse_attn::msdw::backward_cuda);
}
