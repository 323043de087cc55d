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
// kept index); pass 2 streams them again for the output. Backward (FlashAttention-2 style,
// recomputing the scores): per query tile, D_p = ⟨dO_p, O_p⟩ = Σ_m A_pm dP_pm, then dq; per key
// tile, dk and dv. Halo rows of a tile's result overlap its neighbours': every tile writes its
// own buffer and the buffers are added in a fixed order, so the results do not depend on the
// number of threads. On x86 the tile loops are compiled a second time for AVX2+FMA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "common/patch_attention.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define PATCH_HAS_AVX2_CLONE 1
#define PATCH_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace sparse_attn {
namespace patch {
namespace {

using at::Tensor;

constexpr int64_t kTileRows = 8, kTileCols = 16;  // query and key rectangles
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
  int64_t level, first_key;
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
// g[i][j] = Σ_c a[i][c] · b[c][j]: a pixel-major (na × C), b channel-major (C × nb).
#define PATCH_TILE_FUNCTIONS(ATTR, SUFFIX)                                                                        \
  template <typename T>                                                                                          \
  ATTR void pixel_gram##SUFFIX(const T* __restrict a, const T* __restrict b, int64_t na, int64_t nb,             \
                               int64_t channels, T* __restrict g) {                                               \
    int64_t i = 0;                                                                                               \
    for (; i + 4 <= na; i += 4) {                                                                                \
      T* __restrict g0 = g + i * nb;                                                                             \
      T* __restrict g1 = g0 + nb;                                                                                \
      T* __restrict g2 = g1 + nb;                                                                                \
      T* __restrict g3 = g2 + nb;                                                                                \
      for (int64_t j = 0; j < nb; ++j) g0[j] = g1[j] = g2[j] = g3[j] = T(0);                                     \
      for (int64_t c = 0; c < channels; ++c) {                                                                   \
        const T a0 = a[i * channels + c], a1 = a[(i + 1) * channels + c], a2 = a[(i + 2) * channels + c],        \
                a3 = a[(i + 3) * channels + c];                                                                  \
        const T* __restrict bc = b + c * nb;                                                                     \
        for (int64_t j = 0; j < nb; ++j) {                                                                       \
          const T bj = bc[j];                                                                                    \
          g0[j] += a0 * bj;                                                                                      \
          g1[j] += a1 * bj;                                                                                      \
          g2[j] += a2 * bj;                                                                                      \
          g3[j] += a3 * bj;                                                                                      \
        }                                                                                                        \
      }                                                                                                          \
    }                                                                                                            \
    for (; i < na; ++i) {                                                                                        \
      T* __restrict gi = g + i * nb;                                                                             \
      for (int64_t j = 0; j < nb; ++j) gi[j] = T(0);                                                             \
      for (int64_t c = 0; c < channels; ++c) {                                                                   \
        const T ai = a[i * channels + c];                                                                        \
        const T* __restrict bc = b + c * nb;                                                                     \
        for (int64_t j = 0; j < nb; ++j) gi[j] += ai * bc[j];                                                    \
      }                                                                                                          \
    }                                                                                                            \
  }                                                                                                              \
                                                                                                                 \
  /* s[p][m] = Σ_δ g[p+δ][m+δ] over the two rectangles' interiors (p: qr, m: kr). */                            \
  template <typename T>                                                                                          \
  ATTR void diagonal_sums##SUFFIX(const T* __restrict g, const HaloRect& qr, const HaloRect& kr, T* __restrict s) { \
    const int64_t nk = kr.rows * kr.cols, nbh = kr.halo_size();                                                  \
    for (int64_t p = 0; p < qr.rows * qr.cols; ++p) {                                                            \
      const int64_t py = p / qr.cols, px = p % qr.cols;                                                          \
      T* __restrict row = s + p * nk;                                                                            \
      for (int64_t m = 0; m < nk; ++m) row[m] = T(0);                                                            \
      for (int64_t dy = -1; dy <= 1; ++dy)                                                                       \
        for (int64_t dx = -1; dx <= 1; ++dx) {                                                                   \
          const T* __restrict grow = g + qr.halo_index(py + dy, px + dx) * nbh;                                  \
          for (int64_t my = 0; my < kr.rows; ++my) {                                                             \
            const T* __restrict src = grow + kr.halo_index(my + dy, dx);                                         \
            T* __restrict dst = row + my * kr.cols;                                                              \
            for (int64_t mx = 0; mx < kr.cols; ++mx) dst[mx] += src[mx];                                         \
          }                                                                                                      \
        }                                                                                                        \
    }                                                                                                            \
  }                                                                                                              \
                                                                                                                 \
  /* The adjoint: acc[x][y] = Σ_δ a[x−δ][y−δ] (acc: qr halo × kr halo). */                                       \
  template <typename T>                                                                                          \
  ATTR void diagonal_spread##SUFFIX(const T* __restrict a, const HaloRect& qr, const HaloRect& kr, T* __restrict acc) { \
    const int64_t nk = kr.rows * kr.cols, nbh = kr.halo_size();                                                  \
    for (int64_t i = 0; i < qr.halo_size() * nbh; ++i) acc[i] = T(0);                                            \
    for (int64_t p = 0; p < qr.rows * qr.cols; ++p) {                                                            \
      const int64_t py = p / qr.cols, px = p % qr.cols;                                                          \
      const T* __restrict row = a + p * nk;                                                                      \
      for (int64_t dy = -1; dy <= 1; ++dy)                                                                       \
        for (int64_t dx = -1; dx <= 1; ++dx) {                                                                   \
          T* __restrict arow = acc + qr.halo_index(py + dy, px + dx) * nbh;                                      \
          for (int64_t my = 0; my < kr.rows; ++my) {                                                             \
            T* __restrict dst = arow + kr.halo_index(my + dy, dx);                                               \
            const T* __restrict src = row + my * kr.cols;                                                        \
            for (int64_t mx = 0; mx < kr.cols; ++mx) dst[mx] += src[mx];                                         \
          }                                                                                                      \
        }                                                                                                        \
    }                                                                                                            \
  }                                                                                                              \
                                                                                                                 \
  /* out[x][c] += Σ_y w[x][y] · b[y][c] (w: nx × ny; b, out pixel-major). */                                     \
  template <typename T>                                                                                          \
  ATTR void product_rows##SUFFIX(const T* __restrict w, const T* __restrict b, int64_t nx, int64_t ny,           \
                                 int64_t channels, T* __restrict out) {                                           \
    for (int64_t x = 0; x < nx; ++x) {                                                                           \
      T* __restrict ox = out + x * channels;                                                                     \
      for (int64_t y = 0; y < ny; ++y) {                                                                         \
        const T wy = w[x * ny + y];                                                                              \
        if (wy == T(0)) continue;                                                                                \
        const T* __restrict by = b + y * channels;                                                               \
        for (int64_t c = 0; c < channels; ++c) ox[c] += wy * by[c];                                              \
      }                                                                                                          \
    }                                                                                                            \
  }                                                                                                              \
                                                                                                                 \
  /* out[y][c] += Σ_x w[x][y] · b[x][c] (w: nx × ny; b, out pixel-major). */                                     \
  template <typename T>                                                                                          \
  ATTR void product_cols##SUFFIX(const T* __restrict w, const T* __restrict b, int64_t nx, int64_t ny,           \
                                 int64_t channels, T* __restrict out) {                                           \
    for (int64_t x = 0; x < nx; ++x) {                                                                           \
      const T* __restrict bx = b + x * channels;                                                                 \
      for (int64_t y = 0; y < ny; ++y) {                                                                         \
        const T wy = w[x * ny + y];                                                                              \
        if (wy == T(0)) continue;                                                                                \
        T* __restrict oy = out + y * channels;                                                                   \
        for (int64_t c = 0; c < channels; ++c) oy[c] += wy * bx[c];                                              \
      }                                                                                                          \
    }                                                                                                            \
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
  // Per query (N): log-sum-exp of the kept scores; with topk the threshold and last kept index.
  const T* lse;
  const T* threshold;
  const int64_t* last_kept;
  bool dense() const { return topk == 0; }
};

template <typename T>
std::vector<KeyTile> key_tiles_of(const std::vector<Map<T>>& keys) {
  std::vector<KeyTile> tiles;
  int64_t first = 0;
  for (int64_t level = 0; level < static_cast<int64_t>(keys.size()); ++level) {
    const Grid grid{keys[level].rows, keys[level].cols};
    for (int64_t t = 0; t < grid.count(); ++t) tiles.push_back({level, first, grid.rect(t)});
    first += keys[level].rows * keys[level].cols;
  }
  return tiles;
}

// A thread's scratch: halo gathers, the pixel products and the score tiles.
template <typename T>
struct Workspace {
  std::vector<T> query_pixels, grad_pixels, key_channels, value_channels, key_pixels, value_pixels;
  std::vector<T> gram, value_gram, spread;
  std::vector<T> scores, probs, grad_probs;
  Workspace(int64_t cq, int64_t cv)
      : query_pixels(kHaloPixels * cq), grad_pixels(kHaloPixels * cv), key_channels(kHaloPixels * cq),
        value_channels(kHaloPixels * cv), key_pixels(kHaloPixels * cq), value_pixels(kHaloPixels * cv),
        gram(kHaloPixels * kHaloPixels), value_gram(kHaloPixels * kHaloPixels), spread(kHaloPixels * kHaloPixels),
        scores(kTilePixels * kTilePixels), probs(kTilePixels * kTilePixels), grad_probs(kTilePixels * kTilePixels) {}
};

// The scores s[p][m] = scale · r_m · ⟨Q_p, K_m⟩ of a query tile (its pixels gathered in
// ws.query_pixels) against a key tile.
template <typename T>
void tile_scores(const Problem<T>& pr, Workspace<T>& ws, const HaloRect& qr, const KeyTile& kt) {
  const int64_t cq = pr.q.channels;
  gather(pr.keys[kt.level], kt.rect, ws.key_channels.data(), false);
  PATCH_CALL(pixel_gram, ws.query_pixels.data(), ws.key_channels.data(), qr.halo_size(), kt.rect.halo_size(), cq,
             ws.gram.data());
  PATCH_CALL(diagonal_sums, ws.gram.data(), qr, kt.rect, ws.scores.data());
  const int64_t nk = kt.rect.rows * kt.rect.cols, level_cols = pr.keys[kt.level].cols;
  T factor[kTilePixels];
  for (int64_t m = 0; m < nk; ++m) factor[m] = pr.scale * pr.inverse_norm[kt.key(m / kt.rect.cols, m % kt.rect.cols, level_cols)];
  for (int64_t p = 0; p < qr.rows * qr.cols; ++p)
    for (int64_t m = 0; m < nk; ++m) ws.scores[p * nk + m] *= factor[m];
}

// ws.probs = the attention A of the tile (0 for keys outside a query's top t), from ws.scores.
template <typename T>
void tile_probs(const Problem<T>& pr, Workspace<T>& ws, const HaloRect& qr, const KeyTile& kt) {
  const int64_t nk = kt.rect.rows * kt.rect.cols, level_cols = pr.keys[kt.level].cols;
  for (int64_t p = 0; p < qr.rows * qr.cols; ++p) {
    const int64_t query = (qr.y0 + p / qr.cols) * pr.q.cols + qr.x0 + p % qr.cols;
    const T lse = pr.lse[query];
    for (int64_t m = 0; m < nk; ++m) {
      const T s = ws.scores[p * nk + m];
      const bool kept = pr.dense() ||
                        is_kept(s, kt.key(m / kt.rect.cols, m % kt.rect.cols, level_cols), pr.threshold[query],
                                pr.last_kept[query], false);
      ws.probs[p * nk + m] = kept ? std::exp(s - lse) : T(0);
    }
  }
}

// ws.grad_probs = dP[p][m] = ⟨dO_p, V_m⟩ (dO's pixels gathered in ws.grad_pixels).
template <typename T>
void tile_grad_probs(const Problem<T>& pr, Workspace<T>& ws, const HaloRect& qr, const KeyTile& kt) {
  gather(pr.values[kt.level], kt.rect, ws.value_channels.data(), false);
  PATCH_CALL(pixel_gram, ws.grad_pixels.data(), ws.value_channels.data(), qr.halo_size(), kt.rect.halo_size(),
             pr.value_channels, ws.value_gram.data());
  PATCH_CALL(diagonal_sums, ws.value_gram.data(), qr, kt.rect, ws.grad_probs.data());
}

// ---------------------------------------------------------------------------------------------
// Per-key inverse norms, the top-k heap, and the fold of per-tile halo buffers
// ---------------------------------------------------------------------------------------------
template <typename T>
void inverse_norms(const std::vector<Map<T>>& keys, T key_eps, T* out) {
  for (const Map<T>& k : keys) {
    std::vector<T> pixel_sq(k.rows * k.cols, T(0));
    for (int64_t c = 0; c < k.channels; ++c)
      for (int64_t i = 0; i < k.rows * k.cols; ++i) pixel_sq[i] += k.data[c * k.rows * k.cols + i] * k.data[c * k.rows * k.cols + i];
    for (int64_t y = 0; y < k.rows; ++y)
      for (int64_t x = 0; x < k.cols; ++x) {
        T sum = T(0);
        for (int64_t yy = std::max<int64_t>(y - 1, 0); yy <= std::min(y + 1, k.rows - 1); ++yy)
          for (int64_t xx = std::max<int64_t>(x - 1, 0); xx <= std::min(x + 1, k.cols - 1); ++xx) sum += pixel_sq[yy * k.cols + xx];
        out[y * k.cols + x] = key_inverse_norm(sum, key_eps);
      }
    out += k.rows * k.cols;
  }
}

// A query's t best (score, key) so far: a binary heap with the worst at the root.
template <typename T>
struct TopHeap {
  std::pair<T, int64_t>* items;
  int64_t size = 0, capacity;
  static bool worse(const std::pair<T, int64_t>& a, const std::pair<T, int64_t>& b) {
    return ranks_before(b.first, b.second, a.first, a.second);
  }
  void offer(T score, int64_t key) {
    std::pair<T, int64_t> item{score, key};
    if (size < capacity) {
      int64_t i = size++;
      while (i > 0 && worse(item, items[(i - 1) / 2])) {
        items[i] = items[(i - 1) / 2];
        i = (i - 1) / 2;
      }
      items[i] = item;
      return;
    }
    if (!worse(items[0], item)) return;
    int64_t i = 0;
    for (;;) {
      int64_t child = 2 * i + 1;
      if (child >= size) break;
      if (child + 1 < size && worse(items[child + 1], items[child])) ++child;
      if (!worse(items[child], item)) break;
      items[i] = items[child];
      i = child;
    }
    items[i] = item;
  }
};

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
void check_operands(const Tensor& q, at::TensorList keys, at::TensorList values) {
  TORCH_CHECK(q.dim() == 4, "q: expected (B, Cq, H, W), got ", q.sizes());
  TORCH_CHECK(!keys.empty() && keys.size() == values.size(), "keys, values: expected the same number (> 0) of levels");
  for (size_t l = 0; l < keys.size(); ++l) {
    TORCH_CHECK(keys[l].dim() == 4 && keys[l].size(0) == q.size(0) && keys[l].size(1) == q.size(1),
                "keys[", l, "]: expected (B, Cq, H_l, W_l) with q's B and Cq, got ", keys[l].sizes());
    TORCH_CHECK(values[l].dim() == 4 && values[l].size(0) == q.size(0) && values[l].size(1) == values[0].size(1) &&
                    values[l].size(2) == keys[l].size(2) && values[l].size(3) == keys[l].size(3),
                "values[", l, "]: expected (B, Cv, H_l, W_l) matching keys[", l, "], got ", values[l].sizes());
    TORCH_CHECK(keys[l].scalar_type() == q.scalar_type() && values[l].scalar_type() == q.scalar_type(),
                "keys, values: expected q's dtype");
  }
}

std::vector<Tensor> contiguous_all(at::TensorList maps) {
  std::vector<Tensor> out;
  for (const Tensor& t : maps) out.push_back(t.contiguous());
  return out;
}

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
template <typename T>
void forward_query_tile(const Problem<T>& pr, Workspace<T>& ws, int64_t tile, T* lse_out, T* threshold_out,
                        int64_t* last_out, T* out_buffer) {
  const HaloRect qr = pr.query_grid.rect(tile);
  const int64_t np = qr.rows * qr.cols, cv = pr.value_channels;
  gather(pr.q, qr, ws.query_pixels.data(), true);
  auto query_of = [&](int64_t p) { return (qr.y0 + p / qr.cols) * pr.q.cols + qr.x0 + p % qr.cols; };

  // Pass 1: each query's log-sum-exp (online), or its t best keys.
  T row_max[kTilePixels], row_sum[kTilePixels];
  std::vector<std::pair<T, int64_t>> heap_items(pr.dense() ? 0 : np * pr.topk);
  std::vector<TopHeap<T>> heaps;
  for (int64_t p = 0; p < np; ++p) {
    row_max[p] = -std::numeric_limits<T>::infinity();
    row_sum[p] = T(0);
    if (!pr.dense()) heaps.push_back(TopHeap<T>{heap_items.data() + p * pr.topk, 0, pr.topk});
  }
  for (const KeyTile& kt : pr.key_tiles) {
    tile_scores(pr, ws, qr, kt);
    const int64_t nk = kt.rect.rows * kt.rect.cols, level_cols = pr.keys[kt.level].cols;
    for (int64_t p = 0; p < np; ++p) {
      const T* s = ws.scores.data() + p * nk;
      if (pr.dense()) {
        T tile_max = row_max[p];
        for (int64_t m = 0; m < nk; ++m) tile_max = std::max(tile_max, s[m]);
        T sum = row_sum[p] * std::exp(row_max[p] - tile_max);
        for (int64_t m = 0; m < nk; ++m) sum += std::exp(s[m] - tile_max);
        row_max[p] = tile_max;
        row_sum[p] = sum;
      } else {
        for (int64_t m = 0; m < nk; ++m) heaps[p].offer(s[m], kt.key(m / kt.rect.cols, m % kt.rect.cols, level_cols));
      }
    }
  }
  for (int64_t p = 0; p < np; ++p) {
    const int64_t query = query_of(p);
    if (!pr.dense()) {
      const TopHeap<T>& h = heaps[p];
      const T threshold = h.items[0].first;
      int64_t last = h.items[0].second;
      T best = threshold;
      for (int64_t i = 0; i < h.size; ++i) {
        best = std::max(best, h.items[i].first);
        if (h.items[i].first == threshold) last = std::max(last, h.items[i].second);
      }
      T sum = T(0);
      for (int64_t i = 0; i < h.size; ++i) sum += std::exp(h.items[i].first - best);
      row_max[p] = best;
      row_sum[p] = sum;
      threshold_out[query] = threshold;
      last_out[query] = last;
    } else {
      threshold_out[query] = -std::numeric_limits<T>::infinity();
      last_out[query] = pr.n_keys - 1;
    }
    lse_out[query] = row_max[p] + std::log(row_sum[p]);
  }

  // Pass 2: out = Ã v over the query tile's halo, into the tile's own buffer.
  std::fill(out_buffer, out_buffer + kHaloPixels * cv, T(0));
  for (const KeyTile& kt : pr.key_tiles) {
    tile_scores(pr, ws, qr, kt);
    tile_probs(pr, ws, qr, kt);
    PATCH_CALL(diagonal_spread, ws.probs.data(), qr, kt.rect, ws.spread.data());
    gather(pr.values[kt.level], kt.rect, ws.value_pixels.data(), true);
    PATCH_CALL(product_rows, ws.spread.data(), ws.value_pixels.data(), qr.halo_size(), kt.rect.halo_size(), cv,
               out_buffer);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward_cpu(const Tensor& q_in, at::TensorList keys_in,
                                                                at::TensorList values_in, double scale, int64_t topk,
                                                                double key_eps) {
  check_operands(q_in, keys_in, values_in);
  const Tensor q = q_in.contiguous();
  const std::vector<Tensor> keys = contiguous_all(keys_in), values = contiguous_all(values_in);
  const int64_t batch = q.size(0), n_queries = q.size(2) * q.size(3), cv = values[0].size(1);
  int64_t n_keys = 0;
  for (const Tensor& k : keys) n_keys += k.size(2) * k.size(3);
  TORCH_CHECK(topk >= 0 && topk <= n_keys, "topk: expected 0 (dense) or 1..", n_keys, ", got ", topk);
  Tensor out = at::empty({batch, cv, q.size(2), q.size(3)}, q.options());
  Tensor inverse_norm = at::empty({batch, n_keys}, q.options());
  Tensor lse = at::empty({batch, n_queries}, q.options());
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
      problems.back().lse = lse.const_data_ptr<T>() + b * n_queries;
      problems.back().threshold = threshold.const_data_ptr<T>() + b * n_queries;
      problems.back().last_kept = last_kept.const_data_ptr<int64_t>() + b * n_queries;
    }
    const Grid grid{q.size(2), q.size(3)};
    std::vector<T> buffers(batch * grid.count() * kHaloPixels * cv);
    at::parallel_for(0, batch * grid.count(), 1, [&](int64_t begin, int64_t end) {
      Workspace<T> ws(q.size(1), cv);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / grid.count(), tile = task % grid.count();
        forward_query_tile(problems[b], ws, tile, lse.mutable_data_ptr<T>() + b * n_queries,
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
// Per query tile: D_p = Σ_m A_pm dP_pm (pass 1), then dq (pass 2), into the tile's halo buffer.
template <typename T>
void backward_query_tile(const Problem<T>& pr, const Map<T>& grad_out, Workspace<T>& ws, int64_t tile, T* delta_out,
                         T* dq_buffer) {
  const HaloRect qr = pr.query_grid.rect(tile);
  const int64_t np = qr.rows * qr.cols, cq = pr.q.channels;
  gather(pr.q, qr, ws.query_pixels.data(), true);
  gather(grad_out, qr, ws.grad_pixels.data(), true);
  T delta[kTilePixels] = {};
  for (const KeyTile& kt : pr.key_tiles) {
    tile_scores(pr, ws, qr, kt);
    tile_probs(pr, ws, qr, kt);
    tile_grad_probs(pr, ws, qr, kt);
    const int64_t nk = kt.rect.rows * kt.rect.cols;
    for (int64_t p = 0; p < np; ++p) {
      T sum = T(0);
      for (int64_t m = 0; m < nk; ++m) sum += ws.probs[p * nk + m] * ws.grad_probs[p * nk + m];
      delta[p] += sum;
    }
  }
  for (int64_t p = 0; p < np; ++p) delta_out[(qr.y0 + p / qr.cols) * pr.q.cols + qr.x0 + p % qr.cols] = delta[p];

  std::fill(dq_buffer, dq_buffer + kHaloPixels * cq, T(0));
  for (const KeyTile& kt : pr.key_tiles) {
    tile_scores(pr, ws, qr, kt);
    tile_probs(pr, ws, qr, kt);
    tile_grad_probs(pr, ws, qr, kt);
    const int64_t nk = kt.rect.rows * kt.rect.cols, level_cols = pr.keys[kt.level].cols;
    // dS·scale·r_m, the gradient of ⟨Q_p, K_m⟩, spread over pixel pairs, times k.
    for (int64_t p = 0; p < np; ++p)
      for (int64_t m = 0; m < nk; ++m) {
        const T r = pr.inverse_norm[kt.key(m / kt.rect.cols, m % kt.rect.cols, level_cols)];
        ws.scores[p * nk + m] = ws.probs[p * nk + m] * (ws.grad_probs[p * nk + m] - delta[p]) * pr.scale * r;
      }
    PATCH_CALL(diagonal_spread, ws.scores.data(), qr, kt.rect, ws.spread.data());
    gather(pr.keys[kt.level], kt.rect, ws.key_pixels.data(), true);
    PATCH_CALL(product_rows, ws.spread.data(), ws.key_pixels.data(), qr.halo_size(), kt.rect.halo_size(), cq, dq_buffer);
  }
}

// Per key tile: dv, the first term of dk, and c_m = Σ_p dS_pm s_pm (for the normalisation's
// gradient), streaming every query tile.
template <typename T>
void backward_key_tile(const Problem<T>& pr, const Map<T>& grad_out, const T* delta, Workspace<T>& ws,
                       const KeyTile& kt, T* dk_buffer, T* dv_buffer, T* key_dot) {
  const int64_t cq = pr.q.channels, cv = pr.value_channels, nk = kt.rect.rows * kt.rect.cols;
  std::fill(dk_buffer, dk_buffer + kHaloPixels * cq, T(0));
  std::fill(dv_buffer, dv_buffer + kHaloPixels * cv, T(0));
  T dot[kTilePixels] = {};
  const int64_t level_cols = pr.keys[kt.level].cols;
  for (int64_t tile = 0; tile < pr.query_grid.count(); ++tile) {
    const HaloRect qr = pr.query_grid.rect(tile);
    const int64_t np = qr.rows * qr.cols;
    gather(pr.q, qr, ws.query_pixels.data(), true);
    gather(grad_out, qr, ws.grad_pixels.data(), true);
    tile_scores(pr, ws, qr, kt);
    tile_probs(pr, ws, qr, kt);
    tile_grad_probs(pr, ws, qr, kt);
    PATCH_CALL(diagonal_spread, ws.probs.data(), qr, kt.rect, ws.spread.data());
    PATCH_CALL(product_cols, ws.spread.data(), ws.grad_pixels.data(), qr.halo_size(), kt.rect.halo_size(), cv, dv_buffer);
    for (int64_t p = 0; p < np; ++p) {
      const T d = delta[(qr.y0 + p / qr.cols) * pr.q.cols + qr.x0 + p % qr.cols];
      for (int64_t m = 0; m < nk; ++m) {
        const T grad_score = ws.probs[p * nk + m] * (ws.grad_probs[p * nk + m] - d);
        dot[m] += grad_score * ws.scores[p * nk + m];
        const T r = pr.inverse_norm[kt.key(m / kt.rect.cols, m % kt.rect.cols, level_cols)];
        ws.grad_probs[p * nk + m] = grad_score * pr.scale * r;
      }
    }
    PATCH_CALL(diagonal_spread, ws.grad_probs.data(), qr, kt.rect, ws.spread.data());
    PATCH_CALL(product_cols, ws.spread.data(), ws.query_pixels.data(), qr.halo_size(), kt.rect.halo_size(), cq, dk_buffer);
  }
  for (int64_t m = 0; m < nk; ++m) key_dot[kt.key(m / kt.rect.cols, m % kt.rect.cols, level_cols)] = dot[m];
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> backward_cpu(
    const Tensor& grad_out_in, const Tensor& q_in, at::TensorList keys_in, at::TensorList values_in,
    const Tensor& inverse_norm_in, const Tensor& lse_in, const Tensor& threshold_in, const Tensor& last_kept_in,
    double scale, int64_t topk, double key_eps) {
  check_operands(q_in, keys_in, values_in);
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
      pr.lse = lse.const_data_ptr<T>() + b * n_queries;
      pr.threshold = threshold.const_data_ptr<T>() + b * n_queries;
      pr.last_kept = last_kept.const_data_ptr<int64_t>() + b * n_queries;
      grad_maps.push_back(Map<T>{grad_out.const_data_ptr<T>() + b * cv * n_queries, cv, q.size(2), q.size(3)});
    }
    const int64_t n_keys = problems[0].n_keys;
    const Grid grid{q.size(2), q.size(3)};
    std::vector<T> delta(batch * n_queries), dq_buffers(batch * grid.count() * kHaloPixels * cq);
    at::parallel_for(0, batch * grid.count(), 1, [&](int64_t begin, int64_t end) {
      Workspace<T> ws(cq, cv);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / grid.count(), tile = task % grid.count();
        backward_query_tile(problems[b], grad_maps[b], ws, tile, delta.data() + b * n_queries,
                            dq_buffers.data() + task * kHaloPixels * cq);
      }
    });
    for (int64_t b = 0; b < batch; ++b)
      fold_tiles(grid, dq_buffers.data() + b * grid.count() * kHaloPixels * cq, cq,
                 grad_q.mutable_data_ptr<T>() + b * cq * n_queries);

    const int64_t n_key_tiles = problems[0].key_tiles.size();
    std::vector<T> dk_buffers(batch * n_key_tiles * kHaloPixels * cq), dv_buffers(batch * n_key_tiles * kHaloPixels * cv);
    std::vector<T> key_dot(batch * n_keys);
    at::parallel_for(0, batch * n_key_tiles, 1, [&](int64_t begin, int64_t end) {
      Workspace<T> ws(cq, cv);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / n_key_tiles, tile = task % n_key_tiles;
        backward_key_tile(problems[b], grad_maps[b], delta.data() + b * n_queries, ws, problems[b].key_tiles[tile],
                          dk_buffers.data() + task * kHaloPixels * cq, dv_buffers.data() + task * kHaloPixels * cv,
                          key_dot.data() + b * n_keys);
      }
    });
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
            T sum = T(0);
            for (int64_t yy = std::max<int64_t>(y - 1, 0); yy <= std::min(y + 1, k.rows - 1); ++yy)
              for (int64_t xx = std::max<int64_t>(x - 1, 0); xx <= std::min(x + 1, k.cols - 1); ++xx) sum += w[yy * k.cols + xx];
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
