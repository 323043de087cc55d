// CPU kernels of the top-k channel attention (DESIGN.md §1).
//
// Forward: one streaming pass over N reduces the raw Gram matrix q kᵀ together with ‖q‖² and
// ‖k‖² (each chunk of q and k is read into cache once, for the GEMM and the norms); the d x d
// stage normalises, ranks and sums the branches into one matrix P; one GEMM writes out = P v.
// Backward: dP = dout vᵀ, the d x d stage gives dS, dτ, dw; dv = Pᵀ dout; dq and dk are one
// GEMM each plus a per-channel correction, fused chunk by chunk. Nothing of size d x N is saved
// besides q, k, v.
//
// Determinism: N is cut into fixed slabs whose partial sums are added in slab order, so the
// result does not depend on the number of threads; every other reduction is sequential.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/sparse_channel_attention.h"
#include "common/sparse_channel_attention_args.h"

namespace sparse_attn {
namespace sca {
namespace {

using at::Tensor;

constexpr int64_t kSlab = 8192;   // columns per deterministic partial sum
constexpr int64_t kChunk = 1024;  // columns per cache-resident step (d x kChunk of q and of k)

int64_t num_slabs(int64_t n) { return (n + kSlab - 1) / kSlab; }

// Raw Gram matrix and squared channel norms of one (batch*head, slab) item.
template <typename scalar_t>
void gram_and_norms_of_slab(const Tensor& q, const Tensor& k, int64_t col_begin, int64_t col_end,
                            Tensor& gram_partial, scalar_t* q_sq, scalar_t* k_sq) {
  const int64_t d = q.size(0);
  for (int64_t c0 = col_begin; c0 < col_end; c0 += kChunk) {
    const int64_t len = std::min(kChunk, col_end - c0);
    const Tensor q_chunk = q.narrow(1, c0, len);
    const Tensor k_chunk = k.narrow(1, c0, len);
    gram_partial.addmm_(q_chunk, k_chunk.t());
    const int64_t stride = q.stride(0);
    const scalar_t* qp = q_chunk.const_data_ptr<scalar_t>();
    const scalar_t* kp = k_chunk.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < d; ++i) {
      scalar_t qs = 0, ks = 0;
      // omp simd lets the compiler vectorise the reduction (a fixed order for a given build).
#pragma omp simd reduction(+ : qs, ks)
      for (int64_t n = 0; n < len; ++n) {
        qs += qp[i * stride + n] * qp[i * stride + n];
        ks += kp[i * stride + n] * kp[i * stride + n];
      }
      q_sq[i] += qs;
      k_sq[i] += ks;
    }
  }
}

// Fills gram (normalised q̂k̂ᵀ), q_norm and k_norm of every (batch*head).
template <typename scalar_t>
void normalized_gram(const Tensor& q, const Tensor& k, Tensor& gram, Tensor& q_norm, Tensor& k_norm) {
  const int64_t bh = q.size(0), d = q.size(1), n = q.size(2);
  const int64_t slabs = num_slabs(n);
  Tensor partials = at::zeros({bh, slabs, d, d}, q.options());
  Tensor sq_partials = at::zeros({bh, slabs, 2, d}, q.options());
  at::parallel_for(0, bh * slabs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / slabs, s = item % slabs;
      Tensor gram_partial = partials[b][s];
      scalar_t* sq = sq_partials[b][s].data_ptr<scalar_t>();
      gram_and_norms_of_slab<scalar_t>(q[b], k[b], s * kSlab, std::min(n, (s + 1) * kSlab),
                                       gram_partial, sq, sq + d);
    }
  });
  const scalar_t* part = partials.const_data_ptr<scalar_t>();
  const scalar_t* sq_part = sq_partials.const_data_ptr<scalar_t>();
  scalar_t* g = gram.data_ptr<scalar_t>();
  scalar_t* qn = q_norm.data_ptr<scalar_t>();
  scalar_t* kn = k_norm.data_ptr<scalar_t>();
  at::parallel_for(0, bh, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t i = 0; i < d; ++i) {
        scalar_t qs = 0, ks = 0;
        for (int64_t s = 0; s < slabs; ++s) {
          qs += sq_part[((b * slabs + s) * 2 + 0) * d + i];
          ks += sq_part[((b * slabs + s) * 2 + 1) * d + i];
        }
        qn[b * d + i] = sqrt_of(qs);
        kn[b * d + i] = sqrt_of(ks);
      }
      for (int64_t i = 0; i < d; ++i) {
        for (int64_t j = 0; j < d; ++j) {
          scalar_t acc = 0;
          for (int64_t s = 0; s < slabs; ++s) acc += part[((b * slabs + s) * d + i) * d + j];
          g[(b * d + i) * d + j] = normalized_gram_entry(acc, qn[b * d + i], kn[b * d + j]);
        }
      }
    }
  });
}

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_typed(const Tensor& q4, const Tensor& k4,
                                                         const Tensor& v4, const Tensor& temperature,
                                                         const Tensor& weights, const Branches& br) {
  const int64_t batch = q4.size(0), heads = q4.size(1), d = q4.size(2), n = q4.size(3);
  const int64_t bh = batch * heads;
  const Tensor q = q4.reshape({bh, d, n}).contiguous();
  const Tensor k = k4.reshape({bh, d, n}).contiguous();
  Tensor gram = at::empty({bh, d, d}, q.options());
  Tensor q_norm = at::empty({bh, d}, q.options());
  Tensor k_norm = at::empty({bh, d}, q.options());
  normalized_gram<scalar_t>(q, k, gram, q_norm, k_norm);

  Tensor p = at::empty({bh, d, d}, q.options());
  const Tensor tau = temperature.contiguous();
  const Tensor w = weights.contiguous();
  const scalar_t* tau_p = tau.const_data_ptr<scalar_t>();
  const scalar_t* w_p = w.const_data_ptr<scalar_t>();
  const scalar_t* g = gram.const_data_ptr<scalar_t>();
  scalar_t* pp = p.data_ptr<scalar_t>();
  at::parallel_for(0, bh * d, 16, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> s(d);
    std::vector<int> rank(d);
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t t = tau_p[(row / d) % heads];
      scores_and_ranks_of_row(g + row * d, t, static_cast<int>(d), s.data(), rank.data());
      attention_row_forward(s.data(), rank.data(), static_cast<int>(d), br, w_p, pp + row * d);
    }
  });
  Tensor out = at::matmul(p, v4.reshape({bh, d, n}));
  return {out.view({batch, heads, d, n}), gram.view({batch, heads, d, d}),
          q_norm.view({batch, heads, d}), k_norm.view({batch, heads, d})};
}

// grad_x = A x_other - a ⊙ x, chunk by chunk so that the correction is added while the GEMM's
// output is still in cache.
template <typename scalar_t>
void gemm_minus_row_scaled(const Tensor& a_mat, const Tensor& other, const Tensor& x,
                           const Tensor& a_vec, Tensor& grad) {
  const int64_t bh = x.size(0), d = x.size(1), n = x.size(2);
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, bh * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, c0 = (item % chunks) * kChunk;
      const int64_t len = std::min(kChunk, n - c0);
      Tensor out_chunk = grad[b].narrow(1, c0, len);
      const scalar_t* xp = x[b].narrow(1, c0, len).const_data_ptr<scalar_t>();
      const scalar_t* av = a_vec[b].const_data_ptr<scalar_t>();
      scalar_t* op = out_chunk.data_ptr<scalar_t>();
      for (int64_t i = 0; i < d; ++i) {
        const scalar_t scale = -av[i];
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) op[i * n + j] = scale * xp[i * n + j];
      }
      out_chunk.addmm_(a_mat[b], other[b].narrow(1, c0, len));
    }
  });
}

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_typed(
    const Tensor& grad_out4, const Tensor& q4, const Tensor& k4, const Tensor& v4,
    const Tensor& temperature, const Tensor& weights, const Tensor& gram4, const Tensor& q_norm4,
    const Tensor& k_norm4, const Branches& br) {
  const int64_t batch = q4.size(0), heads = q4.size(1), d = q4.size(2), n = q4.size(3);
  const int64_t bh = batch * heads;
  const int nb = br.count;
  const Tensor grad_out = grad_out4.reshape({bh, d, n});
  const Tensor v = v4.reshape({bh, d, n});
  const Tensor gram = gram4.reshape({bh, d, d}).contiguous();
  const Tensor q_norm = q_norm4.reshape({bh, d}).contiguous();
  const Tensor k_norm = k_norm4.reshape({bh, d}).contiguous();
  const Tensor dp = at::matmul(grad_out, v.transpose(1, 2)).contiguous();

  Tensor p = at::empty({bh, d, d}, q4.options());
  Tensor ds = at::empty({bh, d, d}, q4.options());
  Tensor s_all = at::empty({bh, d, d}, q4.options());
  // Per-row partials, reduced below in row order: dw (R per row), dτ and <dq̂_i, q̂_i>.
  Tensor row_dw = at::zeros({bh * d, nb}, q4.options());
  Tensor row_dtau = at::empty({bh * d}, q4.options());
  Tensor row_sdot = at::empty({bh * d}, q4.options());
  const Tensor tau = temperature.contiguous();
  const Tensor w = weights.contiguous();
  const scalar_t* tau_p = tau.const_data_ptr<scalar_t>();
  const scalar_t* w_p = w.const_data_ptr<scalar_t>();
  const scalar_t* g = gram.const_data_ptr<scalar_t>();
  const scalar_t* dpp = dp.const_data_ptr<scalar_t>();
  scalar_t* pp = p.data_ptr<scalar_t>();
  scalar_t* dsp = ds.data_ptr<scalar_t>();
  scalar_t* sp = s_all.data_ptr<scalar_t>();
  scalar_t* rdw = row_dw.data_ptr<scalar_t>();
  scalar_t* rdtau = row_dtau.data_ptr<scalar_t>();
  scalar_t* rsdot = row_sdot.data_ptr<scalar_t>();
  at::parallel_for(0, bh * d, 16, [&](int64_t begin, int64_t end) {
    std::vector<int> rank(d);
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t t = tau_p[(row / d) % heads];
      scalar_t* s = sp + row * d;
      scores_and_ranks_of_row(g + row * d, t, static_cast<int>(d), s, rank.data());
      attention_row_forward(s, rank.data(), static_cast<int>(d), br, w_p, pp + row * d);
      attention_row_backward(s, rank.data(), dpp + row * d, static_cast<int>(d), br, w_p,
                             dsp + row * d, rdw + row * nb);
      score_grad_row_sums(dsp + row * d, g + row * d, s, static_cast<int>(d), rdtau + row, rsdot + row);
    }
  });

  // Sequential reductions (tiny): dw, dτ, and the two normalisation corrections
  //   a_i = <dq̂_i, q̂_i> / ‖q_i‖² = Σ_j dS_ij S_ij / ‖q_i‖²,   b_j = Σ_i dS_ij S_ij / ‖k_j‖²,
  // and A_ij = τ dS_ij / (‖q_i‖ ‖k_j‖), so that dq = A k - a ⊙ q and dk = Aᵀ q - b ⊙ k.
  Tensor grad_weights = at::zeros({nb}, q4.options());
  Tensor grad_temperature = at::zeros({heads}, q4.options());
  Tensor a_mat = at::empty({bh, d, d}, q4.options());
  Tensor a_q = at::empty({bh, d}, q4.options());
  Tensor a_k = at::empty({bh, d}, q4.options());
  {
    scalar_t* gw = grad_weights.data_ptr<scalar_t>();
    scalar_t* gt = grad_temperature.data_ptr<scalar_t>();
    scalar_t* am = a_mat.data_ptr<scalar_t>();
    scalar_t* aq = a_q.data_ptr<scalar_t>();
    scalar_t* ak = a_k.data_ptr<scalar_t>();
    const scalar_t* qn = q_norm.const_data_ptr<scalar_t>();
    const scalar_t* kn = k_norm.const_data_ptr<scalar_t>();
    for (int64_t row = 0; row < bh * d; ++row) {
      for (int r = 0; r < nb; ++r) gw[r] += rdw[row * nb + r];
      gt[(row / d) % heads] += rdtau[row];
    }
    for (int64_t b = 0; b < bh; ++b) {
      const scalar_t t = tau_p[b % heads];
      for (int64_t j = 0; j < d; ++j) ak[b * d + j] = 0;
      for (int64_t i = 0; i < d; ++i) {
        const int64_t row = b * d + i;
        aq[row] = rsdot[row] * normalize_projection_scale(qn[row]);
        for (int64_t j = 0; j < d; ++j) {
          ak[b * d + j] += dsp[row * d + j] * sp[row * d + j];
          am[row * d + j] = raw_score_grad(t, dsp[row * d + j], qn[row], kn[b * d + j]);
        }
      }
      for (int64_t j = 0; j < d; ++j) ak[b * d + j] *= normalize_projection_scale(kn[b * d + j]);
    }
  }

  const Tensor q = q4.reshape({bh, d, n}).contiguous();
  const Tensor k = k4.reshape({bh, d, n}).contiguous();
  Tensor grad_q = at::empty({bh, d, n}, q4.options());
  Tensor grad_k = at::empty({bh, d, n}, q4.options());
  gemm_minus_row_scaled<scalar_t>(a_mat, k, q, a_q, grad_q);
  gemm_minus_row_scaled<scalar_t>(a_mat.transpose(1, 2), q, k, a_k, grad_k);
  Tensor grad_v = at::matmul(p.transpose(1, 2), grad_out);
  return {grad_q.view({batch, heads, d, n}), grad_k.view({batch, heads, d, n}),
          grad_v.view({batch, heads, d, n}), grad_temperature, grad_weights};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                       const Tensor& temperature, const Tensor& weights,
                                                       c10::IntArrayRef topk, c10::IntArrayRef activation) {
  check_forward_args(q, k, v, temperature, weights, static_cast<int64_t>(topk.size()));
  const Branches br = make_branches(topk, activation, q.size(2));
  std::tuple<Tensor, Tensor, Tensor, Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sparse_channel_attention_forward_cpu", [&] {
    result = forward_typed<scalar_t>(q, k, v, temperature.reshape({-1}), weights.reshape({-1}), br);
  });
  return result;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_cpu(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& temperature,
    const Tensor& weights, const Tensor& gram, const Tensor& q_norm, const Tensor& k_norm,
    c10::IntArrayRef topk, c10::IntArrayRef activation) {
  check_forward_args(q, k, v, temperature, weights, static_cast<int64_t>(topk.size()));
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "grad_out: expected the shape of q");
  const Branches br = make_branches(topk, activation, q.size(2));
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sparse_channel_attention_backward_cpu", [&] {
    result = backward_typed<scalar_t>(grad_out.to(q.scalar_type()), q, k, v, temperature.reshape({-1}),
                                      weights.reshape({-1}), gram, q_norm, k_norm, br);
  });
  return result;
}

}  // namespace
}  // namespace sca
}  // namespace sparse_attn

TORCH_LIBRARY_IMPL(sparse_attn, CPU, m) {
  m.impl("sparse_channel_attention_forward", &sparse_attn::sca::forward_cpu);
  m.impl("sparse_channel_attention_backward", &sparse_attn::sca::backward_cpu);
}
