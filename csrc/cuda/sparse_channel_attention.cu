// CUDA kernels of the top-k channel attention (DESIGN.md §1), the same passes as the CPU file:
//
// Forward: the raw Gram matrix q kᵀ by cuBLAS (fp32 output for fp16/bf16 inputs), the channel
// norms by a block reduction per channel, the d x d stage by one thread per row (one block per
// (batch*head) row block) calling the row helpers of csrc/common, and out = P v by cuBLAS.
// Backward: dP = dout vᵀ and dv = Pᵀ dout by cuBLAS; the d x d stage gives dS, the per-row
// partials of dτ and dw, A = τ dS / (‖q‖ ‖k‖) and the corrections a, b; dq = A k − a⊙q and
// dk = Aᵀ q − b⊙k are one GEMM each followed by a fused correction kernel.
//
// Determinism: every reduction is either a fixed-order loop, a fixed-shape block reduction or
// an ATen reduction of a fixed shape; no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/sparse_channel_attention.h"
#include "common/sparse_channel_attention_args.h"

namespace sparse_attn {
namespace sca {
namespace {

using at::Tensor;

constexpr int kNormThreads = 256;  // threads of one channel's norm reduction (a power of two)
constexpr int kRowThreads = 64;    // rows of the d x d stage per block
constexpr int kElementThreads = 256;

// Strides of a (B, heads, d, N) tensor whose last dimension is contiguous.
struct RowStrides {
  int64_t batch, head, row;
};

RowStrides row_strides(const Tensor& x) { return {x.stride(0), x.stride(1), x.stride(2)}; }

Tensor rows_contiguous(const Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); }

__device__ inline int64_t row_offset(const RowStrides& st, int64_t bh, int64_t heads, int64_t i) {
  return (bh / heads) * st.batch + (bh % heads) * st.head + i * st.row;
}

// ‖x_row‖ of every row of q (blockIdx.y = 0) and k (blockIdx.y = 1), in the accumulation type.
template <typename scalar_t, typename acc_t>
__global__ void channel_norms_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                     RowStrides q_st, RowStrides k_st, int64_t heads, int64_t d,
                                     int64_t n, acc_t* __restrict__ q_norm, acc_t* __restrict__ k_norm) {
  __shared__ acc_t partial[kNormThreads];
  const int64_t row = blockIdx.x;  // bh * d + i
  const int64_t bh = row / d, i = row % d;
  const bool is_q = blockIdx.y == 0;
  const scalar_t* x = is_q ? q + row_offset(q_st, bh, heads, i) : k + row_offset(k_st, bh, heads, i);
  acc_t sum = acc_t(0);
  for (int64_t c = threadIdx.x; c < n; c += kNormThreads) {
    const acc_t value = static_cast<acc_t>(x[c]);
    sum += value * value;
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int half = kNormThreads / 2; half > 0; half /= 2) {  // fixed tree: deterministic
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) (is_q ? q_norm : k_norm)[row] = sqrt_of(partial[0]);
}

// Row i of (batch*head) blockIdx.x: the normalised gram row, then S, ranks and P.
template <typename acc_t>
__global__ void attention_rows_forward_kernel(const acc_t* __restrict__ raw, const acc_t* __restrict__ q_norm,
                                              const acc_t* __restrict__ k_norm, const acc_t* __restrict__ tau,
                                              const acc_t* __restrict__ w, Branches br, int64_t heads, int d,
                                              acc_t* __restrict__ gram, acc_t* __restrict__ s_scratch,
                                              int* __restrict__ rank_scratch, acc_t* __restrict__ p) {
  const int64_t bh = blockIdx.x;
  const int i = blockIdx.y * kRowThreads + threadIdx.x;
  if (i >= d) return;
  const int64_t row = bh * d + i;
  acc_t* g = gram + row * d;
  for (int j = 0; j < d; ++j) g[j] = normalized_gram_entry(raw[row * d + j], q_norm[row], k_norm[bh * d + j]);
  acc_t* s = s_scratch + row * d;
  int* rank = rank_scratch + row * d;
  scores_and_ranks_of_row(g, tau[bh % heads], d, s, rank);
  attention_row_forward(s, rank, d, br, w, p + row * d);
}

// Row i of (batch*head) blockIdx.x, given dP: P (for dv), dS, A, a_q, and this row's
// partials of dw (R values) and dτ.
template <typename acc_t>
__global__ void attention_rows_backward_kernel(const acc_t* __restrict__ gram, const acc_t* __restrict__ dp,
                                               const acc_t* __restrict__ q_norm, const acc_t* __restrict__ k_norm,
                                               const acc_t* __restrict__ tau, const acc_t* __restrict__ w,
                                               Branches br, int64_t heads, int d, acc_t* __restrict__ s_scratch,
                                               int* __restrict__ rank_scratch, acc_t* __restrict__ p,
                                               acc_t* __restrict__ ds, acc_t* __restrict__ a_mat,
                                               acc_t* __restrict__ a_q, acc_t* __restrict__ row_dw,
                                               acc_t* __restrict__ row_dtau) {
  const int64_t bh = blockIdx.x;
  const int i = blockIdx.y * kRowThreads + threadIdx.x;
  if (i >= d) return;
  const int64_t row = bh * d + i;
  const acc_t t = tau[bh % heads];
  acc_t* s = s_scratch + row * d;
  int* rank = rank_scratch + row * d;
  acc_t* ds_row = ds + row * d;
  scores_and_ranks_of_row(gram + row * d, t, d, s, rank);
  attention_row_forward(s, rank, d, br, w, p + row * d);
  for (int r = 0; r < br.count; ++r) row_dw[row * br.count + r] = acc_t(0);
  attention_row_backward(s, rank, dp + row * d, d, br, w, ds_row, row_dw + row * br.count);
  acc_t s_dot;
  score_grad_row_sums(ds_row, gram + row * d, s, d, row_dtau + row, &s_dot);
  a_q[row] = s_dot * normalize_projection_scale(q_norm[row]);
  for (int j = 0; j < d; ++j) a_mat[row * d + j] = raw_score_grad(t, ds_row[j], q_norm[row], k_norm[bh * d + j]);
}

// b_j = Σ_i dS_ij S_ij / ‖k_j‖², one thread per column, rows summed in order.
template <typename acc_t>
__global__ void column_corrections_kernel(const acc_t* __restrict__ ds, const acc_t* __restrict__ s,
                                          const acc_t* __restrict__ k_norm, int d, acc_t* __restrict__ a_k) {
  const int64_t bh = blockIdx.x;
  const int j = blockIdx.y * kRowThreads + threadIdx.x;
  if (j >= d) return;
  const int64_t base = bh * d * d;
  acc_t sum = acc_t(0);
  for (int i = 0; i < d; ++i) sum += ds[base + int64_t(i) * d + j] * s[base + int64_t(i) * d + j];
  a_k[bh * d + j] = sum * normalize_projection_scale(k_norm[bh * d + j]);
}

// grad[bh, i, c] = gemm[bh, i, c] − a[bh, i] · x[bh, i, c] (gemm and grad contiguous).
template <typename scalar_t, typename acc_t>
__global__ void normalization_correction_kernel(const acc_t* __restrict__ gemm, const scalar_t* __restrict__ x,
                                                RowStrides x_st, const acc_t* __restrict__ a, int64_t heads,
                                                int64_t d, int64_t n, int64_t total, scalar_t* __restrict__ grad) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = idx % n, row = idx / n;
    const int64_t bh = row / d, i = row % d;
    const acc_t value = static_cast<acc_t>(x[row_offset(x_st, bh, heads, i) + c]);
    grad[idx] = static_cast<scalar_t>(gemm[idx] - a[row] * value);
  }
}

bool is_reduced_float(const Tensor& x) {
  return x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
}

// a bᵀ-style batched product in the accumulation type: fp16/bf16 inputs give an fp32 result
// (cuBLAS accumulates in fp32 either way; the output is not rounded to half precision).
Tensor bmm_accumulate(const Tensor& a, const Tensor& b) {
  return is_reduced_float(a) ? at::bmm(a, b, at::kFloat) : at::bmm(a, b);
}

dim3 row_grid(int64_t bh, int64_t d) { return dim3(bh, (d + kRowThreads - 1) / kRowThreads); }

int element_blocks(int64_t total) {
  return static_cast<int>(std::min<int64_t>((total + kElementThreads - 1) / kElementThreads, 65535));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_cuda(const Tensor& q_in, const Tensor& k_in,
                                                        const Tensor& v_in, const Tensor& temperature,
                                                        const Tensor& weights, c10::IntArrayRef topk,
                                                        c10::IntArrayRef activation) {
  check_forward_args(q_in, k_in, v_in, temperature, weights, static_cast<int64_t>(topk.size()));
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Branches br = make_branches(topk, activation, q_in.size(2));
  const Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in);
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(2), n = q.size(3), bh = batch * heads;
  const auto acc_type = at::toOpMathType(q.scalar_type());
  const auto acc_options = q.options().dtype(acc_type);
  const Tensor raw = bmm_accumulate(q.reshape({bh, d, n}), k.reshape({bh, d, n}).transpose(1, 2)).contiguous();
  Tensor q_norm = at::empty({batch, heads, d}, acc_options);
  Tensor k_norm = at::empty({batch, heads, d}, acc_options);
  Tensor gram = at::empty({batch, heads, d, d}, acc_options);
  Tensor p = at::empty({bh, d, d}, acc_options);
  Tensor s_scratch = at::empty({bh, d, d}, acc_options);
  Tensor rank_scratch = at::empty({bh, d, d}, q.options().dtype(at::kInt));
  const Tensor tau = temperature.reshape({-1}).to(acc_type).contiguous();
  const Tensor w = weights.reshape({-1}).to(acc_type).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sparse_channel_attention_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    channel_norms_kernel<scalar_t, acc_t><<<dim3(bh * d, 2), kNormThreads, 0, stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), row_strides(q), row_strides(k), heads, d, n,
        q_norm.data_ptr<acc_t>(), k_norm.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    attention_rows_forward_kernel<acc_t><<<row_grid(bh, d), kRowThreads, 0, stream>>>(
        raw.const_data_ptr<acc_t>(), q_norm.const_data_ptr<acc_t>(), k_norm.const_data_ptr<acc_t>(),
        tau.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(), br, heads, static_cast<int>(d),
        gram.data_ptr<acc_t>(), s_scratch.data_ptr<acc_t>(), rank_scratch.data_ptr<int>(), p.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const Tensor out = at::bmm(p.to(q.scalar_type()), v_in.reshape({bh, d, n}));
  return {out.view({batch, heads, d, n}), gram, q_norm, k_norm};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_cuda(
    const Tensor& grad_out_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
    const Tensor& temperature, const Tensor& weights, const Tensor& gram_in, const Tensor& q_norm_in,
    const Tensor& k_norm_in, c10::IntArrayRef topk, c10::IntArrayRef activation) {
  check_forward_args(q_in, k_in, v_in, temperature, weights, static_cast<int64_t>(topk.size()));
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes(), "grad_out: expected the shape of q");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Branches br = make_branches(topk, activation, q_in.size(2));
  const int nb = br.count;
  const Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in);
  const Tensor grad_out = grad_out_in.to(q.scalar_type()).reshape(q.sizes());
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(2), n = q.size(3), bh = batch * heads;
  const auto acc_type = at::toOpMathType(q.scalar_type());
  const auto acc_options = q.options().dtype(acc_type);
  const Tensor gram = gram_in.to(acc_type).contiguous();
  const Tensor q_norm = q_norm_in.to(acc_type).contiguous();
  const Tensor k_norm = k_norm_in.to(acc_type).contiguous();
  const Tensor tau = temperature.reshape({-1}).to(acc_type).contiguous();
  const Tensor w = weights.reshape({-1}).to(acc_type).contiguous();
  const Tensor dout3 = grad_out.reshape({bh, d, n});
  const Tensor dp = bmm_accumulate(dout3, v_in.reshape({bh, d, n}).transpose(1, 2)).contiguous();

  Tensor p = at::empty({bh, d, d}, acc_options);
  Tensor ds = at::empty({bh, d, d}, acc_options);
  Tensor a_mat = at::empty({bh, d, d}, acc_options);
  Tensor s_scratch = at::empty({bh, d, d}, acc_options);
  Tensor rank_scratch = at::empty({bh, d, d}, q.options().dtype(at::kInt));
  Tensor a_q = at::empty({bh, d}, acc_options);
  Tensor a_k = at::empty({bh, d}, acc_options);
  Tensor row_dw = at::empty({bh * d, nb}, acc_options);
  Tensor row_dtau = at::empty({batch, heads, d}, acc_options);
  Tensor grad_q = at::empty({batch, heads, d, n}, q.options());
  Tensor grad_k = at::empty({batch, heads, d, n}, q.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sparse_channel_attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    attention_rows_backward_kernel<acc_t><<<row_grid(bh, d), kRowThreads, 0, stream>>>(
        gram.const_data_ptr<acc_t>(), dp.const_data_ptr<acc_t>(), q_norm.const_data_ptr<acc_t>(),
        k_norm.const_data_ptr<acc_t>(), tau.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(), br, heads,
        static_cast<int>(d), s_scratch.data_ptr<acc_t>(), rank_scratch.data_ptr<int>(), p.data_ptr<acc_t>(),
        ds.data_ptr<acc_t>(), a_mat.data_ptr<acc_t>(), a_q.data_ptr<acc_t>(), row_dw.data_ptr<acc_t>(),
        row_dtau.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    column_corrections_kernel<acc_t><<<row_grid(bh, d), kRowThreads, 0, stream>>>(
        ds.const_data_ptr<acc_t>(), s_scratch.const_data_ptr<acc_t>(), k_norm.const_data_ptr<acc_t>(),
        static_cast<int>(d), a_k.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // A is tiny (1/(‖q‖‖k‖)) where N is large: the GEMMs run in the accumulation type, never
    // with A rounded to half precision.
    const int64_t total = bh * d * n;
    const Tensor gemm_q = at::bmm(a_mat, k.reshape({bh, d, n}).to(acc_type)).contiguous();
    normalization_correction_kernel<scalar_t, acc_t><<<element_blocks(total), kElementThreads, 0, stream>>>(
        gemm_q.const_data_ptr<acc_t>(), q.const_data_ptr<scalar_t>(), row_strides(q), a_q.const_data_ptr<acc_t>(),
        heads, d, n, total, grad_q.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const Tensor gemm_k = at::bmm(a_mat.transpose(1, 2), q.reshape({bh, d, n}).to(acc_type)).contiguous();
    normalization_correction_kernel<scalar_t, acc_t><<<element_blocks(total), kElementThreads, 0, stream>>>(
        gemm_k.const_data_ptr<acc_t>(), k.const_data_ptr<scalar_t>(), row_strides(k), a_k.const_data_ptr<acc_t>(),
        heads, d, n, total, grad_k.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const Tensor grad_v = at::bmm(p.transpose(1, 2).to(q.scalar_type()), dout3);
  // Fixed-shape ATen reductions of the per-row partials: deterministic.
  const Tensor grad_temperature = row_dtau.sum(at::IntArrayRef{0, 2}).to(temperature.scalar_type());
  const Tensor grad_weights = row_dw.sum(0).to(weights.scalar_type());
  return {grad_q, grad_k, grad_v.view({batch, heads, d, n}), grad_temperature, grad_weights};
}

}  // namespace
}  // namespace sca
}  // namespace sparse_attn

TORCH_LIBRARY_IMPL(sparse_attn, CUDA, m) {
  m.impl("sparse_channel_attention_forward", &sparse_attn::sca::forward_cuda);
  m.impl("sparse_channel_attention_backward", &sparse_attn::sca::backward_cuda);
}
