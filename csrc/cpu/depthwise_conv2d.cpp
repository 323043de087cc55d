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
// On x86 the tasks are compiled a second time for AVX2+FMA, picked at run time (csrc/cpu/isa.h);
// where the AVX-512 clones run, the float forward runs its own kernel instead (row blocks, no
// frame: below), with the same bits; the double forward keeps the AVX2 clone, and the backward has
// an AVX-512 clone of its own.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/depthwise_conv2d.h"
#include "common/depthwise_conv2d_args.h"
#include "cpu/isa.h"
#include "cpu/window_correlation.h"

#ifdef SA_HAS_ISA_CLONES
#include <immintrin.h>
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
    for (int j = 0; j < K; ++j)
      DWC_UNROLL
      for (int i = 0; i < K; ++i) {
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

// One (image, channel, band) of the backward: dx over the band, and the band's partial sums of
// the weight's gradient (csrc/cpu/window_correlation.h: one pass per window row) and of the bias's.
template <int K, int64_t Block, typename T>
DWC_INLINE void backward_task(const Geometry& g, const T* weight, const T* grad_out, const T* x, T* grad_x,
                              double* partials, int64_t item, Scratch<T>& s) {
  const Task t = task_of(g, item);
  const int64_t offset = (t.b * g.channels + t.c) * g.plane(), ld = g.ld();
  const int dilation = g.dilation;
  load_frame(g, grad_out + offset, t, s.grad_frame.data());
  load_frame(g, x + offset, t, s.frame.data());
  T taps[K * K] = {};
  std::copy(weight + t.c * K * K, weight + (t.c + 1) * K * K, taps);
  for (int64_t y = t.y0; y < t.y1; ++y)
    conv_row<K, true>(s.grad_frame.data() + (y - t.y0) * ld, ld, dilation, taps, T(0), g.width,
                      grad_x + offset + y * g.width);
  // grad_out's own rows sit `reach` rows and columns into the frame.
  const T* grad_rows = s.grad_frame.data() + g.reach * ld + g.reach;
  double* partial = partials + (t.b * g.bands + t.band) * g.partial_row() + t.c * (K * K + 1);
  std::fill(partial, partial + K * K, 0.0);
  correlate_window<K, Block>(grad_rows, ld, s.frame.data(), ld, dilation, t.y1 - t.y0, g.width, partial);
  partial[K * K] = patch_sum(grad_rows, ld, t.y1 - t.y0, g.width);
}

#ifdef SA_HAS_ISA_CLONES
// ---------------------------------------------------------------------------------------------
// The float forward on AVX-512: row blocks, read straight from the input
// ---------------------------------------------------------------------------------------------
// One row at a time, every tap costs a weight broadcast and an input load per FMA, so the loads
// bound it. Here a block computes R output rows of one dilation phase (y, y + d, ..., y + (R-1)d)
// over B vectors of 16 columns, one tap column j at a time: the column's K weights stay in
// registers, and output row r's tap row i reads input row y + (r + i - half)·d, so walking
// s = r + i = 0 .. R+K-2, one loaded vector feeds the FMAs of every output row r with
// 0 <= s - r < K. Each output adds its taps column by column (j-major, i-minor) from zero, then
// the bias: the order of window_sum and of the row kernel above.
// Why column by column: the loads at column offsets j·d straddle cache lines (a split load costs
// about two), and walking the taps row by row, with 49 weights broadcast from memory, needed
// about as many load slots as FMAs; how well GCC then allocated registers swung with the tuning
// flags (82-165 GFLOP/s in-cache on one core of this AVX-512 Xeon, standalone). With a column's
// K weights in registers the load slots are about half the FMAs: 145-176 GFLOP/s whatever the
// flags (the same loop with aligned loads, at the FMA ceiling: ~210). In the op, 7x7 dilation 2,
// one thread, C48 256²: 3.18 -> 2.46 ms.
// There is no frame: rows above and below the image read a row of zeros, and the blocks whose
// window crosses the left or right edge (or the image's last columns) mask their loads to the
// image's columns (masked-off lanes read zero and never fault) and their stores to the width.
// The copy into a frame cost about a fifth of the time; the next task's rows are prefetched
// into L2 instead, a few lines per block.
constexpr int kVec = 16;     // floats per AVX-512 register
constexpr int kRows = 8;     // R: output rows per block
constexpr int kVectors = 2;  // B: vectors per block; R·B accumulators leave registers for the rest
// Outputs of more bytes than a core's L2 are written with streaming stores: no read for ownership.
constexpr int64_t kStreamBytes = int64_t(4) << 20;

// The next task's input rows, fetched into L2 a few lines per block while this task computes.
struct Prefetch {
  const char* next = nullptr;
  int64_t lines = 0, per_block = 0;
  DWC_INLINE void issue() {
    for (int64_t n = std::min(per_block, lines); n > 0; --n, --lines, next += 64) _mm_prefetch(next, _MM_HINT_T1);
  }
};

// Lanes [lo, hi) of a vector (clamped to 0 .. 16) as a mask.
DWC_INLINE __mmask16 lanes(int64_t lo, int64_t hi) {
  lo = std::max<int64_t>(lo, 0);
  hi = std::min<int64_t>(hi, kVec);
  return lo < hi ? static_cast<__mmask16>((1u << hi) - (1u << lo)) : 0;
}

// rows[s] is column 0 of input row y + (s - half)·d, or of the zero row; `left` = j0 - reach,
// the input column under tap column 0 of the block's first output column j0. D is the dilation
// when known at compile time (1 and 2, the networks'), else 0. An Edge block is one vector wide
// and masks tap column j's loads with masks[j] and its stores with `store`.
// Out of line: inlined into the task loop, its registers spilled.
template <int K, int D, int R, int B, bool Edge>
SA_TARGET_AVX512 __attribute__((noinline)) void row_block_avx512(const float* const* rows, int64_t left,
                                                                 int dilation, const float* taps, __m512 shift,
                                                                 float* dst, int64_t dst_step, const __mmask16* masks,
                                                                 __mmask16 store, bool stream) {
  static_assert(!Edge || B == 1, "an edge block is one vector wide");
  const int64_t d = D ? D : dilation;
  __m512 acc[R][B];
  DWC_UNROLL
  for (int r = 0; r < R; ++r)
    DWC_UNROLL
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_ps();
#pragma GCC unroll 1
  for (int j = 0; j < K; ++j) {  // a loop: unrolled, the block is ~1400 instructions
    __m512 column[K];
    DWC_UNROLL
    for (int i = 0; i < K; ++i) column[i] = _mm512_set1_ps(taps[i * K + j]);
    DWC_UNROLL
    for (int s = 0; s < R + K - 1; ++s) {
      const float* src = rows[s] + left + j * d;
      __m512 v[B];
      DWC_UNROLL
      for (int b = 0; b < B; ++b) {
        v[b] = Edge ? _mm512_maskz_loadu_ps(masks[j], src) : _mm512_loadu_ps(src + b * kVec);
        asm("" : "+v"(v[b]));  // one load per vector: not folded into (and repeated by) each FMA
      }
      DWC_UNROLL
      for (int r = (s < K ? 0 : s - K + 1); r <= (s < R ? s : R - 1); ++r)
        DWC_UNROLL
        for (int b = 0; b < B; ++b) acc[r][b] = _mm512_fmadd_ps(column[s - r], v[b], acc[r][b]);
    }
  }
  DWC_UNROLL
  for (int r = 0; r < R; ++r)
    DWC_UNROLL
    for (int b = 0; b < B; ++b) {
      float* out = dst + r * dst_step + b * kVec;
      const __m512 sum = _mm512_add_ps(shift, acc[r][b]);
      if (Edge)
        _mm512_mask_storeu_ps(out, store, sum);
      else if (stream)
        _mm512_stream_ps(out, sum);
      else
        _mm512_storeu_ps(out, sum);
    }
}

struct Image {
  const float* plane;  // the input channel
  const float* zeros;  // a row of zeros as long as the input's
  float* out;          // the output channel
  int64_t height, width;
  int reach, dilation;
  bool stream;  // output rows are 64-byte aligned and the output is large
};

// R output rows of one phase from row y: across the width in blocks of B vectors where the
// window stays inside the image, else one masked vector at a time. Then the rest of `count`
// rows in groups of R/2, R/4, ..., 1.
template <int K, int D, int R>
SA_TARGET_AVX512 DWC_INLINE void phase_rows_avx512(const Image& im, int64_t y, int64_t count, const float* taps,
                                                   __m512 shift, Prefetch& prefetch) {
  constexpr int B = kVectors;
  const int64_t d = D ? D : im.dilation, width = im.width, reach = im.reach;
  for (; count >= R; count -= R, y += R * d) {
    const float* rows[R + K - 1];
    for (int s = 0; s < R + K - 1; ++s) {
      const int64_t iy = y + (s - (K - 1) / 2) * d;
      rows[s] = iy >= 0 && iy < im.height ? im.plane + iy * width : im.zeros;
    }
    float* dst = im.out + y * width;
    for (int64_t j0 = 0; j0 < width;) {
      prefetch.issue();
      if (j0 >= reach && j0 + B * kVec + reach <= width) {
        row_block_avx512<K, D, R, B, false>(rows, j0 - reach, im.dilation, taps, shift, dst + j0, d * width, nullptr,
                                            0, im.stream);
        j0 += B * kVec;
      } else {
        __mmask16 masks[K];
        for (int j = 0; j < K; ++j) masks[j] = lanes(reach - j0 - j * d, width + reach - j0 - j * d);
        row_block_avx512<K, D, R, 1, true>(rows, j0 - reach, im.dilation, taps, shift, dst + j0, d * width, masks,
                                           lanes(0, width - j0), false);
        j0 += kVec;
      }
    }
  }
  if constexpr (R > 1)
    if (count > 0) phase_rows_avx512<K, D, R / 2>(im, y, count, taps, shift, prefetch);
}

// One (image, channel, band): the band's rows phase by phase (y0 + p, y0 + p + d, ...).
template <int K, int D>
SA_TARGET_AVX512 void forward_task_avx512(const Geometry& g, const float* weight, const float* bias, const float* x,
                                          float* out, const float* zeros, bool stream, int64_t item, int64_t end) {
  const Task t = task_of(g, item);
  const int64_t offset = (t.b * g.channels + t.c) * g.plane(), d = g.dilation;
  const Image im{x + offset, zeros, out + offset, g.height, g.width, g.reach, g.dilation, stream};
  float taps[K * K] = {};
  std::copy(weight + t.c * K * K, weight + (t.c + 1) * K * K, taps);
  const __m512 shift = _mm512_set1_ps(bias ? bias[t.c] : 0.0f);
  Prefetch prefetch;
  if (item + 1 < end) {
    const Task n = task_of(g, item + 1);
    const int64_t first = std::max<int64_t>(n.y0 - g.reach, 0), last = std::min<int64_t>(n.y1 + g.reach, g.height);
    prefetch.next = reinterpret_cast<const char*>(x + (n.b * g.channels + n.c) * g.plane() + first * g.width);
    prefetch.lines = ((last - first) * g.width * int64_t(sizeof(float)) + 63) / 64;
    const int64_t blocks = (t.y1 - t.y0 + kRows - 1) / kRows * ((g.width + kVec - 1) / kVec);  // about
    prefetch.per_block = prefetch.lines / blocks + 1;
  }
  for (int64_t p = 0; p < std::min<int64_t>(d, t.y1 - t.y0); ++p)
    phase_rows_avx512<K, D, kRows>(im, t.y0 + p, (t.y1 - t.y0 - p + d - 1) / d, taps, shift, prefetch);
}

template <int K>
SA_TARGET_AVX512 void forward_tasks_avx512(const Geometry& g, const float* w, const float* bias, const float* x,
                                           float* out, int64_t begin, int64_t end) {
  const std::vector<float> zeros(g.width);
  const bool stream = g.batch * g.channels * g.plane() * int64_t(sizeof(float)) >= kStreamBytes &&
                      reinterpret_cast<uintptr_t>(out) % 64 == 0 && g.width % kVec == 0;
  for (int64_t item = begin; item < end; ++item) {
    if (g.dilation == 1)
      forward_task_avx512<K, 1>(g, w, bias, x, out, zeros.data(), stream, item, end);
    else if (g.dilation == 2)
      forward_task_avx512<K, 2>(g, w, bias, x, out, zeros.data(), stream, item, end);
    else
      forward_task_avx512<K, 0>(g, w, bias, x, out, zeros.data(), stream, item, end);
  }
  if (stream) _mm_sfence();  // streaming stores are weakly ordered: publish them before returning
}
#endif

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
  for (int64_t item = begin; item < end; ++item)
    backward_task<K, kBlockPortable>(g, w, grad_out, x, grad_x, partials, item, s);
}

#ifdef SA_HAS_ISA_CLONES
template <int K, typename T>
SA_TARGET_AVX2 void forward_tasks_avx2(const Geometry& g, const T* w, const T* bias, const T* x, T* out, int64_t begin,
                                       int64_t end, Scratch<T>& s) {
  for (int64_t item = begin; item < end; ++item) forward_task<K>(g, w, bias, x, out, item, s);
}
template <int K, typename T>
SA_TARGET_AVX2 void backward_tasks_avx2(const Geometry& g, const T* w, const T* grad_out, const T* x, T* grad_x,
                                        double* partials, int64_t begin, int64_t end, Scratch<T>& s) {
  for (int64_t item = begin; item < end; ++item)
    backward_task<K, kBlockAvx2>(g, w, grad_out, x, grad_x, partials, item, s);
}
template <int K, typename T>
SA_TARGET_AVX512 void backward_tasks_avx512(const Geometry& g, const T* w, const T* grad_out, const T* x,
                                            T* grad_x, double* partials, int64_t begin, int64_t end, Scratch<T>& s) {
  for (int64_t item = begin; item < end; ++item)
    backward_task<K, kBlockAvx512>(g, w, grad_out, x, grad_x, partials, item, s);
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
#ifdef SA_HAS_ISA_CLONES
        if constexpr (std::is_same_v<scalar_t, float>)
          if (cpu_isa() == Isa::kAvx512) return forward_tasks_avx512<K>(g, wp, bp, xp, op, begin, end);
#endif
        Scratch<scalar_t> scratch(g);
#ifdef SA_HAS_ISA_CLONES
        if (cpu_isa() != Isa::kPortable) return forward_tasks_avx2<K>(g, wp, bp, xp, op, begin, end, scratch);
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
#ifdef SA_HAS_ISA_CLONES
        if (cpu_isa() == Isa::kAvx512)
          return backward_tasks_avx512<K>(g, wp, gp, xp, dxp, pp, begin, end, scratch);
        if (cpu_isa() == Isa::kAvx2) return backward_tasks_avx2<K>(g, wp, gp, xp, dxp, pp, begin, end, scratch);
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
