// CPU kernels of the mixed-scale depthwise core of DRSformer's MSFN (DESIGN.md §2).
//
// The image is cut into tiles of kTileH x kTileW pixels. Every task works in a small buffer
// frame around its tile (kHalo pixels on each side, zero outside the image), so the first-stage
// maps y3, y5 only ever exist for one tile plus its halo.
//
// Forward: one task per (batch, output channel, tile) loads the two input channels its two
// first-stage maps come from, computes those maps on the tile widened by the second-stage
// radius, and writes the output tile.
// Backward: one task per (batch, input channel, tile) recomputes that channel's two maps
// (y3[c] and y5[c]), takes the gradient of each map's single reader back through the relu
// (mask from the saved output) and the second stage, then through the map's relu and the first
// stage into dx, which only this task writes. Weight and bias gradients are written as one
// partial per (batch, tile) and summed afterwards in a fixed order, so every result is
// independent of the number of threads.
//
// Inner loops run along a row of the buffer (contiguous) so that the compiler vectorises them;
// on x86 the tasks are compiled for AVX2 and AVX-512 too and picked at run time (cpu/isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "common/mixed_scale_dwconv.h"
#include "common/mixed_scale_dwconv_args.h"
#include "cpu/isa.h"
#include "cpu/window_correlation.h"

#if defined(__GNUC__)
#define MSDW_INLINE inline __attribute__((always_inline))
#else
#define MSDW_INLINE inline
#endif

namespace sparse_attn {
namespace msdw {
namespace {

using at::Tensor;

constexpr int64_t kTileH = 32;
constexpr int64_t kTileW = 128;
constexpr int64_t kHalo = 4;  // first-stage radius (<= 2) plus second-stage radius (<= 2)
constexpr int64_t kLd = kTileW + 2 * kHalo;       // row stride of a buffer frame
constexpr int64_t kFrame = (kTileH + 2 * kHalo) * kLd;

// A half-open range of buffer rows or columns.
struct Span {
  int64_t begin, end;
};

// The tile [t0, t1) of one image axis of length n widened by `halo`, clipped to the image,
// in the coordinates of a frame that starts at image index `origin`.
inline Span widened(int64_t t0, int64_t t1, int64_t halo, int64_t n, int64_t origin) {
  return {std::max<int64_t>(t0 - halo, 0) - origin, std::min<int64_t>(t1 + halo, n) - origin};
}

// One tile: image rows [i0, i1), columns [j0, j1); its frame starts kHalo before both.
struct Tile {
  int64_t i0, i1, j0, j1;
  int64_t top() const { return i0 - kHalo; }
  int64_t left() const { return j0 - kHalo; }
  Span rows(int64_t halo, int64_t height) const { return widened(i0, i1, halo, height, top()); }
  Span cols(int64_t halo, int64_t width) const { return widened(j0, j1, halo, width, left()); }
};

struct Geometry {
  int64_t batch, channels, hidden, height, width, tiles_h, tiles_w;
  int64_t tiles() const { return tiles_h * tiles_w; }
  int64_t plane() const { return height * width; }
  Tile tile(int64_t t) const {
    const int64_t i0 = (t / tiles_w) * kTileH, j0 = (t % tiles_w) * kTileW;
    return {i0, std::min(i0 + kTileH, height), j0, std::min(j0 + kTileW, width)};
  }
};

// Tasks per parallel chunk: enough pixels that waking a thread pays off, so that small images
// (gradcheck, tests) run on the calling thread.
int64_t grain_of(const Geometry& g) {
  constexpr int64_t kPixelsPerChunk = 1 << 15;
  const int64_t tile_pixels = std::min(g.height, kTileH) * std::min(g.width, kTileW);
  return std::max<int64_t>(1, kPixelsPerChunk / tile_pixels);
}

Geometry geometry_of(const Tensor& x) {
  const int64_t h = x.size(2), w = x.size(3);
  return {x.size(0), x.size(1), x.size(1) / 2, h, w, (h + kTileH - 1) / kTileH, (w + kTileW - 1) / kTileW};
}

// The parameters, as raw pointers; a missing bias reads as zero.
template <typename T>
struct Params {
  const T *w3, *w5, *w3_1, *w5_1, *b3, *b5, *b3_1, *b5_1;

  const T* stage_one_taps(int kind, int64_t c) const {
    return kind == kKind3 ? w3 + c * 9 : w5 + c * 25;
  }
  T stage_one_bias(int kind, int64_t c) const {
    const T* b = kind == kKind3 ? b3 : b5;
    return b ? b[c] : T(0);
  }
  // Output channel o, slot s: w3_1[g, s] for o = g < h, w5_1[g, s] for o = h + g.
  const T* stage_two_taps(int64_t o, int slot, int64_t hidden) const {
    return o < hidden ? w3_1 + (o * 2 + slot) * 9 : w5_1 + ((o - hidden) * 2 + slot) * 25;
  }
  T stage_two_bias(int64_t o, int64_t hidden) const {
    const T* b = o < hidden ? b3_1 : b5_1;
    return b ? b[o < hidden ? o : o - hidden] : T(0);
  }
};

// Copies an image plane into a zeroed frame over the given spans (already clipped to the image).
template <typename T>
MSDW_INLINE void load_plane(const T* plane, int64_t width, const Tile& tile, Span rows, Span cols, T* frame) {
  std::fill(frame, frame + kFrame, T(0));
  for (int64_t i = rows.begin; i < rows.end; ++i) {
    const T* src = plane + (tile.top() + i) * width + tile.left();
    std::copy(src + cols.begin, src + cols.end, frame + i * kLd + cols.begin);
  }
}

// y = relu(bias + conv_KxK(x)) over the spans; the rest of the frame stays zero (padding).
template <int K, typename T>
MSDW_INLINE void first_stage(const T* __restrict x, const T* taps_in, T bias, Span rows, Span cols,
                             T* __restrict y) {
  constexpr int64_t r = K / 2;
  T taps[K * K];
  std::copy(taps_in, taps_in + K * K, taps);
  std::fill(y, y + kFrame, T(0));
  for (int64_t i = rows.begin; i < rows.end; ++i) {
    const T* __restrict window = x + (i - r) * kLd - r;
    T* __restrict dst = y + i * kLd;
    for (int64_t j = cols.begin; j < cols.end; ++j) dst[j] = relu(bias + tap_sum<K>(window + j, kLd, taps));
  }
}

template <typename T>
MSDW_INLINE void first_stage(int kind, const T* x, const T* taps, T bias, Span rows, Span cols, T* y) {
  if (kind == kKind3) first_stage<3>(x, taps, bias, rows, cols, y);
  else first_stage<5>(x, taps, bias, rows, cols, y);
}

// out = relu(bias + conv_KxK(y0) + conv_KxK(y1)) over the tile, written to the output plane.
template <int K, typename T>
MSDW_INLINE void second_stage(const T* __restrict y0, const T* __restrict y1, const T* taps0_in,
                              const T* taps1_in, T bias, const Tile& tile, int64_t width, T* __restrict out) {
  constexpr int64_t r = K / 2;
  T taps0[K * K], taps1[K * K];
  std::copy(taps0_in, taps0_in + K * K, taps0);
  std::copy(taps1_in, taps1_in + K * K, taps1);
  for (int64_t i = kHalo; i < kHalo + tile.i1 - tile.i0; ++i) {
    const T* __restrict w0 = y0 + (i - r) * kLd + kHalo - r;
    const T* __restrict w1 = y1 + (i - r) * kLd + kHalo - r;
    T* __restrict dst = out + (tile.top() + i) * width + tile.j0;
    for (int64_t j = 0; j < tile.j1 - tile.j0; ++j)
      dst[j] = relu(bias + tap_sum<K>(w0 + j, kLd, taps0) + tap_sum<K>(w1 + j, kLd, taps1));
  }
}

template <typename T>
struct ForwardScratch {
  std::vector<T> x, y0, y1;
  ForwardScratch() : x(kFrame), y0(kFrame), y1(kFrame) {}
};

// One (batch, output channel, tile) of the forward.
template <typename T>
MSDW_INLINE void forward_task(const Geometry& g, const Params<T>& p, const T* x, T* out, int64_t item,
                              ForwardScratch<T>& s) {
  const int64_t t = item % g.tiles(), o = (item / g.tiles()) % g.channels, b = item / (g.tiles() * g.channels);
  const Tile tile = g.tile(t);
  const int k2 = stage_two_kernel_size(static_cast<int>(o), static_cast<int>(g.hidden));
  T* maps[2] = {s.y0.data(), s.y1.data()};
  for (int slot = 0; slot < 2; ++slot) {
    const StageOneMap m = source_of(static_cast<int>(o), slot, static_cast<int>(g.hidden));
    const int64_t r1 = kernel_size_of_kind(m.kind) / 2, r2 = k2 / 2;
    const T* plane = x + (b * g.channels + m.channel) * g.plane();
    load_plane(plane, g.width, tile, tile.rows(r1 + r2, g.height), tile.cols(r1 + r2, g.width), s.x.data());
    first_stage(m.kind, s.x.data(), p.stage_one_taps(m.kind, m.channel), p.stage_one_bias(m.kind, m.channel),
                tile.rows(r2, g.height), tile.cols(r2, g.width), maps[slot]);
  }
  T* out_plane = out + (b * g.channels + o) * g.plane();
  const T* taps0 = p.stage_two_taps(o, 0, g.hidden);
  const T* taps1 = p.stage_two_taps(o, 1, g.hidden);
  const T bias = p.stage_two_bias(o, g.hidden);
  if (k2 == 3) second_stage<3>(maps[0], maps[1], taps0, taps1, bias, tile, g.width, out_plane);
  else second_stage<5>(maps[0], maps[1], taps0, taps1, bias, tile, g.width, out_plane);
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// dz = grad_out * (out > 0) over the spans (clipped to the image); zero elsewhere.
template <typename T>
MSDW_INLINE void masked_grad(const T* grad_plane, const T* out_plane, int64_t width, const Tile& tile, Span rows,
                             Span cols, T* __restrict dz) {
  std::fill(dz, dz + kFrame, T(0));
  for (int64_t i = rows.begin; i < rows.end; ++i) {
    const int64_t offset = (tile.top() + i) * width + tile.left();
    const T* __restrict g = grad_plane + offset;
    const T* __restrict o = out_plane + offset;
    T* __restrict dst = dz + i * kLd;
    for (int64_t j = cols.begin; j < cols.end; ++j) dst[j] = o[j] > T(0) ? g[j] : T(0);
  }
}

// dst[t] += sum over the tile's pixels p of a[p] * b[p + t - r]: a weight gradient's partial
// (dst starts at zero: the partials are zeroed, and only this task writes these taps).
template <int K, int64_t Block, typename T>
MSDW_INLINE void correlate(const T* a, const T* b, const Tile& tile, double* dst) {
  constexpr int64_t r = K / 2;
  const int64_t origin = kHalo * kLd + kHalo;  // the tile's first pixel in the frames
  correlate_window<K, Block>(a + origin, kLd, b + origin - r * kLd - r, kLd, 1, tile.i1 - tile.i0, tile.j1 - tile.j0, dst);
}

// The sum of `a` over the tile's pixels (a bias gradient's partial), in a fixed order (cpu/patch_sum.h).
template <typename T>
MSDW_INLINE double tile_sum(const T* a, const Tile& tile) {
  return patch_sum(a + kHalo * kLd + kHalo, kLd, tile.i1 - tile.i0, tile.j1 - tile.j0);
}

// dy = (y > 0) * conv_transpose_KxK(dz) over the spans; zero elsewhere.
template <int K, typename T>
MSDW_INLINE void back_through_stage_two(const T* __restrict dz, const T* __restrict y, const T* taps_in,
                                        Span rows, Span cols, T* __restrict dy) {
  constexpr int64_t r = K / 2;
  T taps[K * K];
  std::copy(taps_in, taps_in + K * K, taps);
  std::fill(dy, dy + kFrame, T(0));
  for (int64_t i = rows.begin; i < rows.end; ++i) {
    const T* __restrict window = dz + (i - r) * kLd - r;
    const T* __restrict yr = y + i * kLd;
    T* __restrict dst = dy + i * kLd;
    for (int64_t j = cols.begin; j < cols.end; ++j)
      dst[j] = yr[j] > T(0) ? flipped_tap_sum<K>(window + j, kLd, taps) : T(0);
  }
}

// dx += conv_transpose_KxK(dy) over the tile.
template <int K, typename T>
MSDW_INLINE void back_through_stage_one(const T* __restrict dy, const T* taps_in, const Tile& tile,
                                        T* __restrict dx) {
  constexpr int64_t r = K / 2;
  T taps[K * K];
  std::copy(taps_in, taps_in + K * K, taps);
  for (int64_t i = kHalo; i < kHalo + tile.i1 - tile.i0; ++i) {
    const T* __restrict window = dy + (i - r) * kLd + kHalo - r;
    T* __restrict dst = dx + i * kLd + kHalo;
    for (int64_t j = 0; j < tile.j1 - tile.j0; ++j) dst[j] += flipped_tap_sum<K>(window + j, kLd, taps);
  }
}

template <typename T>
struct BackwardScratch {
  std::vector<T> x, y, dz, dy, dx;
  BackwardScratch() : x(kFrame), y(kFrame), dz(kFrame), dy(kFrame), dx(kFrame) {}
};

// The gradient through one first-stage map of the task's input channel; adds its part of dx
// into s.dx and writes its weight and bias partials into `partial` (this task's row).
template <int K1, int K2, int64_t Block, typename T>
MSDW_INLINE void backward_map(const Geometry& g, const Params<T>& p, const GradLayout& layout, int kind, int64_t c,
                              const T* grad_out, const T* out, int64_t b, const Tile& tile,
                              BackwardScratch<T>& s, double* partial) {
  constexpr int64_t r1 = K1 / 2, r2 = K2 / 2, reach = r1 > r2 ? r1 : r2;
  const StageTwoSlot reader = consumer_of(kind, static_cast<int>(c), static_cast<int>(g.hidden));
  const int64_t o = reader.out_channel;
  first_stage<K1>(s.x.data(), p.stage_one_taps(kind, c), p.stage_one_bias(kind, c), tile.rows(reach, g.height),
                  tile.cols(reach, g.width), s.y.data());
  const int64_t plane = (b * g.channels + o) * g.plane();
  masked_grad(grad_out + plane, out + plane, g.width, tile, tile.rows(r1 + r2, g.height),
              tile.cols(r1 + r2, g.width), s.dz.data());

  const int64_t g2 = o < g.hidden ? o : o - g.hidden;
  const int64_t w2_offset = (o < g.hidden ? layout.w3_1 : layout.w5_1) + (g2 * 2 + reader.slot) * K2 * K2;
  correlate<K2, Block>(s.dz.data(), s.y.data(), tile, partial + w2_offset);
  if (reader.slot == 0) {  // the slot-0 task owns the output channel's bias
    partial[(o < g.hidden ? layout.b3_1 : layout.b5_1) + g2] = tile_sum(s.dz.data(), tile);
  }

  back_through_stage_two<K2>(s.dz.data(), s.y.data(), p.stage_two_taps(o, reader.slot, g.hidden),
                             tile.rows(r1, g.height), tile.cols(r1, g.width), s.dy.data());
  correlate<K1, Block>(s.dy.data(), s.x.data(), tile, partial + (kind == kKind3 ? layout.w3 : layout.w5) + c * K1 * K1);
  partial[(kind == kKind3 ? layout.b3 : layout.b5) + c] = tile_sum(s.dy.data(), tile);

  back_through_stage_one<K1>(s.dy.data(), p.stage_one_taps(kind, c), tile, s.dx.data());
}

// One (batch, input channel, tile) of the backward.
template <int64_t Block, typename T>
MSDW_INLINE void backward_task(const Geometry& g, const Params<T>& p, const GradLayout& layout, const T* grad_out,
                               const T* x, const T* out, T* grad_x, double* partials, int64_t item,
                               BackwardScratch<T>& s) {
  const int64_t t = item % g.tiles(), c = (item / g.tiles()) % g.channels, b = item / (g.tiles() * g.channels);
  const Tile tile = g.tile(t);
  const int64_t x_plane = (b * g.channels + c) * g.plane();
  load_plane(x + x_plane, g.width, tile, tile.rows(kHalo, g.height), tile.cols(kHalo, g.width), s.x.data());
  std::fill(s.dx.begin(), s.dx.end(), T(0));
  double* partial = partials + (b * g.tiles() + t) * layout.total;
  for (int kind : {kKind3, kKind5}) {
    const int k2 = stage_two_kernel_size(consumer_of(kind, static_cast<int>(c), static_cast<int>(g.hidden)).out_channel,
                                         static_cast<int>(g.hidden));
    if (kind == kKind3 && k2 == 3) backward_map<3, 3, Block>(g, p, layout, kind, c, grad_out, out, b, tile, s, partial);
    else if (kind == kKind3) backward_map<3, 5, Block>(g, p, layout, kind, c, grad_out, out, b, tile, s, partial);
    else if (k2 == 3) backward_map<5, 3, Block>(g, p, layout, kind, c, grad_out, out, b, tile, s, partial);
    else backward_map<5, 5, Block>(g, p, layout, kind, c, grad_out, out, b, tile, s, partial);
  }
  T* dst = grad_x + x_plane;
  for (int64_t i = tile.i0; i < tile.i1; ++i)
    std::copy(s.dx.data() + (i - tile.top()) * kLd + kHalo, s.dx.data() + (i - tile.top()) * kLd + kHalo + (tile.j1 - tile.j0),
              dst + i * g.width + tile.j0);
}

// ---------------------------------------------------------------------------------------------
// Run-time choice of the instruction set, and the task loops
// ---------------------------------------------------------------------------------------------
template <typename T>
void forward_task_portable(const Geometry& g, const Params<T>& p, const T* x, T* out, int64_t item,
                           ForwardScratch<T>& s) {
  forward_task(g, p, x, out, item, s);
}
template <typename T>
void backward_task_portable(const Geometry& g, const Params<T>& p, const GradLayout& layout, const T* grad_out,
                            const T* x, const T* out, T* grad_x, double* partials, int64_t item,
                            BackwardScratch<T>& s) {
  backward_task<kBlockPortable>(g, p, layout, grad_out, x, out, grad_x, partials, item, s);
}

#ifdef SA_HAS_ISA_CLONES
template <typename T>
SA_TARGET_AVX512 void forward_task_avx512(const Geometry& g, const Params<T>& p, const T* x, T* out, int64_t item,
                                          ForwardScratch<T>& s) {
  forward_task(g, p, x, out, item, s);
}
template <typename T>
SA_TARGET_AVX2 void forward_task_avx2(const Geometry& g, const Params<T>& p, const T* x, T* out, int64_t item,
                                      ForwardScratch<T>& s) {
  forward_task(g, p, x, out, item, s);
}
template <typename T>
SA_TARGET_AVX512 void backward_task_avx512(const Geometry& g, const Params<T>& p, const GradLayout& layout,
                                           const T* grad_out, const T* x, const T* out, T* grad_x, double* partials,
                                           int64_t item, BackwardScratch<T>& s) {
  backward_task<kBlockAvx512>(g, p, layout, grad_out, x, out, grad_x, partials, item, s);
}
template <typename T>
SA_TARGET_AVX2 void backward_task_avx2(const Geometry& g, const Params<T>& p, const GradLayout& layout,
                                       const T* grad_out, const T* x, const T* out, T* grad_x, double* partials,
                                       int64_t item, BackwardScratch<T>& s) {
  backward_task<kBlockAvx2>(g, p, layout, grad_out, x, out, grad_x, partials, item, s);
}
#endif

template <typename T>
Params<T> params_of(const Operands& o) {
  return {o.w3.const_data_ptr<T>(),   o.w5.const_data_ptr<T>(),   o.w3_1.const_data_ptr<T>(),
          o.w5_1.const_data_ptr<T>(), pointer_or_null<T>(o.b3),   pointer_or_null<T>(o.b5),
          pointer_or_null<T>(o.b3_1), pointer_or_null<T>(o.b5_1)};
}

Tensor forward_cpu(const Tensor& x_in, const Tensor& w3_in, const Tensor& w5_in, const Tensor& w3_1_in,
                   const Tensor& w5_1_in, const std::optional<Tensor>& b3_in, const std::optional<Tensor>& b5_in,
                   const std::optional<Tensor>& b3_1_in, const std::optional<Tensor>& b5_1_in) {
  const Operands o = forward_operands(x_in, w3_in, w5_in, w3_1_in, w5_1_in, b3_in, b5_in, b3_1_in, b5_1_in);
  const Tensor& x = o.x;
  Tensor out = at::empty_like(x);
  const Geometry g = geometry_of(x);
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mixed_scale_dwconv_forward_cpu", [&] {
    const Params<scalar_t> p = params_of<scalar_t>(o);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.batch * g.channels * g.tiles(), grain_of(g), [&](int64_t begin, int64_t end) {
      ForwardScratch<scalar_t> scratch;
      for (int64_t item = begin; item < end; ++item) {
#ifdef SA_HAS_ISA_CLONES
        if (cpu_isa() == Isa::kAvx512) {
          forward_task_avx512(g, p, xp, op, item, scratch);
          continue;
        }
        if (cpu_isa() == Isa::kAvx2) {
          forward_task_avx2(g, p, xp, op, item, scratch);
          continue;
        }
#endif
        forward_task_portable(g, p, xp, op, item, scratch);
      }
    });
  });
  return out;
}

BackwardResult backward_cpu(
    const Tensor& grad_out_in, const Tensor& x_in, const Tensor& out_in, const Tensor& w3_in, const Tensor& w5_in,
    const Tensor& w3_1_in, const Tensor& w5_1_in, const std::optional<Tensor>& b3_in,
    const std::optional<Tensor>& b5_in) {
  const Operands o = backward_operands(grad_out_in, x_in, out_in, w3_in, w5_in, w3_1_in, w5_1_in, b3_in, b5_in);
  const Tensor& x = o.x;
  const Geometry g = geometry_of(x);
  const GradLayout layout(g.hidden);
  Tensor grad_x = at::empty_like(x);
  Tensor partials = at::zeros({g.batch * g.tiles(), layout.total}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mixed_scale_dwconv_backward_cpu", [&] {
    const Params<scalar_t> p = params_of<scalar_t>(o);
    const scalar_t* gp = o.grad_out.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* op = o.out.const_data_ptr<scalar_t>();
    scalar_t* dxp = grad_x.mutable_data_ptr<scalar_t>();
    double* pp = partials.mutable_data_ptr<double>();
    at::parallel_for(0, g.batch * g.channels * g.tiles(), grain_of(g), [&](int64_t begin, int64_t end) {
      BackwardScratch<scalar_t> scratch;
      for (int64_t item = begin; item < end; ++item) {
#ifdef SA_HAS_ISA_CLONES
        if (cpu_isa() == Isa::kAvx512) {
          backward_task_avx512(g, p, layout, gp, xp, op, dxp, pp, item, scratch);
          continue;
        }
        if (cpu_isa() == Isa::kAvx2) {
          backward_task_avx2(g, p, layout, gp, xp, op, dxp, pp, item, scratch);
          continue;
        }
#endif
        backward_task_portable(g, p, layout, gp, xp, op, dxp, pp, item, scratch);
      }
    });
  });
  // Sum the per-(batch, tile) partials row by row: a fixed order, whatever the thread count.
  Tensor grads = at::empty({layout.total}, partials.options());
  {
    const double* pp = partials.const_data_ptr<double>();
    double* gp = grads.mutable_data_ptr<double>();
    const int64_t rows = partials.size(0), total = layout.total;
    at::parallel_for(0, total, std::max<int64_t>(256, (1 << 15) / rows), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        double sum = 0;
        for (int64_t row = 0; row < rows; ++row) sum += pp[row * total + k];
        gp[k] = sum;
      }
    });
  }
  return backward_result(grad_x, layout.split(grads, x));
}

}  // namespace
}  // namespace msdw
}  // namespace sparse_attn

TORCH_LIBRARY_IMPL(sparse_attn, CPU, m) {
  m.impl("mixed_scale_dwconv_forward", &sparse_attn::msdw::forward_cpu);
  m.impl("mixed_scale_dwconv_backward", &sparse_attn::msdw::backward_cpu);
}
