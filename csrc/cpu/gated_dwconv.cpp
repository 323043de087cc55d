// CPU kernels of the gated depthwise core of Restormer's GDFN (DESIGN.md §5); per-element math in
// csrc/common/gated_dwconv.h.
//
// The image is cut into tiles of kTileH x kTileW pixels; every task works in small buffer frames
// around its tile (kHalo pixels on each side, zero outside the image), so z only ever exists for
// one tile plus its halo.
// Forward: one task per (batch, group g, tile) loads input channels g and h + g, and writes
// out[g] = act(z[g])·z[h + g] on the tile.
// Backward: one task per (batch, group, tile) recomputes z[g], z[h + g] on the tile widened by
// one pixel, takes grad_out through the gate into dz (zero outside the image), then into dx of
// both channels (written by this task only). Weight, bias and slope gradients are written as one
// partial per (batch, tile) and summed afterwards in a fixed order, so every result is
// independent of the number of threads.
// Inner loops run along a row of the buffer (contiguous); on x86 the tasks are compiled for AVX2
// and AVX-512 too and picked at run time (cpu/isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "common/gated_dwconv.h"
#include "common/gated_dwconv_args.h"
#include "cpu/isa.h"
#include "cpu/window_correlation.h"

#if defined(__GNUC__)
#define GDW_INLINE inline __attribute__((always_inline))
#else
#define GDW_INLINE inline
#endif

namespace sparse_attn {
namespace gdw {
namespace {

using at::Tensor;

constexpr int64_t kTileH = 32;
constexpr int64_t kTileW = 128;
constexpr int64_t kHalo = 2;  // the backward's dz on the tile widened by 1, from x widened by 2
constexpr int64_t kLd = kTileW + 2 * kHalo;
constexpr int64_t kFrame = (kTileH + 2 * kHalo) * kLd;

struct Span {
  int64_t begin, end;
};

// One tile: image rows [i0, i1), columns [j0, j1); its frame starts kHalo before both.
struct Tile {
  int64_t i0, i1, j0, j1;
  int64_t top() const { return i0 - kHalo; }
  int64_t left() const { return j0 - kHalo; }
  // The tile's rows (columns) widened by `halo`, clipped to the image, in frame coordinates.
  Span rows(int64_t halo, int64_t height) const {
    return {std::max<int64_t>(i0 - halo, 0) - top(), std::min<int64_t>(i1 + halo, height) - top()};
  }
  Span cols(int64_t halo, int64_t width) const {
    return {std::max<int64_t>(j0 - halo, 0) - left(), std::min<int64_t>(j1 + halo, width) - left()};
  }
};

struct Geometry {
  int64_t batch, channels, hidden, height, width, tiles_h, tiles_w;
  int64_t tiles() const { return tiles_h * tiles_w; }
  int64_t plane() const { return height * width; }
  int64_t tasks() const { return batch * hidden * tiles(); }
  Tile tile(int64_t t) const {
    const int64_t i0 = (t / tiles_w) * kTileH, j0 = (t % tiles_w) * kTileW;
    return {i0, std::min(i0 + kTileH, height), j0, std::min(j0 + kTileW, width)};
  }
};

Geometry geometry_of(const Tensor& x) {
  const int64_t h = x.size(2), w = x.size(3);
  return {x.size(0), x.size(1), x.size(1) / 2, h, w, (h + kTileH - 1) / kTileH, (w + kTileW - 1) / kTileW};
}

// Tasks per parallel chunk: small images (gradcheck, tests) run on the calling thread.
int64_t grain_of(const Geometry& g) {
  constexpr int64_t kPixelsPerChunk = 1 << 15;
  return std::max<int64_t>(1, kPixelsPerChunk / (std::min(g.height, kTileH) * std::min(g.width, kTileW)));
}

template <typename T>
struct Params {
  const T *weight, *bias;
  T slope;
  T bias_of(int64_t c) const { return bias ? bias[c] : T(0); }
};

// Zeroes the part of a frame that a tile uses: the tile widened by kHalo on each side. (Not the
// whole frame: on small images, such as Restormer's 16² and 32² levels, that would be most of
// the work.)
template <typename T>
GDW_INLINE void clear_frame(const Tile& tile, T* frame) {
  const int64_t rows = tile.i1 - tile.i0 + 2 * kHalo, cols = tile.j1 - tile.j0 + 2 * kHalo;
  if (cols == kLd) return std::fill(frame, frame + rows * kLd, T(0));  // one call, not one per row
  for (int64_t i = 0; i < rows; ++i) std::fill(frame + i * kLd, frame + i * kLd + cols, T(0));
}

// Copies an image plane into a cleared frame over the given spans (already clipped to the image).
template <typename T>
GDW_INLINE void load_plane(const T* plane, int64_t width, const Tile& tile, Span rows, Span cols, T* frame) {
  clear_frame(tile, frame);
  for (int64_t i = rows.begin; i < rows.end; ++i) {
    const T* src = plane + (tile.top() + i) * width + tile.left();
    std::copy(src + cols.begin, src + cols.end, frame + i * kLd + cols.begin);
  }
}

template <typename T>
struct Scratch {
  std::vector<T> a, b, grad, dz_a, dz_b, slope;
  Scratch() : a(kFrame), b(kFrame), grad(kFrame), dz_a(kFrame), dz_b(kFrame), slope(kFrame) {}
};

// One row of z = bias + the 3x3 window sums, from the window of its first pixel: a pass of plain
// multiply-adds, kept apart from the activation so that each loop is one simple vector loop.
template <typename T>
GDW_INLINE void conv_row(const T* __restrict window, const T* __restrict taps, T bias, int64_t n, T* __restrict z) {
  for (int64_t j = 0; j < n; ++j) z[j] = bias + tap_sum<3>(window + j, kLd, taps);
}

// out = act(za)·zb along a row. The activation's selects are branch-free only because the
// extension is built with -fno-trapping-math (setup.py): without it GCC will not if-convert a
// float comparison and the loop stays scalar.
template <int Act, typename T>
GDW_INLINE void gate_row(const T* __restrict za, const T* __restrict zb, T slope, int64_t n, T* __restrict out) {
  for (int64_t j = 0; j < n; ++j) out[j] = activation<Act>(za[j], slope) * zb[j];
}

// The gate's backward along a row: dz of both halves (and the slope's per-pixel terms for PReLU).
template <int Act, typename T>
GDW_INLINE void gate_grad_row(const T* __restrict za, const T* __restrict zb, const T* __restrict grad, T slope,
                              int64_t n, T* __restrict dz_a, T* __restrict dz_b, T* __restrict dslope) {
  for (int64_t j = 0; j < n; ++j) {
    dz_a[j] = grad[j] * zb[j] * activation_grad<Act>(za[j], slope);
    dz_b[j] = grad[j] * activation<Act>(za[j], slope);
    if constexpr (Act == kPrelu) dslope[j] = grad[j] * zb[j] * activation_slope_grad<Act>(za[j]);
  }
}

// One (batch, group, tile) of the forward.
template <int Act, typename T>
GDW_INLINE void forward_task(const Geometry& g, const Params<T>& p, const T* x, T* out, int64_t item,
                             Scratch<T>& s) {
  const int64_t t = item % g.tiles(), grp = (item / g.tiles()) % g.hidden, b = item / (g.tiles() * g.hidden);
  const Tile tile = g.tile(t);
  const int64_t ca = grp, cb = g.hidden + grp;
  load_plane(x + (b * g.channels + ca) * g.plane(), g.width, tile, tile.rows(1, g.height), tile.cols(1, g.width),
             s.a.data());
  load_plane(x + (b * g.channels + cb) * g.plane(), g.width, tile, tile.rows(1, g.height), tile.cols(1, g.width),
             s.b.data());
  T taps_a[9], taps_b[9];
  std::copy(p.weight + ca * 9, p.weight + ca * 9 + 9, taps_a);
  std::copy(p.weight + cb * 9, p.weight + cb * 9 + 9, taps_b);
  const T bias_a = p.bias_of(ca), bias_b = p.bias_of(cb), slope = p.slope;
  T* out_plane = out + (b * g.hidden + grp) * g.plane();
  const int64_t n = tile.j1 - tile.j0;
  T za[kLd], zb[kLd];
  for (int64_t i = kHalo; i < kHalo + tile.i1 - tile.i0; ++i) {
    conv_row(s.a.data() + (i - 1) * kLd + kHalo - 1, taps_a, bias_a, n, za);
    conv_row(s.b.data() + (i - 1) * kLd + kHalo - 1, taps_b, bias_b, n, zb);
    gate_row<Act>(za, zb, slope, n, out_plane + (tile.top() + i) * g.width + tile.j0);
  }
}

// The sum of a over the tile's pixels, in a fixed order (cpu/patch_sum.h).
template <typename T>
GDW_INLINE double tile_sum(const T* a, const Tile& tile) {
  return patch_sum(a + kHalo * kLd + kHalo, kLd, tile.i1 - tile.i0, tile.j1 - tile.j0);
}

// One channel's weight and bias partials and its dx over the tile, from its dz and x frames.
template <int64_t Block, typename T>
GDW_INLINE void backward_channel(const T* dz, const T* x, const T* taps_in, const Tile& tile, int64_t width,
                                 double* weight_partial, double* bias_partial, T* grad_x_plane) {
  std::fill(weight_partial, weight_partial + 9, 0.0);
  const int64_t origin = kHalo * kLd + kHalo;  // the tile's first pixel in the frames
  correlate_window<3, Block>(dz + origin, kLd, x + origin - kLd - 1, kLd, 1, tile.i1 - tile.i0, tile.j1 - tile.j0,
                             weight_partial);
  *bias_partial = tile_sum(dz, tile);
  T taps[9];
  std::copy(taps_in, taps_in + 9, taps);
  for (int64_t i = kHalo; i < kHalo + tile.i1 - tile.i0; ++i) {
    const T* __restrict window = dz + (i - 1) * kLd + kHalo - 1;
    T* __restrict dst = grad_x_plane + (tile.top() + i) * width + tile.j0;
    for (int64_t j = 0; j < tile.j1 - tile.j0; ++j) dst[j] = flipped_tap_sum<3>(window + j, kLd, taps);
  }
}

// One (batch, group, tile) of the backward.
template <int Act, int64_t Block, typename T>
GDW_INLINE void backward_task(const Geometry& g, const Params<T>& p, const GradLayout& layout, const T* grad_out,
                              const T* x, T* grad_x, double* partials, int64_t item, Scratch<T>& s) {
  const int64_t t = item % g.tiles(), grp = (item / g.tiles()) % g.hidden, b = item / (g.tiles() * g.hidden);
  const Tile tile = g.tile(t);
  const int64_t ca = grp, cb = g.hidden + grp;
  const Span rows2 = tile.rows(2, g.height), cols2 = tile.cols(2, g.width);
  const Span rows1 = tile.rows(1, g.height), cols1 = tile.cols(1, g.width);
  load_plane(x + (b * g.channels + ca) * g.plane(), g.width, tile, rows2, cols2, s.a.data());
  load_plane(x + (b * g.channels + cb) * g.plane(), g.width, tile, rows2, cols2, s.b.data());
  load_plane(grad_out + (b * g.hidden + grp) * g.plane(), g.width, tile, rows1, cols1, s.grad.data());
  T taps_a[9], taps_b[9];
  std::copy(p.weight + ca * 9, p.weight + ca * 9 + 9, taps_a);
  std::copy(p.weight + cb * 9, p.weight + cb * 9 + 9, taps_b);
  const T bias_a = p.bias_of(ca), bias_b = p.bias_of(cb), slope = p.slope;
  clear_frame(tile, s.dz_a.data());
  clear_frame(tile, s.dz_b.data());
  if (Act == kPrelu) clear_frame(tile, s.slope.data());
  const int64_t n = cols1.end - cols1.begin;
  T za[kLd], zb[kLd];
  for (int64_t i = rows1.begin; i < rows1.end; ++i) {
    const int64_t row = i * kLd + cols1.begin;
    conv_row(s.a.data() + row - kLd - 1, taps_a, bias_a, n, za);
    conv_row(s.b.data() + row - kLd - 1, taps_b, bias_b, n, zb);
    gate_grad_row<Act>(za, zb, s.grad.data() + row, slope, n, s.dz_a.data() + row, s.dz_b.data() + row,
                       s.slope.data() + row);
  }
  double* partial = partials + (b * g.tiles() + t) * layout.total;
  backward_channel<Block>(s.dz_a.data(), s.a.data(), taps_a, tile, g.width, partial + layout.weight + ca * 9,
                          partial + layout.bias + ca, grad_x + (b * g.channels + ca) * g.plane());
  backward_channel<Block>(s.dz_b.data(), s.b.data(), taps_b, tile, g.width, partial + layout.weight + cb * 9,
                          partial + layout.bias + cb, grad_x + (b * g.channels + cb) * g.plane());
  if (Act == kPrelu) partial[layout.slope + grp] = tile_sum(s.slope.data(), tile);
}

// ---------------------------------------------------------------------------------------------
// Run-time choice of the instruction set and of the activation, and the task loops
// ---------------------------------------------------------------------------------------------
template <int Act, typename T>
void forward_tasks_portable(const Geometry& g, const Params<T>& p, const T* x, T* out, int64_t begin, int64_t end,
                            Scratch<T>& s) {
  for (int64_t item = begin; item < end; ++item) forward_task<Act>(g, p, x, out, item, s);
}
template <int Act, typename T>
void backward_tasks_portable(const Geometry& g, const Params<T>& p, const GradLayout& layout, const T* grad_out,
                             const T* x, T* grad_x, double* partials, int64_t begin, int64_t end, Scratch<T>& s) {
  for (int64_t item = begin; item < end; ++item)
    backward_task<Act, kBlockPortable>(g, p, layout, grad_out, x, grad_x, partials, item, s);
}

#ifdef SA_HAS_ISA_CLONES
template <int Act, typename T>
SA_TARGET_AVX512 void forward_tasks_avx512(const Geometry& g, const Params<T>& p, const T* x, T* out, int64_t begin,
                                           int64_t end, Scratch<T>& s) {
  for (int64_t item = begin; item < end; ++item) forward_task<Act>(g, p, x, out, item, s);
}
template <int Act, typename T>
SA_TARGET_AVX2 void forward_tasks_avx2(const Geometry& g, const Params<T>& p, const T* x, T* out, int64_t begin,
                                       int64_t end, Scratch<T>& s) {
  for (int64_t item = begin; item < end; ++item) forward_task<Act>(g, p, x, out, item, s);
}
template <int Act, typename T>
SA_TARGET_AVX512 void backward_tasks_avx512(const Geometry& g, const Params<T>& p, const GradLayout& layout,
                                            const T* grad_out, const T* x, T* grad_x, double* partials, int64_t begin,
                                            int64_t end, Scratch<T>& s) {
  for (int64_t item = begin; item < end; ++item)
    backward_task<Act, kBlockAvx512>(g, p, layout, grad_out, x, grad_x, partials, item, s);
}
template <int Act, typename T>
SA_TARGET_AVX2 void backward_tasks_avx2(const Geometry& g, const Params<T>& p, const GradLayout& layout,
                                        const T* grad_out, const T* x, T* grad_x, double* partials, int64_t begin,
                                        int64_t end, Scratch<T>& s) {
  for (int64_t item = begin; item < end; ++item)
    backward_task<Act, kBlockAvx2>(g, p, layout, grad_out, x, grad_x, partials, item, s);
}
#endif

// Calls fn(std::integral_constant<int, Act>) for the run-time activation code.
template <typename Fn>
void with_activation(int64_t act, Fn&& fn) {
  switch (act) {
    case kGelu: fn(std::integral_constant<int, kGelu>()); break;
    case kPrelu: fn(std::integral_constant<int, kPrelu>()); break;
    case kRelu2: fn(std::integral_constant<int, kRelu2>()); break;
    default: fn(std::integral_constant<int, kIdentity>()); break;
  }
}

template <typename T>
Params<T> params_of(const Operands& o) {
  return {o.weight.const_data_ptr<T>(), pointer_or_null<T>(o.bias), slope_of<T>(o)};
}

Tensor forward_cpu(const Tensor& x_in, const Tensor& weight_in, const std::optional<Tensor>& bias_in, int64_t act,
                   const std::optional<Tensor>& activation_weight_in) {
  const Operands o = forward_operands(x_in, weight_in, bias_in, act, activation_weight_in);
  const Tensor& x = o.x;
  const Geometry g = geometry_of(x);
  Tensor out = at::empty({g.batch, g.hidden, g.height, g.width}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gated_dwconv_forward_cpu", [&] {
    const Params<scalar_t> p = params_of<scalar_t>(o);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    with_activation(act, [&](auto code) {
      constexpr int Act = decltype(code)::value;
      at::parallel_for(0, g.tasks(), grain_of(g), [&](int64_t begin, int64_t end) {
        Scratch<scalar_t> scratch;
#ifdef SA_HAS_ISA_CLONES
        if (cpu_isa() == Isa::kAvx512) return forward_tasks_avx512<Act>(g, p, xp, op, begin, end, scratch);
        if (cpu_isa() == Isa::kAvx2) return forward_tasks_avx2<Act>(g, p, xp, op, begin, end, scratch);
#endif
        forward_tasks_portable<Act>(g, p, xp, op, begin, end, scratch);
      });
    });
  });
  return out;
}

BackwardResult backward_cpu(const Tensor& grad_out_in, const Tensor& x_in, const Tensor& weight_in,
                            const std::optional<Tensor>& bias_in, int64_t act,
                            const std::optional<Tensor>& activation_weight_in) {
  const Operands o = backward_operands(grad_out_in, x_in, weight_in, bias_in, act, activation_weight_in);
  const Tensor& x = o.x;
  const Geometry g = geometry_of(x);
  const GradLayout layout(g.hidden);
  Tensor grad_x = at::empty_like(x);
  Tensor partials = at::zeros({g.batch * g.tiles(), layout.total}, x.options().dtype(at::kDouble));
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gated_dwconv_backward_cpu", [&] {
      const Params<scalar_t> p = params_of<scalar_t>(o);
      const scalar_t *gp = o.grad_out.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
      scalar_t* dxp = grad_x.mutable_data_ptr<scalar_t>();
      double* pp = partials.mutable_data_ptr<double>();
      with_activation(act, [&](auto code) {
        constexpr int Act = decltype(code)::value;
        at::parallel_for(0, g.tasks(), grain_of(g), [&](int64_t begin, int64_t end) {
          Scratch<scalar_t> scratch;
#ifdef SA_HAS_ISA_CLONES
          if (cpu_isa() == Isa::kAvx512) return backward_tasks_avx512<Act>(g, p, layout, gp, xp, dxp, pp, begin, end, scratch);
          if (cpu_isa() == Isa::kAvx2) return backward_tasks_avx2<Act>(g, p, layout, gp, xp, dxp, pp, begin, end, scratch);
#endif
          backward_tasks_portable<Act>(g, p, layout, gp, xp, dxp, pp, begin, end, scratch);
        });
      });
    });
  }
  // Sum the per-(batch, tile) partials row by row: a fixed order, whatever the thread count.
  Tensor sums = at::zeros({layout.total}, partials.options());
  {
    const double* pp = partials.const_data_ptr<double>();
    double* sp = sums.mutable_data_ptr<double>();
    for (int64_t row = 0; row < partials.size(0); ++row)
      for (int64_t k = 0; k < layout.total; ++k) sp[k] += pp[row * layout.total + k];
  }
  auto [grad_weight, grad_bias, grad_slope] = layout.split(sums, x);
  return {grad_x, grad_weight, grad_bias, grad_slope};
}

}  // namespace
}  // namespace gdw
}  // namespace sparse_attn

TORCH_LIBRARY_IMPL(sparse_attn, CPU, m) {
  m.impl("gated_dwconv_forward", &sparse_attn::gdw::forward_cpu);
  m.impl("gated_dwconv_backward", &sparse_attn::gdw::backward_cpu);
}
