// Host-side pieces of patch attention shared by its CPU and CUDA launchers: the argument checks
// (the Python wrapper checks the same with friendlier messages; these guard direct calls of
// torch.ops.sparse_attn.*) and the operands made contiguous.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

namespace sparse_attn {
namespace patch {

// The accumulation dtype of the kernels, also that of the key inverse norms and the thresholds.
inline at::ScalarType accumulation_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// M: the key positions over every level.
inline int64_t key_count(at::TensorList keys) {
  int64_t n = 0;
  for (const at::Tensor& k : keys) n += k.size(2) * k.size(3);
  return n;
}

inline void check_operands(const at::Tensor& q, at::TensorList keys, at::TensorList values) {
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
    TORCH_CHECK(keys[l].device() == q.device() && values[l].device() == q.device(),
                "keys, values: expected q's device ", q.device());
  }
}

inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& q, at::TensorList values) {
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == q.size(0) && grad_out.size(1) == values[0].size(1) &&
                  grad_out.size(2) == q.size(2) && grad_out.size(3) == q.size(3) && grad_out.device() == q.device(),
              "patch_attention_backward: grad_out expected (B, Cv, H, W) = (", q.size(0), ", ", values[0].size(1),
              ", ", q.size(2), ", ", q.size(3), ") on ", q.device(), ", got ", grad_out.sizes(), " on ",
              grad_out.device());
}

// The statistics the forward returned, as the backward takes them back.
inline void check_statistics(const at::Tensor& q, int64_t n_keys, const at::Tensor& inverse_norm,
                             const at::Tensor& lse, const at::Tensor& threshold, const at::Tensor& last_kept) {
  const int64_t batch = q.size(0), n_queries = q.size(2) * q.size(3);
  const at::ScalarType acc = accumulation_dtype(q);
  auto check = [&](const at::Tensor& t, const char* name, int64_t count, at::ScalarType dtype) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == batch && t.size(1) == count && t.scalar_type() == dtype &&
                    t.device() == q.device(),
                "patch_attention_backward: ", name, " expected (", batch, ", ", count, ") of ", dtype, " on ",
                q.device(), ", got ", t.sizes(), " of ", t.scalar_type(), " on ", t.device());
  };
  check(inverse_norm, "key_inverse_norm", n_keys, acc);
  check(lse, "lse", n_queries, at::kDouble);
  check(threshold, "threshold", n_queries, acc);
  check(last_kept, "last_kept", n_queries, at::kLong);
}

inline std::vector<at::Tensor> contiguous_all(at::TensorList maps) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : maps) out.push_back(t.contiguous());
  return out;
}

}  // namespace patch
}  // namespace sparse_attn
