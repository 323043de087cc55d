// The last, deterministic step of every CUDA backward that reduces weight gradients: blocks write
// double partial sums into rows of a (rows, total) table, and this sums each column in row order
// (no float atomics, so the result does not depend on scheduling).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace sparse_attn {
namespace {  // each translation unit gets its own copy of the kernel

__global__ void sum_rows_kernel(const double* __restrict__ partials, int64_t rows, int64_t total,
                                double* __restrict__ summed) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= total) return;
  double s = 0;
  for (int64_t row = 0; row < rows; ++row) s += partials[row * total + k];
  summed[k] = s;
}

// summed[k] = Σ_row partials[row][k], in row order; partials: contiguous (rows, total) doubles.
inline at::Tensor sum_partial_rows(const at::Tensor& partials, cudaStream_t stream) {
  const int64_t rows = partials.size(0), total = partials.size(1);
  at::Tensor summed = at::empty({total}, partials.options());
  constexpr int kThreads = 256;
  sum_rows_kernel<<<static_cast<unsigned>((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      partials.const_data_ptr<double>(), rows, total, summed.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return summed;
}

}  // namespace
}  // namespace sparse_attn
