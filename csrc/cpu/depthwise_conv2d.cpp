// CPU kernels of the depthwise convolution op (DESIGN.md §5); per-pixel math in
// csrc/common/depthwise_conv2d.h.
//
// One task per (image, channel, band of rows). A task copies the rows its band reads (the band
// widened by the window's reach) into a zero-padded frame, so the inner loops run along a
// contiguous row with no bounds checks and the compiler vectorises them.
// Forward: out = bias + the window sums over the input's frame.
// Backward: dx = the rotated window sums over grad_out's frame; the weight's and bias's
// gradients are written as one partial per task (in double) and summed afterwards in a fixed
// order, so every result is independent of the number of threads.
// On x86 the tasks are compiled a second time for AVX2+FMA and picked at run time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "common/depthwise_conv2d.h"
#include "common/depthwise_conv2d_args.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define DWC_HAS_AVX2_CLONE 1
#define DWC_AVX2 __attribute__((target("avx2,fma")))
#endif
#if defined(__GNUC__)
#define DWC_INLINE inline __attribute__((always_inline))
#else
#define DWC_INLINE inline
#endif

namespace sparse_attn {
namespace dwc {
namespace {

using at::Tensor;

constexpr int64_t kBandPixels = 4096;  // a band's frame stays within L1 at the networks' widths
constexpr int64_t kLanes = 32;  // running sums of a row's dot product: four independent AVX2 chains
constexpr int64_t kBlock = 16;  // output columns per register block: two AVX2 registers of floats

struct Geometry {
  int64_t batch, channels, height, width;
  int kernel, dilation, reach;
  int64_t band_rows, bands;
  int64_t ld() const { return width + 2 * reach; }
  int64_t frame() const { return (band_rows + 2 * reach) * ld(); }
  int64_t plane() const { return height * width; }
  int64_t tasks() const { return batch * channels * bands; }
  int taps() const { return kernel * kernel; }
  int64_t partial_row() const { return channels * (taps() + 1); }  // weight taps then bias, per channel
};

Geometry geometry_of(const Operands& o) {
  const Tensor& x = o.x;
  const int64_t h = x.size(2), w = x.size(3);
  const int64_t rows = std::min<int64_t>(h, std::max<int64_t>(1, kBandPixels / w));
  return {x.size(0), x.size(1), h, w, o.kernel, o.dilation, reach(o.kernel, o.dilation), rows, (h + rows - 1) / rows};
}

// Tasks per parallel chunk: small images (gradcheck, tests) run on the calling thread.
int64_t grain_of(const Geometry& g) {
  constexpr int64_t kPixelsPerChunk = 1 << 15;
  return std::max<int64_t>(1, kPixelsPerChunk / (g.band_rows * g.width));
}

struct Task {
  int64_t b, c, band, y0, y1;
};

Task task_of(const Geometry& g, int64_t item) {
  const int64_t band = item % g.bands, c = (item / g.bands) % g.channels, b = item / (g.bands * g.channels);
  const int64_t y0 = band * g.band_rows;
  return {b, c, band, y0, std::min(y0 + g.band_rows, g.height)};
}

// Copies the rows [y0 - reach, y1 + reach) of a plane into a zeroed frame: frame row r, column
// j hold the plane's row y0 - reach + r, column j - reach (zero outside the plane).
template <typename T>
DWC_INLINE void load_frame(const Geometry& g, const T* plane, const Task& t, T* frame) {
  const int64_t ld = g.ld(), top = t.y0 - g.reach;
  std::fill(frame, frame + (t.y1 - t.y0 + 2 * g.reach) * ld, T(0));
  const int64_t first = std::max<int64_t>(top, 0), last = std::min<int64_t>(t.y1 + g.reach, g.height);
  for (int64_t y = first; y < last; ++y)
    std::copy(plane + y * g.width, plane + (y + 1) * g.width, frame + (y - top) * ld + g.reach);
}

template <typename T>
struct Scratch {
  std::vector<T> frame, grad_frame;
  explicit Scratch(const Geometry& g) : frame(g.frame()), grad_frame(g.frame()) {}
};

// One output row from the frame: `window` points at the window of its first pixel (the frame row
// `reach` rows above it). Whole blocks of kBlock columns keep their sums in registers across
// every tap (the compiler unrolls the taps and vectorises the block); the last columns use the
// per-pixel window sum. Both add the taps in the same order, then the bias.
template <int K, bool Flipped, typename T>
DWC_INLINE void conv_row(const T* __restrict window, int64_t ld, int dilation, const T* __restrict taps, T shift,
                         int64_t width, T* __restrict dst) {
  const int64_t full = width / kBlock * kBlock;
  for (int64_t j0 = 0; j0 < full; j0 += kBlock) {
    T acc[kBlock] = {};
    DWC_UNROLL
    for (int i = 0; i < K; ++i)
      DWC_UNROLL
      for (int j = 0; j < K; ++j) {
        const T w = Flipped ? taps[(K - 1 - i) * K + (K - 1 - j)] : taps[i * K + j];
        const T* __restrict src = window + (i * ld + j) * dilation + j0;
        for (int64_t l = 0; l < kBlock; ++l) acc[l] += w * src[l];
      }
    for (int64_t l = 0; l < kBlock; ++l) dst[j0 + l] = shift + acc[l];
  }
  for (int64_t j = full; j < width; ++j)
    dst[j] = shift + (Flipped ? flipped_window_sum<K>(window + j, ld, dilation, taps)
                              : window_sum<K>(window + j, ld, dilation, taps));
}

// One (image, channel, band) of the forward.
template <int K, typename T>
DWC_INLINE void forward_task(const Geometry& g, const T* weight, const T* bias, const T* x, T* out, int64_t item,
                             Scratch<T>& s) {
  const Task t = task_of(g, item);
  const int64_t offset = (t.b * g.channels + t.c) * g.plane(), ld = g.ld();
  load_frame(g, x + offset, t, s.frame.data());
  T taps[K * K] = {};
  std::copy(weight + t.c * K * K, weight + (t.c + 1) * K * K, taps);
  const T shift = bias ? bias[t.c] : T(0);
  for (int64_t y = t.y0; y < t.y1; ++y)
    conv_row<K, false>(s.frame.data() + (y - t.y0) * ld, ld, g.dilation, taps, shift, g.width,
                       out + offset + y * g.width);
}

// The sum over a row of a[j] * b[j] (or of a[j] when b is null) in kLanes running sums (several
// vector registers, so that the adds do not wait on each other).
template <typename T>
DWC_INLINE void row_dot(const T* __restrict a, const T* __restrict b, int64_t n, T* __restrict lanes) {
  const int64_t n_full = n / kLanes * kLanes;
  if (b) {
    for (int64_t j = 0; j < n_full; j += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[j + l] * b[j + l];
    for (int64_t j = n_full; j < n; ++j) lanes[j - n_full] += a[j] * b[j];
  } else {
    for (int64_t j = 0; j < n_full; j += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[j + l];
    for (int64_t j = n_full; j < n; ++j) lanes[j - n_full] += a[j];
  }
}

// One (image, channel, band) of the backward: dx over the band, and the band's partial sums of
// the weight's gradient (tap by tap) and of the bias's.
template <int K, typename T>
DWC_INLINE void backward_task(const Geometry& g, const T* weight, const T* grad_out, const T* x, T* grad_x,
                              double* partials, int64_t item, Scratch<T>& s) {
  const Task t = task_of(g, item);
  const int64_t offset = (t.b * g.channels + t.c) * g.plane(), ld = g.ld();
  const int dilation = g.dilation;
  load_frame(g, grad_out + offset, t, s.grad_frame.data());
  load_frame(g, x + offset, t, s.frame.data());
  T taps[K * K] = {};
  std::copy(weight + t.c * K * K, weight + (t.c + 1) * K * K, taps);
  double wide[K * K + 1][kLanes] = {};
  for (int64_t y = t.y0; y < t.y1; ++y) {
    const T* __restrict grad_window = s.grad_frame.data() + (y - t.y0) * ld;
    conv_row<K, true>(grad_window, ld, dilation, taps, T(0), g.width, grad_x + offset + y * g.width);
    // grad_out's own row sits `reach` rows and columns into its window.
    const T* grad_row = grad_window + g.reach * ld + g.reach;
    const T* x_window = s.frame.data() + (y - t.y0) * ld;
    for (int tap = 0; tap <= K * K; ++tap) {
      T lanes[kLanes] = {};
      const T* x_row = tap < K * K ? x_window + ((tap / K) * ld + tap % K) * dilation : nullptr;
      row_dot(grad_row, x_row, g.width, lanes);
      for (int64_t l = 0; l < kLanes; ++l) wide[tap][l] += lanes[l];
    }
  }
  double* partial = partials + (t.b * g.bands + t.band) * g.partial_row() + t.c * (K * K + 1);
  for (int tap = 0; tap <= K * K; ++tap) {
    double sum = 0;
    for (int64_t l = 0; l < kLanes; ++l) sum += wide[tap][l];
    partial[tap] = sum;
  }
}

// ---------------------------------------------------------------------------------------------
// Run-time choice of the instruction set, and the task loops
// ---------------------------------------------------------------------------------------------
template <int K, typename T>
void forward_tasks_portable(const Geometry& g, const T* w, const T* bias, const T* x, T* out, int64_t begin,
                            int64_t end, Scratch<T>& s) {
  for (int64_t item = begin; item < end; ++item) forward_task<K>(g, w, bias, x, out, item, s);
}
template <int K, typename T>
void backward_tasks_portable(const Geometry& g, const T* w, const T* grad_out, const T* x, T* grad_x,
                             double* partials, int64_t begin, int64_t end, Scratch<T>& s) {
  for (int64_t item = begin; item < end; ++item) backward_task<K>(g, w, grad_out, x, grad_x, partials, item, s);
}

#ifdef DWC_HAS_AVX2_CLONE
template <int K, typename T>
DWC_AVX2 void forward_tasks_avx2(const Geometry& g, const T* w, const T* bias, const T* x, T* out, int64_t begin,
                                 int64_t end, Scratch<T>& s) {
  for (int64_t item = begin; item < end; ++item) forward_task<K>(g, w, bias, x, out, item, s);
}
template <int K, typename T>
DWC_AVX2 void backward_tasks_avx2(const Geometry& g, const T* w, const T* grad_out, const T* x, T* grad_x,
                                  double* partials, int64_t begin, int64_t end, Scratch<T>& s) {
  for (int64_t item = begin; item < end; ++item) backward_task<K>(g, w, grad_out, x, grad_x, partials, item, s);
}
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

Tensor forward_cpu(const Tensor& x_in, const Tensor& weight_in, const std::optional<Tensor>& bias_in,
                   int64_t dilation) {
  const Operands o = forward_operands(x_in, weight_in, bias_in, dilation);
  Tensor out = at::empty_like(o.x);
  if (out.numel() == 0) return out;
  const Geometry g = geometry_of(o);
  AT_DISPATCH_FLOATING_TYPES(o.x.scalar_type(), "depthwise_conv2d_forward_cpu", [&] {
    const scalar_t *xp = o.x.const_data_ptr<scalar_t>(), *wp = o.weight.const_data_ptr<scalar_t>();
    const scalar_t* bp = pointer_or_null<scalar_t>(o.bias);
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    with_kernel_size(g.kernel, [&](auto size) {
      constexpr int K = decltype(size)::value;
      at::parallel_for(0, g.tasks(), grain_of(g), [&](int64_t begin, int64_t end) {
        Scratch<scalar_t> scratch(g);
#ifdef DWC_HAS_AVX2_CLONE
        if (cpu_has_avx2()) return forward_tasks_avx2<K>(g, wp, bp, xp, op, begin, end, scratch);
#endif
        forward_tasks_portable<K>(g, wp, bp, xp, op, begin, end, scratch);
      });
    });
  });
  return out;
}

BackwardResult backward_cpu(const Tensor& grad_out_in, const Tensor& x_in, const Tensor& weight_in,
                            const std::optional<Tensor>& bias_in, int64_t dilation) {
  const Operands o = backward_operands(grad_out_in, x_in, weight_in, bias_in, dilation);
  const Tensor& x = o.x;
  Tensor grad_x = at::empty_like(x);
  const int64_t channels = x.size(1), taps = int64_t(o.kernel) * o.kernel;
  if (x.numel() == 0)
    return {grad_x, at::zeros_like(o.weight), at::zeros({channels}, x.options())};
  const Geometry g = geometry_of(o);
  Tensor partials = at::empty({g.batch * g.bands, g.partial_row()}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_conv2d_backward_cpu", [&] {
    const scalar_t *gp = o.grad_out.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = o.weight.const_data_ptr<scalar_t>();
    scalar_t* dxp = grad_x.mutable_data_ptr<scalar_t>();
    double* pp = partials.mutable_data_ptr<double>();
    with_kernel_size(g.kernel, [&](auto size) {
      constexpr int K = decltype(size)::value;
      at::parallel_for(0, g.tasks(), grain_of(g), [&](int64_t begin, int64_t end) {
        Scratch<scalar_t> scratch(g);
#ifdef DWC_HAS_AVX2_CLONE
        if (cpu_has_avx2()) return backward_tasks_avx2<K>(g, wp, gp, xp, dxp, pp, begin, end, scratch);
#endif
        backward_tasks_portable<K>(g, wp, gp, xp, dxp, pp, begin, end, scratch);
      });
    });
  });
  // Sum the per-(image, band) partials row by row: a fixed order, whatever the thread count.
  Tensor summed = at::zeros({g.partial_row()}, partials.options());
  {
    const double* pp = partials.const_data_ptr<double>();
    double* sp = summed.mutable_data_ptr<double>();
    for (int64_t row = 0; row < partials.size(0); ++row)
      for (int64_t k = 0; k < g.partial_row(); ++k) sp[k] += pp[row * g.partial_row() + k];
  }
  const Tensor sums = summed.to(x.scalar_type()).reshape({channels, taps + 1});
  // Copies, not views: two views of `sums` would alias (and with one channel both are contiguous views).
  return {grad_x, sums.narrow(1, 0, taps).reshape_as(o.weight).clone(at::MemoryFormat::Contiguous),
          sums.select(1, taps).clone(at::MemoryFormat::Contiguous)};
}

}  // namespace
}  // namespace dwc
}  // namespace sparse_attn

TORCH_LIBRARY_IMPL(sparse_attn, CPU, m) {
  m.impl("depthwise_conv2d_forward", &sparse_attn::dwc::forward_cpu);
  m.impl("depthwise_conv2d_backward", &sparse_attn::dwc::backward_cpu);
}
