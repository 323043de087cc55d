// CUDA kernels of block-sparse region attention (DESIGN.md §4); the online-softmax and gradient
// math comes from csrc/common/block_sparse_attention.h, which the CPU tests cover.
//
// One block per (region, image·head), one thread per pixel of the region (P = p_h·p_w threads).
// Forward: each thread owns a query pixel (its q and running output in registers/local memory);
// the block stages each of its t key regions' k and v in shared memory, and every thread folds
// the P scores into its online softmax. Backward, deterministic and without atomics: dq per query
// region the same way (probabilities recomputed from the saved log-sum-exp), then dk, dv per key
// region: each thread owns a key pixel and the block stages, one after the other in ascending
// order, the q, dout, lse and D of the query regions that read it (the inverse index).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/block_sparse_attention.h"
#include "common/block_sparse_attention_args.h"

namespace sparse_attn {
namespace bsa {
namespace {

using at::Tensor;

constexpr int kMaxD = 64;                      // channels per head a thread holds
constexpr int64_t kMaxShared = 48 * 1024;      // shared memory without opting in
constexpr int kMaxPixels = 1024;               // threads per block

struct Shape {
  RegionGeometry geometry;
  int64_t d, t, plane, regions;
};

// Stage rows[n][c] = map[c·plane + offset(region, n)] (pixel-major) for the region's P pixels.
template <typename T, typename A>
__device__ void stage_region(const T* __restrict__ map, const Shape& s, int64_t region, A* __restrict__ rows) {
  const int64_t pixels = s.geometry.pixels();
  for (int64_t idx = threadIdx.x; idx < pixels * s.d; idx += blockDim.x) {
    const int64_t n = idx % pixels, c = idx / pixels;  // consecutive threads: consecutive pixels
    rows[n * s.d + c] = static_cast<A>(map[c * s.plane + s.geometry.offset(region, n)]);
  }
}

template <typename T, typename A>
__global__ void forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                               const int64_t* __restrict__ key_blocks, Shape s, A scale, T* __restrict__ out,
                               A* __restrict__ lse) {
  extern __shared__ unsigned char shared_bytes[];
  A* keys = reinterpret_cast<A*>(shared_bytes);
  A* values = keys + s.geometry.pixels() * s.d;
  const int64_t region = blockIdx.x, group = blockIdx.y, i = threadIdx.x;
  const int64_t base = group * s.d * s.plane, pixel = s.geometry.offset(region, i);
  A q_row[kMaxD], acc[kMaxD];
  for (int64_t c = 0; c < s.d; ++c) {
    q_row[c] = static_cast<A>(q[base + c * s.plane + pixel]);
    acc[c] = A(0);
  }
  A row_max = -INFINITY, row_sum = A(0);
  const int64_t* blocks = key_blocks + (group * s.regions + region) * s.t;
  for (int64_t slot = 0; slot < s.t; ++slot) {
    const int64_t key_region = blocks[slot];
    if (key_region < 0 || key_region >= s.regions) continue;  // checked on the host: never a wild read
    __syncthreads();
    stage_region(k + base, s, key_region, keys);
    stage_region(v + base, s, key_region, values);
    __syncthreads();
    for (int64_t j = 0; j < s.geometry.pixels(); ++j) {
      A score = A(0);
      for (int64_t c = 0; c < s.d; ++c) score += q_row[c] * keys[j * s.d + c];
      score *= scale;
      const A new_max = score > row_max ? score : row_max;
      const A alpha = rescale_factor(row_max, new_max, StandardExp());
      const A p = StandardExp()(score - new_max);
      row_sum = alpha * row_sum + p;
      for (int64_t c = 0; c < s.d; ++c) acc[c] = alpha * acc[c] + p * values[j * s.d + c];
      row_max = new_max;
    }
  }
  for (int64_t c = 0; c < s.d; ++c) out[base + c * s.plane + pixel] = static_cast<T>(acc[c] / row_sum);
  lse[group * s.plane + pixel] = log_sum_exp(row_max, row_sum);
}

template <typename T, typename A>
__global__ void grad_q_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                              const T* __restrict__ grad_out, const A* __restrict__ lse, const A* __restrict__ delta,
                              const int64_t* __restrict__ key_blocks, Shape s, A scale, T* __restrict__ grad_q) {
  extern __shared__ unsigned char shared_bytes[];
  A* keys = reinterpret_cast<A*>(shared_bytes);
  A* values = keys + s.geometry.pixels() * s.d;
  const int64_t region = blockIdx.x, group = blockIdx.y, i = threadIdx.x;
  const int64_t base = group * s.d * s.plane, pixel = s.geometry.offset(region, i);
  A q_row[kMaxD], dout_row[kMaxD], acc[kMaxD];
  for (int64_t c = 0; c < s.d; ++c) {
    q_row[c] = static_cast<A>(q[base + c * s.plane + pixel]);
    dout_row[c] = static_cast<A>(grad_out[base + c * s.plane + pixel]);
    acc[c] = A(0);
  }
  const A row_lse = lse[group * s.plane + pixel], row_delta = delta[group * s.plane + pixel];
  const int64_t* blocks = key_blocks + (group * s.regions + region) * s.t;
  for (int64_t slot = 0; slot < s.t; ++slot) {
    const int64_t key_region = blocks[slot];
    if (key_region < 0 || key_region >= s.regions) continue;
    __syncthreads();
    stage_region(k + base, s, key_region, keys);
    stage_region(v + base, s, key_region, values);
    __syncthreads();
    for (int64_t j = 0; j < s.geometry.pixels(); ++j) {
      A score = A(0), dp = A(0);
      for (int64_t c = 0; c < s.d; ++c) {
        score += q_row[c] * keys[j * s.d + c];
        dp += dout_row[c] * values[j * s.d + c];
      }
      const A ds = scale * score_grad(StandardExp()(scale * score - row_lse), dp, row_delta);
      for (int64_t c = 0; c < s.d; ++c) acc[c] += ds * keys[j * s.d + c];
    }
  }
  for (int64_t c = 0; c < s.d; ++c) grad_q[base + c * s.plane + pixel] = static_cast<T>(acc[c]);
}

template <typename T, typename A>
__global__ void grad_kv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                               const T* __restrict__ grad_out, const A* __restrict__ lse,
                               const A* __restrict__ delta, const int64_t* __restrict__ offsets,
                               const int64_t* __restrict__ readers, Shape s, A scale, T* __restrict__ grad_k,
                               T* __restrict__ grad_v) {
  extern __shared__ unsigned char shared_bytes[];
  const int64_t pixels = s.geometry.pixels();
  A* queries = reinterpret_cast<A*>(shared_bytes);
  A* douts = queries + pixels * s.d;
  A* lses = douts + pixels * s.d;
  A* deltas = lses + pixels;
  const int64_t region = blockIdx.x, group = blockIdx.y, j = threadIdx.x;
  const int64_t base = group * s.d * s.plane, pixel = s.geometry.offset(region, j);
  A k_row[kMaxD], v_row[kMaxD], acc_k[kMaxD], acc_v[kMaxD];
  for (int64_t c = 0; c < s.d; ++c) {
    k_row[c] = static_cast<A>(k[base + c * s.plane + pixel]);
    v_row[c] = static_cast<A>(v[base + c * s.plane + pixel]);
    acc_k[c] = acc_v[c] = A(0);
  }
  const int64_t entry = group * s.regions + region;
  for (int64_t n = offsets[entry]; n < offsets[entry + 1]; ++n) {
    const int64_t reader = readers[n];
    __syncthreads();
    stage_region(q + base, s, reader, queries);
    stage_region(grad_out + base, s, reader, douts);
    for (int64_t idx = threadIdx.x; idx < pixels; idx += blockDim.x) {
      lses[idx] = lse[group * s.plane + s.geometry.offset(reader, idx)];
      deltas[idx] = delta[group * s.plane + s.geometry.offset(reader, idx)];
    }
    __syncthreads();
    for (int64_t i = 0; i < pixels; ++i) {
      A score = A(0), dp = A(0);
      for (int64_t c = 0; c < s.d; ++c) {
        score += queries[i * s.d + c] * k_row[c];
        dp += douts[i * s.d + c] * v_row[c];
      }
      const A p = StandardExp()(scale * score - lses[i]);
      const A ds = scale * score_grad(p, dp, deltas[i]);
      for (int64_t c = 0; c < s.d; ++c) {
        acc_v[c] += p * douts[i * s.d + c];
        acc_k[c] += ds * queries[i * s.d + c];
      }
    }
  }
  for (int64_t c = 0; c < s.d; ++c) {
    grad_k[base + c * s.plane + pixel] = static_cast<T>(acc_k[c]);
    grad_v[base + c * s.plane + pixel] = static_cast<T>(acc_v[c]);
  }
}

Shape shape_of(const Operands& o) {
  return {o.geometry, o.d, o.t, o.plane(), o.geometry.regions()};
}

// The kernels' bounds (the Python table's `limits` says the same before dispatching here).
int64_t shared_bytes_of(const Operands& o) {
  const int64_t element = accumulation_dtype(o.q) == at::kDouble ? 8 : 4;
  return (2 * o.geometry.pixels() * o.d + 2 * o.geometry.pixels()) * element;
}

void check_cuda_limits(const Operands& o) {
  TORCH_CHECK(o.d <= kMaxD, "block_sparse_attention (CUDA): at most ", kMaxD, " channels per head, got ", o.d);
  TORCH_CHECK(o.geometry.pixels() <= kMaxPixels, "block_sparse_attention (CUDA): regions of at most ", kMaxPixels,
              " pixels");
  TORCH_CHECK(shared_bytes_of(o) <= kMaxShared, "block_sparse_attention (CUDA): a region's staged tiles need ",
              shared_bytes_of(o), " bytes of shared memory, more than ", kMaxShared);
  TORCH_CHECK(o.groups < 65536, "block_sparse_attention (CUDA): B·heads must be below 65536");
}

dim3 grid_of(const Operands& o) {
  return dim3(static_cast<unsigned>(o.geometry.regions()), static_cast<unsigned>(o.groups));
}

std::tuple<Tensor, Tensor> forward_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                        const Tensor& key_blocks_in, int64_t region_h, int64_t region_w,
                                        double scale) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Operands o = forward_operands(q_in, k_in, v_in, key_blocks_in, region_h, region_w);
  check_cuda_limits(o);
  Tensor out = at::empty_like(o.q);
  Tensor lse = at::empty({q_in.size(0), q_in.size(1), o.geometry.height, o.geometry.width},
                         o.q.options().dtype(accumulation_dtype(o.q)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.q.scalar_type(), "block_sparse_attention_forward_cuda",
                                  [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    forward_kernel<scalar_t, acc_t><<<grid_of(o), static_cast<unsigned>(o.geometry.pixels()), shared_bytes_of(o),
                                      c10::cuda::getCurrentCUDAStream()>>>(
        o.q.const_data_ptr<scalar_t>(), o.k.const_data_ptr<scalar_t>(), o.v.const_data_ptr<scalar_t>(),
        o.key_blocks.const_data_ptr<int64_t>(), shape_of(o), static_cast<acc_t>(scale),
        out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> backward_cuda(const Tensor& grad_out_in, const Tensor& q_in, const Tensor& k_in,
                                                 const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
                                                 const Tensor& key_blocks_in, int64_t region_h, int64_t region_w,
                                                 double scale) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Operands o = backward_operands(grad_out_in, q_in, k_in, v_in, out_in, lse_in, key_blocks_in, region_h,
                                       region_w);
  check_cuda_limits(o);
  const InverseIndex inverse = inverse_index(o.key_blocks, o.groups, o.geometry.regions(), o.t);
  const at::ScalarType acc = accumulation_dtype(o.q);
  const Tensor delta = (o.grad_out.to(acc) * o.out.to(acc)).sum(2).contiguous();  // D = ⟨dout, out⟩
  Tensor grad_q = at::empty_like(o.q), grad_k = at::empty_like(o.k), grad_v = at::empty_like(o.v);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.q.scalar_type(), "block_sparse_attention_backward_cuda",
                                  [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const scalar_t *qp = o.q.const_data_ptr<scalar_t>(), *kp = o.k.const_data_ptr<scalar_t>(),
                   *vp = o.v.const_data_ptr<scalar_t>(), *gp = o.grad_out.const_data_ptr<scalar_t>();
    const acc_t *lp = o.lse.const_data_ptr<acc_t>(), *dp = delta.const_data_ptr<acc_t>();
    const unsigned threads = static_cast<unsigned>(o.geometry.pixels());
    grad_q_kernel<scalar_t, acc_t><<<grid_of(o), threads, shared_bytes_of(o), stream>>>(
        qp, kp, vp, gp, lp, dp, o.key_blocks.const_data_ptr<int64_t>(), shape_of(o), static_cast<acc_t>(scale),
        grad_q.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_kv_kernel<scalar_t, acc_t><<<grid_of(o), threads, shared_bytes_of(o), stream>>>(
        qp, kp, vp, gp, lp, dp, inverse.offsets.const_data_ptr<int64_t>(), inverse.readers.const_data_ptr<int64_t>(),
        shape_of(o), static_cast<acc_t>(scale), grad_k.mutable_data_ptr<scalar_t>(),
        grad_v.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace bsa
}  // namespace sparse_attn

TORCH_LIBRARY_IMPL(sparse_attn, CUDA, m) {
  m.impl("block_sparse_attention_forward", &sparse_attn::bsa::forward_cuda);
  m.impl("block_sparse_attention_backward", &sparse_attn::bsa::backward_cuda);
}
