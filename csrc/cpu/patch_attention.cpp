// CPU kernels of patch attention (DESIGN.md §3); shared math in csrc/common/patch_attention.h.
//
// The pixel-level formulation: for a rectangle of query pixels and a rectangle of key pixels of
// one level, each with its one-pixel halo, one product over the channels of single pixels
// (G = q kᵀ) and nine shifted adds give every 3×3 patch score (S[p, m] = Σ_δ G[p+δ, m+δ]); the
// fold is the same trick backwards (Ã[x, y] = Σ_δ A[x−δ, y−δ], then out = Ã v). That is about
// 2·Cq + Cv multiply-adds per (query, key) pair in the forward instead of 9·(Cq + Cv).
//
// Forward, per query tile: pass 1 streams the key tiles for each query's log-sum-exp (with topk:
// a per-query heap of its t best keys, whose worst gives the threshold and the tie rule's last
// kept index); pass 2 streams them again for the output (with topk it reads the heaps' keys
// instead). Backward (FlashAttention-2 style, recomputing the scores): per query tile, D_p =
// ⟨dO_p, O_p⟩ = Σ_m A_pm dP_pm; then per key tile, streaming the query tiles, dk, dv and the key
// tile's share of dq. Halo rows of a tile's result overlap its neighbours': every tile writes its
// own buffer and the buffers are added in a fixed order, so the results do not depend on the
// number of threads. On x86 the tile loops are compiled a second time for AVX2+FMA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/patch_attention.h"
#include "common/patch_attention_args.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define PATCH_HAS_AVX2_CLONE 1
#define PATCH_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace sparse_attn {
namespace patch {
namespace {

using at::Tensor;

constexpr int64_t kTileRows = 16, kTileCols = 16;  // query and key rectangles
constexpr int64_t kTilePixels = kTileRows * kTileCols;
constexpr int64_t kHaloPixels = (kTileRows + 2) * (kTileCols + 2);

// ---------------------------------------------------------------------------------------------
// Maps and their tiling
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Map {  // one image's (C, H, W) map, contiguous
  const T* data;
  int64_t channels, rows, cols;
  T at(int64_t c, int64_t y, int64_t x) const { return data[(c * rows + y) * cols + x]; }
};

struct Grid {  // the tiles of a rows × cols map, row-major
  int64_t rows, cols;
  int64_t tile_rows() const { return (rows + kTileRows - 1) / kTileRows; }
  int64_t tile_cols() const { return (cols + kTileCols - 1) / kTileCols; }
  int64_t count() const { return tile_rows() * tile_cols(); }
  HaloRect rect(int64_t tile) const {
    const int64_t y0 = (tile / tile_cols()) * kTileRows, x0 = (tile % tile_cols()) * kTileCols;
    return {y0, x0, std::min(kTileRows, rows - y0), std::min(kTileCols, cols - x0)};
  }
};

struct KeyTile {  // a tile of one level's key map; `first_key`: the key index m of the level's pixel (0, 0)
  int64_t level, first_key, index;  // index: its place in Problem::key_tiles
  HaloRect rect;
  int64_t key(int64_t y, int64_t x, int64_t level_cols) const { return first_key + (rect.y0 + y) * level_cols + rect.x0 + x; }
};

// The halo rectangle's pixels, zero outside the map: pixel-major ([halo pixel][channel]) or
// channel-major ([channel][halo pixel]).
template <typename T>
void gather(const Map<T>& map, const HaloRect& r, T* out, bool pixel_major) {
  const int64_t n = r.halo_size(), channels = map.channels;
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t y = -1; y <= r.rows; ++y)
      for (int64_t x = -1; x <= r.cols; ++x) {
        const int64_t my = r.y0 + y, mx = r.x0 + x;
        const T value = (my >= 0 && my < map.rows && mx >= 0 && mx < map.cols) ? map.at(c, my, mx) : T(0);
        const int64_t i = r.halo_index(y, x);
        out[pixel_major ? i * channels + c : c * n + i] = value;
      }
}

// ---------------------------------------------------------------------------------------------
// Tile arithmetic (compiled twice on x86: portable and AVX2+FMA)
// ---------------------------------------------------------------------------------------------
// exp(x) for the softmax: float32 by a polynomial that vectorises (Cephes' expf: range reduction
// by ln 2 in two parts, degree-6 polynomial, within 2 ulp; below -87 it is 0); float64 by std::exp.
inline float exp_approx(float x) {
  if (!(x > -87.0f)) return 0.0f;
  x = x < 88.0f ? x : 88.0f;
  const float n = static_cast<float>(static_cast<int32_t>(x * 1.44269504088896341f + (x >= 0.0f ? 0.5f : -0.5f)));
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
inline double exp_approx(double x) { return std::exp(x); }

// The float32 hot loops in GCC vector extensions (AVX2 registers in the AVX2 clone, pairs of SSE
// registers otherwise): the compiler's own vectorisation of them was poor.
typedef float float8 __attribute__((vector_size(32)));
typedef int32_t int8v __attribute__((vector_size(32)));

inline float8 load8(const float* p) {
  float8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, float8 v) { std::memcpy(p, &v, sizeof(v)); }

// The tile products: blocks of kBlockRows × kBlockCols outputs.
constexpr int64_t kBlockRows = 6, kBlockCols = 16;
static_assert(kTileCols == 16, "diagonal_sums keeps a full key tile's row in two float8 registers");
// Every buffer a tile product reads as b ends in this many spare floats (zeros), for the loads of
// its ragged right-edge blocks.
constexpr int64_t kProductSlack = kBlockCols;
// The backward's memory for the key tiles' shares of dq (see backward_cpu).
constexpr int64_t kShareBudget = int64_t(64) << 20;

#define PATCH_TILE_FUNCTIONS(ATTR, SUFFIX)                                                                           \
  /* x on eight lanes (compiled here so that the AVX2 clone broadcasts in one instruction). */                       \
  ATTR inline float8 splat8##SUFFIX(float x) { return float8{x, x, x, x, x, x, x, x}; }                              \
                                                                                                                     \
  /* exp_approx(float) on eight lanes. */                                                                            \
  ATTR inline float8 exp8##SUFFIX(float8 x) {                                                                        \
    const int8v valid = x > splat8##SUFFIX(-87.0f);                                                                  \
    x = x < splat8##SUFFIX(88.0f) ? x : splat8##SUFFIX(88.0f);                                                       \
    x = x > splat8##SUFFIX(-87.0f) ? x : splat8##SUFFIX(-87.0f);                                                     \
    const float8 t = x * 1.44269504088896341f + (x >= splat8##SUFFIX(0.0f) ? splat8##SUFFIX(0.5f) : splat8##SUFFIX(-0.5f)); \
    const int8v ni = __builtin_convertvector(t, int8v);                                                              \
    const float8 n = __builtin_convertvector(ni, float8);                                                            \
    const float8 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;                                                    \
    float8 p = splat8##SUFFIX(1.9875691500e-4f);                                                                     \
    p = p * r + 1.3981999507e-3f;                                                                                    \
    p = p * r + 8.3334519073e-3f;                                                                                    \
    p = p * r + 4.1665795894e-2f;                                                                                    \
    p = p * r + 1.6666665459e-1f;                                                                                    \
    p = p * r + 5.0000001201e-1f;                                                                                    \
    const float8 y = p * r * r + r + 1.0f;                                                                           \
    const float8 scale = (float8)((ni + 127) << 23);                                                                 \
    return (float8)((int8v)(y * scale) & valid);                                                                     \
  }                                                                                                                  \
                                                                                                                     \
  /* One block of block_product_float: kBlockRows × 16 outputs in twelve vector registers while k */                 \
  /* runs (twelve independent FMA chains hide the FMA latency; the a values are broadcast from */                    \
  /* memory, so that nothing spills). */                                                                             \
  template <bool kSkipZero>                                                                                          \
  ATTR inline void row_block##SUFFIX(const float* __restrict a, int64_t a_row, int64_t a_k,                          \
                                     const float* __restrict b, int64_t b_k, int64_t depth,                          \
                                     float8 (&acc)[kBlockRows][2]) {                                                 \
    for (int64_t k = 0; k < depth; ++k) {                                                                            \
      const float* __restrict ak = a + k * a_k;                                                                      \
      if (kSkipZero) {                                                                                               \
        bool all_zero = true;                                                                                        \
        for (int64_t r = 0; r < kBlockRows; ++r) all_zero = all_zero && ak[r * a_row] == 0.0f;                       \
        if (all_zero) continue;                                                                                      \
      }                                                                                                              \
      const float8 b0 = load8(b + k * b_k), b1 = load8(b + k * b_k + 8);                                             \
      _Pragma("GCC unroll 6") for (int64_t r = 0; r < kBlockRows; ++r) {                                             \
        const float8 x = splat8##SUFFIX(ak[r * a_row]);                                                              \
        acc[r][0] += x * b0;                                                                                         \
        acc[r][1] += x * b1;                                                                                         \
      }                                                                                                              \
    }                                                                                                                \
  }                                                                                                                  \
                                                                                                                     \
  /* The float32 block_product, in blocks of kBlockRows × 16 outputs; the last rows (fewer than */                   \
  /* kBlockRows) one at a time. A ragged block at the right edge loads 16 columns of b all the */                    \
  /* same and stores only its own: b must be readable kBlockCols floats past its last row (see */                    \
  /* kProductSlack). With `skip_zero`, a k where the block's a values are all 0 is skipped (the */                   \
  /* masked probabilities of top-k). */                                                                              \
  ATTR void block_product_float##SUFFIX(const float* __restrict a, int64_t a_row, int64_t a_k,                       \
                                        const float* __restrict b, int64_t b_k, int64_t rows, int64_t cols,          \
                                        int64_t depth, float* __restrict out, int64_t out_row, bool accumulate,      \
                                        bool skip_zero) {                                                            \
    for (int64_t r0 = 0; r0 < rows; r0 += kBlockRows) {                                                              \
      const int64_t nr = std::min(kBlockRows, rows - r0);                                                            \
      const float* __restrict ar = a + r0 * a_row;                                                                   \
      for (int64_t n0 = 0; n0 < cols; n0 += kBlockCols) {                                                            \
        const int64_t nn = std::min(kBlockCols, cols - n0);                                                          \
        float8 acc[kBlockRows][2] = {};                                                                              \
        if (nr == kBlockRows) {                                                                                      \
          if (skip_zero)                                                                                             \
            row_block##SUFFIX<true>(ar, a_row, a_k, b + n0, b_k, depth, acc);                                        \
          else                                                                                                       \
            row_block##SUFFIX<false>(ar, a_row, a_k, b + n0, b_k, depth, acc);                                       \
        } else {                                                                                                     \
          for (int64_t k = 0; k < depth; ++k) {                                                                      \
            const float8 b0 = load8(b + k * b_k + n0), b1 = load8(b + k * b_k + n0 + 8);                             \
            for (int64_t r = 0; r < nr; ++r) {                                                                       \
              const float8 x = splat8##SUFFIX(ar[r * a_row + k * a_k]);                                              \
              acc[r][0] += x * b0;                                                                                   \
              acc[r][1] += x * b1;                                                                                   \
            }                                                                                                        \
          }                                                                                                          \
        }                                                                                                            \
        for (int64_t r = 0; r < nr; ++r) {                                                                           \
          float* __restrict o = out + (r0 + r) * out_row + n0;                                                       \
          if (nn == kBlockCols) {                                                                                    \
            store8(o, accumulate ? load8(o) + acc[r][0] : acc[r][0]);                                                \
            store8(o + 8, accumulate ? load8(o + 8) + acc[r][1] : acc[r][1]);                                        \
          } else {                                                                                                   \
            for (int64_t n = 0; n < nn; ++n) {                                                                       \
              const float value = n < 8 ? acc[r][0][n] : acc[r][1][n - 8];                                           \
              o[n] = accumulate ? o[n] + value : value;                                                              \
            }                                                                                                        \
          }                                                                                                          \
        }                                                                                                            \
      }                                                                                                              \
    }                                                                                                                \
  }                                                                                                                  \
                                                                                                                     \
  /* out[r][n] (= or +=) Σ_k a[r·a_row + k·a_k] · b[k·b_k + n], r < rows, n < cols, k < depth: the */                \
  /* three products of the tiles (see pixel_gram, product_rows and product_cols). */                                 \
  template <typename T>                                                                                              \
  ATTR void block_product##SUFFIX(const T* __restrict a, int64_t a_row, int64_t a_k, const T* __restrict b,          \
                                  int64_t b_k, int64_t rows, int64_t cols, int64_t depth, T* __restrict out,         \
                                  int64_t out_row, bool accumulate, bool skip_zero) {                                \
    if constexpr (std::is_same_v<T, float>) {                                                                        \
      block_product_float##SUFFIX(a, a_row, a_k, b, b_k, rows, cols, depth, out, out_row, accumulate, skip_zero);    \
    } else {                                                                                                         \
      for (int64_t r = 0; r < rows; ++r)                                                                             \
        for (int64_t n = 0; n < cols; ++n) {                                                                         \
          T sum = T(0);                                                                                              \
          for (int64_t k = 0; k < depth; ++k) sum += a[r * a_row + k * a_k] * b[k * b_k + n];                        \
          out[r * out_row + n] = accumulate ? out[r * out_row + n] + sum : sum;                                      \
        }                                                                                                            \
    }                                                                                                                \
  }                                                                                                                  \
                                                                                                                     \
  /* out[m] = exp(s[m] − shift) */                                                                                   \
  template <typename T>                                                                                              \
  ATTR void exp_shifted##SUFFIX(const T* __restrict s, T shift, int64_t n, T* __restrict out) {                      \
    int64_t m = 0;                                                                                                   \
    if constexpr (std::is_same_v<T, float>)                                                                          \
      for (; m + 8 <= n; m += 8) store8(out + m, exp8##SUFFIX(load8(s + m) - shift));                                \
    for (; m < n; ++m) out[m] = exp_approx(s[m] - shift);                                                            \
  }                                                                                                                  \
                                                                                                                     \
  /* Folds a row of n scores into an online softmax's running (max, Σ exp(s − max)); the tile's */                   \
  /* exponentials are summed in T (at most one tile of them, each ≤ 1), the running sum in double. */                \
  template <typename T>                                                                                              \
  ATTR void online_exp_sum##SUFFIX(const T* __restrict s, int64_t n, T& max, double& sum) {                          \
    T tile_max = max;                                                                                                \
    int64_t m = 0;                                                                                                   \
    if constexpr (std::is_same_v<T, float>) {                                                                        \
      float8 vmax = splat8##SUFFIX(tile_max);                                                                        \
      for (; m + 8 <= n; m += 8) {                                                                                   \
        const float8 v = load8(s + m);                                                                               \
        vmax = v > vmax ? v : vmax;                                                                                  \
      }                                                                                                              \
      for (int lane = 0; lane < 8; ++lane) tile_max = std::max(tile_max, vmax[lane]);                                \
    }                                                                                                                \
    for (; m < n; ++m) tile_max = std::max(tile_max, s[m]);                                                          \
    T tile_sum = T(0);                                                                                               \
    m = 0;                                                                                                           \
    if constexpr (std::is_same_v<T, float>) {                                                                        \
      float8 vsum = splat8##SUFFIX(0.0f);                                                                            \
      for (; m + 8 <= n; m += 8) vsum += exp8##SUFFIX(load8(s + m) - tile_max);                                      \
      for (int lane = 0; lane < 8; ++lane) tile_sum += vsum[lane];                                                   \
    }                                                                                                                \
    for (; m < n; ++m) tile_sum += exp_approx(s[m] - tile_max);                                                      \
    sum = sum * std::exp(double(max) - double(tile_max)) + double(tile_sum);                                         \
    max = tile_max;                                                                                                  \
  }                                                                                                                  \
                                                                                                                     \
  /* s[p][m] = Σ_δ g[p+δ][m+δ] over the two rectangles' interiors (p: qr, m: kr); a full key */                      \
  /* tile's row of sixteen sums stays in two vector registers over the nine δ. */                                    \
  template <typename T>                                                                                              \
  ATTR void diagonal_sums##SUFFIX(const T* __restrict g, const HaloRect& qr, const HaloRect& kr, T* __restrict s) {  \
    const int64_t nk = kr.rows * kr.cols, nbh = kr.halo_size();                                                      \
    for (int64_t p = 0; p < qr.rows * qr.cols; ++p) {                                                                \
      const int64_t py = p / qr.cols, px = p % qr.cols;                                                              \
      T* __restrict row = s + p * nk;                                                                                \
      if constexpr (std::is_same_v<T, float>) {                                                                      \
        if (kr.cols == kTileCols) {                                                                                  \
          for (int64_t my = 0; my < kr.rows; ++my) {                                                                 \
            float8 lo = splat8##SUFFIX(0.0f), hi = splat8##SUFFIX(0.0f);                                             \
            for (int64_t dy = -1; dy <= 1; ++dy)                                                                     \
              for (int64_t dx = -1; dx <= 1; ++dx) {                                                                 \
                const float* __restrict src = g + qr.halo_index(py + dy, px + dx) * nbh + kr.halo_index(my + dy, dx); \
                lo += load8(src);                                                                                    \
                hi += load8(src + 8);                                                                                \
              }                                                                                                      \
            store8(row + my * kTileCols, lo);                                                                        \
            store8(row + my * kTileCols + 8, hi);                                                                    \
          }                                                                                                          \
          continue;                                                                                                  \
        }                                                                                                            \
      }                                                                                                              \
      for (int64_t m = 0; m < nk; ++m) row[m] = T(0);                                                                \
      for (int64_t dy = -1; dy <= 1; ++dy)                                                                           \
        for (int64_t dx = -1; dx <= 1; ++dx) {                                                                       \
          const T* __restrict grow = g + qr.halo_index(py + dy, px + dx) * nbh;                                      \
          for (int64_t my = 0; my < kr.rows; ++my) {                                                                 \
            const T* __restrict src = grow + kr.halo_index(my + dy, dx);                                             \
            T* __restrict dst = row + my * kr.cols;                                                                  \
            for (int64_t mx = 0; mx < kr.cols; ++mx) dst[mx] += src[mx];                                             \
          }                                                                                                          \
        }                                                                                                            \
    }                                                                                                                \
  }                                                                                                                  \
                                                                                                                     \
  /* The adjoint: acc[x][y] = Σ_δ a[x−δ][y−δ] (acc: qr halo × kr halo), one row x at a time so */                    \
  /* that it stays in the first-level cache over its (up to) nine contributions. */                                  \
  template <typename T>                                                                                              \
  ATTR void diagonal_spread##SUFFIX(const T* __restrict a, const HaloRect& qr, const HaloRect& kr, T* __restrict acc) { \
    const int64_t nk = kr.rows * kr.cols, nbh = kr.halo_size();                                                      \
    for (int64_t hy = -1; hy <= qr.rows; ++hy)                                                                       \
      for (int64_t hx = -1; hx <= qr.cols; ++hx) {                                                                   \
        T* __restrict out = acc + qr.halo_index(hy, hx) * nbh;                                                       \
        for (int64_t i = 0; i < nbh; ++i) out[i] = T(0);                                                             \
        for (int64_t dy = 1; dy >= -1; --dy)  /* in the order of the source rows p = x − δ */                        \
          for (int64_t dx = 1; dx >= -1; --dx) {                                                                     \
            const int64_t py = hy - dy, px = hx - dx;                                                                \
            if (py < 0 || py >= qr.rows || px < 0 || px >= qr.cols) continue;                                        \
            const T* __restrict row = a + (py * qr.cols + px) * nk;                                                  \
            for (int64_t my = 0; my < kr.rows; ++my) {                                                               \
              T* __restrict dst = out + kr.halo_index(my + dy, dx);                                                  \
              const T* __restrict src = row + my * kr.cols;                                                          \
              for (int64_t mx = 0; mx < kr.cols; ++mx) dst[mx] += src[mx];                                           \
            }                                                                                                        \
          }                                                                                                          \
      }                                                                                                              \
  }

PATCH_TILE_FUNCTIONS(, _portable)
#ifdef PATCH_HAS_AVX2_CLONE
PATCH_TILE_FUNCTIONS(PATCH_AVX2, _avx2)
#endif

bool cpu_has_avx2() {
#ifdef PATCH_HAS_AVX2_CLONE
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

#ifdef PATCH_HAS_AVX2_CLONE
#define PATCH_CALL(fn, ...) (cpu_has_avx2() ? fn##_avx2(__VA_ARGS__) : fn##_portable(__VA_ARGS__))
#else
#define PATCH_CALL(fn, ...) fn##_portable(__VA_ARGS__)
#endif

// g[i][j] = Σ_c a[i][c] · b[c][j]: a pixel-major (na × C), b channel-major (C × nb).
template <typename T>
void pixel_gram(const T* a, const T* b, int64_t na, int64_t nb, int64_t channels, T* g) {
  PATCH_CALL(block_product, a, channels, 1, b, nb, na, nb, channels, g, nb, false, false);
}

// out[x][c] += Σ_y w[x][y] · b[y][c] (w: nx × ny; b, out pixel-major).
template <typename T>
void product_rows(const T* w, const T* b, int64_t nx, int64_t ny, int64_t channels, T* out, bool skip_zero) {
  PATCH_CALL(block_product, w, ny, 1, b, channels, nx, channels, ny, out, channels, true, skip_zero);
}

// out[y][c] += Σ_x w[x][y] · b[x][c] (w: nx × ny; b, out pixel-major).
template <typename T>
void product_cols(const T* w, const T* b, int64_t nx, int64_t ny, int64_t channels, T* out, bool skip_zero) {
  PATCH_CALL(block_product, w, 1, ny, b, channels, ny, channels, nx, out, channels, true, skip_zero);
}

// ---------------------------------------------------------------------------------------------
// One image's problem: its maps, key tiles, and the per-query / per-key statistics
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Problem {
  Map<T> q;
  std::vector<Map<T>> keys, values;
  std::vector<KeyTile> key_tiles;  // every level's tiles, in level order
  Grid query_grid;
  int64_t n_keys, value_channels;
  T scale, key_eps;
  int64_t topk;  // 0: dense
  const T* inverse_norm;  // (M)
  // Per query (N): log-sum-exp of the kept scores, in double whatever T is: scores reach a few
  // hundred, and a float lse would carry |lse|·2⁻²⁴ of error into every probability (measured: 2-5x
  // the float reference's error); with topk the threshold and last kept index.
  const double* lse;
  const T* threshold;
  const int64_t* last_kept;
  bool dense() const { return topk == 0; }
  // Every key tile's halo, gathered once (kHaloPixels × C per tile; see gather_tiles), and in the
  // backward every query tile's pixels of q and of the output gradient.
  std::vector<T> key_channel_tiles, key_pixel_tiles, value_channel_tiles, value_pixel_tiles;
  std::vector<T> query_pixel_tiles, grad_pixel_tiles;
  std::vector<T> value_pixels;  // with topk, the forward's values pixel-major (M × Cv), level after level
  const T* key_channel_tile(const KeyTile& kt) const { return key_channel_tiles.data() + kt.index * kHaloPixels * q.channels; }
  const T* key_pixel_tile(const KeyTile& kt) const { return key_pixel_tiles.data() + kt.index * kHaloPixels * q.channels; }
  const T* value_channel_tile(const KeyTile& kt) const {
    return value_channel_tiles.data() + kt.index * kHaloPixels * value_channels;
  }
  const T* value_pixel_tile(const KeyTile& kt) const { return value_pixel_tiles.data() + kt.index * kHaloPixels * value_channels; }
};

// Gathers the halos of every key tile (keys and values, pixel- or channel-major) into `out`.
template <typename T>
void gather_key_tiles(const Problem<T>& pr, bool values, bool pixel_major, std::vector<T>& out) {
  const int64_t channels = values ? pr.value_channels : pr.q.channels;
  out.resize(pr.key_tiles.size() * kHaloPixels * channels + kProductSlack);
  at::parallel_for(0, pr.key_tiles.size(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const KeyTile& kt = pr.key_tiles[t];
      gather(values ? pr.values[kt.level] : pr.keys[kt.level], kt.rect, out.data() + t * kHaloPixels * channels,
             pixel_major);
    }
  });
}

template <typename T>
void gather_query_tiles(const Map<T>& map, const Grid& grid, std::vector<T>& out) {
  out.resize(grid.count() * kHaloPixels * map.channels + kProductSlack);
  at::parallel_for(0, grid.count(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) gather(map, grid.rect(t), out.data() + t * kHaloPixels * map.channels, true);
  });
}

template <typename T>
void gather_value_pixels(Problem<T>& pr) {
  pr.value_pixels.resize(pr.n_keys * pr.value_channels);
  T* out = pr.value_pixels.data();
  for (const Map<T>& v : pr.values) {
    const int64_t plane = v.rows * v.cols;
    for (int64_t i = 0; i < plane; ++i)
      for (int64_t c = 0; c < v.channels; ++c) out[i * v.channels + c] = v.data[c * plane + i];
    out += plane * v.channels;
  }
}

template <typename T>
std::vector<KeyTile> key_tiles_of(const std::vector<Map<T>>& keys) {
  std::vector<KeyTile> tiles;
  int64_t first = 0;
  for (int64_t level = 0; level < static_cast<int64_t>(keys.size()); ++level) {
    const Grid grid{keys[level].rows, keys[level].cols};
    for (int64_t t = 0; t < grid.count(); ++t) tiles.push_back({level, first, static_cast<int64_t>(tiles.size()), grid.rect(t)});
    first += keys[level].rows * keys[level].cols;
  }
  return tiles;
}

// A thread's scratch: halo gathers, the pixel products and the score tiles.
template <typename T>
struct Workspace {
  std::vector<T> query_pixels;
  const T* query = nullptr;  // the current query tile's halo pixels of q, and of the output gradient
  const T* grad = nullptr;
  std::vector<T> gram, value_gram, spread;
  std::vector<T> scores, probs, grad_probs;
  int64_t tile_keys[kTilePixels];        // the key index m of each pixel of the current key tile
  T tile_inverse_norms[kTilePixels];     // and its 1 / max(‖K_m‖, key_eps)
  Workspace(int64_t cq, int64_t cv)
      : query_pixels(kHaloPixels * cq),
        gram(kHaloPixels * kHaloPixels), value_gram(kHaloPixels * kHaloPixels), spread(kHaloPixels * kHaloPixels),
        scores(kTilePixels * kTilePixels), probs(kTilePixels * kTilePixels), grad_probs(kTilePixels * kTilePixels) {}
};

// The scores s[p][m] = scale · r_m · ⟨Q_p, K_m⟩ of a query tile (its pixels gathered in
// ws.query_pixels) against a key tile.
template <typename T>
void tile_scores(const Problem<T>& pr, Workspace<T>& ws, const HaloRect& qr, const KeyTile& kt) {
  const int64_t cq = pr.q.channels;
  pixel_gram(ws.query, pr.key_channel_tile(kt), qr.halo_size(), kt.rect.halo_size(), cq, ws.gram.data());
  PATCH_CALL(diagonal_sums, ws.gram.data(), qr, kt.rect, ws.scores.data());
  const int64_t nk = kt.rect.rows * kt.rect.cols, level_cols = pr.keys[kt.level].cols;
  T factor[kTilePixels];
  for (int64_t m = 0; m < nk; ++m) {
    ws.tile_keys[m] = kt.key(m / kt.rect.cols, m % kt.rect.cols, level_cols);
    ws.tile_inverse_norms[m] = pr.inverse_norm[ws.tile_keys[m]];
    factor[m] = pr.scale * ws.tile_inverse_norms[m];
  }
  for (int64_t p = 0; p < qr.rows * qr.cols; ++p)
    for (int64_t m = 0; m < nk; ++m) ws.scores[p * nk + m] *= factor[m];
}

// ws.probs = the attention A of the tile (0 for keys outside a query's top t), from ws.scores
// (and ws.tile_keys, set by tile_scores).
template <typename T>
void tile_probs(const Problem<T>& pr, Workspace<T>& ws, const HaloRect& qr, const KeyTile& kt) {
  const int64_t nk = kt.rect.rows * kt.rect.cols;
  for (int64_t p = 0; p < qr.rows * qr.cols; ++p) {
    const int64_t query = (qr.y0 + p / qr.cols) * pr.q.cols + qr.x0 + p % qr.cols;
    T* probs = ws.probs.data() + p * nk;
    const T* scores = ws.scores.data() + p * nk;
    // exp(s − lse) split as in probability(), eight lanes at a time.
    const T shift = T(pr.lse[query]);
    PATCH_CALL(exp_shifted, scores, shift, nk, probs);
    if constexpr (!std::is_same_v<T, double>) {
      const T correction = T(std::exp(double(shift) - pr.lse[query]));
      for (int64_t m = 0; m < nk; ++m) probs[m] *= correction;
    }
    if (pr.dense()) continue;
    const T threshold = pr.threshold[query];
    const int64_t last = pr.last_kept[query];
    for (int64_t m = 0; m < nk; ++m)
      if (!is_kept(scores[m], ws.tile_keys[m], threshold, last, false)) probs[m] = T(0);
  }
}

// ws.grad_probs = dP[p][m] = ⟨dO_p, V_m⟩ (dO's pixels gathered in ws.grad_pixels).
template <typename T>
void tile_grad_probs(const Problem<T>& pr, Workspace<T>& ws, const HaloRect& qr, const KeyTile& kt) {
  pixel_gram(ws.grad, pr.value_channel_tile(kt), qr.halo_size(), kt.rect.halo_size(), pr.value_channels,
             ws.value_gram.data());
  PATCH_CALL(diagonal_sums, ws.value_gram.data(), qr, kt.rect, ws.grad_probs.data());
}

// ---------------------------------------------------------------------------------------------
// Per-key inverse norms and the fold of per-tile halo buffers
// ---------------------------------------------------------------------------------------------
template <typename T>
void inverse_norms(const std::vector<Map<T>>& keys, T key_eps, T* out) {
  for (const Map<T>& k : keys) {
    std::vector<T> pixel_sq(k.rows * k.cols, T(0));
    for (int64_t c = 0; c < k.channels; ++c)
      for (int64_t i = 0; i < k.rows * k.cols; ++i) pixel_sq[i] += k.data[c * k.rows * k.cols + i] * k.data[c * k.rows * k.cols + i];
    for (int64_t y = 0; y < k.rows; ++y)
      for (int64_t x = 0; x < k.cols; ++x)
        out[y * k.cols + x] =
            key_inverse_norm(box_sum<T>(k.rows, k.cols, y, x, [&](int64_t i) { return pixel_sq[i]; }), key_eps);
    out += k.rows * k.cols;
  }
}

// out (C, rows, cols) = the sum, in tile order, of every tile's halo buffer (kHaloPixels × C,
// pixel-major) over the grid's tiles.
template <typename T>
void fold_tiles(const Grid& grid, const T* buffers, int64_t channels, T* out) {
  at::parallel_for(0, grid.count(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const HaloRect r = grid.rect(tile);
      const int64_t ty = tile / grid.tile_cols(), tx = tile % grid.tile_cols();
      for (int64_t y = r.y0; y < r.y0 + r.rows; ++y)
        for (int64_t x = r.x0; x < r.x0 + r.cols; ++x) {
          T* o = out + y * grid.cols + x;
          for (int64_t c = 0; c < channels; ++c) o[c * grid.rows * grid.cols] = T(0);
          for (int64_t ny = std::max<int64_t>(ty - 1, 0); ny <= std::min(ty + 1, grid.tile_rows() - 1); ++ny)
            for (int64_t nx = std::max<int64_t>(tx - 1, 0); nx <= std::min(tx + 1, grid.tile_cols() - 1); ++nx) {
              const int64_t other = ny * grid.tile_cols() + nx;
              const HaloRect o_r = grid.rect(other);
              const int64_t ly = y - o_r.y0, lx = x - o_r.x0;
              if (ly < -1 || ly > o_r.rows || lx < -1 || lx > o_r.cols) continue;
              const T* src = buffers + (other * kHaloPixels + o_r.halo_index(ly, lx)) * channels;
              for (int64_t c = 0; c < channels; ++c) o[c * grid.rows * grid.cols] += src[c];
            }
        }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Operands
// ---------------------------------------------------------------------------------------------
template <typename T>
Problem<T> problem_of(const Tensor& q, const std::vector<Tensor>& keys, const std::vector<Tensor>& values, int64_t b,
                      double scale, int64_t topk, double key_eps) {
  Problem<T> pr;
  auto map_of = [b](const Tensor& t) {
    return Map<T>{t.const_data_ptr<T>() + b * t.size(1) * t.size(2) * t.size(3), t.size(1), t.size(2), t.size(3)};
  };
  pr.q = map_of(q);
  for (const Tensor& k : keys) pr.keys.push_back(map_of(k));
  for (const Tensor& v : values) pr.values.push_back(map_of(v));
  pr.key_tiles = key_tiles_of(pr.keys);
  pr.query_grid = Grid{q.size(2), q.size(3)};
  pr.n_keys = 0;
  for (const Tensor& k : keys) pr.n_keys += k.size(2) * k.size(3);
  pr.value_channels = values[0].size(1);
  pr.scale = static_cast<T>(scale);
  pr.key_eps = static_cast<T>(key_eps);
  pr.topk = topk;
  return pr;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
// A_pm = exp(s − lse) as exp(s − lse_T) · exp(lse_T − lse): the first difference is exact near
// the top scores, the second factor restores lse's bits below T's precision.
template <typename T>
T probability(T score, double lse) {
  const T shift = T(lse);
  const T a = exp_approx(score - shift);
  return std::is_same_v<T, double> ? a : a * T(std::exp(double(shift) - lse));
}

// The output of a query tile with top-k, from each query's t kept keys (its heap): O_p = Σ A_pm
// V_m over them, each 3×3 value patch pasted around p. t·9·Cv multiply-adds per query, where
// streaming the key tiles again would cost M·(2·Cq + Cv) and more.
template <typename T>
void kept_output(const Problem<T>& pr, const HaloRect& qr, const std::vector<TopHeap<T>>& heaps, T* out_buffer) {
  const int64_t cv = pr.value_channels;
  for (int64_t p = 0; p < qr.rows * qr.cols; ++p) {
    const int64_t py = p / qr.cols, px = p % qr.cols;
    const double lse = pr.lse[(qr.y0 + py) * pr.q.cols + qr.x0 + px];
    const TopHeap<T>& heap = heaps[p];
    for (int64_t i = 0; i < heap.size; ++i) {
      const T a = probability(heap.items[i].score, lse);
      int64_t level = 0, key = heap.items[i].key;  // key: its index within its level
      for (; key >= pr.keys[level].rows * pr.keys[level].cols; ++level) key -= pr.keys[level].rows * pr.keys[level].cols;
      const int64_t rows = pr.keys[level].rows, cols = pr.keys[level].cols, ky = key / cols, kx = key % cols;
      const T* level_values = pr.value_pixels.data() + (heap.items[i].key - key) * cv;
      for (int delta = 0; delta < kPatchElements; ++delta) {
        const int64_t neighbour = neighbour_index(rows, cols, ky, kx, patch_dy(delta), patch_dx(delta));
        if (neighbour < 0) continue;
        const T* v = level_values + neighbour * cv;
        T* o = out_buffer + qr.halo_index(py + patch_dy(delta), px + patch_dx(delta)) * cv;
        for (int64_t c = 0; c < cv; ++c) o[c] += a * v[c];
      }
    }
  }
}

template <typename T>
void forward_query_tile(const Problem<T>& pr, Workspace<T>& ws, int64_t tile, double* lse_out, T* threshold_out,
                        int64_t* last_out, T* out_buffer) {
  const HaloRect qr = pr.query_grid.rect(tile);
  const int64_t np = qr.rows * qr.cols, cv = pr.value_channels;
  gather(pr.q, qr, ws.query_pixels.data(), true);
  ws.query = ws.query_pixels.data();
  auto query_of = [&](int64_t p) { return (qr.y0 + p / qr.cols) * pr.q.cols + qr.x0 + p % qr.cols; };

  // Pass 1: each query's log-sum-exp (online), or its t best keys.
  T row_max[kTilePixels];
  double row_sum[kTilePixels];  // summed in double: M reaches tens of thousands of keys
  std::vector<ScoredKey<T>> heap_items(pr.dense() ? 0 : np * pr.topk);
  std::vector<TopHeap<T>> heaps;
  for (int64_t p = 0; p < np; ++p) {
    row_max[p] = -std::numeric_limits<T>::infinity();
    row_sum[p] = 0.0;
    if (!pr.dense()) heaps.push_back(TopHeap<T>{heap_items.data() + p * pr.topk, 0, pr.topk});
  }
  for (const KeyTile& kt : pr.key_tiles) {
    tile_scores(pr, ws, qr, kt);
    const int64_t nk = kt.rect.rows * kt.rect.cols;
    for (int64_t p = 0; p < np; ++p) {
      const T* s = ws.scores.data() + p * nk;
      if (pr.dense()) {
        PATCH_CALL(online_exp_sum, s, nk, row_max[p], row_sum[p]);
      } else {
        TopHeap<T>& heap = heaps[p];
        for (int64_t m = 0; m < nk; ++m)  // a score below a full heap's worst cannot enter it
          if (heap.size < heap.capacity || s[m] >= heap.threshold()) heap.offer(s[m], ws.tile_keys[m]);
      }
    }
  }
  for (int64_t p = 0; p < np; ++p) {
    const int64_t query = query_of(p);
    if (!pr.dense()) {
      const TopHeap<T>& h = heaps[p];
      row_max[p] = h.best();
      row_sum[p] = h.sum_exp(row_max[p]);
      threshold_out[query] = h.threshold();
      last_out[query] = h.last_kept();
    } else {
      threshold_out[query] = -std::numeric_limits<T>::infinity();
      last_out[query] = pr.n_keys - 1;
    }
    lse_out[query] = double(row_max[p]) + std::log(row_sum[p]);
  }

  // Pass 2: out = Ã v over the query tile's halo, into the tile's own buffer.
  std::fill(out_buffer, out_buffer + kHaloPixels * cv, T(0));
  if (!pr.dense()) return kept_output(pr, qr, heaps, out_buffer);
  for (const KeyTile& kt : pr.key_tiles) {
    tile_scores(pr, ws, qr, kt);
    tile_probs(pr, ws, qr, kt);
    PATCH_CALL(diagonal_spread, ws.probs.data(), qr, kt.rect, ws.spread.data());
    product_rows(ws.spread.data(), pr.value_pixel_tile(kt), qr.halo_size(), kt.rect.halo_size(), cv, out_buffer, false);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward_cpu(const Tensor& q_in, at::TensorList keys_in,
                                                                at::TensorList values_in, double scale, int64_t topk,
                                                                double key_eps) {
  check_operands(q_in, keys_in, values_in);
  const Tensor q = q_in.contiguous();
  const std::vector<Tensor> keys = contiguous_all(keys_in), values = contiguous_all(values_in);
  const int64_t batch = q.size(0), n_queries = q.size(2) * q.size(3), cv = values[0].size(1);
  const int64_t n_keys = key_count(keys);
  TORCH_CHECK(topk >= 0 && topk <= n_keys, "topk: expected 0 (dense) or 1..", n_keys, ", got ", topk);
  Tensor out = at::empty({batch, cv, q.size(2), q.size(3)}, q.options());
  Tensor inverse_norm = at::empty({batch, n_keys}, q.options());
  Tensor lse = at::empty({batch, n_queries}, q.options().dtype(at::kDouble));
  Tensor threshold = at::empty({batch, n_queries}, q.options());
  Tensor last_kept = at::empty({batch, n_queries}, q.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "patch_attention_forward_cpu", [&] {
    using T = scalar_t;
    std::vector<Problem<T>> problems;
    for (int64_t b = 0; b < batch; ++b) {
      problems.push_back(problem_of<T>(q, keys, values, b, scale, topk, key_eps));
      T* norms = inverse_norm.mutable_data_ptr<T>() + b * n_keys;
      inverse_norms(problems.back().keys, static_cast<T>(key_eps), norms);
      problems.back().inverse_norm = norms;
      gather_key_tiles(problems.back(), false, false, problems.back().key_channel_tiles);
      if (topk == 0)
        gather_key_tiles(problems.back(), true, true, problems.back().value_pixel_tiles);
      else
        gather_value_pixels(problems.back());
      problems.back().lse = lse.const_data_ptr<double>() + b * n_queries;
      problems.back().threshold = threshold.const_data_ptr<T>() + b * n_queries;
      problems.back().last_kept = last_kept.const_data_ptr<int64_t>() + b * n_queries;
    }
    const Grid grid{q.size(2), q.size(3)};
    std::vector<T> buffers(batch * grid.count() * kHaloPixels * cv);
    at::parallel_for(0, batch * grid.count(), 1, [&](int64_t begin, int64_t end) {
      Workspace<T> ws(q.size(1), cv);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / grid.count(), tile = task % grid.count();
        forward_query_tile(problems[b], ws, tile, lse.mutable_data_ptr<double>() + b * n_queries,
                           threshold.mutable_data_ptr<T>() + b * n_queries,
                           last_kept.mutable_data_ptr<int64_t>() + b * n_queries,
                           buffers.data() + task * kHaloPixels * cv);
      }
    });
    for (int64_t b = 0; b < batch; ++b)
      fold_tiles(grid, buffers.data() + b * grid.count() * kHaloPixels * cv, cv,
                 out.mutable_data_ptr<T>() + b * cv * n_queries);
  });
  return {out, inverse_norm, lse, threshold, last_kept};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
// Whether any key of the tile is among any of its queries' top t (ws.probs, from tile_probs):
// with top-k most tile pairs keep none, and then pass no gradient.
template <typename T>
bool tile_keeps_any(const Problem<T>& pr, const Workspace<T>& ws, const HaloRect& qr, const KeyTile& kt) {
  if (pr.dense()) return true;
  const int64_t n = qr.rows * qr.cols * kt.rect.rows * kt.rect.cols;
  return std::any_of(ws.probs.begin(), ws.probs.begin() + n, [](T a) { return a != T(0); });
}

// Per query tile: D_p = Σ_m A_pm dP_pm (= ⟨dO_p, O_p⟩), which every dS_pm needs before the
// gradients can be streamed.
template <typename T>
void query_tile_delta(const Problem<T>& pr, Workspace<T>& ws, int64_t tile, T* delta_out) {
  const HaloRect qr = pr.query_grid.rect(tile);
  const int64_t np = qr.rows * qr.cols;
  ws.query = pr.query_pixel_tiles.data() + tile * kHaloPixels * pr.q.channels;
  ws.grad = pr.grad_pixel_tiles.data() + tile * kHaloPixels * pr.value_channels;
  // D_p is a long sum whose difference with dP_pm is taken next: accumulated in double.
  double delta_sum[kTilePixels] = {};
  for (const KeyTile& kt : pr.key_tiles) {
    tile_scores(pr, ws, qr, kt);
    tile_probs(pr, ws, qr, kt);
    if (!tile_keeps_any(pr, ws, qr, kt)) continue;
    tile_grad_probs(pr, ws, qr, kt);
    const int64_t nk = kt.rect.rows * kt.rect.cols;
    for (int64_t p = 0; p < np; ++p) {
      double sum = 0.0;
      for (int64_t m = 0; m < nk; ++m) sum += double(ws.probs[p * nk + m]) * double(ws.grad_probs[p * nk + m]);
      delta_sum[p] += sum;
    }
  }
  for (int64_t p = 0; p < np; ++p)
    delta_out[(qr.y0 + p / qr.cols) * pr.q.cols + qr.x0 + p % qr.cols] = static_cast<T>(delta_sum[p]);
}

// Per key tile, streaming every query tile: dv, the first term of dk, c_m = Σ_p dS_pm s_pm (for
// the normalisation's gradient), and this key tile's share of dq, per query tile
// (dq_shares: query tiles × kHaloPixels × Cq). dk and dq take the same spread dS.
template <typename T>
void backward_key_tile(const Problem<T>& pr, const T* delta, Workspace<T>& ws, const KeyTile& kt, T* dk_buffer,
                       T* dv_buffer, T* dq_shares, T* key_dot) {
  const int64_t cq = pr.q.channels, cv = pr.value_channels, nk = kt.rect.rows * kt.rect.cols;
  std::fill(dk_buffer, dk_buffer + kHaloPixels * cq, T(0));
  std::fill(dv_buffer, dv_buffer + kHaloPixels * cv, T(0));
  std::fill(dq_shares, dq_shares + pr.query_grid.count() * kHaloPixels * cq, T(0));
  T dot[kTilePixels] = {};
  const int64_t level_cols = pr.keys[kt.level].cols;
  for (int64_t tile = 0; tile < pr.query_grid.count(); ++tile) {
    const HaloRect qr = pr.query_grid.rect(tile);
    const int64_t np = qr.rows * qr.cols;
    ws.query = pr.query_pixel_tiles.data() + tile * kHaloPixels * cq;
    ws.grad = pr.grad_pixel_tiles.data() + tile * kHaloPixels * cv;
    tile_scores(pr, ws, qr, kt);
    tile_probs(pr, ws, qr, kt);
    if (!tile_keeps_any(pr, ws, qr, kt)) continue;
    tile_grad_probs(pr, ws, qr, kt);
    PATCH_CALL(diagonal_spread, ws.probs.data(), qr, kt.rect, ws.spread.data());
    product_cols(ws.spread.data(), ws.grad, qr.halo_size(), kt.rect.halo_size(), cv, dv_buffer, !pr.dense());
    // dS·scale·r_m: the gradient of ⟨Q_p, K_m⟩.
    for (int64_t p = 0; p < np; ++p) {
      const T d = delta[(qr.y0 + p / qr.cols) * pr.q.cols + qr.x0 + p % qr.cols];
      for (int64_t m = 0; m < nk; ++m) {
        const T grad_score = ws.probs[p * nk + m] * (ws.grad_probs[p * nk + m] - d);
        dot[m] += grad_score * ws.scores[p * nk + m];
        ws.grad_probs[p * nk + m] = grad_score * pr.scale * ws.tile_inverse_norms[m];
      }
    }
    PATCH_CALL(diagonal_spread, ws.grad_probs.data(), qr, kt.rect, ws.spread.data());
    product_cols(ws.spread.data(), ws.query, qr.halo_size(), kt.rect.halo_size(), cq, dk_buffer, !pr.dense());
    product_rows(ws.spread.data(), pr.key_pixel_tile(kt), qr.halo_size(), kt.rect.halo_size(), cq,
                 dq_shares + tile * kHaloPixels * cq, !pr.dense());
  }
  for (int64_t m = 0; m < nk; ++m) key_dot[kt.key(m / kt.rect.cols, m % kt.rect.cols, level_cols)] = dot[m];
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> backward_cpu(
    const Tensor& grad_out_in, const Tensor& q_in, at::TensorList keys_in, at::TensorList values_in,
    const Tensor& inverse_norm_in, const Tensor& lse_in, const Tensor& threshold_in, const Tensor& last_kept_in,
    double scale, int64_t topk, double key_eps) {
  check_operands(q_in, keys_in, values_in);
  check_grad_out(grad_out_in, q_in, values_in);
  check_statistics(q_in, key_count(keys_in), inverse_norm_in, lse_in, threshold_in, last_kept_in);
  const Tensor q = q_in.contiguous(), grad_out = grad_out_in.contiguous().to(q.scalar_type());
  const std::vector<Tensor> keys = contiguous_all(keys_in), values = contiguous_all(values_in);
  const Tensor inverse_norm = inverse_norm_in.contiguous(), lse = lse_in.contiguous(),
               threshold = threshold_in.contiguous(), last_kept = last_kept_in.contiguous();
  const int64_t batch = q.size(0), n_queries = q.size(2) * q.size(3), cq = q.size(1), cv = values[0].size(1);
  Tensor grad_q = at::empty_like(q);
  std::vector<Tensor> grad_keys, grad_values;
  for (size_t l = 0; l < keys.size(); ++l) {
    grad_keys.push_back(at::empty_like(keys[l]));
    grad_values.push_back(at::empty_like(values[l]));
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "patch_attention_backward_cpu", [&] {
    using T = scalar_t;
    std::vector<Problem<T>> problems;
    std::vector<Map<T>> grad_maps;
    for (int64_t b = 0; b < batch; ++b) {
      problems.push_back(problem_of<T>(q, keys, values, b, scale, topk, key_eps));
      Problem<T>& pr = problems.back();
      pr.inverse_norm = inverse_norm.const_data_ptr<T>() + b * pr.n_keys;
      pr.lse = lse.const_data_ptr<double>() + b * n_queries;
      pr.threshold = threshold.const_data_ptr<T>() + b * n_queries;
      pr.last_kept = last_kept.const_data_ptr<int64_t>() + b * n_queries;
      grad_maps.push_back(Map<T>{grad_out.const_data_ptr<T>() + b * cv * n_queries, cv, q.size(2), q.size(3)});
      gather_key_tiles(pr, false, false, pr.key_channel_tiles);
      gather_key_tiles(pr, false, true, pr.key_pixel_tiles);
      gather_key_tiles(pr, true, false, pr.value_channel_tiles);
      gather_query_tiles(pr.q, pr.query_grid, pr.query_pixel_tiles);
      gather_query_tiles(grad_maps.back(), pr.query_grid, pr.grad_pixel_tiles);
    }
    const int64_t n_keys = problems[0].n_keys;
    const Grid grid{q.size(2), q.size(3)};
    const int64_t n_query_tiles = grid.count(), query_tile_size = kHaloPixels * cq;
    std::vector<T> delta(batch * n_queries);
    at::parallel_for(0, batch * n_query_tiles, 1, [&](int64_t begin, int64_t end) {
      Workspace<T> ws(cq, cv);
      for (int64_t task = begin; task < end; ++task)
        query_tile_delta(problems[task / n_query_tiles], ws, task % n_query_tiles,
                         delta.data() + (task / n_query_tiles) * n_queries);
    });

    // The key tiles in groups, a few per thread and their dq shares within kShareBudget: each
    // group's tiles run in parallel, then their shares are added to dq. The shares are added in
    // key-tile order whatever the group size, so the sums are the same for every number of threads.
    const int64_t n_key_tiles = problems[0].key_tiles.size(), n_tasks = batch * n_key_tiles;
    const int64_t share_size = n_query_tiles * query_tile_size;
    const int64_t group = std::clamp<int64_t>(
        std::min<int64_t>(kShareBudget / int64_t(sizeof(T) * share_size), 4 * at::get_num_threads()), 1, n_tasks);
    std::vector<T> dk_buffers(n_tasks * kHaloPixels * cq), dv_buffers(n_tasks * kHaloPixels * cv);
    std::vector<T> dq_buffers(batch * share_size, T(0)), dq_shares(group * share_size), key_dot(batch * n_keys);
    for (int64_t first = 0; first < n_tasks; first += group) {
      const int64_t last = std::min(first + group, n_tasks);
      at::parallel_for(first, last, 1, [&](int64_t begin, int64_t end) {
        Workspace<T> ws(cq, cv);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / n_key_tiles;
          backward_key_tile(problems[b], delta.data() + b * n_queries, ws, problems[b].key_tiles[task % n_key_tiles],
                            dk_buffers.data() + task * kHaloPixels * cq, dv_buffers.data() + task * kHaloPixels * cv,
                            dq_shares.data() + (task - first) * share_size, key_dot.data() + b * n_keys);
        }
      });
      at::parallel_for(0, batch * n_query_tiles, 1, [&](int64_t begin, int64_t end) {
        for (int64_t target = begin; target < end; ++target) {
          const int64_t b = target / n_query_tiles, tile = target % n_query_tiles;
          T* dq = dq_buffers.data() + b * share_size + tile * query_tile_size;
          for (int64_t task = std::max(first, b * n_key_tiles); task < std::min(last, (b + 1) * n_key_tiles); ++task) {
            const T* share = dq_shares.data() + (task - first) * share_size + tile * query_tile_size;
            for (int64_t i = 0; i < query_tile_size; ++i) dq[i] += share[i];
          }
        }
      });
    }
    for (int64_t b = 0; b < batch; ++b)
      fold_tiles(grid, dq_buffers.data() + b * share_size, cq, grad_q.mutable_data_ptr<T>() + b * cq * n_queries);
    // Fold each level's tiles, then the normalisation's gradient: dK_m −= r_m² c_m K_m (when not
    // clamped), i.e. dk[:, y] −= k[:, y] · Σ_δ w[y−δ] with w_m = r_m² c_m.
    for (int64_t b = 0; b < batch; ++b) {
      int64_t first_tile = 0, first_key = 0;
      for (size_t l = 0; l < keys.size(); ++l) {
        const Map<T>& k = problems[b].keys[l];
        const Grid level_grid{k.rows, k.cols};
        const int64_t plane = k.rows * k.cols;
        const int64_t task0 = b * n_key_tiles + first_tile;
        T* dk = grad_keys[l].mutable_data_ptr<T>() + b * cq * plane;
        fold_tiles(level_grid, dk_buffers.data() + task0 * kHaloPixels * cq, cq, dk);
        fold_tiles(level_grid, dv_buffers.data() + task0 * kHaloPixels * cv, cv,
                   grad_values[l].mutable_data_ptr<T>() + b * cv * plane);
        std::vector<T> w(plane);
        const T* r = problems[b].inverse_norm + first_key;
        const T* dot = key_dot.data() + b * n_keys + first_key;
        for (int64_t m = 0; m < plane; ++m)
          w[m] = key_norm_clamped(r[m], static_cast<T>(key_eps)) ? T(0) : r[m] * r[m] * dot[m];
        for (int64_t y = 0; y < k.rows; ++y)
          for (int64_t x = 0; x < k.cols; ++x) {
            const T sum = box_sum<T>(k.rows, k.cols, y, x, [&](int64_t i) { return w[i]; });
            for (int64_t c = 0; c < cq; ++c) dk[c * plane + y * k.cols + x] -= k.at(c, y, x) * sum;
          }
        first_tile += level_grid.count();
        first_key += plane;
      }
    }
  });
  return {grad_q, grad_keys, grad_values};
}

}  // namespace
}  // namespace patch
}  // namespace sparse_attn

TORCH_LIBRARY_IMPL(sparse_attn, CPU, m) {
  m.impl("patch_attention_forward", &sparse_attn::patch::forward_cpu);
  m.impl("patch_attention_backward", &sparse_attn::patch::backward_cpu);
}
