// Per-row math of the top-k channel attention's d x d stage (DESIGN.md §1), shared by the
// CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda) so that the CPU tests cover both.
//
// One row i of the (d x d) score matrix S is handled at a time. Branch r keeps the entries of
// rank < topk[r]; every branch shares the row's ranks, and every softmax branch shares the row
// maximum (the rank-0 entry is kept by all), so each exp(s - max) is computed once per row.
#pragma once

#include <math.h>

#include "common/host_device.h"

namespace sparse_attn {
namespace sca {

constexpr int kMaxBranches = 8;
constexpr int kSoftmax = 0;  // activation codes, as in the op schema (csrc/ops.cpp)
constexpr int kRelu2 = 1;
constexpr double kNormEps = 1e-12;  // F.normalize's default eps

// The branch configuration, passed by value into kernels.
struct Branches {
  int count;
  int topk[kMaxBranches];
  int activation[kMaxBranches];
};

SA_HOST_DEVICE inline float exp_of(float x) { return expf(x); }
SA_HOST_DEVICE inline double exp_of(double x) { return exp(x); }
SA_HOST_DEVICE inline float sqrt_of(float x) { return sqrtf(x); }
SA_HOST_DEVICE inline double sqrt_of(double x) { return sqrt(x); }

// Rank of entry j in row s: the entries strictly larger, plus the equal ones to its left. This
// is the position a stable descending sort gives it: ties go to the lower column index.
template <typename T>
SA_HOST_DEVICE inline int rank_in_row(const T* s, int d, int j) {
  const T x = s[j];
  int rank = 0;
  for (int l = 0; l < d; ++l) rank += (s[l] > x) || (s[l] == x && l < j);
  return rank;
}

// S_ij = τ·q̂_i·k̂_j of one row and the ranks of its entries. Forward and backward compute them
// identically, from the same stored gram row, so that both see the same selection.
template <typename T>
SA_HOST_DEVICE inline void scores_and_ranks_of_row(const T* gram_row, T tau, int d, T* s, int* rank) {
  for (int j = 0; j < d; ++j) s[j] = tau * gram_row[j];
  for (int j = 0; j < d; ++j) rank[j] = rank_in_row(s, d, j);
}

template <typename T>
SA_HOST_DEVICE inline T row_max(const T* s, int d) {
  T m = s[0];
  for (int j = 1; j < d; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// Softmax normaliser of each branch: z[r] = sum of exp(s_j - max) over the entries it keeps.
template <typename T>
SA_HOST_DEVICE inline void softmax_normalizers(const T* s, const int* rank, int d, T s_max,
                                               const Branches& br, T* z) {
  for (int r = 0; r < br.count; ++r) z[r] = T(0);
  for (int j = 0; j < d; ++j) {
    const T e = exp_of(s[j] - s_max);
    for (int r = 0; r < br.count; ++r)
      if (rank[j] < br.topk[r]) z[r] += e;
  }
}

// phi_r(s_j) of one kept entry: e / z for softmax, relu(s)^2 for relu2.
template <typename T>
SA_HOST_DEVICE inline T branch_value(int activation, T s, T e, T z) {
  if (activation == kSoftmax) return e / z;
  const T pos = s > T(0) ? s : T(0);
  return pos * pos;
}

// p_j = sum_r w_r * phi_r(s_j) over the branches that keep j.
template <typename T>
SA_HOST_DEVICE inline void attention_row_forward(const T* s, const int* rank, int d,
                                                 const Branches& br, const T* w, T* p) {
  T z[kMaxBranches];
  const T s_max = row_max(s, d);
  softmax_normalizers(s, rank, d, s_max, br, z);
  for (int j = 0; j < d; ++j) {
    const T e = exp_of(s[j] - s_max);
    T acc = T(0);
    for (int r = 0; r < br.count; ++r)
      if (rank[j] < br.topk[r]) acc += w[r] * branch_value(br.activation[r], s[j], e, z[r]);
    p[j] = acc;
  }
}

// Given dp = dL/dP of the row, writes ds = dL/dS and adds <phi_r, dp> of this row to dw[r].
//   softmax: ds_j += w_r phi_j (dp_j - <phi_r, dp>)      relu2: ds_j += w_r 2 relu(s_j) dp_j
template <typename T>
SA_HOST_DEVICE inline void attention_row_backward(const T* s, const int* rank, const T* dp, int d,
                                                  const Branches& br, const T* w, T* ds, T* dw) {
  T z[kMaxBranches];
  T phi_dot_dp[kMaxBranches];
  const T s_max = row_max(s, d);
  softmax_normalizers(s, rank, d, s_max, br, z);
  for (int r = 0; r < br.count; ++r) phi_dot_dp[r] = T(0);
  for (int j = 0; j < d; ++j) {
    const T e = exp_of(s[j] - s_max);
    for (int r = 0; r < br.count; ++r)
      if (rank[j] < br.topk[r]) phi_dot_dp[r] += branch_value(br.activation[r], s[j], e, z[r]) * dp[j];
  }
  for (int r = 0; r < br.count; ++r) dw[r] += phi_dot_dp[r];
  for (int j = 0; j < d; ++j) {
    const T e = exp_of(s[j] - s_max);
    T acc = T(0);
    for (int r = 0; r < br.count; ++r) {
      if (rank[j] >= br.topk[r]) continue;
      if (br.activation[r] == kSoftmax)
        acc += w[r] * (e / z[r]) * (dp[j] - phi_dot_dp[r]);
      else
        acc += w[r] * T(2) * (s[j] > T(0) ? s[j] : T(0)) * dp[j];
    }
    ds[j] = acc;
  }
}

// F.normalize divides by max(norm, eps); below eps it is a plain scaling whose gradient has no
// projection term. This is the projection's weight for a channel of the given norm.
template <typename T>
SA_HOST_DEVICE inline T normalize_projection_scale(T norm) {
  const T denom = norm > T(kNormEps) ? norm : T(kNormEps);
  return norm >= T(kNormEps) ? T(1) / (denom * denom) : T(0);
}

template <typename T>
SA_HOST_DEVICE inline T clamped_norm(T norm) {
  return norm > T(kNormEps) ? norm : T(kNormEps);
}

// One entry of q̂k̂ᵀ from the raw Gram entry q_i·k_j and the two channel norms.
template <typename T>
SA_HOST_DEVICE inline T normalized_gram_entry(T raw, T q_norm, T k_norm) {
  return raw / (clamped_norm(q_norm) * clamped_norm(k_norm));
}

// Row i's sums after dS: its share of dτ, ⟨dS_i, q̂_i k̂ᵀ⟩, and ⟨dS_i, S_i⟩ = ⟨dq̂_i, q̂_i⟩, the
// weight of q_i's normalisation correction.
template <typename T>
SA_HOST_DEVICE inline void score_grad_row_sums(const T* ds, const T* gram_row, const T* s, int d,
                                               T* dtau, T* s_dot) {
  T dt = T(0), sd = T(0);
  for (int j = 0; j < d; ++j) {
    dt += ds[j] * gram_row[j];
    sd += ds[j] * s[j];
  }
  *dtau = dt;
  *s_dot = sd;
}

// A_ij = τ dS_ij / (‖q_i‖ ‖k_j‖) (norms clamped), so that dq = A k − a⊙q and dk = Aᵀ q − b⊙k
// with a_i = ⟨dS_i, S_i⟩ / ‖q_i‖² and b_j = Σ_i dS_ij S_ij / ‖k_j‖² (normalize_projection_scale).
template <typename T>
SA_HOST_DEVICE inline T raw_score_grad(T tau, T ds, T q_norm, T k_norm) {
  return tau * ds / (clamped_norm(q_norm) * clamped_norm(k_norm));
}

}  // namespace sca
}  // namespace sparse_attn
