// Host-side argument checks of the top-k channel attention op, shared by its CPU and CUDA
// launchers. The Python wrapper checks the same things with friendlier messages; these guard
// direct calls of torch.ops.sparse_attn.* .
#pragma once

#include <torch/library.h>

#include "common/sparse_channel_attention.h"

namespace sparse_attn {
namespace sca {

inline Branches make_branches(c10::IntArrayRef topk, c10::IntArrayRef activation, int64_t d) {
  TORCH_CHECK(topk.size() >= 1 && topk.size() <= static_cast<size_t>(kMaxBranches),
              "topk: expected 1 to ", kMaxBranches, " branches, got ", topk.size());
  TORCH_CHECK(activation.size() == topk.size(), "activation: expected ", topk.size(),
              " codes (one per branch), got ", activation.size());
  Branches br{};
  br.count = static_cast<int>(topk.size());
  for (int r = 0; r < br.count; ++r) {
    TORCH_CHECK(topk[r] >= 1 && topk[r] <= d, "topk[", r, "] = ", topk[r], " is outside 1..", d);
    TORCH_CHECK(activation[r] == kSoftmax || activation[r] == kRelu2, "activation[", r,
                "]: expected 0 (softmax) or 1 (relu2), got ", activation[r]);
    br.topk[r] = static_cast<int>(topk[r]);
    br.activation[r] = static_cast<int>(activation[r]);
  }
  return br;
}

inline void check_forward_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& temperature, const at::Tensor& weights,
                               int64_t n_branches) {
  TORCH_CHECK(q.dim() == 4, "q: expected (B, heads, d, N), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "k, v: expected the shape of q ",
              q.sizes(), ", got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(temperature.numel() == q.size(1), "temperature: expected ", q.size(1),
              " values (one per head), got ", temperature.numel());
  TORCH_CHECK(weights.numel() == n_branches, "weights: expected ", n_branches,
              " values (one per branch), got ", weights.numel());
  for (const at::Tensor* t : {&k, &v, &temperature, &weights}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "all tensors must have q's dtype ",
                q.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), "all tensors must be on q's device ", q.device(),
                ", got ", t->device());
  }
}

}  // namespace sca
}  // namespace sparse_attn
